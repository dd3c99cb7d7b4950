"""Fidelity: which input channels of every layer carry its output, and what the method keeps."""
import streamlit as st

from modhifi.options import COMPONENT_LABELS, Component, choices
from modhifi.requests import PruneRequest, TextPruneRequest
from ui import cache, figures, keys, page, sidebar, text_cache


def render_text(chosen: cache.Selection) -> None:
    st.title("Fidelity — which neurons and heads matter")
    st.write(
        "In a transformer layer the FFN's **neurons** are the inputs of its down-projection, and "
        "each **attention head** is a block of inputs of the attention output projection. Each "
        "adds a contribution to every output feature; the **singleton fidelity** of a component "
        "is the share of an output's energy it alone explains once optimally rescaled (the "
        "squared cosine of the two), here the best over the layer's outputs. **Greedy "
        "selection** keeps first the component that adds the most refit fidelity given those "
        "already kept: that is the order along each row.")
    st.caption(f"Per-token statistics of {chosen.samples} unlabeled calibration quotations (or "
               "all of the split if fewer), padding masked; no labels, no gradients.")
    cols = st.columns(3)
    kind = cols[0].radio("Components", choices(Component), horizontal=True,
                         key=keys.FIDELITY_COMPONENTS, format_func=COMPONENT_LABELS.get)
    score = cols[1].radio("Colour", list(figures.SCORE_LABELS), horizontal=True,
                          key=keys.FIDELITY_SCORE, format_func=figures.SCORE_LABELS.get)
    target = page.target_slider(
        cols[2], "Share removed (to mark kept / removed)", key=keys.FIDELITY_TARGET, default=0.3,
        most=text_cache.most(chosen, TextPruneRequest(target=0.0, components=kind)),
        what=COMPONENT_LABELS[kind])
    if target is None:
        return
    table = text_cache.score_map(chosen, kind, target)
    st.plotly_chart(figures.channel_heatmap(table, score), width="stretch")
    st.dataframe(table.sort_values(["layer", "priority"]), hide_index=True)


def render() -> None:
    chosen = sidebar.selection()
    if sidebar.is_text(chosen):
        render_text(chosen)
        return
    st.title("Fidelity — which channels matter")
    st.write(
        "Each input channel *i* of a layer adds a **contribution** to every output channel *c*. "
        "The **singleton fidelity** of *i* is the share of output *c*'s energy that channel *i* "
        "alone explains once optimally rescaled (the squared cosine between the two); a small "
        "**HiFi set** of channels usually explains most of an output. ModHiFi keeps a channel if it "
        "is in the HiFi set of at least one output it feeds.")
    with st.expander("The formulas"):
        st.latex(r"A_{ci} = \Phi_i \star W_{ci},\quad Y_c = \sum_i A_{ci},\quad "
                 r"Q_c[i,j] = \mathbb{E}\langle A_{ci}, A_{cj}\rangle")
        st.latex(r"FS_c(C) = \max_\delta\ 1 - \frac{\mathbb{E}\|Y_c - \sum_{i\in C}\delta_i A_{ci}\|^2}"
                 r"{\mathbb{E}\|Y_c\|^2},\qquad s_{ci} = FS_c(\{i\}) = "
                 r"\frac{(Q_c\mathbf{1})_i^2}{Q_c[i,i]\;\mathbf{1}^\top Q_c \mathbf{1}}")
        st.write("Saliency share: r_ci / E‖Y_c‖² with r_ci = (Q_c 1)_i, the part of output c that "
                 "channel i accounts for; it sums to one over the inputs.")
    st.caption(f"Statistics from {chosen.samples} unlabeled calibration images; no labels, no gradients.")

    left, right = st.columns([2, 1])
    score = left.radio("Colour", list(figures.SCORE_LABELS), horizontal=True, key=keys.FIDELITY_SCORE,
                       format_func=figures.SCORE_LABELS.get)
    target = page.target_slider(right, "Channels removed (to mark kept / removed)",
                                key=keys.FIDELITY_TARGET, default=0.5, what="channels",
                                most=cache.most(chosen, PruneRequest(target=0.0)))
    if target is None:
        return
    table = cache.channel_table(chosen, target)
    hifi = cache.hifi_table(chosen)
    share = float((hifi["hifi_share"] < 0.2).mean())
    st.metric("Layers where fewer than 20% of inputs reach fidelity ≥ 0.8", f"{share:.0%}",
              help="Per layer: the median over output channels of the smallest HiFi set reaching "
                   "subset fidelity 0.8, as a share of the inputs (the paper's first observation).")
    st.plotly_chart(figures.channel_heatmap(table, score), width="stretch")

    st.subheader("One layer, one output channel")
    shapes = dict(zip(hifi["layer"], hifi["shape"]))  # forward order
    layer = st.selectbox("Layer", list(shapes), key=keys.FIDELITY_LAYER,
                         format_func=lambda name: f"{name} · {shapes[name]}")
    matrix = cache.layer_scores(chosen, layer)[score]
    out = st.number_input("Output channel", 0, matrix.shape[0] - 1, 0, key=keys.FIDELITY_OUTPUT)
    left, right = st.columns(2)
    left.plotly_chart(figures.layer_heatmap(matrix, score, layer), width="stretch")
    right.plotly_chart(figures.fidelity_curve(cache.fidelity_curve(chosen, layer, int(out))),
                       width="stretch")
    channel_card(chosen, layer, int(matrix.shape[1]))

    st.subheader("Every layer: how small its HiFi sets are")
    st.dataframe(hifi, hide_index=True, column_config={
        "hifi_share": st.column_config.ProgressColumn(
            "smallest HiFi set reaching 0.8 (share of inputs)", min_value=0, max_value=1,
            format="percent")})


