"""The model registry: built-in zoo models, torchvision architectures, and safe checkpoint loading.

Checkpoints are dicts of tensors and plain values read with `torch.load(weights_only=True)`:
a file that would need to unpickle code is refused. Train a zoo model with
`python -m modhifi.zoo train NAME` (writes `assets/NAME.pt` and its model card `assets/NAME.json`).
"""
from __future__ import annotations

import datetime
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from modhifi import nets
from modhifi.data import Dataset, load_dataset
from modhifi.errors import UserError
from modhifi.options import RETRAIN_REFERENCE_SECONDS
from modhifi.training import TrainConfig, train

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CHECKPOINT_FORMAT = "modhifi-checkpoint/1"


def torchvision_archs() -> tuple[str, ...]:
    """Every torchvision classification builder (`torchvision.models.list_models`)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))



@dataclass(frozen=True)
class ZooEntry:
    """A built-in model: how to build it, its data, what it must reach, how it was trained."""

    name: str
    arch: str
    dataset: str
    build: Callable[[], nn.Module]
    min_accuracy: float
    train: TrainConfig
    # The Unlearn page's first view: class 0, unless forgetting it changes more than 20% of the
    # other classes' calibration predictions (docs/benchmarks/unlearn_<name>.csv); then the class
    # whose edit changes the fewest.
    forget_class: int = 0

    @property
    def checkpoint(self) -> Path:
        return ASSETS / f"{self.name}.pt"

    @property
    def card(self) -> Path:
        return ASSETS / f"{self.name}.json"


ZOO = {entry.name: entry for entry in (
    ZooEntry("fmnist-resnet", "ResNet (32-64-128, BatchNorm, residual additions)", "fashion-mnist",
             nets.ResNet, 0.92, TrainConfig(epochs=6)),
    ZooEntry("fmnist-vgg", "VGG (2x32-2x64-2x128, BatchNorm)", "fashion-mnist",
             nets.vgg, 0.92, TrainConfig(epochs=6)),
    ZooEntry("fmnist-vit", "ViT (patch 4, dim 96, depth 4, LayerNorm)", "fashion-mnist",
             nets.ViT, 0.88, TrainConfig(epochs=12, optimizer="adamw", lr=2e-3,
                                         weight_decay=0.05)),
    ZooEntry("digits-cnn", "tiny CNN (16-32, BatchNorm)", "digits",
             nets.tiny_cnn, 0.95, TrainConfig(epochs=30, lr=0.05, shift=1, flip=False),
             forget_class=5),
)}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode, on the requested device) and where it came from."""

    name: str
    arch: str
    dataset: str
    model: nn.Module
    trained: bool  # False: random weights, only fit for speed exploration


def load_model(spec: str, *, device: torch.device, arch: str | None = None,
               dataset: str | None = None, num_classes: int = 10,
               in_channels: int = 3) -> LoadedModel:
    """Load a zoo model by name, or a checkpoint file (ours, pruned ones included, or a user's).

    Args:
        spec: a zoo name (`fmnist-resnet`), a checkpoint path, or `random` with `arch` (untrained).
        arch: torchvision classification architecture of a user's checkpoint (`torchvision_archs`).
        dataset: dataset spec of a user's checkpoint (see data.load_dataset).
        num_classes, in_channels: shape of the torchvision head and stem.
    """
    if spec in ZOO:
        entry = ZOO[spec]
        if not entry.checkpoint.is_file():
            raise UserError(f"zoo checkpoint {entry.checkpoint} is missing: run "
                            f"`python -m modhifi.zoo train {spec}`")
        model = entry.build()
        _load_state(model, read_checkpoint(entry.checkpoint)["state_dict"], entry.checkpoint)
        return LoadedModel(spec, entry.arch, entry.dataset, model.eval().to(device), True)
    if spec == "random":
        if arch is None:
            raise UserError("an untrained model needs --arch: a torchvision classification "
                            "builder such as resnet18 (python -m modhifi models lists them)")
        model = build_torchvision(arch, num_classes=num_classes, in_channels=in_channels)
        return LoadedModel(f"{arch} (untrained)", arch, dataset or "", model.eval().to(device), False)
    path = Path(spec)
    state = read_checkpoint(path)
    if "base" in state:  # one of ours: a modified copy of a base model
        return _load_modified(path, state, device=device)
    if arch is None:
        raise UserError(f"{spec!r} is not a zoo model ({', '.join(ZOO)}); for a checkpoint file "
                        "also give --arch and --data")
    model = build_torchvision(arch, num_classes=num_classes, in_channels=in_channels)
    _load_state(model, state.get("state_dict", state), path)
    return LoadedModel(path.name, arch, dataset or "", model.eval().to(device), True)


