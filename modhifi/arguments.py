"""What the command line accepts: its parser, which options go with which kind of model, and
the checks of every option's range and every output path, made before any work starts (one
line and exit 2 on bad input: `modhifi.__main__` runs the commands)."""
from __future__ import annotations

import argparse
from pathlib import Path

from modhifi.errors import UserError
from modhifi.options import (CALIBRATION_CLI, CALIBRATION_TEXT, CALIBRATION_THEORY,
                             COMPONENT_LABELS, DEFAULT_ALLOCATION, DEFAULT_COMPONENT,
                             DEFAULT_METHOD, METHOD_LABELS, ROUND_TO, WHY_FORGET_TARGET, WHY_K,
                             WHY_ROUND_TO, WHY_STEPS, Allocation, Compensation, Component,
                             DeviceChoice, Edit, Method, Scope, TargetKind, check_fraction,
                             check_target, check_whole, choices)


COMMANDS = {
    "models": "list the built-in model zoo and the architectures --arch takes",
    "info": "accuracy, MACs, params and latency of a model",
    "prune": "ModHiFi-P: remove channels, compensate, recalibrate BatchNorm",
    "unlearn": "ModHiFi-U: forget one class without fine-tuning, and audit it",
    "theory": "local vs global error, Lipschitz bound constants, HiFi existence",
    "bench": "short benchmark: ModHiFi vs baselines, speed-up, slider latency",
    "scores": "per-layer singleton fidelity and saliency as a CSV table",
}  # name -> help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modhifi", description="ModHiFi Studio command line")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--json", action="store_true", help="print one JSON object")
        command.add_argument("--device", default="auto", choices=choices(DeviceChoice))
        if name == "bench":
            command.add_argument("--quick", action="store_true", help="the short version")
        if name != "models":
            command.add_argument("--model", required=name != "bench", default="fmnist-resnet",
                                 help="zoo name or checkpoint path (with --arch and --data)")
            command.add_argument("--arch", help="torchvision classification architecture of a "
                                                "checkpoint (any builder: `modhifi models`)")
            command.add_argument("--data", help="dataset of a checkpoint: fashion-mnist, digits, "
                                                "cifar10:DIR, imagefolder:DIR")
            command.add_argument("--batch-size", type=int, default=64,
                                 help="batch size for latency timing")
        if name in ("prune", "scores", "theory"):
            command.add_argument("--calib-samples", type=int,
                                 help=f"unlabeled calibration images ({_default_samples(name)})")
        if name == "unlearn":
            command.add_argument("--forget-class", required=True, help="class index or name")
            command.add_argument("--edit", choices=choices(Edit),
                                 help="default: zero for BatchNorm networks, negate for LayerNorm "
                                      "ones; direction: one neuron of a Transformer's last "
                                      "feed-forward layer made a gate on the class's direction "
                                      "(no --layers, --k)")
            command.add_argument("--layers", type=int,
                                 help="edit the last L layers (default: chosen with k, 1 to 4; "
                                      "the last 4 when --k is given)")
            command.add_argument("--k", type=float, help="share of (output, input) pairs edited "
                                                         "per layer (default: chosen automatically)")
            command.add_argument("--forget-target", type=float, default=0.0,
                                 help="forget-class accuracy on the calibration images that the "
                                      "automatic choice aims for (default 0; a little above 0 "
                                      "spares the other classes where 0 is out of reach, e.g. "
                                      "0.02 on fmnist-vit)")
            command.add_argument("--out", help="write the edited model here")
        if name == "scores":
            command.add_argument("--out", required=True, help="CSV file to write")
            command.add_argument("--target", type=float,
                                 help="also mark which inputs a uniform channel target keeps")
            command.add_argument("--forget-class",
                                 help="saliency centred for forgetting this class (index or name)")
        if name == "prune":
            command.add_argument("--target", type=float, required=True,
                                 help="fraction of channels (or of MACs, or of latency) to remove")
            command.add_argument("--target-kind", choices=choices(TargetKind), default="channels",
                                 help="latency: of the measured latency on this device at "
                                      "--batch-size (each layer timed once at candidate widths, "
                                      "cached beside the model; JSON adds speedup_planned)")
            command.add_argument("--allocation", choices=choices(Allocation),
                                 help=f"image models: default {DEFAULT_ALLOCATION}")
            command.add_argument("--scope", choices=choices(Scope), default="all",
                                 help="internal: leave residual-stream channels alone")
            command.add_argument("--method", choices=choices(Method),
                                 help=f"default: {DEFAULT_METHOD}; " + "; ".join(
                                          f"{name}: {label}" for name, label in METHOD_LABELS.items()))
            command.add_argument("--components", choices=choices(Component),
                                 help=f"text models only: what to remove (default "
                                      f"{DEFAULT_COMPONENT}), " + "; ".join(
                                     f"{name}: {label}" for name, label in COMPONENT_LABELS.items()))
            command.add_argument("--round-to", type=int,
                                 help=f"keep multiples of this many channels per group (default "
                                      f"{ROUND_TO}, text heads 1; 16 suits AVX-512 CPUs; 1: exact "
                                      "counts)")
            command.add_argument("--compensation", choices=choices(Compensation),
                                 help="default for modhifi and modhifi-greedy on image "
                                      "models: sequential where its recordings of the "
                                      "calibration images fit in memory, else refit; none for "
                                      "the baselines. sequential: the refit layer by layer on "
                                      "the pruned network's own inputs (more accurate, about "
                                      "one analysis more); refit: in one shot, on the dense "
                                      "model's statistics")
            command.add_argument("--steps", type=int,
                                 help="image models, iterative mode: rounds of score, remove, "
                                      "compensate, recalibrate (default 1)")
            command.add_argument("--no-bn-recal", action="store_true",
                                 help="keep the old BatchNorm statistics")
            command.add_argument("--out", help="write the pruned model here (and FILE.channels.json); "
                                               "for a text model, a new folder")
    return parser


