"""Prune: slide the sparsity, see the physically smaller model's accuracy, cost and speed."""
from dataclasses import replace

import streamlit as st

from modhifi.options import (COMPONENT_LABELS, LIVE_COMPENSATIONS, METHOD_LABELS, Allocation,
                             Component, Method, Scope, TargetKind, TextCompensation, choices,
                             default_compensation)
from modhifi.prune.plan import TARGET_UNITS
from modhifi.requests import PruneRequest, TextPruneRequest
from modhifi.text.components import target_units
from ui import cache, figures, history, keys, page, sidebar, text_cache, url

OVERSHOOT = 0.02  # say so when the plan removes this much more than asked


def render_text(chosen: cache.Selection) -> None:
    st.title("Prune — ModHiFi-P on a sentence encoder")
    st.write(
        "Move the slider: the same share of every layer's **FFN neurons** (or **attention "
        "heads**) is **physically** removed — the up-projection rows and down-projection "
        "columns of a neuron, the query, key and value rows and output-projection block of a "
        "head — and the layer that read them is **refitted** (least squares on per-token "
        "statistics, bias included) to reproduce its old output. No labels, no training.")
    cols = st.columns(3)
    kind = cols[0].radio("Components", choices(Component), horizontal=True,
                         key=keys.PRUNE_COMPONENTS, format_func=COMPONENT_LABELS.get)
    url.restore(keys.PRUNE_KIND, lambda kind: kind in choices(TargetKind))
    target_kind = cols[0].radio("Target", choices(TargetKind), horizontal=True,
                                key=keys.PRUNE_KIND,
                                format_func={"macs": "share of MACs",
                                             "channels": "share of the components",
                                             "latency": "share of latency"}.get,
                                help="Latency: this device's at batch 64, from one FFN and one "
                                     "attention block timed at candidate counts (the first time "
                                     "takes about half a minute; kept on disk).")
    url.restore(keys.PRUNE_METHOD, lambda name: name in choices(Method))
    method = cols[1].selectbox("Method", choices(Method), format_func=METHOD_LABELS.get,
                               key=keys.PRUNE_METHOD)
    compensation = cols[2].selectbox("Compensation", choices(TextCompensation),
                                     index=choices(TextCompensation).index(
                                         default_compensation(method)),
                                     key=keys.PRUNE_COMPENSATION)
    live, total = text_cache.test_count(chosen.opened)
    full = live == total or cols[2].toggle(f"Evaluate on all {total:,} test quotations (live "
                                           f"numbers use the first {live:,})", key=keys.PRUNE_FULL)
    options = TextPruneRequest(target=0.0, components=kind, target_kind=target_kind,
                               method=method, compensation=compensation)
    target = page.target_slider(cols[0], "Remove", key=keys.PRUNE_TARGET, default=0.3,
                                most=text_cache.most(chosen, options),
                                what=target_units(kind, target_kind))
    if target is None:
        return
    request = replace(options, target=target)
    plan = text_cache.plan(chosen, request)
    result = text_cache.comparison(chosen, request, full)
    cols = st.columns(5)
    cols[0].metric("Embedding cosine", f"{result['embedding_cosine']:.4f}",
                   help=f"Mean over {result['texts']} test quotations of the cosine between the "
                        f"dense and the pruned embedding; 5th percentile "
                        f"{result['embedding_cosine_p5']:.4f}.")
    cols[1].metric("Same nearest neighbour", f"{result['retrieval_agreement']:.1%}",
                   help=f"Recall@10 of the dense nearest neighbour: {result['recall_at_10']:.1%}.")
    cols[2].metric("Category accuracy", f"{result['accuracy_after']:.2%}",
                   f"{(result['accuracy_after'] - result['accuracy_before']) * 100:+.2f} pts")
    cols[3].metric("MACs / sentence", f"{plan.macs_after / 1e6:.0f} M",
                   f"{plan.macs_before / plan.macs_after:.2f}× fewer", delta_color="off",
                   delta_arrow="off")
    cols[4].metric(f"Kept: {COMPONENT_LABELS[kind]}",
                   f"{plan.units_after} / {plan.units_before}")
    if plan.speedup_planned is not None:
        st.caption(f"Predicted speed-up {plan.speedup_planned:.2f}× ({cache.LATENCY_BATCH} "
                   "quotations per batch, this device; one FFN and one attention block timed "
                   "alone at candidate counts): measure it below.")
    speedup = None
    if st.toggle("Measure the real speed-up (batch 64, dense and pruned timed side by side)",
                 key=keys.PRUNE_SPEED):
        before, after = text_cache.speed(chosen, request)
        planned = (f", planned {plan.speedup_planned:.2f}×" if plan.speedup_planned is not None
                   else "")
        st.metric("Sentences per second", f"{after:.0f}", f"{after / before:.2f}× the dense "
                  f"{before:.0f} (MACs ratio {plan.macs_before / plan.macs_after:.2f}×"
                  f"{planned})", delta_color="off")
        speedup = after / before
    history.record({
        "model": chosen.model.spec, "method": method, "target": target,
        "target kind": target_kind, "options": f"{kind}, {compensation}",
        "embedding cosine": round(result["embedding_cosine"], 4),
        "same nearest neighbour": round(result["retrieval_agreement"], 4),
        "accuracy": result["accuracy_after"], "test quotations": result["texts"],
        "MACs": plan.macs_after, "MACs ×": round(plan.macs_before / plan.macs_after, 3),
        "planned speed-up": plan.speedup_planned and round(plan.speedup_planned, 3),
        "measured speed-up": None if speedup is None else round(speedup, 3)})
    st.subheader(f"Kept per layer: {COMPONENT_LABELS[kind]}")
    st.plotly_chart(figures.kept_bars(plan.to_frame(), COMPONENT_LABELS[kind]), width="stretch")

    st.subheader("Try it")
    sentence = st.text_input("Type a sentence: its nearest test quotations, dense and pruned "
                             "side by side", "Computers make very fast, very accurate mistakes.",
                             key=keys.PRUNE_TRY_IT)
    if sentence.strip():
        page.side_by_side(text_cache.try_it(chosen, request, sentence.strip(), full))
    history.show(chosen.model.spec)
    command = request.command(chosen.model.spec, chosen.samples)
    st.caption(f"Save this pruned folder with `{command} --out DIR`; it reloads with `modhifi "
               "info --model DIR` and with sentence-transformers.")


