"""The command line: `python -m modhifi COMMAND` (also installed as `modhifi`).

Every command returns one flat dict; `--json` prints it as one JSON object on stdout, otherwise
as aligned `key: value` lines. Progress goes to stderr (`modhifi.console`). Bad input: one line
on stderr, exit 2. This module parses and checks the arguments, runs the image commands (shared
by torchrun's processes where they can be) and hands text models to `modhifi.text.commands`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from modhifi.console import RANK, WORLD, class_index, progress, tenths
from modhifi.errors import UserError
from modhifi.options import (CALIBRATION_CLI, COMPONENT_LABELS, DEFAULT_ALLOCATION,
                             DEFAULT_COMPONENT, DEFAULT_METHOD, METHOD_LABELS, ROUND_TO,
                             WHY_FORGET_TARGET, WHY_K, WHY_ROUND_TO, WHY_STEPS, Allocation,
                             Compensation, Component, DeviceChoice, Edit, Method, Scope, TargetKind,
                             check_fraction, check_target, check_whole, choices,
                             default_compensation)
from modhifi.text import commands as text_commands
from modhifi.text.commands import is_text


def _models(args: argparse.Namespace) -> dict:
    from modhifi.zoo import ZOO, model_card, torchvision_archs

    rows = []
    for name, entry in ZOO.items():
        card = model_card(name)
        rows.append({"name": name, "arch": entry.arch, "dataset": entry.dataset,
                     "accuracy": card.get("test_accuracy"), "params": card.get("params"),
                     "macs": card.get("macs"), "trained": entry.checkpoint.is_file()})
    from modhifi.text.encoder import ZOO_TEXT
    from modhifi.text.subject import text_card

    for name in ZOO_TEXT:
        card = text_card(name)
        rows.append({"name": name, "arch": card.get("arch"), "dataset": "fortunes",
                     "accuracy": card.get("test_accuracy"), "params": card.get("params"),
                     "macs": card.get("macs"), "trained": True})
    return {"models": rows, "architectures": list(torchvision_archs())}  # for --arch


def _info(args: argparse.Namespace) -> dict:
    from modhifi.metrics import count_cost, evaluate, measure_latency

    if is_text(args):
        return text_commands.info(args)
    backend, subject = _open(args)
    model, dataset = subject.loaded.model, subject.dataset
    result = evaluate(model, dataset.test, device=backend.device, num_classes=dataset.num_classes,
                      shard=args.shard)
    if not args.shard.is_main:  # process 0 times and prints
        return {}
    cost = count_cost(model, dataset.input_shape)
    latency = measure_latency(model, dataset.input_shape, backend=backend,
                              batch_size=args.batch_size)
    return {"model": subject.loaded.name, "arch": subject.loaded.arch, "dataset": dataset.name,
            "device": backend.description, "accuracy": result.accuracy,
            "per_class_accuracy": dict(zip(dataset.classes, result.per_class)),
            "macs": cost.macs, "params": cost.params, "batch_size": args.batch_size,
            "latency_ms": latency.optimised.median_ms,
            "latency_ms_eager": latency.eager.median_ms, "trained": subject.loaded.trained}


def _prune(args: argparse.Namespace) -> dict:
    import time

    from modhifi.metrics import compare
    from modhifi.prune import analyse, measured_costs, prune_in_steps, trace_structure
    from modhifi.prune.hold import hold_latency, meets
    from modhifi.zoo import cost_cache

    if is_text(args):
        return text_commands.prune(args)
    backend, subject = _open(args)
    model, dataset = subject.loaded.model, subject.dataset
    method, round_to = args.method or DEFAULT_METHOD, args.round_to or ROUND_TO
    allocation = args.allocation or DEFAULT_ALLOCATION
    steps = 1 if args.steps is None else args.steps
    calibration, samples = _calibration(subject, args.calib_samples, args.shard,
                                        backend.device)
    structure = trace_structure(model, dataset.input_shape)  # once: the analysis reuses it
    compensation = _compensation(args, method, model, calibration, structure.consumers)
    costs = None
    if args.target_kind == "latency":
        cache = cost_cache(args.model, model, backend, args.batch_size, dataset.input_shape)
        how = "read from" if cache.is_file() else "timing each layer at candidate widths, kept in"
        progress(f"latency cost model: {how} {cache}")
        costs = measured_costs(model, structure, dataset.input_shape, backend=backend,
                               batch_size=args.batch_size, cache=cache, shard=args.shard)
    progress("statistics and scores on the calibration images")
    start = time.perf_counter()
    options = {"allocation": allocation, "method": method, "scope": args.scope,
               "round_to": round_to}
    tries = None
    if costs is not None and steps == 1:  # cut, time, and plan for more where it fell short
        analysis = analyse(model, calibration, device=backend.device,
                           input_shape=dataset.input_shape, shard=args.shard,
                           progress=tenths("statistics"), structure=structure)
        held = hold_latency(analysis, args.target, costs=costs, backend=backend,
                            batch_size=args.batch_size, compensation=compensation,
                            recalibrate=not args.no_bn_recal, **options)
        pruned, plans, tries = held.model, (held.plan,), list(held.asked)
    else:
        if costs is not None:
            progress("with --steps, each round is planned to the latency target but not timed")
        pruned, plans = prune_in_steps(model, calibration, device=backend.device,
                                       input_shape=dataset.input_shape, target=args.target,
                                       steps=steps, target_kind=args.target_kind,
                                       compensation=compensation,
                                       recalibrate=not args.no_bn_recal, costs=costs,
                                       shard=args.shard, progress=tenths("statistics"),
                                       structure=structure, **options)
    seconds = time.perf_counter() - start
    progress(f"pruned in {seconds:.1f} s; evaluating and timing")
    result = compare(model, pruned, dataset=dataset, backend=backend, batch_size=args.batch_size,
                     latency=args.shard.is_main, shard=args.shard)
    if not args.shard.is_main:  # process 0 times, prints and writes
        return {}
    if args.out:
        removed = [plan.removed_channels() for plan in plans]
        _save_modified(args, subject, pruned, removed=removed[0] if len(removed) == 1 else removed)
    return {"model": subject.loaded.name, "method": method, "target": args.target,
            "target_kind": args.target_kind, "allocation": allocation, "scope": args.scope,
            "round_to": round_to,
            "compensation": compensation, "bn_recalibrated": not args.no_bn_recal,
            "calib_samples": samples, "device": backend.description,
            "accuracy_before": result.before.accuracy, "accuracy_after": result.after.accuracy,
            "macs_before": result.cost_before.macs, "macs_after": result.cost_after.macs,
            "params_before": result.cost_before.params, "params_after": result.cost_after.params,
            "channels_before": plans[0].channels_before, "channels_after": plans[-1].channels_after,
            "steps": steps,
            "batch_size": args.batch_size,
            "latency_ms_before": result.latency_before.optimised.median_ms,
            "latency_ms_after": result.latency_after.optimised.median_ms,
            "speedup_macs": result.speedup_macs, "speedup_measured": result.speedup_measured,
            "speedup_eager": result.speedup_eager,
            # latency targets: what the cost model predicted, beside what was measured
            "speedup_planned": plans[0].latency_before_ms / plans[-1].latency_after_ms
            if costs else None,
            "latency_targets_tried": tries,  # the plans cut and timed until the target held
            "latency_target_met": (meets(args.target, 1 - 1 / result.speedup_measured)
                                   if costs else None),  # by the measurement above
            "seconds": seconds}


def _unlearn(args: argparse.Namespace) -> dict:
    from modhifi.unlearn import unlearn

    if is_text(args):
        return text_commands.unlearn(args)
    backend, subject = _open(args)
    dataset = subject.dataset
    forget = class_index(dataset, args.forget_class)
    progress(f"forgetting class {forget} ({dataset.classes[forget]})")
    result = unlearn(subject.loaded.model, dataset, forget_class=forget, device=backend.device,
                     edit=args.edit, layers=args.layers, k=args.k,
                     target_forget_accuracy=args.forget_target, shard=args.shard)
    if not args.shard.is_main:  # process 0 prints and writes
        return {}
    if args.out:
        _save_modified(args, subject, result.model, removed={})
    return result.summary(model=subject.loaded.name, device=backend.description)


def _theory(args: argparse.Namespace) -> dict:
    from modhifi.theory import theory_report
    from modhifi.zoo import ZOO

    _image_only(args, "the theory report")
    backend, subject = _open(args)
    build = ZOO[args.model].build if args.model in ZOO else None
    report = theory_report(subject.loaded.model, subject.dataset, device=backend.device,
                           name=subject.loaded.name, calib_samples=args.calib_samples,
                           build=build, shard=args.shard)
    return report if args.shard.is_main else {}  # process 0 prints


def _bench(args: argparse.Namespace) -> dict:
    from modhifi.bench import quick

    if not args.quick:
        raise UserError("only `bench --quick` runs from the CLI: the full benchmarks are the "
                        "scripts in benchmarks/ (see docs/results.md)")
    backend, subject = _open(args)
    return {"model": subject.loaded.name,
            **quick(subject.loaded.model, subject.dataset, backend=backend)}


def _scores(args: argparse.Namespace) -> dict:
    from modhifi.prune import analyse
    from modhifi.prune.tables import score_table
    from modhifi.zoo import write_atomically

    if is_text(args):
        return text_commands.scores(args)
    backend, subject = _open(args)
    dataset = subject.dataset
    analysis = analyse(subject.loaded.model, _calibration(subject, args.calib_samples,
                                                          args.shard, backend.device)[0],
                       device=backend.device, input_shape=dataset.input_shape, shard=args.shard,
                       progress=tenths("statistics"))
    if not args.shard.is_main:  # process 0 writes and prints
        return {}
    plan = None if args.target is None else analysis.plan(args.target)
    table = score_table(analysis, plan)
    if args.forget_class is not None:  # the forget-class saliency of the edited layers
        from modhifi.unlearn import score_forget_class, unlearnable_layers

        forget = class_index(dataset, args.forget_class)
        example = next(dataset.calibration.batches(1, device=backend.device))
        scores = score_forget_class(subject.loaded.model, dataset.calibration, forget_class=forget,
                                    layers=unlearnable_layers(subject.loaded.model, example),
                                    device=backend.device).to_frame()
        table = table.drop(columns="saliency").merge(scores, on=["layer", "out_channel", "in_channel"])
    write_atomically(Path(args.out), lambda p: table.to_csv(p, index=False))
    return {"model": subject.loaded.name, "out": args.out, "rows": len(table),
            "layers": int(table["layer"].nunique()), "target": args.target}


# Images per calibration batch: the unit processes share, and one BatchNorm recalibration pass
# (`recalibrate_batchnorm`'s chunk), so that each batch's terms are the same however shared.
CALIBRATION_BATCH = 128
SHARED = ("info", "prune", "scores", "unlearn", "theory")  # whose work torchrun's processes share


def _compensation(args: argparse.Namespace, method: str, model, calibration,
                  order: tuple[str, ...]) -> str:
    """--compensation, else the sequential refit for ModHiFi's selections where its recordings
    of this process's calibration images fit in memory (one analysis more, and the most
    accurate), else the one-shot refit, and none for the baselines; a line on stderr says why
    where the sequential refit is left out or will run long."""
    from modhifi.batch import head
    from modhifi.prune import sequential_recordings
    from modhifi.prune.apply import FRONTIER_BYTES

    chosen = args.compensation or default_compensation(method)
    if args.compensation not in (None, "sequential") or chosen == "none":
        return chosen
    if not order:  # nothing to prune: the analysis says why
        return chosen
    recordings = sequential_recordings(model, head(calibration[0], 1), order,
                                       len(calibration.split), shard=args.shard)
    if recordings.fits:
        return "sequential"
    over = (f"the sequential refit would record at least {recordings.nbytes / 2**30:.1f} GiB "
            f"of activations per pass, over the {FRONTIER_BYTES / 2**30:.0f} GiB it keeps")
    # at least that much per image: an upper bound on the images that fit, over every process
    most = FRONTIER_BYTES * len(calibration.split) // recordings.nbytes * args.shard.world
    fewer = f"--calib-samples {most} or fewer might fit" if most else "no image fits"
    if args.compensation == "sequential":
        progress(f"warning: {over}: each of its passes runs from the input, which takes far "
                 f"longer; {fewer}")
        return "sequential"
    progress(f"compensation: the one-shot refit ({over}; {fewer})")
    return "refit"


def _calibration(subject, samples: int | None, shard, device) -> tuple:
    """This process's batches of the first `samples` calibration images (the split is already a
    seeded random draw; when several processes share them, each reads only its own whole
    batches, made on `device` again at each pass), and how many images all of them hold; a
    warning on stderr when too few. Returns (`data.Batches`, images)."""
    from modhifi.data import Batches
    from modhifi.prune import calibration_caveats

    dataset = subject.dataset
    samples = min(CALIBRATION_CLI, len(dataset.calibration)) if samples is None else samples
    if not 0 < samples <= len(dataset.calibration):
        raise UserError(f"--calib-samples {samples} must be between 1 and "
                        f"{len(dataset.calibration)} for {dataset.name}")
    shard.check_batches(samples, CALIBRATION_BATCH)
    for caveat in calibration_caveats(subject.loaded.model, samples):
        progress(f"warning: {caveat}")
    mine = dataset.calibration.subset(shard.indices(samples, CALIBRATION_BATCH))
    return Batches(mine, CALIBRATION_BATCH, device=device), samples


def _shared(args: argparse.Namespace) -> bool:
    """Whether this command's work is shared by the processes torchrun started (`SHARED`, on
    image models); the others run on process 0 alone, with the one-process result."""
    return (args.command in SHARED and not is_text(args)
            and getattr(args, "forget_class", None) is None)


def _save_modified(args: argparse.Namespace, subject, model, *, removed: dict | list) -> None:
    """Write the model (reloadable by `--model FILE`) and, for a pruned one, its removed channels
    beside it, as one unit (`zoo.write_together`): never one without the other."""
    import json

    import torch

    from modhifi.zoo import base_of, checkpoint_state, write_together

    out = Path(args.out)
    state = checkpoint_state(model, base=base_of(args.model, args.arch, subject.dataset),
                             removed=removed)
    files = {out: lambda p: torch.save(state, p),  # the model (it holds its channel list too)
             _channels_path(out): lambda p: p.write_text(json.dumps(removed, indent=1) + "\n")}
    write_together(files)
    progress(f"wrote {' and '.join(map(str, files))}")


def _channels_path(out: Path) -> Path:
    return out.with_name(out.name + ".channels.json")


def _image_only(args: argparse.Namespace, what: str) -> None:
    """A one-line refusal for a command that has no text path yet."""
    if args.model and is_text(args):
        raise UserError(f"{what} is not available for text models yet; {args.model} works with "
                        "info, prune, scores and unlearn")


def _open(args: argparse.Namespace):
    from modhifi import distributed
    from modhifi.backend import choose_backend
    from modhifi.zoo import open_subject

    backend = choose_backend(args.device)
    if _shared(args):  # alone, or one of the processes torchrun started
        args.shard = distributed.from_environment(backend)
    progress(f"loading {args.model} on {backend.description}")
    subject = open_subject(args.model, device=backend.device, arch=args.arch, data=args.data)
    for caveat in subject.dataset.caveats:
        progress(f"warning: {caveat}")
    return backend, subject


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], str]] = {
    "models": (_models, "list the built-in model zoo and the architectures --arch takes"),
    "info": (_info, "accuracy, MACs, params and latency of a model"),
    "prune": (_prune, "ModHiFi-P: remove channels, compensate, recalibrate BatchNorm"),
    "unlearn": (_unlearn, "ModHiFi-U: forget one class without fine-tuning, and audit it"),
    "theory": (_theory, "local vs global error, Lipschitz bound constants, HiFi existence"),
    "bench": (_bench, "short benchmark: ModHiFi vs baselines, speed-up, slider latency"),
    "scores": (_scores, "per-layer singleton fidelity and saliency as a CSV table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modhifi", description="ModHiFi Studio command line")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
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
                                 help="unlabeled calibration images (default: 2000, or all if fewer)")
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


def _print(result: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, list) and all(isinstance(row, dict) for row in value):
            for row in value:
                print("  ".join(f"{k}={v}" for k, v in row.items()))
        elif isinstance(value, list):
            print(f"{key:>20}: {' '.join(map(str, value))}")
        else:
            print(f"{key:>20}: {value}")


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


def _check(args: argparse.Namespace) -> None:
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
                                "default: 2,000, or all if fewer"),
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
        if args.command in ("prune", "unlearn") and kind == "text" and Path(args.out).exists():
            raise UserError(f"--out {args.out} exists; a text model is written as a new folder: "
                            "give a new name")
        if args.command != "scores":
            check_output(_channels_path(Path(args.out)))


def main(argv: list[str] | None = None) -> int:
    from modhifi import distributed
    from modhifi.backend import quiet_dependency_warnings

    quiet_dependency_warnings()  # this process is ours: hide notices not meant for users
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        args.shard = distributed.ALONE  # until `_open` joins torchrun's other processes
        if WORLD > 1 and not _shared(args):
            if RANK:  # nothing to share: process 0 does it all
                return 0
            progress(f"{args.command} on this model runs in process 0 alone; the other "
                      f"{WORLD - 1} have nothing to do (shared: {', '.join(SHARED)} of image "
                      "models)")
        result = COMMANDS[args.command][0](args)
    except UserError as error:
        print(f"modhifi: error: {error}", file=sys.stderr)
        return 2
    distributed.leave()  # after every process is done with the others
    if args.shard.is_main:
        _print(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
