"""The only place with Streamlit caches and session-state keys.

Models, analyses and the backend live in `st.cache_resource` and are shared by every session, so
they are never mutated: modifications always work on copies made by the library. Derived numbers
and tables live in `st.cache_data`, keyed by plain ids (model, device, calibration size, options).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import streamlit as st

from modhifi import backend as _backend
from modhifi import bench, metrics, options, prune, theory, unlearn, zoo
from modhifi.errors import UserError
from modhifi.prune import tables
from ui.store import SharedResults

# --- session-state keys ------------------------------------------------------------------------
MODEL = "sidebar.model"
DEVICE = "sidebar.device"
CALIBRATION = "sidebar.calibration"
CHECKPOINT_PATH = "sidebar.checkpoint_path"
CHECKPOINT_ARCH = "sidebar.checkpoint_arch"
CHECKPOINT_DATA = "sidebar.checkpoint_data"
CHECKPOINT_UPLOAD = "sidebar.checkpoint_upload"
FIDELITY_SCORE = "fidelity.score"
FIDELITY_LAYER = "fidelity.layer"
FIDELITY_OUTPUT = "fidelity.output"
FIDELITY_TARGET = "fidelity.target"
PRUNE_TARGET = "prune.target"
PRUNE_KIND = "prune.kind"
PRUNE_ALLOCATION = "prune.allocation"
PRUNE_SCOPE = "prune.scope"
PRUNE_ROUND_TO = "prune.round_to"
PRUNE_METHOD = "prune.method"
PRUNE_COMPENSATION = "prune.compensation"
PRUNE_RECALIBRATE = "prune.recalibrate"
PRUNE_FULL = "prune.full"
PRUNE_SPEED = "prune.speed"
UNLEARN_CLASS = "unlearn.class"
UNLEARN_LAYERS = "unlearn.layers"
UNLEARN_K = "unlearn.k"
UNLEARN_EDIT = "unlearn.edit"
UNLEARN_TARGET = "unlearn.target"
THEORY_LAYER = "theory.layer"

OWN_CHECKPOINT = "your checkpoint…"
# Below this share of unchanged other-class predictions (calibration images) the Unlearn page
# warns: the zoo's Fashion-MNIST CNNs keep 0.86-0.99 on every class, the ViT 0.73-0.95,
# digits-cnn 0.32 on "0" (docs/benchmarks/unlearn_*.csv).
UNLEARN_LOW_AGREEMENT = 0.8
LIVE_TEST_IMAGES = bench.LIVE_TEST_IMAGES  # live numbers use this prefix of the test split
CALIBRATION_DEFAULT = bench.LIVE_CALIBRATION_IMAGES
UPLOADS = Path.home() / ".cache" / "modhifi" / "uploads"
SERVER_MODELS_VARIABLE = "MODHIFI_MODEL_DIR"  # a folder whose checkpoints visitors may pick

# --- how much one server keeps (README, "Running it for a room") --------------------------------
# Each open model holds its dataset; each analysis its private copy of the model and the input
# moments of every layer (docs/results.md measures both). Least recently used entries go first.
OPEN_MODELS = 4          # models with their datasets
SHARED_RESULTS = {"analysis": 4, "sparsity_curve": 16}
PRUNED_MODELS = 16       # pruned models behind the Prune page's slider positions
UNLEARNED_MODELS = 8
CACHED_TABLES = 256      # each st.cache_data function: numbers and tables, small
CACHED_DOWNLOADS = 16    # checkpoint bytes ready for the download buttons


# --- the sidebar ---------------------------------------------------------------------------------

def sidebar() -> None:
    """Model (zoo or own checkpoint), calibration size and device pickers."""
    names = [n for n, e in zoo.ZOO.items() if e.checkpoint.is_file()] + [OWN_CHECKPOINT]
    if MODEL not in st.session_state and st.query_params.get("model") in names:
        st.session_state[MODEL] = st.query_params["model"]  # shareable links: ?model=digits-cnn
    st.sidebar.selectbox("Model", names, key=MODEL,
                         format_func=lambda n: n if n == OWN_CHECKPOINT else f"{n} — {zoo.ZOO[n].dataset}")
    if st.session_state[MODEL] == OWN_CHECKPOINT:
        st.sidebar.selectbox("Architecture", zoo.torchvision_archs(), key=CHECKPOINT_ARCH)
        st.sidebar.text_input("Dataset", key=CHECKPOINT_DATA, placeholder="cifar10:/data/cifar",
                              help="fashion-mnist, digits, cifar10:DIR or imagefolder:DIR")
        upload = st.sidebar.file_uploader("Checkpoint (.pt state_dict)", type=["pt", "pth"],
                                          key=CHECKPOINT_UPLOAD)
        if upload is not None:
            st.session_state[CHECKPOINT_PATH] = str(_store_upload(upload.name, upload.getvalue()))
        elif server_checkpoints():
            # Only files the server's owner published: a free path field would tell a visitor
            # which files exist anywhere on the server.
            st.sidebar.selectbox(f"…or a checkpoint on the server ({SERVER_MODELS_VARIABLE})",
                                 server_checkpoints(), key=CHECKPOINT_PATH, index=None,
                                 format_func=lambda path: Path(path).name)
    st.sidebar.select_slider("Calibration images", (250, 500, 1000, 2000), value=CALIBRATION_DEFAULT,
                             key=CALIBRATION, help="Unlabeled held-out images the method reads.")
    st.sidebar.selectbox("Device", options.choices(options.DeviceChoice), key=DEVICE)
    try:
        st.sidebar.caption(f"Scoring backend: {backend(st.session_state[DEVICE]).description}")
    except UserError as error:
        st.sidebar.error(str(error))


def server_checkpoints() -> list[str]:
    """The .pt/.pth files in the folder named by MODHIFI_MODEL_DIR (none when it is unset)."""
    folder = os.environ.get(SERVER_MODELS_VARIABLE)
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix in (".pt", ".pth") and p.is_file())


def _store_upload(name: str, data: bytes) -> Path:
    """Keep an upload on disk under a content-addressed name (checkpoints are read by path)."""
    import hashlib

    path = UPLOADS / f"{hashlib.sha256(data).hexdigest()[:16]}-{Path(name).name}"
    if not path.exists():
        zoo.write_atomically(path, lambda p: p.write_bytes(data))
    return path


def selection() -> tuple[str, str, int]:
    """(model id, device choice, calibration images) picked in the sidebar.

    The model id is a zoo name, or `path|arch|dataset` for a user's checkpoint.
    """
    name = st.session_state.get(MODEL, next(iter(zoo.ZOO)))
    if name == OWN_CHECKPOINT:
        path = st.session_state.get(CHECKPOINT_PATH) or ""
        data = st.session_state.get(CHECKPOINT_DATA) or ""
        if not path or not data:
            raise UserError("choose a checkpoint (upload or path) and its dataset in the sidebar")
        name = f"{path}|{st.session_state.get(CHECKPOINT_ARCH)}|{data}"
    device = st.session_state.get(DEVICE, "auto")
    samples = st.session_state.get(CALIBRATION, CALIBRATION_DEFAULT)
    chosen = subject(name, device)
    images = min(samples, len(chosen.dataset.calibration))
    for caveat in chosen.dataset.caveats + prune.calibration_caveats(chosen.loaded.model, images):
        st.warning(caveat)  # legal but meaningless: say so above the numbers
    return name, device, samples


def guarded(render) -> None:
    """Run a page body; bad input or a full device becomes a message, never a traceback."""
    try:
        render()
    except UserError as error:
        st.error(str(error))
    except MemoryError:
        st.error("out of memory: choose fewer calibration images or a smaller model")
    except RuntimeError as error:
        if "out of memory" not in str(error):
            raise
        st.error("the device ran out of memory: choose fewer calibration images, or the CPU")


# --- cached resources (never mutated) --------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def backend(choice: str) -> _backend.Backend:
    return _backend.choose_backend(choice)


@st.cache_resource(show_spinner="Loading model and data…", max_entries=OPEN_MODELS)
def subject(model_id: str, device: str) -> zoo.Subject:
    spec, _, rest = model_id.partition("|")
    arch, _, data = rest.partition("|")
    return zoo.open_subject(spec, device=backend(device).device, arch=arch or None, data=data or None)


class _Progress:
    """A progress bar that appears at the first report, so that reused results show nothing."""

    def __init__(self, text: str):
        self.text, self.bar = text, None

    def __call__(self, fraction: float) -> None:
        self.bar = self.bar or st.progress(0.0, text=self.text)
        self.bar.progress(min(max(fraction, 0.0), 1.0), text=self.text)

    def __enter__(self) -> _Progress:
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
        with _Progress(text) as report:
            return work(report)

    return _store(kind).get(key, compute)


def analysis(model_id: str, device: str, samples: int) -> prune.Analysis:
    def work(report) -> prune.Analysis:
        chosen = subject(model_id, device)
        calibration = chosen.dataset.calibration
        batches = calibration.subset(slice(0, min(samples, len(calibration)))).batches(250)
        return prune.analyse(chosen.loaded.model, batches, device=backend(device).device,
                             input_shape=chosen.dataset.input_shape, progress=report)

    return _with_progress("analysis", (model_id, device, samples), "Input statistics of every "
                          f"layer on {samples:,} calibration images, then fidelity scores…", work)


@st.cache_resource(show_spinner="Pruning: compensating, cutting, recalibrating BatchNorm…",
                   max_entries=PRUNED_MODELS)
def pruned(model_id: str, device: str, samples: int, plan: prune.PrunePlan,
           compensation: str, recalibrate: bool):
    return analysis(model_id, device, samples).apply(plan, compensation=compensation,
                                                     recalibrate=recalibrate)


# --- cached numbers and tables --------------------------------------------------------------------

@st.cache_data(show_spinner="Evaluating on the test split…", max_entries=CACHED_TABLES)
def evaluation(model_id: str, device: str, *, full: bool = True) -> metrics.Evaluation:
    chosen = subject(model_id, device)
    return _evaluate(chosen, chosen.loaded.model, device, full=full)


def _evaluate(chosen: zoo.Subject, model, device: str, *, full: bool) -> metrics.Evaluation:
    test = chosen.dataset.test
    split = test if full else test.subset(slice(0, LIVE_TEST_IMAGES))
    return metrics.evaluate(model, split, device=backend(device).device,
                            num_classes=chosen.dataset.num_classes)


@st.cache_data(show_spinner="Counting MACs…", max_entries=CACHED_TABLES)
def cost(model_id: str, device: str) -> metrics.Cost:
    chosen = subject(model_id, device)
    return metrics.count_cost(chosen.loaded.model, chosen.dataset.input_shape)


@st.cache_data(show_spinner="Timing the forward pass…", max_entries=CACHED_TABLES)
def latency(model_id: str, device: str, batch_size: int) -> metrics.Latency:
    chosen = subject(model_id, device)
    return metrics.measure_latency(chosen.loaded.model, chosen.dataset.input_shape,
                                   backend=backend(device), batch_size=batch_size)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def plan(model_id: str, device: str, samples: int, target: float, kind: str, allocation: str,
         method: str, scope: str = "all", round_to: int = 8) -> prune.PrunePlan:
    return analysis(model_id, device, samples).plan(target, target_kind=kind, allocation=allocation,
                                                    method=method, scope=scope, round_to=round_to)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def channel_table(model_id: str, device: str, samples: int, target: float) -> pd.DataFrame:
    chosen = analysis(model_id, device, samples)
    return tables.channel_table(chosen, chosen.plan(target))


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def layer_scores(model_id: str, device: str, samples: int, layer: str) -> dict:
    return tables.layer_scores(analysis(model_id, device, samples), layer)


@st.cache_data(show_spinner="Fidelity of growing HiFi sets…", max_entries=CACHED_TABLES)
def fidelity_curve(model_id: str, device: str, samples: int, layer: str, out: int) -> pd.DataFrame:
    return tables.fidelity_curve(analysis(model_id, device, samples), layer, out)


@st.cache_data(show_spinner="Smallest HiFi sets of every layer…", max_entries=CACHED_TABLES)
def hifi_table(model_id: str, device: str, samples: int) -> pd.DataFrame:
    return tables.hifi_table(analysis(model_id, device, samples))


@st.cache_data(show_spinner="Evaluating the pruned model…", max_entries=CACHED_TABLES)
def pruned_evaluation(model_id: str, device: str, samples: int, plan: prune.PrunePlan,
                      compensation: str, recalibrate: bool, full: bool) -> metrics.Evaluation:
    model = pruned(model_id, device, samples, plan, compensation, recalibrate)
    return _evaluate(subject(model_id, device), model, device, full=full)


@st.cache_data(show_spinner="Timing dense and pruned models side by side…",
               max_entries=CACHED_TABLES)
def pruned_latency(model_id: str, device: str, samples: int, plan: prune.PrunePlan,
                   compensation: str, recalibrate: bool, batch_size: int = 64) -> list[metrics.Latency]:
    chosen = subject(model_id, device)
    model = pruned(model_id, device, samples, plan, compensation, recalibrate)
    return metrics.measure_latencies([chosen.loaded.model, model], chosen.dataset.input_shape,
                                     backend=backend(device), batch_size=batch_size, repeats=15)


CURVE_METHODS = (("modhifi-greedy", "refit"), ("modhifi", "refit"), ("modhifi", "rescale"),
                 ("l1", "none"), ("activation", "none"), ("random", "none"))


def sparsity_curve(model_id: str, device: str, samples: int, kind: str,
                   targets: tuple[float, ...]) -> pd.DataFrame:
    def work(report) -> pd.DataFrame:
        chosen, study = subject(model_id, device), analysis(model_id, device, samples)
        runs = [(method, compensation, target) for method, compensation in CURVE_METHODS
                for target in targets]
        rows = []
        for done, (method, compensation, target) in enumerate(runs, 1):
            chosen_plan = study.plan(target, target_kind=kind, method=method)
            model = study.apply(chosen_plan, compensation=compensation)
            rows.append({"method": f"{method} ({compensation})", "target": target,
                         "macs_reduction": chosen_plan.speedup_macs,
                         "accuracy": _evaluate(chosen, model, device, full=False).accuracy})
            report(done / len(runs))
        return pd.DataFrame(rows)

    return _with_progress("sparsity_curve", (model_id, device, samples, kind, targets),
                          "Pruning, recalibrating and evaluating ModHiFi and the baselines…", work)


@st.cache_data(show_spinner="Packing the pruned model…", max_entries=CACHED_DOWNLOADS)
def pruned_download(model_id: str, device: str, samples: int, plan: prune.PrunePlan,
                    compensation: str, recalibrate: bool) -> tuple[bytes, str, str]:
    """(checkpoint bytes, removed channels as JSON, as CSV)."""
    chosen = subject(model_id, device)
    model = pruned(model_id, device, samples, plan, compensation, recalibrate)
    removed = plan.removed_channels()
    csv = pd.DataFrame([(g, c) for g, cs in removed.items() for c in cs],
                       columns=["group", "channel"]).to_csv(index=False)
    return (zoo.checkpoint_bytes(model, base=_base(model_id, chosen), removed=removed),
            json.dumps(removed, indent=1), csv)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def _editable_count(model_id: str, device: str, edit: str | None) -> int:
    chosen = subject(model_id, device)
    example = next(chosen.dataset.calibration.batches(1, device=backend(device).device))
    return len(unlearn.editable_layers(chosen.loaded.model, example, edit=edit))


def editable_layers(model_id: str, device: str, edit: str | None) -> int:
    """How many layers before the classifier ModHiFi-U can edit with this edit (None: the
    model's default); a layer count chosen earlier for another edit is lowered to fit."""
    most = _editable_count(model_id, device, edit)
    if (st.session_state.get(UNLEARN_LAYERS) or 0) > most:
        st.session_state[UNLEARN_LAYERS] = most
    return most


@st.cache_resource(show_spinner="Forgetting: forget-class statistics, choosing k, editing, auditing…",
                   max_entries=UNLEARNED_MODELS)
def unlearned(model_id: str, device: str, forget_class: int, layers: int | None, k: float | None,
              edit: str | None, target: float) -> unlearn.UnlearnResult:
    chosen = subject(model_id, device)
    return unlearn.unlearn(chosen.loaded.model, chosen.dataset, forget_class=forget_class,
                           device=backend(device).device, edit=edit, layers=layers, k=k,
                           target_forget_accuracy=target)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def unlearned_evaluation(model_id: str, device: str, forget_class: int, layers: int | None,
                         k: float | None, edit: str | None, target: float) -> metrics.Evaluation:
    model = unlearned(model_id, device, forget_class, layers, k, edit, target).model
    return _evaluate(subject(model_id, device), model, device, full=True)


@st.cache_data(show_spinner=False, max_entries=CACHED_TABLES)
def forget_examples(model_id: str, device: str, forget_class: int, layers: int | None,
                    k: float | None, edit: str | None, target: float, count: int = 8) -> pd.DataFrame:
    """Test images of the forget class with the predictions before and after (image as uint8)."""
    chosen = subject(model_id, device)
    test = chosen.dataset.test
    images = test.subset((test.labels == forget_class).nonzero().flatten()[:count])
    after = unlearned(model_id, device, forget_class, layers, k, edit, target).model
    classes = chosen.dataset.classes

    def predicted(model) -> list[str]:
        return [classes[i] for i in metrics.predict(model, images, device=backend(device).device).argmax(1)]

    return pd.DataFrame({"image": [img.permute(1, 2, 0).squeeze(-1).numpy() for img in images.images],
                         "before": predicted(chosen.loaded.model), "after": predicted(after)})


@st.cache_data(show_spinner="Packing the edited model…", max_entries=CACHED_DOWNLOADS)
def unlearned_download(model_id: str, device: str, forget_class: int, layers: int | None,
                       k: float | None, edit: str | None, target: float) -> bytes:
    chosen = subject(model_id, device)
    result = unlearned(model_id, device, forget_class, layers, k, edit, target)
    return zoo.checkpoint_bytes(result.model, base=_base(model_id, chosen), removed={})


def _base(model_id: str, chosen: zoo.Subject) -> dict:
    """What a downloaded modified model is rebuilt from (see `selection` for the id's form)."""
    spec, _, rest = model_id.partition("|")
    return zoo.base_of(spec, rest.partition("|")[0] or None, chosen.dataset)


@st.cache_data(show_spinner="Masking the layer's inputs: local error from statistics, global measured…",
               max_entries=CACHED_TABLES)
def local_global(model_id: str, device: str, samples: int, layer: str) -> theory.LocalGlobal:
    return theory.local_global(analysis(model_id, device, samples), layer)


@st.cache_data(show_spinner="Feature changes under translations and deformations, by depth…",
               max_entries=CACHED_TABLES)
def invariance(model_id: str, device: str, samples: int) -> pd.DataFrame:
    chosen, study = subject(model_id, device), analysis(model_id, device, samples)
    half = study.apply(study.plan(0.5, target_kind="macs"))
    images = next(chosen.dataset.test.batches(128, device=backend(device).device))
    return theory.invariance({"dense": chosen.loaded.model, "pruned (½ MACs)": half}, images)


@st.cache_data(show_spinner="Smallest HiFi sets, trained against untrained…",
               max_entries=CACHED_TABLES)
def hifi_existence(model_id: str, device: str, samples: int) -> theory.HifiExistence:
    study = analysis(model_id, device, samples)
    untrained = (theory.untrained_analysis(zoo.ZOO[model_id].build, study).fidelity
                 if model_id in zoo.ZOO else None)
    return theory.hifi_existence(study.fidelity, untrained=untrained)