def group_overrides(chosen: cache.Selection,
                    options: PruneRequest) -> tuple[tuple[str, float], ...]:
    """Per-group shares to remove whatever the target, typed into a table of the groups."""
    # The editor keeps edits by row: another model or scope lists other groups in those rows.
    table = (str(chosen.model), options.scope)
    if st.session_state.get(keys.PRUNE_OVERRIDES_FOR, table) != table:
        st.session_state.pop(keys.PRUNE_OVERRIDES, None)
    st.session_state[keys.PRUNE_OVERRIDES_FOR] = table
    with st.expander("Per-group overrides: prune one group more or less than the target"):
        st.caption("Type a share to remove for a group; the other groups are pruned as far as "
                   "the target still needs. Leave it blank to follow the target.")
        groups = cache.group_table(chosen, options)
        edited = st.data_editor(
            groups, key=keys.PRUNE_OVERRIDES, hide_index=True, width="stretch",
            disabled=["group", "layers", "channels"],
            column_config={"remove": st.column_config.NumberColumn(
                "remove (share)", min_value=0.0, max_value=0.95, step=0.05, format="%.2f")})
    return tuple((group, float(share)) for group, share in zip(edited["group"], edited["remove"])
                 if share == share and share is not None)  # NaN and None: follow the target


def architecture(chosen: cache.Selection, request: PruneRequest) -> None:
    st.subheader("The architecture")
    st.caption("Every convolution and linear layer left to right in the order the forward pass "
               "calls them. Layers outlined in one colour write channels that must be removed "
               "together (a residual stream is one such group); the arcs show where those "
               "channels are read. Hover a layer for its shape, MACs and what the plan does to "
               "it.")
    cols = st.columns(2)
    alone = cols[0].toggle("Sensitivity: prune each group alone", key=keys.PRUNE_ALONE,
                           help="Accuracy on the live test images when only that group is "
                                "pruned as in the plan above (one model per group).")
    timing = cols[1].toggle("Time each layer (batch 64)", key=keys.PRUNE_LAYER_TIME)
    nodes, edges = cache.layers(chosen, request, sensitivity=alone, timing=timing)
    shown = [c for c in figures.ARCHITECTURE_COLOURS
             if c in nodes and (c != "alone" or alone) and (c != "ms" or timing)]
    colour = st.radio("Colour", shown, key=keys.PRUNE_COLOUR, horizontal=True,
                           format_func=figures.ARCHITECTURE_COLOURS.get)
    st.plotly_chart(figures.architecture(nodes, edges, colour or "kept"), width="stretch")
    if timing:
        timed = cache.layer_latency(chosen.opened)
        st.caption(f"Eager forward of a random batch of {timed.batch_size} on {timed.device}: "
                   f"{timed.forward_ms:.1f} ms, of which the layers drawn take "
                   f"{nodes['ms'].sum():.1f} ms (median of {timed.repeats}, the dense model).")


