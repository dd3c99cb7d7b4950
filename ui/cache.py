"""Every Streamlit cache of the dashboard, and its bounds.

Models, analyses and the backend live in `st.cache_resource` and are shared by every session, so
they are never mutated: modifications always work on copies made by the library. Derived numbers
and tables live in `st.cache_data`. Work that draws a progress bar lives in `ui.store`'s
`SharedResults`. Everything is keyed by frozen values: `Opened` (a model on a device) for what
depends on the model alone, `Selection` (that, and the calibration size) for what depends on the
analysis, and a `PruneRequest` or `UnlearnRequest` (`modhifi.requests`) for one modification.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from modhifi import backend as backends
from modhifi import audit, bench, metrics, prune, theory, unlearn, zoo
from modhifi.options import DeviceChoice, Method, choices, default_compensation
from modhifi.prune import architecture, card, tables
from modhifi.requests import ModelRef, PruneRequest, UnlearnRequest
from ui.store import SharedResults

LIVE_TEST_IMAGES = bench.LIVE_TEST_IMAGES  # live numbers use this prefix of the test split
CALIBRATION_DEFAULT = bench.LIVE_CALIBRATION_IMAGES

# --- how much one server keeps (README, "Running it for a room") --------------------------------
# Each open model holds its dataset; each analysis its private copy of the model and the input
# moments of every layer (docs/results.md measures both). Least recently used entries go first.
OPEN_MODELS = 4          # models with their datasets
SHARED_RESULTS = {"analysis": 4, "sparsity_curve": 16}
PRUNED_MODELS = 16       # pruned models behind the Prune page's slider positions
UNLEARNED_MODELS = 8
CACHED_TABLES = 256      # each st.cache_data function: numbers and tables, small
CACHED_DOWNLOADS = 16    # checkpoint bytes ready for the download buttons

# The accuracy against sparsity curve: every method with its default compensation, and the
# paper's δ* rescaling beside ModHiFi's refit, at these targets.
CURVE_METHODS = tuple((method, default_compensation(method)) for method in choices(Method)) + (
    ("modhifi", "rescale"),)
CURVE_TARGETS = (0.2, 0.35, 0.5, 0.6, 0.7)


@dataclass(frozen=True)
class Opened:
    """A model opened on a device: the key of everything that depends on the model alone."""

    model: ModelRef
    device: DeviceChoice


@dataclass(frozen=True)
class Selection:
    """What the sidebar picked: a model, a device, and how many calibration images to analyse."""

    model: ModelRef
    device: DeviceChoice
    samples: int

    @property
    def opened(self) -> Opened:
        """The model on its device, without the calibration size."""
        return Opened(self.model, self.device)


# --- cached resources (never mutated) --------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def backend(choice: DeviceChoice) -> backends.Backend:
    return backends.choose_backend(choice)


@st.cache_resource(show_spinner="Loading model and data…", max_entries=OPEN_MODELS)
def subject(opened: Opened) -> zoo.Subject:
    return zoo.open_subject(**opened.model.open_kwargs(), device=backend(opened.device).device)


class Progress:
    """A progress bar that appears at the first report, so that reused results show nothing."""

    def __init__(self, text: str):
        self.text, self.bar = text, None

    def __call__(self, fraction: float) -> None:
        self.bar = self.bar or st.progress(0.0, text=self.text)
        self.bar.progress(min(max(fraction, 0.0), 1.0), text=self.text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_) -> None:
        if self.bar is not None:
            self.bar.empty()


@st.cache_resource(show_spinner=False)
def _store(kind: str) -> SharedResults:
    """Shared results of long work that draws a progress bar (see `ui.store`), bounded."""
    return SharedResults(SHARED_RESULTS[kind])


def _with_progress(kind: str, key: tuple, text: str, work):
    def compute():
        with Progress(text) as report:
            return work(report)

    return _store(kind).get(key, compute)


def analysis(selection: Selection) -> prune.Analysis:
    def work(report) -> prune.Analysis:
        chosen = subject(selection.opened)
        return bench.live_analysis(chosen.loaded.model, chosen.dataset,
                                   backend=backend(selection.device), samples=selection.samples,
                                   progress=report)

    return _with_progress("analysis", (selection,), "Input statistics of every layer on "
                          f"{selection.samples:,} calibration images, then fidelity scores…", work)


LATENCY_BATCH = 64  # the Prune page's latency: targets and measured speed-ups at this batch size


@st.cache_resource(show_spinner="Timing each layer at candidate widths (batch 64; once per model "
                                "and device, kept on disk)…", max_entries=OPEN_MODELS)
def costs(opened: Opened) -> prune.CostModel:
    """The model's latency cost model on this device, read from or written to its cache file."""
    chosen, on = subject(opened), backend(opened.device)
    model, shape = chosen.loaded.model, chosen.dataset.input_shape
    cache = zoo.cost_cache(opened.model.spec, model, on, LATENCY_BATCH, shape, beside=False)
    return prune.measured_costs(model, prune.trace_structure(model, shape), shape, backend=on,
                                batch_size=LATENCY_BATCH, cache=cache)


