"""The command line: `python -m modhifi COMMAND` (also installed as `modhifi`).

Every command returns one flat dict; `--json` prints it as one JSON object on stdout, otherwise
as aligned `key: value` lines. Progress goes to stderr (`modhifi.console`). Bad input: one line
on stderr, exit 2, checked by `modhifi.arguments` before any work. This module runs the image
commands (shared by torchrun's processes where they can be) and hands text models to
`modhifi.text.commands`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from modhifi.arguments import build_parser, channels_path, check_arguments
from modhifi.console import RANK, WORLD, class_index, progress, tenths
from modhifi.errors import UserError
from modhifi.options import (CALIBRATION_CLI, DEFAULT_ALLOCATION, DEFAULT_METHOD, ROUND_TO,
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
    compensation = _compensation(args, method, model, calibration, samples,
                                 structure.consumers)
    costs = None
    if args.target_kind == "latency":
        cache = cost_cache(args.model, model, backend, args.batch_size, dataset.input_shape)
        costs = measured_costs(model, structure, dataset.input_shape, backend=backend,
                               batch_size=args.batch_size, cache=cache, shard=args.shard,
                               progress=progress)
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
        _save_modified(args, subject, pruned, [plan.removed_channels() for plan in plans])
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
        _save_modified(args, subject, result.model, [])
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
    _image_only(args, "bench --quick")
    backend, subject = _open(args)
    return {"model": subject.loaded.name,
            **quick(subject.loaded.model, subject.dataset, backend=backend,
                    batch_size=args.batch_size)}


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
        # every pair of either table (an edited layer pruning does not score, such as the first
        # convolution or the classifier, has no singleton fidelity; a pruned one not edited, no
        # forget-class saliency), in the contract's column order
        pairs = ["layer", "out_channel", "in_channel"]
        table = table.drop(columns="saliency").merge(scores, how="outer", on=pairs,
                                                     sort=False)[table.columns]
    write_atomically(Path(args.out), lambda p: table.to_csv(p, index=False))
    return {"model": subject.loaded.name, "out": args.out, "rows": len(table),
            "layers": int(table["layer"].nunique()), "target": args.target}


SHARED = ("info", "prune", "scores", "unlearn", "theory")  # whose work torchrun's processes share


def _compensation(args: argparse.Namespace, method: str, model, calibration, samples: int,
                  order: tuple[str, ...]) -> str:
    """--compensation, else the sequential refit for ModHiFi's selections where its recordings
    of all `samples` calibration images fit in memory (one analysis more, and the most
    accurate), else the one-shot refit, and none for the baselines; a line on stderr says why
    where the sequential refit is left out or will run long. Judged on every image, not this
    process's share: the choice, and so the model, is the one process would make."""
    from modhifi.batch import head
    from modhifi.prune import sequential_recordings
    from modhifi.prune.apply import FRONTIER_BYTES

    chosen = args.compensation or default_compensation(method)
    if args.compensation not in (None, "sequential") or chosen == "none":
        return chosen
    if not order:  # nothing to prune: the analysis says why
        return chosen
    recordings = sequential_recordings(model, head(calibration[0], 1), order, samples,
                                       shard=args.shard)
    if recordings.fits:
        return "sequential"
    over = (f"the sequential refit would record at least {recordings.nbytes / 2**30:.1f} GiB "
            f"of activations per pass, over the {FRONTIER_BYTES / 2**30:.0f} GiB it keeps")
    most = FRONTIER_BYTES * samples // recordings.nbytes  # at least that much per image
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
    from modhifi.distributed import calibration_batch
    from modhifi.prune import calibration_caveats

    dataset = subject.dataset
    samples = min(CALIBRATION_CLI, len(dataset.calibration)) if samples is None else samples
    if not 0 < samples <= len(dataset.calibration):
        raise UserError(f"--calib-samples {samples} must be between 1 and "
                        f"{len(dataset.calibration)} for {dataset.name}")
    size = calibration_batch(samples)
    shard.check_batches(samples, len(dataset.calibration))
    for caveat in calibration_caveats(subject.loaded.model, samples):
        progress(f"warning: {caveat}")
    mine = dataset.calibration.subset(shard.indices(samples, size))
    return Batches(mine, size, device=device), samples


def _shared(args: argparse.Namespace) -> bool:
    """Whether this command's work is shared by the processes torchrun started (`SHARED`, on
    image models, but not `scores --forget-class`); the others run on process 0 alone, with the
    one-process result."""
    return (args.command in SHARED and not is_text(args)
            and not (args.command == "scores" and args.forget_class is not None))


def _save_modified(args: argparse.Namespace, subject, model, removed: list[dict]) -> None:
    """Write the model (reloadable by `--model FILE`) and its removed channels beside it, as one
    unit (`zoo.write_together`): never one without the other. `removed`: this command's rounds;
    a model modified before keeps its own (`zoo.lineage`)."""
    import json

    import torch

    from modhifi.zoo import checkpoint_state, lineage, write_together

    out = Path(args.out)
    meta = lineage(args.model, args.arch, subject.dataset, removed)
    state = checkpoint_state(model, **meta)
    files = {out: lambda p: torch.save(state, p),  # the model (it holds its channel list too)
             channels_path(out):
                 lambda p: p.write_text(json.dumps(meta["removed"], indent=1) + "\n")}
    write_together(files)
    progress(f"wrote {' and '.join(map(str, files))}")


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


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "models": _models,
    "info": _info,
    "prune": _prune,
    "unlearn": _unlearn,
    "theory": _theory,
    "bench": _bench,
    "scores": _scores,
}  # each command's help: `arguments.COMMANDS`


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


def main(argv: list[str] | None = None) -> int:
    from modhifi import distributed
    from modhifi.backend import quiet_dependency_warnings

    quiet_dependency_warnings()  # this process is ours: hide notices not meant for users
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        args.shard = distributed.ALONE  # until `_open` joins torchrun's other processes
        if WORLD > 1 and not _shared(args):
            if RANK:  # nothing to share: process 0 does it all
                return 0
            progress(f"{args.command} on this model runs in process 0 alone; the other "
                      f"{WORLD - 1} have nothing to do (shared: {', '.join(SHARED)} of image "
                      "models)")
        result = COMMANDS[args.command](args)
    except UserError as error:
        if RANK == 0:  # every process meets the same refusal (what the data decides is agreed)
            print(f"modhifi: error: {error}", file=sys.stderr)
        return 2
    distributed.leave()  # after every process is done with the others
    if args.shard.is_main:
        _print(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