def render() -> None:
    chosen = sidebar.selection()
    if sidebar.is_text(chosen):
        render_text(chosen)
        return
    st.title("Prune — ModHiFi-P")
    st.write(
        "Move the slider: the model is **physically** cut (channels removed from the weights, so "
        "fewer MACs and really faster), the layers that read the removed channels are "
        "**compensated** (the kept inputs are refitted to reproduce the old output), and "
        "**BatchNorm statistics are recalibrated** on unlabeled images — no labels, no training.")
    with st.expander("Why compensation and BatchNorm recalibration matter"):
        st.write("Removing inputs shifts every output's mean and scale; BatchNorm then normalises "
                 "with stale statistics, which alone can ruin accuracy. Recalibration re-estimates "
                 "them; compensation re-weights the kept inputs so that each output is as close as "
                 "possible to the original (least squares on the input statistics):")
        st.latex(r"\delta^*_C = \mathbf{1} + Q_c[C,C]^{-1} Q_c[C,\bar C]\,\mathbf{1}"
                 r"\quad\text{(rescale)},\qquad W'_C = (H_{CC}+\lambda I)^{-1} H_{C,:}\,w"
                 r"\quad\text{(refit)}")

    cols = st.columns(3)
    url.restore(keys.PRUNE_KIND, lambda kind: kind in choices(TargetKind))
    kind = cols[0].radio("Target", ("macs", "channels", "latency"), horizontal=True,
                         key=keys.PRUNE_KIND,
                         format_func={"macs": "share of MACs", "channels": "share of channels",
                                      "latency": "share of latency"}.get,
                         help="Latency: this device's at batch 64, from each layer timed once at "
                              "candidate widths (the first time takes a few seconds; kept on "
                              "disk).")
    url.restore(keys.PRUNE_METHOD, lambda name: name in choices(Method))
    method = cols[1].selectbox("Method", choices(Method), format_func=METHOD_LABELS.get,
                              key=keys.PRUNE_METHOD)
    allocation = cols[1].radio("Allocation", choices(Allocation), horizontal=True,
                               key=keys.PRUNE_ALLOCATION)
    scope = cols[1].radio("Channels", choices(Scope), horizontal=True, key=keys.PRUNE_SCOPE,
                          format_func={"all": "all groups", "internal": "inside blocks"}.get,
                          help="Inside blocks: channels that residual additions share stay whole.")
    round_to = cols[1].select_slider(
        "Keep multiples of", (1, 8, 16), value=8, key=keys.PRUNE_ROUND_TO,
        help="Channels kept per group are rounded up to this multiple: vector units run whole "
             "blocks of 8 (16 on AVX-512 CPUs) at full speed.")
    compensation = cols[2].selectbox(
        "Compensation", LIVE_COMPENSATIONS, key=keys.PRUNE_COMPENSATION,
        help="refit: least squares of each output from the dense model's statistics. rescale: "
             "the paper's per-channel δ*. The sequential refit (the command line's default where "
             "its recordings fit in memory) refits layer by layer on the pruned network's own "
             "inputs: more accurate (about half the accuracy lost at 2-3× fewer MACs) but "
             "seconds, so it is a comparison below the refit's numbers, not a slider setting.")
    if cache.has_batchnorm(chosen.opened):
        recalibrate = cols[2].toggle("Recalibrate BatchNorm", True, key=keys.PRUNE_RECALIBRATE)
    else:
        recalibrate = False
        cols[2].caption("No BatchNorm in this model (LayerNorm normalises each sample by "
                        "itself): nothing to recalibrate.")
    live, total = cache.test_images(chosen.opened)
    full = live == total or st.toggle(f"Evaluate on all {total:,} test images (live numbers use "
                                      f"the first {live:,})", key=keys.PRUNE_FULL)

    options = PruneRequest(target=0.0, target_kind=kind, allocation=allocation, method=method,
                           scope=scope, round_to=round_to, compensation=compensation,
                           recalibrate=recalibrate)
    options = replace(options, overrides=group_overrides(chosen, options))
    target = page.target_slider(cols[0], "Remove", key=keys.PRUNE_TARGET, default=0.5,
                                most=cache.most(chosen, options), what=TARGET_UNITS[kind])
    if target is None:
        return
    request = replace(options, target=target)
    plan = cache.plan(chosen, request)
    before = cache.evaluation(chosen.opened, full=full)
    after = cache.pruned_evaluation(chosen, request, full=full)
    cols = st.columns(4)
    cols[0].metric("Accuracy", f"{after.accuracy:.2%}", f"{(after.accuracy - before.accuracy) * 100:+.2f} pts")
    cols[1].metric("MACs / image", f"{plan.macs_after / 1e6:.2f} M", f"{plan.speedup_macs:.2f}× fewer",
                   delta_color="off", delta_arrow="off")
    cols[2].metric("Parameters", f"{plan.params_after / 1e3:.1f} k",
                   f"{plan.params_after / plan.params_before - 1:+.0%}", delta_color="off",
                   delta_arrow="off")
    cols[3].metric("Channels kept", f"{plan.channels_after} / {plan.channels_before}")
    what = f"of the {TARGET_UNITS[kind]}"
    if full:
        seen = f"all {total:,} test images"
    else:  # the same images as after; the Overview's figure is on all of them
        seen = (f"the first {live:,} of {total:,} test images, the same as after (on all of "
                f"them, as on the Overview: {cache.evaluation(chosen.opened).accuracy:.2%})")
    planned = ""
    if plan.speedup_planned is not None:
        planned = (f" Predicted speed-up {plan.speedup_planned:.2f}× ({cache.LATENCY_BATCH} images "
                   "per batch, this device; each layer timed alone at candidate widths, the "
                   "rest of the pass scaled by the activations kept): measure it below.")
    st.caption(f"Before: {before.accuracy:.2%} on {seen}. Asked to remove {target:.0%} {what}; "
               f"the plan removes {plan.achieved:.1%}.{planned}")
    if plan.achieved > target + OVERSHOOT:
        st.info(f"The plan removes {plan.achieved:.1%} {what}, more than the {target:.0%} asked: "
                f"kept channels are rounded up to multiples of {round_to} per group, and the "
                "smallest groups cannot shrink by less than one multiple. Choose multiples of 1 "
                "for exact counts.")

    if compensation == "refit" and st.toggle(
            "Compare with the sequential refit: each layer refitted in turn on the pruned "
            "network's own inputs (seconds, not a slider move)", key=keys.PRUNE_SEQUENTIAL):
        sequential = cache.pruned_evaluation(chosen, replace(request, compensation="sequential"),
                                             full=full)
        st.metric("Accuracy, sequential refit", f"{sequential.accuracy:.2%}",
                  f"{(sequential.accuracy - after.accuracy) * 100:+.2f} pts against the refit",
                  help="The command line's default where it fits: the same plan, each "
                       "consumer fitted by least squares of the dense output on the inputs it "
                       "receives in the pruned network, BatchNorm re-estimated before each.")

    speedup = None
    if st.toggle("Measure the real speed-up (batch 64, dense and pruned timed side by side)",
                 key=keys.PRUNE_SPEED):
        dense, small = cache.pruned_latency(chosen, request)
        speedup = dense.optimised.median_ms / small.optimised.median_ms
        cols = st.columns(4)
        cols[0].metric("Latency, optimised", f"{small.optimised.median_ms:.2f} ms",
                       f"{dense.optimised.median_ms / small.optimised.median_ms:.2f}× faster",
                       help="BatchNorm folded, frozen TorchScript; the MACs ratio is the ideal.")
        cols[1].metric("Latency, eager", f"{small.eager.median_ms:.2f} ms",
                       f"{dense.eager.median_ms / small.eager.median_ms:.2f}× faster")
        cols[2].metric("Ideal (MACs ratio)", f"{plan.speedup_macs:.2f}×")
        if plan.speedup_planned is not None:
            cols[3].metric("Planned (cost model)", f"{plan.speedup_planned:.2f}×",
                           help="What the latency cost model predicted before the cut.")
        st.caption(f"{dense.device}, median of {dense.eager.repeats} runs after {dense.eager.warmup} warm-up.")

    history.record({
        "model": chosen.model.spec, "method": method, "target": target, "target kind": kind,
        "options": f"{allocation}, {scope}, ×{round_to}, {compensation}"
                   f"{', BN recalibrated' if recalibrate else ''}"
                   + "".join(f", {group} −{share:.0%}" for group, share in request.overrides),
        "accuracy": after.accuracy, "test images": after.samples, "MACs": plan.macs_after,
        "MACs ×": round(plan.speedup_macs, 3), "parameters": plan.params_after,
        "planned speed-up": plan.speedup_planned and round(plan.speedup_planned, 3),
        "measured speed-up": None if speedup is None else round(speedup, 3)})

    architecture(chosen, request)  # kept share per layer, in forward order, readable names

    model_bytes, removed_json, removed_csv = cache.pruned_download(chosen, request)
    stem = page.download_stem(chosen.model, f"pruned-{method}-{kind}{target:.2f}")
    cols = st.columns(3)
    cols[0].download_button("Pruned model (.pt)", model_bytes, f"{stem}.pt",
                            key=keys.PRUNE_DOWNLOAD_MODEL)
    cols[1].download_button("Removed channels (JSON)", removed_json, f"{stem}.channels.json",
                            key=keys.PRUNE_DOWNLOAD_JSON)
    cols[2].download_button("Removed channels (CSV)", removed_csv, f"{stem}.channels.csv",
                            key=keys.PRUNE_DOWNLOAD_CSV)
    st.caption(f"The .pt file reloads with `python -m modhifi info --model {stem}.pt`.")

    picked = history.show(chosen.model.spec, "and to mark them on the curve below")

    st.subheader("Accuracy against sparsity")
    if st.toggle("Show the curve for ModHiFi and the baselines (computed once per model)",
                 key=keys.PRUNE_CURVE):
        curve = cache.sparsity_curve(chosen, kind)
        if curve.empty:
            st.info(f"None of the curve's targets ({', '.join(map(str, cache.CURVE_TARGETS))} "
                    f"of the {TARGET_UNITS[kind]}) is within reach of this model here.")
            return
        here = cache.pruned_evaluation(chosen, request, full=live == total)  # the curve's images
        live_runs = picked[picked["test images"] == live] if len(picked) else picked
        st.plotly_chart(figures.sparsity_curve(
            curve, here=(plan.speedup_macs, here.accuracy),
            pinned=[(f"run {r['run']}", r["MACs ×"], r["accuracy"])
                    for r in live_runs.to_dict("records")]), width="stretch")
        st.caption(f"First {live:,} test images; baselines with BatchNorm recalibration and no "
                   "compensation. The star is the plan above, on the same images.")


page.guarded(render)