def _costs_for(opened: Opened, request: PruneRequest) -> prune.CostModel | None:
    """The cost model a latency target plans with; None for the others (nothing to time)."""
    return costs(opened) if request.target_kind == "latency" else None


@st.cache_resource(show_spinner="Pruning: compensating, cutting, recalibrating BatchNorm…",
                   max_entries=PRUNED_MODELS)
def pruned(selection: Selection, request: PruneRequest):
    return analysis(selection).apply(plan(selection, request), **request.apply_kwargs())


# --- cached numbers and tables --------------------------------------------------------------------

def _evaluate(opened: Opened, model, *, full: bool) -> metrics.Evaluation:
    chosen = subject(opened)
    test = chosen.dataset.test
    split = test if full else test.subset(slice(0, LIVE_TEST_IMAGES))
    return metrics.evaluate(model, split, device=backend(opened.device).device,
                            num_classes=chosen.dataset.num_classes)


def test_images(opened: Opened) -> tuple[int, int]:
    """(images the live numbers use, images in the test split)."""
    total = len(subject(opened).dataset.test)
    return min(LIVE_TEST_IMAGES, total), total


@st.cache_data(show_spinner="Evaluating on the test split…", max_entries=CACHED_TABLES)
def evaluation(opened: Opened, *, full: bool = True) -> metrics.Evaluation:
    return _evaluate(opened, subject(opened).loaded.model, full=full)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def has_batchnorm(opened: Opened) -> bool:
    """Whether recalibrating BatchNorm means anything for this model (not for a LayerNorm ViT)."""
    return bool(prune.batchnorms(subject(opened).loaded.model))


@st.cache_data(show_spinner="Counting MACs…", max_entries=CACHED_TABLES)
def cost(opened: Opened) -> metrics.Cost:
    chosen = subject(opened)
    return metrics.count_cost(chosen.loaded.model, chosen.dataset.input_shape)


@st.cache_data(show_spinner="Timing the forward pass…", max_entries=CACHED_TABLES)
def latency(opened: Opened, batch_size: int) -> metrics.Latency:
    chosen = subject(opened)
    return metrics.measure_latency(chosen.loaded.model, chosen.dataset.input_shape,
                                   backend=backend(opened.device), batch_size=batch_size)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def plan(selection: Selection, request: PruneRequest) -> prune.PrunePlan:
    return analysis(selection).plan(**request.plan_kwargs(),
                                    costs=_costs_for(selection.opened, request))


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def most(selection: Selection, request: PruneRequest) -> float:
    """The largest target reachable with the request's other options."""
    options = request.plan_kwargs()
    del options["target"]
    return analysis(selection).most(**options, costs=_costs_for(selection.opened, request))


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def channel_table(selection: Selection, target: float) -> pd.DataFrame:
    chosen = analysis(selection)
    return tables.channel_table(chosen, chosen.plan(target))


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def layer_scores(selection: Selection, layer: str) -> dict:
    return tables.layer_scores(analysis(selection), layer)


@st.cache_data(show_spinner="Reading the channel over the calibration images…",
               max_entries=CACHED_TABLES)
def channel_card(selection: Selection, layer: str, channel: int) -> card.ChannelCard:
    return card.channel_card(analysis(selection), layer, channel)


@st.cache_data(show_spinner="Ranking the group greedily…", max_entries=CACHED_TABLES)
def greedy_steps(selection: Selection, layer: str, channel: int) -> pd.DataFrame:
    return card.greedy_steps(analysis(selection), layer, channel)


@st.cache_data(show_spinner="Removing only this channel (refit, recalibrated)…",
               max_entries=CACHED_TABLES)