@torch.inference_mode(False)  # the cut traces autograd, which inference-mode parameters cannot join
def _load_modified(path: Path, state: dict, *, device: torch.device) -> LoadedModel:
    """Rebuild a saved modified model: its base's architecture (the base's weights are not
    read: the file holds every weight, and is read where the base is not), the same channels
    cut, then its weights."""
    from modhifi.prune import cut_channels

    base, removed = _checked_base(state, path)
    spec, arch = base["model"], base.get("arch")
    if spec in ZOO:
        model, arch, dataset = ZOO[spec].build(), ZOO[spec].arch, ZOO[spec].dataset
    elif arch is not None:
        model = build_torchvision(arch, num_classes=base["num_classes"],
                                  in_channels=base["input_shape"][0])
        dataset = base.get("dataset") or ""
    else:
        raise UserError(f"checkpoint {path} names no architecture for its base {spec}; the file "
                        "is damaged or was edited: save the modified model again")
    try:
        for step in removed:  # iterative pruning: one step per round
            cut_channels(model, step, tuple(base["input_shape"]))
    except (UserError, AttributeError, IndexError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} lists channels its base model {spec} does not have "
                        f"({type(error).__name__}); the file is damaged or was edited: save the "
                        "modified model again") from None
    _load_state(model, state["state_dict"], path)
    return LoadedModel(path.name, f"{arch}, modified", dataset, model.eval().to(device),
                       trained=spec != "random")


def _checked_base(state: dict, path: Path) -> tuple[dict, list[dict]]:
    """The `base` entry and the removed channels (one dict per round) of a modified model's
    checkpoint, or a one-line UserError naming what is malformed."""
    base, removed = state.get("base"), state.get("removed", {})
    steps = listed_rounds(removed)
    shape = base.get("input_shape") if isinstance(base, dict) else None
    problem = (
        "`base` is not a dict" if not isinstance(base, dict) else
        "`base.model` is not a name or path" if not isinstance(base.get("model"), str) else
        "`base.input_shape` is not three positive integers" if not (
            isinstance(shape, (list, tuple)) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)) else
        "`base.num_classes` is not a positive integer" if not (
            isinstance(base.get("num_classes"), int) and base["num_classes"] > 0) else
        "`removed` is not {group: [channel, ...]}" if not all(
            isinstance(step, dict) and all(isinstance(k, str) and isinstance(v, (list, tuple))
                                           and all(isinstance(i, int) and i >= 0 for i in v)
                                           for k, v in step.items()) for step in steps) else
        "`state_dict` is missing" if not isinstance(state.get("state_dict"), dict) else None)
    if problem:
        raise UserError(f"checkpoint {path} is damaged or was edited: {problem}; save the "
                        "modified model again")
    return base, steps


@dataclass(frozen=True)
class Subject:
    """What every command works on: a loaded model and the dataset it was trained on."""

    loaded: LoadedModel
    dataset: Dataset


def open_subject(spec: str, *, device: torch.device, arch: str | None = None,
                 data: str | None = None, calibration_size: int | None = None) -> Subject:
    """Load a model with its dataset (a zoo model's own, or `data` for a checkpoint)."""
    base = None
    if spec in ZOO:
        if data is not None and data != ZOO[spec].dataset:
            raise UserError(f"--data {data} does not apply to zoo model {spec}, which is "
                            f"evaluated on its own dataset ({ZOO[spec].dataset}); leave --data out")
        if arch is not None:
            raise UserError(f"--arch {arch} does not apply to zoo model {spec}, which has its "
                            "own architecture; leave --arch out")
        data = ZOO[spec].dataset
    elif Path(spec).is_file():
        state = read_checkpoint(Path(spec))
        if "base" in state:  # a modified model: it knows its dataset
            base, _ = _checked_base(state, Path(spec))
            data = data or base.get("dataset")
    if data is None and spec not in ZOO and arch is None:
        raise UserError(f"{spec!r} is not a zoo model ({', '.join(ZOO)}); for a checkpoint file "
                        "also give --arch and --data")
    if data is None:
        raise UserError(f"no dataset for {spec!r}: give --data (fashion-mnist, digits, "
                        "cifar10:DIR or imagefolder:DIR)")
    dataset = load_dataset(data, calibration_size=calibration_size)
    if base is not None and (list(dataset.input_shape) != list(base["input_shape"])
                             or dataset.num_classes != base["num_classes"]):
        raise UserError(f"{spec} was made for {base['num_classes']} classes of "
                        f"{'×'.join(map(str, base['input_shape']))} images, but "
                        f"--data {data} has {dataset.num_classes} classes of "
                        f"{'×'.join(map(str, dataset.input_shape))}; use the dataset it was "
                        "made for")
    loaded = load_model(spec, device=device, arch=arch, dataset=data,
                        num_classes=dataset.num_classes, in_channels=dataset.input_shape[0])
    return Subject(loaded, dataset)


