"""Theory: check the two theories the method rests on, on the chosen model."""
import math

import streamlit as st

from ui import cache, figures, keys, page, sidebar


def render() -> None:
    chosen = sidebar.selection()
    st.title("Theory — from local to global")
    if sidebar.is_text(chosen):
        st.info(f"{chosen.model.spec}: the theory checks run on the image models for now; the "
                "Fidelity and Prune pages work for this text model.")
        return
    st.write(
        "ModHiFi judges channels **locally**, one layer at a time. The paper's main theorem says a "
        "small local error stays small at the output: the global error is at most C_l² times the "
        "local one, with C_l the product of the Lipschitz constants of the layers after l. Here "
        "you can check how loose that worst case is next to what actually happens.")
    with st.expander("The bound"):
        st.latex(r"\mathbb{E}\|f(x) - f_m(x)\|^2 \;\le\; C_l^2 \sum_c (1-m)^\top Q_c (1-m),"
                 r"\qquad C_l = \prod_{k>l} \mathrm{Lip}(g_k)")
        st.write("Lipschitz constants: the largest singular value of each conv/linear operator at "
                 "its true input size (power iteration), |γ|/σ for BatchNorm, 1 for ReLU; a residual "
                 "block contributes Lip(branch) + Lip(shortcut).")

    layers = list(cache.analysis(chosen).fidelity)
    layer = st.selectbox("Layer whose inputs are masked", layers,
                         index=min(len(layers) - 1, len(layers) // 2), key=keys.THEORY_LAYER)
    result = cache.local_global(chosen, layer)
    cols = st.columns(3)
    cols[0].metric("Fitted global / local", f"{result.fitted_ratio:.3g}")
    cols[1].metric("Worst global / local", f"{result.worst_ratio:.3g}")
    squared, kind = result.bound_constant ** 2, result.bound_kind  # NaN where unavailable
    # What C_l is for each kind of network (`theory.lipschitz`)
    line = {"composition": "The red line is the theorem's worst case (C_l composed along the "
                           "network, branch and shortcut in residual blocks): every point lies "
                           f"below it, {squared / result.fitted_ratio:.3g}× above the fitted "
                           "ratio.",
            "sequential": "The red line is C_l² from the product of the constants of the modules "
                          "after the layer, in forward order: a heuristic, not a bound, where the "
                          "network branches.",
            "unavailable": "No red line: a module after this layer (LayerNorm, attention) has no "
                           "known Lipschitz constant, so the theorem gives no bound here."}[kind]
    cols[2].metric("Bound's C_l²", "—" if kind == "unavailable" else f"{squared:.3g}", help=line)
    st.plotly_chart(figures.local_global(
        result.to_frame(), result.fitted_ratio, None if kind == "unavailable" else squared,
        bound_name="bound" if kind == "composition" else "heuristic"), width="stretch")
    st.caption("Each point is one mask over the layer's input channels (random, or the HiFi set of "
               "that size); global error measured on the calibration images, logits, no "
               f"recalibration. {line}")

    st.subheader("Feature extractor: invariance grows with depth")
    st.write("Wiatowski & Bölcskei: with Lipschitz non-linearities and pooling, deeper features "
             "change less under small translations and smooth deformations. Below, the relative "
             "change of each layer's output for 1–4 pixel shifts and small deformations, in the "
             "dense model and in the model pruned to half its MACs (or as far as the model "
             "allows: the legend says).")
    st.plotly_chart(figures.invariance(cache.invariance(chosen)),
                    width="stretch")

    st.subheader("Do HiFi sets exist?")
    existence = cache.hifi_existence(chosen)
    trained, untrained = existence.share("trained"), existence.share("untrained")
    compared = not math.isnan(untrained)  # a zoo model's architecture is rebuilt untrained
    cols = st.columns(2)
    cols[0].metric("Layers where < 20% of inputs reach fidelity 0.8 (trained)", f"{trained:.0%}")
    cols[1].metric("…the same architecture untrained", f"{untrained:.0%}" if compared else "—",
                   help=None if compared else "Only for the zoo's models: a checkpoint's "
                   "network is not rebuilt untrained here.")
    st.write("The paper's first observation: in trained networks a few inputs explain most of an "
             "output; untrained networks lack that structure. Bars: the median over output "
             "channels of the smallest share of inputs reaching fidelity 0.8, by the top-k of "
             "singleton fidelity and by the best of several random subsets.")
    if compared and trained <= untrained:
        st.warning("On this model the observation does not hold: the untrained network has as "
                   "many layers with small HiFi sets as the trained one (small layers, where a "
                   "few inputs are a large share, make both look alike). The bars show it as "
                   "measured.")
    st.plotly_chart(figures.hifi_existence(existence.to_frame()), width="stretch")


page.guarded(render)