def without_channel(selection: Selection, layer: str, channel: int) -> metrics.Evaluation:
    """Accuracy on the live test images once this channel alone is removed."""
    studied = analysis(selection)
    plan = card.without_channel(studied, channel_card(selection, layer, channel))
    return _evaluate(selection.opened, studied.apply(plan), full=False)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def group_table(selection: Selection, options: PruneRequest) -> pd.DataFrame:
    """The channel groups in the options' scope, in forward order: group, layers (readable
    names of its producers), channels, remove (blank: follow the target)."""
    studied = analysis(selection)
    groups = studied.plan(0.0, scope=options.scope, method=options.method).groups
    return pd.DataFrame({
        "group": [g.name for g in groups],
        "layers": [", ".join(map(architecture.readable, studied.structure.group(g.name).producers))
                   for g in groups],
        "channels": [g.size for g in groups], "remove": float("nan")})


@st.cache_data(show_spinner="Pruning each group alone, evaluating each…",
               max_entries=CACHED_TABLES)
def alone(selection: Selection, request: PruneRequest) -> dict[str, float]:
    """group -> accuracy on the live test images when only that group is pruned as in the
    request's plan (the others whole), compensated and recalibrated alike."""
    studied, whole = analysis(selection), plan(selection, request)
    return {group.name: _evaluate(selection.opened,
                                  studied.apply(architecture.only_group(studied, whole, group.name),
                                                **request.apply_kwargs()), full=False).accuracy
            for group in whole.groups if group.removed}