def build_torchvision(arch: str, *, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A torchvision architecture with random weights (`weights=None`; nothing is downloaded)."""
    import torchvision

    if arch not in torchvision_archs():
        raise UserError(f"unknown architecture {arch!r}: use a torchvision classification "
                        "builder such as resnet18 (python -m modhifi models lists them)")
    if in_channels != 3:
        raise UserError(f"{arch} expects 3-channel images but the dataset has {in_channels}: "
                        "use an RGB dataset (cifar10:DIR or imagefolder:DIR)")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def read_checkpoint(path: Path) -> dict:
    """Read a checkpoint safely (tensors and plain values only, never code)."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a malformed file can fail anywhere inside the unpickler
        if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in str(error).upper():
            raise UserError(f"refused to load {path}: it needs to unpickle code, which could run "
                            "anything; save a plain state_dict (tensors only)") from None
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({type(error).__name__}): "
                        "save it with torch.save(model.state_dict())") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict: "
                        "save it with torch.save(model.state_dict())")
    return state


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    """Load a state_dict, or raise one UserError listing every mismatch."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: {tuple(v.shape)} in file, {tuple(expected[k].shape)} in model"
                 for k, v in state.items()
                 if k in expected and getattr(v, "shape", None) != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"checkpoint {path} does not fit the architecture: {shown}")
    model.load_state_dict(state)


def check_output(path: Path) -> Path:
    """Raise a one-line UserError unless a file can be written at `path` (checked before work)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder: give a file name inside it, e.g. {path / 'model.pt'}")
    folder = path.parent
    while not folder.exists():  # the folders to create: the first existing ancestor decides
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: no permission to write in {folder}; choose another path")
    return path


