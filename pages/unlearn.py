"""Unlearn: make the model forget one class without fine-tuning, and audit what remains."""
import streamlit as st

from modhifi.audit import Audit
from modhifi.options import Edit, choices
from modhifi.requests import TextUnlearnRequest, UnlearnRequest
from ui import cache, figures, keys, page, sidebar, text_cache

# Below this share of unchanged other-class predictions (calibration images) the page warns: the
# zoo's Fashion-MNIST CNNs keep 0.86-0.99 on every class, the ViT 0.73-0.95, digits-cnn 0.32 on
# "0" (docs/benchmarks/unlearn_*.csv).
LOW_AGREEMENT = 0.8
# The text page opens on "art": forgotten to 1.1% with the other categories +0.1 points on average
# (docs/benchmarks/text_forget_minilm-l6.csv).
DEFAULT_TEXT_CATEGORY = 0
TRY_IT_SENTENCE = ("Every artist dips his brush in his own soul, and paints his own nature into "
                   "his pictures.")


def audit_metrics(before: Audit, after: Audit) -> None:
    """The four figures of the audit, after the edit, with their change."""
    cols = st.columns(4)
    cols[0].metric("Forget accuracy", f"{after.forget_accuracy:.1%}",
                   f"{(after.forget_accuracy - before.forget_accuracy) * 100:+.1f} pts")
    cols[1].metric("Retain accuracy", f"{after.retain_accuracy:.2%}",
                   f"{(after.retain_accuracy - before.retain_accuracy) * 100:+.2f} pts")
    cols[2].metric("Membership attack AUC", f"{after.mia_auc:.3f}",
                   f"{after.mia_auc - before.mia_auc:+.3f}", delta_color="off", delta_arrow="off",
                   help="0.5 = the attacker cannot tell members from non-members.")
    cols[3].metric("Probe accuracy, forget class", f"{after.probe_forget_accuracy:.1%}",
                   f"{(after.probe_forget_accuracy - before.probe_forget_accuracy) * 100:+.1f} pts",
                   delta_color="off", delta_arrow="off")


def render_text(opened: cache.Opened) -> None:
    st.title("Unlearn — ModHiFi-U on a sentence encoder")
    categories = list(text_cache.subject(opened).corpus.categories)
    st.write(
        "Pick a fortunes category to forget. The page reads the calibration quotations of that "
        "category and a sample of all of them (their categories unread), finds the direction "
        "of the last layer's FFN inputs that tells the category's quotations apart, and turns "
        "one FFN neuron of that layer (the one the layer misses least) into a **gate**: it "
        "fires only on tokens that look like the category and then moves them against the "
        "category's offset of the residual stream. Other quotations' tokens stay below its "
        "threshold and are left alone. No gradients, no fine-tuning; the category probe on top "
        "is unchanged.")
    with st.expander("The edit, and how its threshold and strength are chosen"):
        st.latex(r"s(x) = v^\top (x - m),\quad v \propto (\Sigma + \lambda I)^{-1}(m_f - m),"
                 r"\qquad h' = h - \alpha\, d\, \varphi\big(\kappa\,(s(x) - \tau)/\sigma\big)"
                 r"\,\sigma/\kappa,\quad d = \bar h_f - \bar h")
        st.write("x: a token's FFN input; m, Σ: mean and covariance of the quotations' mean FFN "
                 "inputs, m_f over the forgotten category; d: its offset of the residual "
                 "stream h; φ: the layer's activation (GELU); τ: a quantile of the other "
                 "quotations' token scores, σ their spread. The neuron's up-projection row "
                 "becomes κv/σ, its down-projection column −αdσ/κ, and what it gave on average "
                 "moves into the bias. For each threshold tried, α is the smallest that takes "
                 "the category's calibration quotations below the target; the page keeps the "
                 "threshold that leaves most other quotations' predictions unchanged. Both "
                 "figures are judged with a gate fitted without the quotation (5 folds), so the "
                 "choice is not flattered by quotations the gate has seen.")
    with st.form(keys.UNLEARN_FORM, border=False):
        cols = st.columns(2)
        category = page.class_picker(cols[0], "Forget category", categories,
                                     key=keys.UNLEARN_CLASS, default=DEFAULT_TEXT_CATEGORY)
        target = cols[1].number_input(
            "Forget target (calibration accuracy)", 0.0, 0.5, 0.0, 0.01, key=keys.UNLEARN_TARGET,
            help="What the strength aims for on the category's calibration quotations.")
        st.form_submit_button("Forget", type="primary", key=keys.UNLEARN_SUBMIT)
    request = TextUnlearnRequest(category=category, target=target)
    result = text_cache.forgotten(opened, request)
    audit_metrics(result.before, result.after)
    plan = result.plan
    agreement = plan.calibration_retain_agreement
    st.caption(f"Neuron {plan.neuron} of {plan.layer.ffn_down} made a gate at the "
               f"{plan.gate.quantile:.0%} quantile, strength α = {plan.strength:.2f}; "
               f"{plan.calibration_forget_accuracy:.1%} of the category's calibration quotations "
               "still recognised (cross-fitted)"
               + ("" if agreement is None else f", {agreement:.1%} of the others' predictions "
                                               "unchanged (cross-fitted)")
               + f"; {result.seconds:.1f} s without the audits. Full test split.")
    if agreement is not None and agreement < LOW_AGREEMENT:
        st.warning(f"This edit changes {1 - agreement:.0%} of the other categories' predictions "
                   "on the calibration quotations (known before any test quotation is read): "
                   "the gate fires on some of their tokens too, so moving the category moves "
                   "them.")
    audit_table, per_class, neurons = text_cache.forget_tables(opened, request)
    left, right = st.columns(2)
    left.subheader("Per-category accuracy")
    left.plotly_chart(figures.class_bars(per_class, highlight=categories[category]),
                      width="stretch")
    right.subheader("The neurons that tell the category apart")
    right.caption("How much more (or less) the category's quotations activate each FFN neuron "
                  "of the last layer than the others, in standard deviations of a quotation's "
                  "mean activation.")
    right.dataframe(neurons, hide_index=True)
    st.dataframe(audit_table, hide_index=True)

    st.subheader("Try it")
    sentence = st.text_input("Type a sentence: its nearest test quotations, dense and edited "
                             "side by side", TRY_IT_SENTENCE, key=keys.UNLEARN_TRY_IT)
    if sentence.strip():
        page.side_by_side(text_cache.try_forgotten(opened, request, sentence.strip()))
    command = request.command(opened.model.spec, categories[category])
    st.caption(f"Save the edited folder with `{command} --out DIR`; it reloads with `modhifi "
               "info --model DIR` and with sentence-transformers.")