@st.cache_data(show_spinner="Timing each layer (batch 64, eager)…", max_entries=CACHED_TABLES)
def layer_latency(opened: Opened) -> metrics.LayerLatency:
    chosen = subject(opened)
    return metrics.measure_layer_latency(chosen.loaded.model, chosen.dataset.input_shape,
                                         backend=backend(opened.device))


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def layers(selection: Selection, request: PruneRequest, *, sensitivity: bool,
           timing: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(nodes, edges) of the architecture under the request's plan (`architecture.architecture`),
    the nodes with `alone` (accuracy when only the group they write is pruned) and `ms` (time
    per batch) when asked for."""
    drawn = architecture.architecture(analysis(selection), plan(selection, request))
    nodes = drawn.nodes
    if sensitivity:
        nodes = nodes.assign(alone=nodes["writes"].map(alone(selection, request)))
    if timing:
        nodes = nodes.assign(ms=nodes["layer"].map(dict(layer_latency(selection.opened).per_layer)))
    return nodes, drawn.edges


@st.cache_data(show_spinner="Fidelity of growing HiFi sets…", max_entries=CACHED_TABLES)
def fidelity_curve(selection: Selection, layer: str, out: int) -> pd.DataFrame:
    return tables.fidelity_curve(analysis(selection), layer, out)


@st.cache_data(show_spinner="Smallest HiFi sets of every layer…", max_entries=CACHED_TABLES)
def hifi_table(selection: Selection) -> pd.DataFrame:
    return tables.hifi_table(analysis(selection))


@st.cache_data(show_spinner="Evaluating the pruned model…", max_entries=CACHED_TABLES)
def pruned_evaluation(selection: Selection, request: PruneRequest, *,
                      full: bool) -> metrics.Evaluation:
    return _evaluate(selection.opened, pruned(selection, request), full=full)


@st.cache_data(show_spinner="Timing dense and pruned models side by side…",
               max_entries=CACHED_TABLES)
def pruned_latency(selection: Selection, request: PruneRequest,
                   batch_size: int = LATENCY_BATCH) -> list[metrics.Latency]:
    chosen = subject(selection.opened)
    return metrics.measure_latencies([chosen.loaded.model, pruned(selection, request)],
                                     chosen.dataset.input_shape, backend=backend(selection.device),
                                     batch_size=batch_size, repeats=15)


def sparsity_curve(selection: Selection, target_kind: str) -> pd.DataFrame:
    """Accuracy on the live test images against MACs reduction, for ModHiFi and the baselines
    (the targets out of reach left out)."""
    reach = most(selection, PruneRequest(target=0.0, target_kind=target_kind))  # any method:
    # a uniform plan's counts do not depend on the ranking
    requests = [PruneRequest(target=target, target_kind=target_kind, method=method,
                             compensation=compensation)
                for method, compensation in CURVE_METHODS for target in CURVE_TARGETS
                if target <= reach]  # a latency target's reach is the device's
    if not requests:
        return pd.DataFrame()
    latency = _costs_for(selection.opened, requests[0])  # measured before the progress bar

    def work(report) -> pd.DataFrame:
        chosen = subject(selection.opened)
        live = chosen.dataset.test.subset(slice(0, LIVE_TEST_IMAGES))
        points = bench.sweep(analysis(selection), requests, live, backend=backend(selection.device),
                             num_classes=chosen.dataset.num_classes, costs=latency,
                             progress=report)
        rows = [point.to_row() for point in points]
        return pd.DataFrame([{**row, "method": f"{row['method']} ({row['compensation']})"}
                             for row in rows])

    return _with_progress("sparsity_curve", (selection, tuple(requests)),
                          "Pruning, recalibrating and evaluating ModHiFi and the baselines…", work)


@st.cache_data(show_spinner="Packing the pruned model…", max_entries=CACHED_DOWNLOADS)
def pruned_download(selection: Selection, request: PruneRequest) -> tuple[bytes, str, str]:
    """(checkpoint bytes, removed channels as JSON, as CSV)."""
    removed = plan(selection, request).removed_channels()
    csv = pd.DataFrame([(g, c) for g, cs in removed.items() for c in cs],
                       columns=["group", "channel"]).to_csv(index=False)
    return (zoo.checkpoint_bytes(pruned(selection, request),
                                 **_lineage(selection.opened, [removed])),
            json.dumps(removed, indent=1), csv)


def _lineage(opened: Opened, removed: list[dict]) -> dict:
    """What a downloaded modified model is rebuilt from (`zoo.lineage`)."""
    return zoo.lineage(opened.model.spec, opened.model.arch, subject(opened).dataset, removed)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def editable_layers(opened: Opened, edit: str | None) -> int:
    """How many layers before the classifier ModHiFi-U can edit with this edit (None: the
    model's default)."""
    chosen = subject(opened)
    example = next(chosen.dataset.calibration.batches(1, device=backend(opened.device).device))
    return len(unlearn.editable_layers(chosen.loaded.model, example, edit=edit))


@st.cache_resource(show_spinner="Forgetting: forget-class statistics, choosing k, editing, auditing…",
                   max_entries=UNLEARNED_MODELS)
def unlearned(opened: Opened, request: UnlearnRequest) -> unlearn.UnlearnResult:
    chosen = subject(opened)
    return unlearn.unlearn(chosen.loaded.model, chosen.dataset, device=backend(opened.device).device,
                           **request.kwargs())


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def unlearned_evaluation(opened: Opened, request: UnlearnRequest) -> metrics.Evaluation:
    return _evaluate(opened, unlearned(opened, request).model, full=True)


def _zoo_name(opened: Opened) -> str | None:
    """The zoo model's name, or None for a checkpoint of one's own."""
    return opened.model.spec if opened.model.arch is None and opened.model.spec in zoo.ZOO \
        else None


def default_forget_class(opened: Opened) -> int:
    """The class the Unlearn page forgets first: the zoo entry's choice, else the first."""
    name = _zoo_name(opened)
    return zoo.ZOO[name].forget_class if name else 0


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def retrainable(opened: Opened) -> bool:
    """Whether the Unlearn page can show the model retrained without the class beside the edit
    (cached: it reads the model card)."""
    name = _zoo_name(opened)
    return name is not None and zoo.retrainable(name)


@st.cache_resource(show_spinner="Retraining the model without the class: the reference…",
                   max_entries=UNLEARNED_MODELS)
def retrained(opened: Opened, forget_class: int):
    """The zoo model trained again without `forget_class` (shared: never mutated)."""
    chosen = subject(opened)
    return zoo.retrained_without(opened.model.spec, chosen.dataset, forget_class,
                                 device=backend(opened.device).device)


def _compared(opened: Opened, request: UnlearnRequest) -> dict:
    """The models the Unlearn page compares: before, after the edit, and (where retraining is
    cheap) retrained without the class."""
    models = {"before": subject(opened).loaded.model, "after": unlearned(opened, request).model}
    if retrainable(opened):
        models["retrained"] = retrained(opened, request.forget_class)
    return models


@st.cache_data(show_spinner="Auditing the retrained model…", max_entries=CACHED_TABLES)
def retrained_audit(opened: Opened, forget_class: int) -> audit.Audit:
    """The retrained reference's audit."""
    chosen = subject(opened)
    return audit.audit(retrained(opened, forget_class), chosen.dataset, forget_class=forget_class,
                       device=backend(opened.device).device)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def retrained_agreement(opened: Opened, request: UnlearnRequest) -> audit.Agreement:
    """How alike the edited and the retrained model predict the test split."""
    return audit.agreement(unlearned(opened, request).model,
                           retrained(opened, request.forget_class), subject(opened).dataset.test,
                           forget_class=request.forget_class, device=backend(opened.device).device)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def unlearn_tables(opened: Opened, request: UnlearnRequest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The audit (metric, before, after[, retrained]) and per-class accuracy (class, when,
    accuracy) tables of the Unlearn page."""
    result = unlearned(opened, request)
    reference = retrained_audit(opened, request.forget_class) if retrainable(opened) else None
    return result.to_frame(reference), result.per_class_frame(reference).melt(
        id_vars="class", var_name="when", value_name="accuracy")


@st.cache_data(show_spinner="The membership attack's scores…", max_entries=CACHED_TABLES)
def membership(opened: Opened, request: UnlearnRequest) -> pd.DataFrame:
    """Loss and confidence of the forget class's members and non-members for each compared model."""
    chosen = subject(opened)
    return pd.concat([audit.membership_scores(model, chosen.dataset, device=backend(
        opened.device).device, forget_class=request.forget_class).assign(model=name)
        for name, model in _compared(opened, request).items()], ignore_index=True)


FEATURE_MAP_OTHERS = 3  # classes drawn beside the forgotten one


@st.cache_data(show_spinner="Penultimate features, before and after…", max_entries=CACHED_TABLES)
def feature_map(opened: Opened, request: UnlearnRequest) -> pd.DataFrame:
    """The forget class and a few others in the before-model's principal plane, both models."""
    chosen = subject(opened)
    names = chosen.dataset.classes
    others = [c for c in range(len(names)) if c != request.forget_class][:FEATURE_MAP_OTHERS]
    frame = audit.feature_map({"before": chosen.loaded.model,
                               "after": unlearned(opened, request).model},
                              chosen.dataset.test, classes=(request.forget_class, *others),
                              device=backend(opened.device).device)
    frame["class"] = [names[label] for label in frame["label"]]
    return frame.drop(columns="label")


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def forget_examples(opened: Opened, request: UnlearnRequest, count: int = 8) -> pd.DataFrame:
    """Test images of the forget class with the predictions before and after (image as uint8)."""
    chosen = subject(opened)
    test, classes = chosen.dataset.test, chosen.dataset.classes
    images = test.subset((test.labels == request.forget_class).nonzero().flatten()[:count])
    after = unlearned(opened, request).model

    def predicted(model) -> list[str]:
        logits = metrics.predict(model, images, device=backend(opened.device).device)
        return [classes[i] for i in logits.argmax(1)]

    return pd.DataFrame({"image": [img.permute(1, 2, 0).squeeze(-1).numpy() for img in images.images],
                         "before": predicted(chosen.loaded.model), "after": predicted(after)})


@st.cache_data(show_spinner="Packing the edited model…", max_entries=CACHED_DOWNLOADS)
def unlearned_download(opened: Opened, request: UnlearnRequest) -> bytes:
    return zoo.checkpoint_bytes(unlearned(opened, request).model, **_lineage(opened, []))


@st.cache_data(show_spinner="Masking the layer's inputs: local error from statistics, global measured…",
               max_entries=CACHED_TABLES)
def local_global(selection: Selection, layer: str) -> theory.LocalGlobal:
    return theory.local_global(analysis(selection), layer)


@st.cache_data(show_spinner="Feature changes under translations and deformations, by depth…",
               max_entries=CACHED_TABLES)
def invariance(selection: Selection) -> pd.DataFrame:
    chosen, study = subject(selection.opened), analysis(selection)
    share = min(0.5, study.most(target_kind="macs"))  # the ViT's FFNs hold 45% of its MACs
    pruned = study.apply(study.plan(share, target_kind="macs"))
    images = next(chosen.dataset.test.batches(128, device=backend(selection.device).device))
    return theory.invariance({"dense": chosen.loaded.model,
                              f"pruned ({share:.0%} of MACs removed)": pruned}, images)


@st.cache_data(show_spinner="Smallest HiFi sets, trained against untrained…",
               max_entries=CACHED_TABLES)
def hifi_existence(selection: Selection) -> theory.HifiExistence:
    study, name = analysis(selection), str(selection.model)
    untrained = (theory.untrained_analysis(zoo.ZOO[name].build, study).fidelity
                 if name in zoo.ZOO else None)
    return theory.hifi_existence(study.fidelity, untrained=untrained)