def channel_card(chosen: cache.Selection, layer: str, inputs: int) -> None:
    """Why one input channel of the chosen layer matters."""
    st.subheader("Why a channel matters")
    page.lower_to(keys.FIDELITY_CHANNEL, inputs - 1)
    channel = int(st.number_input(f"Input channel of {layer}", 0, inputs - 1, 0,
                                  key=keys.FIDELITY_CHANNEL))
    shown = cache.channel_card(chosen, layer, channel)
    cols = st.columns(3)
    cols[0].metric("Output error without it, refitted", f"{shown.error_refit:.2%}",
                   help="Σ_c E‖ΔY_c‖² / Σ_c E‖Y_c‖² of this layer's outputs on the calibration "
                        "images, once the other inputs are refitted to make up for it.")
    cols[1].metric("…and not compensated", f"{shown.error_removed:.2%}")
    cols[2].metric("Rank in its group (ModHiFi)",
                   f"{shown.ranks['modhifi']} of {shown.group_size}",
                   help=f"Group {shown.group}: the channels removed together with this one in "
                        "every layer that makes or reads them. Rank 1 is kept first.")
    left, right = st.columns(2)
    left.caption("Its rank by every criterion (1 = kept first)")
    left.dataframe(shown.ranks_frame(), hide_index=True)
    right.caption("The outputs it explains best: singleton fidelity and share of each output")
    right.dataframe(shown.feeds, hide_index=True)
    greedy_card(chosen, layer, channel, shown.ranks["modhifi-greedy"])
    st.caption("The calibration images that drive it hardest (top) and the channel over each of "
               "them as this layer reads it (bottom): what the channel responds to.")
    st.plotly_chart(figures.channel_drivers(shown.images, shown.maps, shown.strength),
                    width="stretch")
    if st.toggle("Remove only this channel and measure the accuracy (refit, BatchNorm "
                 "recalibrated)", key=keys.FIDELITY_REMOVE_ONE):
        before = cache.evaluation(chosen.opened, full=False)
        after = cache.without_channel(chosen, layer, channel)
        st.metric("Accuracy without it", f"{after.accuracy:.2%}",
                  f"{(after.accuracy - before.accuracy) * 100:+.2f} pts",
                  help=f"On the first {after.samples:,} test images, as on the Prune page.")


def greedy_card(chosen: cache.Selection, layer: str, channel: int, place: int) -> None:
    """Why greedy subset fidelity keeps (or drops) the channel: what each channel of its group
    added, in the order the greedy chose them, beside the paper's union-rule rank."""
    steps = cache.greedy_steps(chosen, layer, channel)
    mine = steps.iloc[place - 1]
    with st.expander(f"Greedy selection: channel {channel} is added at step {place} of "
                     f"{len(steps)}, raising the group's fidelity by {mine['gain']:.2%}"):
        st.write("Greedy subset fidelity adds, one at a time, the channel that most raises the "
                 "refit fidelity of every output of every layer reading this group, given the "
                 "channels already kept: a channel that only repeats kept ones adds little, "
                 "however high its own fidelity. **gain**: what the channel added (mean over "
                 "those outputs); **fidelity**: the group's mean fidelity with the channels up "
                 "to it kept; **union rank**: its place in the paper's union of HiFi sets.")
        st.dataframe(steps, hide_index=True, column_config={
            "gain": st.column_config.NumberColumn(format="percent"),
            "fidelity": st.column_config.ProgressColumn("fidelity", min_value=0, max_value=1,
                                                        format="percent"),
            "union_rank": "union rank"})


page.guarded(render)