def render() -> None:
    selection = sidebar.selection()
    if sidebar.is_text(selection):
        render_text(selection.opened)
        return
    st.title("Unlearn — ModHiFi-U")
    opened = selection.opened
    classes = list(cache.subject(opened).dataset.classes)
    st.write(
        "Pick a class to forget. ModHiFi-U reads the calibration images of that class only, finds "
        "the (output, input) kernel slices of the last layers whose contributions are most "
        "specific to it, and **zeroes** them (or **negates** them in LayerNorm networks, where the "
        "residual path would otherwise carry the class through). In a Transformer, the "
        "**direction** edit instead turns one neuron of the last feed-forward layer into a gate "
        "that fires only on class tokens that look like the class and moves them off it (it "
        "forgets every class of a ViT, where the pairs leave some behind). No "
        "labels beyond choosing the class, no gradients, no fine-tuning.")
    with st.expander("The score, and how to read the audit"):
        st.latex(r"r_{ci} = (\mathbb{E}_{\text{forget}} - \mathbb{E}_{\text{all}})\,"
                 r"\langle Y_c - m_c,\ A_{ci} - m_{ci}\rangle"
                 r"\quad(m:\ \text{means over all classes})")
        st.write("Forget accuracy should fall to zero and retain accuracy stay close. The "
                 "membership-inference AUC tells whether an attacker can tell the forget class's "
                 "training images from unseen ones (0.5 = cannot tell). The linear probe asks whether "
                 "the penultimate features still separate the class: a high probe accuracy means the "
                 "information is still in the representation, only the head no longer uses it.")

    # A form: the unlearning and its two audits run on submit, not on every widget change; until
    # then the page shows the result of the last submitted choice (cached by its request).
    with st.form(keys.UNLEARN_FORM, border=False):
        cols = st.columns(4)
        forget = page.class_picker(cols[0], "Forget class", classes, key=keys.UNLEARN_CLASS,
                                   default=cache.default_forget_class(opened))
        edit = cols[3].selectbox("Edit", (None, *choices(Edit)), key=keys.UNLEARN_EDIT,
                                 format_func=lambda e: "by architecture" if e is None else e)
        most = cache.editable_layers(opened, edit)  # negate acts on fewer layers
        page.lower_to(keys.UNLEARN_LAYERS, most)
        # the pair edits' controls: the direction edit is one neuron (`UnlearnRequest`)
        pairs = edit != "direction"
        layers = cols[1].number_input("Layers edited (last L; empty: chosen with k)", 1, most, None,
                                      key=keys.UNLEARN_LAYERS, disabled=not pairs)
        auto = cols[2].toggle("Choose k automatically", True, key=keys.UNLEARN_AUTO,
                              disabled=not pairs)
        k = cols[2].slider("k (share of slices per layer) when not automatic", 0.005, 0.2, 0.03,
                           0.005, key=keys.UNLEARN_K, disabled=not pairs)
        target = cols[2].number_input(
            "Forget target (calibration accuracy) when automatic", 0.0, 0.5, 0.0, 0.01,
            key=keys.UNLEARN_TARGET, help="What the automatic k aims for on the forget class's "
            "calibration images; a little above 0 spares the other classes when 0 costs them much.")
        st.form_submit_button("Forget", type="primary", key=keys.UNLEARN_SUBMIT)

    # The target steers what is chosen automatically: k, or the direction edit's strength (a
    # disabled toggle keeps the value it had).
    automatic = auto or not pairs
    request = UnlearnRequest(forget_class=forget, edit=edit,
                             layers=None if layers is None or not pairs else int(layers),
                             k=None if automatic else k,
                             target_forget_accuracy=target if automatic else 0.0)
    result = cache.unlearned(opened, request)
    before, after = result.before, result.after
    audit_metrics(before, after)
    if result.plan.edit == "direction":
        plan = result.plan
        st.caption(f"Neuron {plan.direction.spare} of {plan.direction.up} → {plan.layers[0]} "
                   f"made a gate on the class's direction at the {plan.gate.quantile:.0%} "
                   f"quantile, strength α = {plan.strength:.2f}; {result.seconds:.1f} s without "
                   "the audits. Full test split.")
    else:
        st.caption(f"k = {result.plan.k:.4f} of each layer's (output, input) pairs, edit = "
                   f"{result.plan.edit}, layers: {', '.join(result.plan.layers)}; "
                   f"{result.seconds:.1f} s without the audits. Full test split.")
    agreement = result.plan.calibration_retain_agreement
    if agreement is not None and agreement < LOW_AGREEMENT:
        st.warning(f"This edit changes {1 - agreement:.0%} of the other classes' predictions on "
                   "the calibration images (known before any test image is read; the retain "
                   "accuracy above is on the test split): few of this "
                   "model's channels belong to this class alone, so forgetting it costs the "
                   "others. A larger model, or a forget target above 0, spares them.")

    audit_table, per_class = cache.unlearn_tables(opened, request)
    if cache.retrainable(opened):
        retrained(opened, request, classes)

    left, right = st.columns(2)
    left.subheader("Per-class accuracy")
    left.plotly_chart(figures.class_bars(per_class, highlight=classes[forget]), width="stretch")
    right.subheader("Confusion after forgetting")
    confusion = cache.unlearned_evaluation(opened, request).confusion
    right.plotly_chart(figures.confusion(confusion, classes), width="stretch")

    st.subheader("Can the forgetting be seen?")
    left, right = st.columns(2)
    left.caption("The membership attack's evidence: the loss on the forgotten class's training "
                 "images (members) and test images (non-members). Where the two overlap, the "
                 "attack cannot tell whether an image was trained on. The retrained model, "
                 "where shown, never trained on either: how the two look with no trace left.")
    left.plotly_chart(figures.membership(cache.membership(opened, request)), width="stretch")
    right.caption("The classifier's input features of the forgotten class and three others, on "
                  "the two main axes of the model before the edit: a cloud that stays apart "
                  "after it means the information is still there (the probe's accuracy above).")
    right.plotly_chart(figures.feature_map(cache.feature_map(opened, request), classes[forget]),
                       width="stretch")

    st.subheader(f"Test images of “{classes[forget]}”")
    examples = cache.forget_examples(opened, request)
    for col, row in zip(st.columns(len(examples)), examples.itertuples()):
        col.image(row.image, clamp=True, width="stretch")
        col.caption(f"before: {row.before}  \nafter: {row.after}")
    st.dataframe(audit_table, hide_index=True)
    stem = page.download_stem(opened.model, f"forget-{classes[request.forget_class]}")
    st.download_button("Edited model (.pt)", cache.unlearned_download(opened, request),
                       f"{stem}.pt", key=keys.UNLEARN_DOWNLOAD)


