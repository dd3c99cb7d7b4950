"""Overview: the chosen model's accuracy, cost and measured speed."""
import pandas as pd
import streamlit as st

from ui import cache, figures, keys, page, sidebar, text_cache


def render_text(opened: cache.Opened) -> None:
    chosen = text_cache.subject(opened)
    st.title(f"Overview — {chosen.name}")
    numbers, parts = text_cache.overview(opened)
    st.write(f"**{chosen.name}**: a pretrained sentence encoder nobody here trained, on real "
             f"English text: {numbers['texts']:,} test quotations of Debian's *fortunes* in "
             f"{len(chosen.corpus.categories)} categories. A sentence's embedding is the mean of its "
             "tokens' last hidden states; a linear **probe** trained on the dense model's "
             "embeddings of the train quotations names each quotation's category.")
    cols = st.columns(3)
    cols[0].metric("Category accuracy (probe)", f"{numbers['accuracy']:.2%}")
    cols[1].metric("MACs / sentence", f"{numbers['macs'] / 1e6:.1f} M",
                   help="Mean over the test quotations at their own token lengths.")
    cols[2].metric("Parameters", f"{numbers['params'] / 1e6:.2f} M")
    left, right = st.columns(2)
    left.subheader("Per-category accuracy")
    left.plotly_chart(figures.class_bars(pd.DataFrame({
        "category": list(numbers["per_category"]),
        "accuracy": list(numbers["per_category"].values())}), x="category"), width="stretch")
    right.subheader("Where the parameters and MACs are")
    right.dataframe(parts, hide_index=True, column_config={
        "params": st.column_config.NumberColumn("parameters", format="localized"),
        "macs": st.column_config.NumberColumn("MACs / sentence", format="localized"),
        "macs_share": st.column_config.ProgressColumn("MACs share", format="percent",
                                                      min_value=0, max_value=1)})
    share = dict(zip(parts["part"], parts["macs_share"]))
    right.caption(f"Embeddings are a lookup: parameters without MACs. The FFN does "
                  f"{share.get('FFN', 0):.0%} of the MACs and the attention projections "
                  f"{share.get('attention projections', 0):.0%}: their neurons and heads are what "
                  "the Prune page removes.")


def guided_start(model: str) -> None:
    """Three steps for a first look (or a lecture), each a link to the page set up for it (a
    zoo model named in it, so that it opens the same in another session; a checkpoint is not:
    its path is the server's)."""
    named = {"model": model} if sidebar.is_zoo(model) else {}
    with st.container(border=True):
        st.markdown("**A first look in three steps**")
        st.page_link("pages/fidelity.py", icon=":material/looks_one:",
                     label="Which channels matter: each row of the heatmap is a layer, its "
                           "bright cells the few input channels that explain the outputs.")
        st.page_link("pages/prune.py", icon=":material/looks_two:",
                     query_params={**named, "kind": "macs", "target": "0.5",
                                   "method": "modhifi-greedy"},
                     label="Prune half the MACs, then set Compensation to none and turn "
                           "BatchNorm recalibration off: watch what each one saves.")
        st.page_link("pages/prune.py", icon=":material/looks_3:",
                     query_params={**named, "kind": "macs", "target": "0.5",
                                   "method": "l1"},
                     label="The same cut chosen by weight size (L1), the usual baseline: "
                           "compare the accuracy, and the curve at the bottom of the page.")


def render() -> None:
    selection = sidebar.selection()
    if sidebar.is_text(selection):
        render_text(selection.opened)
        return
    opened = selection.opened
    chosen = cache.subject(opened)
    st.title(f"Overview — {chosen.loaded.name}")
    if not chosen.loaded.trained:
        st.warning("Untrained network: fit for speed exploration only.")
    st.write(f"**{chosen.loaded.arch}**, trained on **{chosen.dataset.name}** "
             f"({len(chosen.dataset.test):,} test images). A model's *cost* is its multiply-"
             "accumulates (MACs) per image and its parameter count; *latency* is the measured "
             "time of one forward pass of a batch.")
    guided_start(selection.model.spec)
    result, cost = cache.evaluation(opened), cache.cost(opened)
    batch = st.select_slider("Latency batch size", (1, 16, 64, 256), value=64, key=keys.OVERVIEW_BATCH)
    timing = cache.latency(opened, batch)
    cols = st.columns(4)
    cols[0].metric("Test accuracy", f"{result.accuracy:.2%}")
    cols[1].metric("MACs / image", f"{cost.macs / 1e6:.2f} M")
    cols[2].metric("Parameters", f"{cost.params / 1e3:.1f} k")
    cols[3].metric(f"Latency (batch {batch})", f"{timing.optimised.median_ms:.2f} ms",
                   help=f"Frozen TorchScript, BatchNorm folded; eager: "
                        f"{timing.eager.median_ms:.2f} ms. {timing.device}, median of "
                        f"{timing.optimised.repeats} after {timing.optimised.warmup} warm-up runs.")
    left, right = st.columns(2)
    left.subheader("Per-class accuracy")
    left.plotly_chart(figures.class_bars(result.to_frame(chosen.dataset.classes)),
                      width="stretch")
    right.subheader("Where the MACs go")
    right.dataframe(cost.to_frame(), hide_index=True, column_config={
        "macs": st.column_config.NumberColumn("MACs / image", format="localized"),
        "share": st.column_config.ProgressColumn("share", format="percent", min_value=0, max_value=1)})


page.guarded(render)
