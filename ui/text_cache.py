"""The dashboard's caches for text models (`modhifi.text`), keyed like the image ones: `Opened`
for what depends on the model alone, `Selection` for what depends on the analysis, a
`TextPruneRequest` for one pruning and a `TextUnlearnRequest` for one forgotten category.
Models, analyses and embeddings are shared resources and never mutated; numbers and tables are
cached data.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

from modhifi import zoo
from modhifi.audit import Audit
from modhifi.requests import TextPruneRequest, TextUnlearnRequest
from modhifi.text import components, encoder, forget, quality, subject as subjects, surgery
from modhifi.text.latency import TextCosts, measured_text_costs
from ui.cache import CACHED_TABLES, LATENCY_BATCH, PRUNED_MODELS, Opened, Selection, backend

LIVE_TEST_TEXTS = 400   # live numbers use this prefix of the (shuffled) test split
TRY_IT_NEIGHBOURS = 5


@st.cache_resource(show_spinner="Loading the text model and the fortunes corpus…", max_entries=2)
def subject(opened: Opened) -> subjects.TextSubject:
    return subjects.open_text(opened.model.spec, device=backend(opened.device).device)


def test_count(opened: Opened) -> tuple[int, int]:
    """(quotations the live numbers use, quotations in the test split)."""
    total = len(subject(opened).corpus.test)
    return min(LIVE_TEST_TEXTS, total), total


def test_texts(opened: Opened, full: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
    test = subject(opened).corpus.test
    chosen = test if full else test.head(LIVE_TEST_TEXTS)
    return chosen.texts, chosen.labels


@st.cache_resource(show_spinner="Per-token statistics of every FFN and attention output, then "
                                "fidelity scores…", max_entries=4)
def analysis(selection: Selection) -> components.TextAnalysis:
    chosen = subject(selection.opened)
    calibration = chosen.corpus.calibration
    samples = min(selection.samples, len(calibration))
    return components.analyse_text(chosen.model, calibration.texts[:samples],
                                   device=backend(selection.device).device)


@st.cache_resource(show_spinner="Encoding the test quotations…", max_entries=8)
def dense_embeddings(opened: Opened, full: bool) -> torch.Tensor:
    texts, _ = test_texts(opened, full)
    return encoder.embed(subject(opened).model, texts, device=backend(opened.device).device)


@st.cache_data(show_spinner="Counting parameters and MACs…", max_entries=CACHED_TABLES)
def overview(opened: Opened) -> tuple[dict, pd.DataFrame]:
    chosen = subject(opened)
    texts, labels = test_texts(opened, True)
    embeddings = dense_embeddings(opened, True)
    numbers = {"accuracy": quality.accuracy(chosen.probe, embeddings, labels),
               "per_category": quality.per_category_accuracy(chosen.probe, embeddings, labels),
               "params": subjects.parameters(chosen.model), "texts": len(texts)}
    parts = components.cost_parts(chosen.model, texts)
    numbers["macs"] = float(parts["macs"].sum())
    return numbers, parts


@st.cache_data(show_spinner="Scoring every component…", max_entries=CACHED_TABLES)
def score_map(selection: Selection, kind: str, target: float) -> pd.DataFrame:
    """Every component's scores and keep priority, and whether greedy selection keeps it when
    `target` of the components go (columns as the image pages' channel table)."""
    studied = analysis(selection)
    frame = studied.score_map(kind)
    kept = studied.plan(target, kind=kind).kept  # the default: greedy
    frame["kept"] = [c in kept[layer] for layer, c in zip(frame["layer"], frame["component"])]
    frame["layer"] = [f"layer {layer}" for layer in frame["layer"]]
    return frame.rename(columns={"component": "channel"})


@st.cache_resource(show_spinner="Timing one FFN and one attention block at candidate counts "
                                "(batch 64; once per model and device, kept on disk)…",
                   max_entries=4)
def costs(opened: Opened) -> TextCosts:
    """The encoder's latency cost model on this device, read from or written to its file."""
    chosen, on = subject(opened), backend(opened.device)
    cache = zoo.cost_cache(opened.model.spec, chosen.model, on, LATENCY_BATCH, "fortunes",
                           beside=False)
    return measured_text_costs(chosen.model, chosen.corpus.calibration.texts, backend=on,
                               batch_size=LATENCY_BATCH, cache=cache)


def _costs_for(opened: Opened, request: TextPruneRequest) -> TextCosts | None:
    return costs(opened) if request.target_kind == "latency" else None


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def most(selection: Selection, request: TextPruneRequest) -> float:
    """The largest target reachable with the request's other options."""
    options = request.plan_kwargs()
    del options["target"]
    return analysis(selection).most(**options, costs=_costs_for(selection.opened, request))


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def plan(selection: Selection, request: TextPruneRequest) -> components.TextPlan:
    return analysis(selection).plan(**request.plan_kwargs(),
                                    costs=_costs_for(selection.opened, request))


@st.cache_resource(show_spinner="Pruning: refitting the consumers, cutting the components…",
                   max_entries=PRUNED_MODELS)
def pruned(selection: Selection, request: TextPruneRequest) -> torch.nn.Module:
    return surgery.apply_plan(analysis(selection), plan(selection, request),
                              compensation=request.compensation)


@st.cache_resource(show_spinner="Encoding the test quotations with the pruned model…",
                   max_entries=PRUNED_MODELS)
def pruned_embeddings(selection: Selection, request: TextPruneRequest, full: bool) -> torch.Tensor:
    texts, _ = test_texts(selection.opened, full)
    return encoder.embed(pruned(selection, request), texts,
                         device=backend(selection.device).device)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def comparison(selection: Selection, request: TextPruneRequest, full: bool) -> dict:
    """Embedding agreement and category accuracy, dense against pruned."""
    probe = subject(selection.opened).probe
    _, labels = test_texts(selection.opened, full)
    dense = dense_embeddings(selection.opened, full)
    after = pruned_embeddings(selection, request, full)
    close = quality.agreement(dense, after)
    return {"embedding_cosine": close.embedding_cosine,
            "embedding_cosine_p5": close.embedding_cosine_p5,
            "retrieval_agreement": close.retrieval_agreement, "recall_at_10": close.recall_at_10,
            "accuracy_before": quality.accuracy(probe, dense, labels),
            "accuracy_after": quality.accuracy(probe, after, labels), "texts": len(labels),
            "params_before": subjects.parameters(subject(selection.opened).model),
            "params_after": subjects.parameters(pruned(selection, request))}


@st.cache_data(show_spinner="Timing dense and pruned encoders side by side…",
               max_entries=CACHED_TABLES)
def speed(selection: Selection, request: TextPruneRequest) -> tuple[float, float]:
    """Sentences per second, dense and pruned, batch 64, timed in alternation."""
    texts, _ = test_texts(selection.opened, True)
    dense = subject(selection.opened).model
    before, after = quality.sentences_per_second([dense, pruned(selection, request)], texts,
                                                 backend=backend(selection.device))
    return before, after


def _nearest(opened: Opened, models: dict[str, tuple[torch.nn.Module, torch.Tensor]],
             sentence: str, full: bool) -> pd.DataFrame:
    """For each model (name -> (model, its embeddings of the test quotations)): the quotations
    nearest to `sentence`, and the category the probe gives the sentence."""
    chosen = subject(opened)
    texts, labels = test_texts(opened, full)
    device = backend(opened.device).device
    rows = []
    for name, (model, embeddings) in models.items():
        query = encoder.embed(model, [sentence], device=device)  # (1, d)
        read = chosen.corpus.categories[int(chosen.probe.predict(query)[0])]
        index, similarity = quality.search(query[0], embeddings, TRY_IT_NEIGHBOURS)
        rows += [{"model": name, "rank": rank + 1, "quotation": texts[i],
                  "category": chosen.corpus.categories[labels[i]], "similarity": s,
                  "sentence read as": read}
                 for rank, (i, s) in enumerate(zip(index, similarity))]
    return pd.DataFrame(rows)


@st.cache_data(show_spinner="Searching the quotations…", max_entries=CACHED_TABLES)
def try_it(selection: Selection, request: TextPruneRequest | None, sentence: str,
           full: bool) -> pd.DataFrame:
    """The test quotations (all, or the live prefix) nearest to `sentence` under the dense and
    the pruned model."""
    opened = selection.opened
    models = {"dense": (subject(opened).model, dense_embeddings(opened, full))}
    if request is not None:
        models["pruned"] = (pruned(selection, request), pruned_embeddings(selection, request, full))
    return _nearest(opened, models, sentence, full)


@st.cache_resource(show_spinner="Encoding the test and calibration quotations, keeping the "
                                "last FFN's inputs (once per model)…", max_entries=2)
def audit_inputs(opened: Opened) -> forget.AuditInputs:
    """What every category's audits replay (150 MiB for MiniLM): two text models' (or devices')
    at a time."""
    chosen = subject(opened)
    return forget.audit_inputs(chosen.model, chosen.corpus, device=backend(opened.device).device)


@st.cache_data(show_spinner="Auditing the dense model on the quotations…",
               max_entries=CACHED_TABLES)
def dense_audit(opened: Opened, category: int) -> Audit:
    chosen, recorded = subject(opened), audit_inputs(opened)
    return forget.audit_text(chosen.model, chosen.probe, chosen.corpus, category=category,
                             device=backend(opened.device).device,
                             test_embeddings=recorded.test.embeddings,
                             calibration_embeddings=recorded.calibration.embeddings)


@st.cache_resource(show_spinner="Forgetting: the category's statistics, the gate, its "
                                "strength, the edit, then the audit…", max_entries=PRUNED_MODELS)
def forgotten(opened: Opened, request: TextUnlearnRequest) -> forget.TopicResult:
    chosen = subject(opened)
    return forget.forget_category(chosen.model, chosen.probe, chosen.corpus,
                                  category=request.category, target=request.target,
                                  device=backend(opened.device).device,
                                  before=dense_audit(opened, request.category),
                                  recorded=audit_inputs(opened))


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def forget_tables(opened: Opened, request: TextUnlearnRequest) -> tuple[pd.DataFrame, ...]:
    """The audit (metric, before, after), per-category accuracy (class, when, accuracy) and the
    neurons that tell the category apart most."""
    result = forgotten(opened, request)
    per_class = result.per_class_frame().melt(id_vars="class", var_name="when",
                                              value_name="accuracy")
    return result.to_frame(), per_class, result.plan.neurons()


@st.cache_data(show_spinner="Searching the quotations…", max_entries=CACHED_TABLES)
def try_forgotten(opened: Opened, request: TextUnlearnRequest, sentence: str) -> pd.DataFrame:
    """The test quotations nearest to `sentence` under the dense and the edited model (the
    whole split, whose embeddings the audits already made: the dense model's in the recording
    of the last FFN's inputs)."""
    result = forgotten(opened, request)
    models = {"dense": (subject(opened).model, audit_inputs(opened).test.embeddings),
              "edited": (result.model, result.test_embeddings)}
    return _nearest(opened, models, sentence, True)