def retrained(opened: cache.Opened, request: UnlearnRequest, classes: list[str]) -> None:
    """The edit beside the gold standard: the same model trained again without the class."""
    name = classes[request.forget_class]
    st.subheader("Against retraining without the class")
    reference = cache.retrained_audit(opened, request.forget_class)
    agreement = cache.retrained_agreement(opened, request)
    st.caption(f"{opened.model.spec} trains in seconds, so the page trains it again from scratch "
               f"(same recipe and seed) on its training images without any “{name}”: what a model "
               "that never saw the class does. An edit that forgets well predicts like it; "
               "its probe accuracy and attack AUC are what remains even with no trace of "
               "training on the class (the probe reads features learnt from the other classes).")
    cols = st.columns(4)
    cols[0].metric("Retrained: forget accuracy", f"{reference.forget_accuracy:.1%}")
    cols[1].metric("Retrained: retain accuracy", f"{reference.retain_accuracy:.2%}")
    cols[2].metric(f"Agrees with retrained: “{name}”", f"{agreement.forget:.1%}",
                   help="Share of the forgotten class's test images for which the edited model "
                        "predicts the class the retrained model predicts.")
    cols[3].metric("Agrees with retrained: others", f"{agreement.retain:.1%}",
                   help="The same share over the other classes' test images.")


page.guarded(render)