# Options for one kind of model only: (command, or "*" for all, option) -> (that kind, what the
# other kind does instead, the value that asks for just that or None). Given with another value
# for the other kind, they are refused before any work.
ONE_KIND_ONLY = {
    ("*", "arch"): ("image", "a text model is a Hugging Face folder or a zoo name", None),
    ("*", "data"): ("image", "a text model is evaluated on Debian's fortunes", None),
    ("prune", "components"): ("text", "an image model's components are its channels", None),
    ("prune", "allocation"): ("image", "a text model's plan removes the same share of every "
                                       "layer", "uniform"),
    ("prune", "steps"): ("image", "a text model is pruned in one round", 1),
    **{("unlearn", option): ("image", "a text model's edit is one FFN neuron of the last layer "
                                      "made a gate", None) for option in ("edit", "layers", "k")},
}


def _default_samples(command: str) -> str:
    """What `command` reads without --calib-samples."""
    images = CALIBRATION_THEORY if command == "theory" else CALIBRATION_CLI
    texts = "" if command == "theory" else f"; {CALIBRATION_TEXT} texts for a text model"
    return f"default: {images:,} images, or all if fewer{texts}"


def check_arguments(args: argparse.Namespace) -> None:
    """Every option meant for this kind of model, every numeric one in range and every output
    path writable, before any work starts."""
    from modhifi.text.encoder import is_text_model

    def given(name: str):
        return getattr(args, name, None)

    kind = "text" if given("model") and is_text_model(args.model) else "image"
    for (command, option), (only, instead, same) in ONE_KIND_ONLY.items():
        if command in ("*", args.command) and only != kind and given(option) not in (None, same):
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} does not apply to {'a text' if kind == 'text' else 'an image'}"
                            f" model ({instead}); leave {flag} out")

    for option, label, why in (("batch_size", "--batch-size", "images per timed batch"),
                               ("calib_samples", "--calib-samples", "leave it out for the "
                                + _default_samples(args.command)),
                               ("steps", "--steps", WHY_STEPS), ("round_to", "--round-to", WHY_ROUND_TO),
                               ("layers", "--layers", "how many layers to edit")):
        if given(option) is not None:
            check_whole(label, given(option), why)
    if given("target") is not None:
        check_target(args.target)
    if given("k") is not None:
        check_fraction("--k", args.k, low_open=True, why=WHY_K)
    if given("forget_target") is not None:
        check_fraction("--forget-target", args.forget_target, why=WHY_FORGET_TARGET)
    if given("out"):
        from modhifi.zoo import check_output

        check_output(Path(args.out))
        if given("model") and Path(args.model).is_file() and Path(args.out).resolve() == \
                Path(args.model).resolve():  # a zoo name is no file, whatever --out is called
            raise UserError(f"--out {args.out} is the model given: the result would replace its "
                            "own base; give another name")
        if args.command in ("prune", "unlearn") and kind == "text" and Path(args.out).exists():
            raise UserError(f"--out {args.out} exists; a text model is written as a new folder: "
                            "give a new name")
        if args.command != "scores":
            check_output(channels_path(Path(args.out)))


def channels_path(out: Path) -> Path:
    """Where a pruned model's channel list is written, beside it."""
    return out.with_name(out.name + ".channels.json")