def write_together(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write several files as one unit: each is written and flushed to disk in a private
    temporary folder beside its target, then renamed into place in the order given; if any step
    fails, those already placed are removed, so a partial set is never left behind.

    New files get the usual permissions (0666 less the umask), unlike `tempfile.mkstemp`'s 0600.

    Args:
        files: target path -> a function that writes the file at the path it is given.
    """
    staged: list[tuple[Path, Path]] = []
    folders: list[Path] = []
    placed: list[Path] = []
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.append(Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")))
            temporary = folders[-1] / path.name
            write(temporary)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            staged.append((temporary, path))
        for temporary, path in staged:
            os.replace(temporary, path)
            placed.append(path)
        for folder in {path.parent for path in files}:
            descriptor = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # the renames themselves reach the disk
            finally:
                os.close(descriptor)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write one file through a temporary one beside it, so no half-written file is ever left."""
    write_together({Path(path): write})


def cost_cache(spec: str, model: nn.Module, backend, batch_size: int, inputs: object, *,
               beside: bool = True) -> Path:
    """Where `spec`'s latency cost model (`prune.latency`, `text.latency`) for this device,
    batch size and `inputs` is cached: beside a checkpoint file or a text model's folder (when
    `beside`: the command line); else, and for a zoo or untrained model, in
    `data.cache_root()`/latency (the dashboard writes only there, never into the project's
    assets or a visitor's folders)."""
    from modhifi.data import cache_root
    from modhifi.prune.latency import cost_file

    path = Path(spec)
    if beside and (path.is_file() or path.is_dir()):
        return cost_file(path.parent, path.stem if path.is_file() else path.name, model, backend,
                         batch_size, inputs)
    return cost_file(cache_root() / "latency", path.name, model, backend, batch_size, inputs)


def base_of(spec: str, arch: str | None, dataset: Dataset) -> dict:
    """The `base` entry of a modified model's checkpoint: what `load_model` rebuilds it from,
    its files named by absolute paths (read from any folder, not only the one it was made in)."""
    kind, _, folder = dataset.name.partition(":")
    data = f"{kind}:{Path(folder).resolve()}" if folder else dataset.name
    model = str(Path(spec).resolve()) if spec not in ZOO and Path(spec).exists() else spec
    return {"model": model, "arch": arch, "dataset": data,
            "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape)}


def lineage(spec: str, arch: str | None, dataset: Dataset, removed: list[dict]) -> dict:
    """The `base` and `removed` entries of the checkpoint of a model modified from model `spec`
    by rounds of `removed` channels ({group: channels} each; none for an edit that keeps every
    channel). Where `spec` is itself a modified model, its base and rounds come first: a chain of
    modifications is rebuilt from the first base, which is never a modified model."""
    state = read_checkpoint(Path(spec)) if spec not in ZOO and Path(spec).is_file() else {}
    base, before = (_checked_base(state, Path(spec)) if "base" in state
                    else (base_of(spec, arch, dataset), []))
    return {"base": base, "removed": rounds_listing([*before, *removed])}


def rounds_listing(rounds: Iterable[dict]) -> dict | list[dict]:
    """Rounds of removed channels (or components) as a checkpoint or a folder lists them: one
    round as it is, several as a list, none as {} (a round that removed nothing left out)."""
    rounds = [step for step in rounds if step]
    return rounds[0] if len(rounds) == 1 else rounds or {}


def listed_rounds(listing: dict | list) -> list:
    """The rounds a `rounds_listing` lists (its inverse)."""
    return listing if isinstance(listing, list) else [listing] if listing else []


def checkpoint_state(model: nn.Module, **meta) -> dict:
    """A state_dict with plain metadata (loadable with weights_only=True).

    A modified model passes `base={"model", "arch", "dataset", "num_classes", "input_shape"}`
    and `removed={group: channels}` so that `load_model(path)` rebuilds its shape.
    """
    return {"format": CHECKPOINT_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **meta}


def save_checkpoint(path: Path, model: nn.Module, **meta) -> None:
    """Write `checkpoint_state(model, **meta)` atomically."""
    state = checkpoint_state(model, **meta)
    write_atomically(Path(path), lambda p: torch.save(state, p))


def checkpoint_bytes(model: nn.Module, **meta) -> bytes:
    """`checkpoint_state(model, **meta)` as the bytes of a .pt file (for downloads)."""
    buffer = io.BytesIO()
    torch.save(checkpoint_state(model, **meta), buffer)
    return buffer.getvalue()


def model_card(name: str) -> dict:
    """The committed model card of a zoo model (accuracy, MACs, params, training settings, date)."""
    card = ZOO[name].card
    return json.loads(card.read_text()) if card.is_file() else {}


def train_zoo_model(name: str) -> dict:
    """Train a zoo model from scratch on its dataset; save checkpoint and card; return the card."""
    from modhifi.backend import choose_backend
    from modhifi.metrics import count_cost, evaluate

    entry = ZOO[name]
    dataset = load_dataset(entry.dataset)
    model, seconds = train(entry.build, dataset.train, config=entry.train,
                           log=lambda line: print(f"[{name}] {line}", file=sys.stderr, flush=True))
    cpu = choose_backend("cpu")
    result = evaluate(model, dataset.test, device=cpu.device, num_classes=dataset.num_classes)
    cost = count_cost(model, dataset.input_shape)
    card = {"name": name, "arch": entry.arch, "dataset": entry.dataset,
            "test_accuracy": round(result.accuracy, 4), "test_samples": result.samples,
            "macs": cost.macs, "params": cost.params, "train_samples": len(dataset.train),
            "training": asdict(entry.train), "training_seconds": round(seconds, 1),
            "training_machine": cpu.description, "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}
    save_checkpoint(entry.checkpoint, model, arch=name)
    write_atomically(entry.card, lambda p: p.write_text(json.dumps(card, indent=2) + "\n"))
    return card


def retrainable(spec: str) -> bool:
    """Whether zoo model `spec` trains fast enough (its card's training time on the CPU) to be
    retrained without a class as the reference of an unlearning edit."""
    seconds = model_card(spec).get("training_seconds") if spec in ZOO else None
    return seconds is not None and seconds <= RETRAIN_REFERENCE_SECONDS


def retrained_without(spec: str, dataset: Dataset, forget_class: int, *,
                      device: torch.device | str) -> nn.Module:
    """Unlearning's gold standard: zoo model `spec` trained again from scratch, by its own recipe
    and seed, on its training split without any image of `forget_class` (a model that never saw
    the class). Trained on the CPU; returned in eval mode on `device`."""
    if not retrainable(spec):
        raise UserError(f"{spec!r} is not a zoo model that trains within "
                        f"{RETRAIN_REFERENCE_SECONDS} s; compare with retraining only on one "
                        f"of: {', '.join(name for name in ZOO if retrainable(name))}")
    split = dataset.train
    model, _ = train(ZOO[spec].build, split.subset(split.labels != forget_class),
                     config=ZOO[spec].train, log=lambda line: None)
    return model.to(device)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "train" or argv[1] not in (*ZOO, "all"):
        print(f"usage: python -m modhifi.zoo train {{{','.join(ZOO)},all}}", file=sys.stderr)
        return 2
    for name in ZOO if argv[1] == "all" else [argv[1]]:
        print(json.dumps(train_zoo_model(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
