"""The command line: `python -m modhifi COMMAND` (also installed as `modhifi`).

Every command returns one flat dict; `--json` prints it as one JSON object on stdout, otherwise
as aligned `key: value` lines. Progress goes to stderr. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from modhifi.errors import UserError
from modhifi.options import (CALIBRATION_CLI, CALIBRATION_TEXT, COMPONENT_LABELS, Component,
                             WHY_FORGET_TARGET, WHY_K, WHY_ROUND_TO, WHY_STEPS,
                             Allocation, Compensation, DeviceChoice, Edit, Method, Scope,
                             METHOD_LABELS, ROUND_TO, TargetKind, check_fraction, check_target, check_whole, choices,
                             default_compensation)


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

    if _is_text(args):
        from modhifi.text.subject import info

        backend, subject, _ = _open_text(args)
        return info(subject, backend=backend, batch_size=args.batch_size)
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
    from modhifi.prune import prune_in_steps

    if _is_text(args):
        return _prune_text(args)
    backend, subject = _open(args)
    model, dataset = subject.loaded.model, subject.dataset
    method, round_to = args.method or "modhifi", args.round_to or ROUND_TO
    compensation = args.compensation or default_compensation(method)
    calibration, samples = _calibration(subject, args.calib_samples, args.shard,
                                        backend.device)
    _progress("statistics and scores on the calibration images")
    start = time.perf_counter()
    pruned, plans = prune_in_steps(model, calibration,
                                   device=backend.device, input_shape=dataset.input_shape,
                                   target=args.target, steps=args.steps,
                                   target_kind=args.target_kind, allocation=args.allocation,
                                   method=method, scope=args.scope, compensation=compensation,
                                   recalibrate=not args.no_bn_recal, round_to=round_to,
                                   shard=args.shard, progress=_tenths("statistics"))
    seconds = time.perf_counter() - start
    _progress(f"pruned in {seconds:.1f} s; evaluating and timing")
    result = compare(model, pruned, dataset=dataset, backend=backend, batch_size=args.batch_size,
                     latency=args.shard.is_main, shard=args.shard)
    if not args.shard.is_main:  # process 0 times, prints and writes
        return {}
    if args.out:
        removed = [plan.removed_channels() for plan in plans]
        _save_modified(args, subject, pruned, removed=removed[0] if len(removed) == 1 else removed)
    return {"model": subject.loaded.name, "method": method, "target": args.target,
            "target_kind": args.target_kind, "allocation": args.allocation, "scope": args.scope,
            "round_to": round_to,
            "compensation": compensation, "bn_recalibrated": not args.no_bn_recal,
            "calib_samples": samples, "device": backend.description,
            "accuracy_before": result.before.accuracy, "accuracy_after": result.after.accuracy,
            "macs_before": result.cost_before.macs, "macs_after": result.cost_after.macs,
            "params_before": result.cost_before.params, "params_after": result.cost_after.params,
            "channels_before": plans[0].channels_before, "channels_after": plans[-1].channels_after,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "latency_ms_before": result.latency_before.optimised.median_ms,
            "latency_ms_after": result.latency_after.optimised.median_ms,
            "speedup_macs": result.speedup_macs, "speedup_measured": result.speedup_measured,
            "speedup_eager": result.speedup_eager, "seconds": seconds}


def _prune_text(args: argparse.Namespace) -> dict:
    """ModHiFi-P on a text encoder's FFN neurons or attention heads (`modhifi.text`)."""
    import time

    from modhifi.text.components import analyse_text
    from modhifi.text.subject import compare_text, save_text_model
    from modhifi.text.surgery import apply_plan

    backend, subject, texts = _open_text(args)
    method = args.method or "modhifi-greedy"
    compensation = args.compensation or default_compensation(method)
    _progress(f"statistics and scores on {len(texts)} calibration texts")
    start = time.perf_counter()
    analysis = analyse_text(subject.model, texts, device=backend.device)
    plan = analysis.plan(args.target, kind=args.components, target_kind=args.target_kind,
                         method=method, round_to=args.round_to)
    pruned = apply_plan(analysis, plan, compensation=compensation)
    seconds = time.perf_counter() - start
    _progress(f"pruned in {seconds:.1f} s; evaluating and timing on {len(subject.corpus.test)} "
              "test texts")
    result = compare_text(subject, pruned, backend=backend, batch_size=args.batch_size)
    if args.out:
        save_text_model(pruned, Path(args.out), base=subject.base,
                        removed={"components": plan.kind, "removed": plan.removed()})
        _progress(f"wrote {args.out}")
    return {"model": subject.name, "method": method, "target": args.target,
            "target_kind": args.target_kind, "components": plan.kind, "allocation": "uniform",
            "compensation": compensation, "bn_recalibrated": False, "calib_samples": len(texts),
            "device": backend.description, "channels_before": plan.units_before,
            "channels_after": plan.units_after, **result, "seconds": seconds}


def _unlearn(args: argparse.Namespace) -> dict:
    from modhifi.unlearn import unlearn

    if _is_text(args):
        return _unlearn_text(args)
    backend, subject = _open(args)
    dataset = subject.dataset
    forget = _class_index(dataset, args.forget_class)
    _progress(f"forgetting class {forget} ({dataset.classes[forget]})")
    result = unlearn(subject.loaded.model, dataset, forget_class=forget, device=backend.device,
                     edit=args.edit, layers=args.layers, k=args.k,
                     target_forget_accuracy=args.forget_target, shard=args.shard)
    if not args.shard.is_main:  # process 0 prints and writes
        return {}
    if args.out:
        _save_modified(args, subject, result.model, removed={})
    return result.summary(model=subject.loaded.name, device=backend.description)


def _unlearn_text(args: argparse.Namespace) -> dict:
    """ModHiFi-U on a text encoder: one category of fortunes forgotten (`modhifi.text.forget`)."""
    from modhifi.text.forget import forget_category
    from modhifi.text.subject import save_text_model

    for option in ("edit", "layers", "k"):
        if getattr(args, option) is not None:
            raise UserError(f"--{option} does not apply to a text model, whose edit is one "
                            f"rank-one change of the last FFN; leave --{option} out")
    if args.calib_samples is not None:
        raise UserError("--calib-samples does not apply to forgetting a category of a text "
                        "model, which reads every calibration text of it; leave it out")
    from modhifi.text.corpus import load_fortunes

    corpus = load_fortunes()
    category = _class_index(corpus, args.forget_class)  # before the model loads
    backend, subject, _ = _open_text(args, corpus)
    _progress(f"forgetting category {category} ({corpus.categories[category]})")
    result = forget_category(subject.model, subject.probe, corpus, category=category,
                             device=backend.device, target=args.forget_target)
    if args.out:
        save_text_model(result.model, Path(args.out), base=subject.base, removed={})
        _progress(f"wrote {args.out}")
    return result.summary(model=subject.name, device=backend.description)


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


def _class_index(dataset, name: str) -> int:
    """A class given by index (`5`) or by name (`Sandal`)."""
    if name.isascii() and name.isdigit():
        if int(name) >= len(dataset.classes):
            raise UserError(f"forget class {name} is out of range for {dataset.name}: use "
                            f"0..{len(dataset.classes) - 1} or a class name")
        return int(name)
    lowered = [c.lower() for c in dataset.classes]
    if name.lower() not in lowered:
        raise UserError(f"no class {name!r} in {dataset.name}: use an index "
                        f"0..{len(dataset.classes) - 1} or one of {', '.join(dataset.classes)}")
    return lowered.index(name.lower())


def _scores(args: argparse.Namespace) -> dict:
    from modhifi.prune import analyse
    from modhifi.prune.tables import score_table
    from modhifi.zoo import write_atomically

    if _is_text(args):
        return _scores_text(args)
    backend, subject = _open(args)
    dataset = subject.dataset
    analysis = analyse(subject.loaded.model, _calibration(subject, args.calib_samples,
                                                          args.shard, backend.device)[0],
                       device=backend.device, input_shape=dataset.input_shape, shard=args.shard,
                       progress=_tenths("statistics"))
    if not args.shard.is_main:  # process 0 writes and prints
        return {}
    plan = None if args.target is None else analysis.plan(args.target)
    table = score_table(analysis, plan)
    if args.forget_class is not None:  # the forget-class saliency of the edited layers
        from modhifi.unlearn import score_forget_class, unlearnable_layers

        forget = _class_index(dataset, args.forget_class)
        example = next(dataset.calibration.batches(1, device=backend.device))
        scores = score_forget_class(subject.loaded.model, dataset.calibration, forget_class=forget,
                                    layers=unlearnable_layers(subject.loaded.model, example),
                                    device=backend.device).to_frame()
        table = table.drop(columns="saliency").merge(scores, on=["layer", "out_channel", "in_channel"])
    write_atomically(Path(args.out), lambda p: table.to_csv(p, index=False))
    return {"model": subject.loaded.name, "out": args.out, "rows": len(table),
            "layers": int(table["layer"].nunique()), "target": args.target}


def _scores_text(args: argparse.Namespace) -> dict:
    """Every (consumer, output, component) score of a text encoder: FFN down-projections (a
    component is a neuron) and attention outputs (a component is a head); with --forget-class,
    each last-layer neuron's signed weight w_i·σ_i in the direction that forgetting that
    category edits along (`modhifi.text.forget`)."""
    from modhifi.prune.tables import score_table
    from modhifi.text.components import analyse_text
    from modhifi.zoo import write_atomically

    from modhifi.text.corpus import load_fortunes

    corpus = load_fortunes()
    category = None if args.forget_class is None else _class_index(corpus, args.forget_class)
    backend, subject, texts = _open_text(args, corpus)
    analysis = analyse_text(subject.model, texts, device=backend.device)
    table = score_table(analysis)
    if category is not None:  # each last-layer neuron's signed weight in the category's direction
        from modhifi.text.forget import topic_direction, topic_statistics

        direction = topic_direction(topic_statistics(subject.model, corpus.calibration,
                                                     category=category, device=backend.device),
                                    category=category)
        weight = (direction.weight * direction.spread).tolist()  # w_i·σ_i per neuron
        table["forget_direction"] = [weight[i] if layer == direction.layer else None
                                     for layer, i in zip(table["layer"], table["in_channel"])]
    if args.target is not None:
        kept = {}
        for kind in choices(Component):
            kept.update(analysis.kept_by_consumer(analysis.plan(args.target, kind=kind,
                                                                method="modhifi-greedy")))
        table["kept"] = [channel in kept[layer]
                         for layer, channel in zip(table["layer"], table["in_channel"])]
    write_atomically(Path(args.out), lambda p: table.to_csv(p, index=False))
    return {"model": subject.name, "out": args.out, "rows": len(table),
            "layers": int(table["layer"].nunique()), "target": args.target}


# Images per calibration batch: the unit processes share, and one BatchNorm recalibration pass
# (`recalibrate_batchnorm`'s chunk), so that each batch's terms are the same however shared.
CALIBRATION_BATCH = 128
SHARED = ("info", "prune", "scores", "unlearn", "theory")  # whose work torchrun's processes share
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


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
        _progress(f"warning: {caveat}")
    mine = dataset.calibration.subset(shard.indices(samples, CALIBRATION_BATCH))
    return Batches(mine, CALIBRATION_BATCH, device=device), samples


def _shared(args: argparse.Namespace) -> bool:
    """Whether this command's work is shared by the processes torchrun started (`SHARED`, on
    image models); the others run on process 0 alone, with the one-process result."""
    return (args.command in SHARED and not _is_text(args)
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
    _progress(f"wrote {' and '.join(map(str, files))}")


def _channels_path(out: Path) -> Path:
    return out.with_name(out.name + ".channels.json")


def _is_text(args: argparse.Namespace) -> bool:
    from modhifi.text.encoder import is_text_model

    if not is_text_model(args.model):
        return False
    for option in ("arch", "data"):
        if getattr(args, option, None) is not None:
            raise UserError(f"--{option} does not apply to the text model {args.model}, which "
                            f"is evaluated on Debian's fortunes; leave --{option} out")
    return True


def _image_only(args: argparse.Namespace, what: str) -> None:
    """A one-line refusal for a command that has no text path yet."""
    if args.model and _is_text(args):
        raise UserError(f"{what} is not available for text models yet; {args.model} works with "
                        "info, prune, scores and unlearn")


def _open_text(args: argparse.Namespace, corpus=None):
    """The backend, the text subject and its calibration texts (`--calib-samples` checked
    against the corpus, loaded unless given, before the model is loaded)."""
    from modhifi.backend import choose_backend
    from modhifi.text.corpus import load_fortunes
    from modhifi.text.subject import open_text

    backend = choose_backend(args.device)
    corpus = corpus or load_fortunes()
    calibration = corpus.calibration
    samples = min(CALIBRATION_TEXT, len(calibration)) if args.calib_samples is None else args.calib_samples
    if not samples <= len(calibration):
        raise UserError(f"--calib-samples {samples} must be at most {len(calibration)} for "
                        f"{corpus.name}")
    _progress(f"loading {args.model} on {backend.description}")
    return backend, open_text(args.model, device=backend.device, corpus=corpus), calibration.texts[:samples]


def _open(args: argparse.Namespace):
    from modhifi import distributed
    from modhifi.backend import choose_backend
    from modhifi.zoo import open_subject

    backend = choose_backend(args.device)
    if _shared(args):  # alone, or one of the processes torchrun started
        args.shard = distributed.from_environment(backend)
    _progress(f"loading {args.model} on {backend.description}")
    subject = open_subject(args.model, device=backend.device, arch=args.arch, data=args.data)
    for caveat in subject.dataset.caveats:
        _progress(f"warning: {caveat}")
    return backend, subject


def _tenths(what: str) -> Callable[[float], None]:
    """A progress line at every tenth of the way (streamed image folders take a while), again
    from the start for each round of `--steps`."""
    shown: set[int] = set()

    def report(share: float) -> None:
        tenth = int(share * 10)
        if shown and tenth < max(shown):  # the next round's statistics
            shown.clear()
        if tenth not in shown:
            shown.add(tenth)
            _progress(f"{what}: {share:.0%}")
    return report


def _progress(line: str) -> None:
    if RANK == 0:  # one voice when torchrun starts several processes
        print(f"modhifi: {line}", file=sys.stderr, flush=True)


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
            command.add_argument("--calib-samples", type=int,
                                 help="unlabeled calibration images (default: 2000, or all if fewer)")
        if name == "unlearn":
            command.add_argument("--forget-class", required=True, help="class index or name")
            command.add_argument("--edit", choices=choices(Edit),
                                 help="default: zero for BatchNorm networks, negate for LayerNorm ones")
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
                                 help="fraction of channels (or of MACs) to remove")
            command.add_argument("--target-kind", choices=choices(TargetKind), default="channels")
            command.add_argument("--allocation", choices=choices(Allocation), default="uniform")
            command.add_argument("--scope", choices=choices(Scope), default="all",
                                 help="internal: leave residual-stream channels alone")
            command.add_argument("--method", choices=choices(Method),
                                 help="default: modhifi for image models, modhifi-greedy for "
                                      "text ones; " + "; ".join(
                                          f"{name}: {label}" for name, label in METHOD_LABELS.items()))
            command.add_argument("--components", choices=choices(Component), default="ffn",
                                 help="text models: what to remove, " + "; ".join(
                                     f"{name}: {label}" for name, label in COMPONENT_LABELS.items()))
            command.add_argument("--round-to", type=int,
                                 help=f"keep multiples of this many channels per group (default "
                                      f"{ROUND_TO}, text heads 1; 16 suits AVX-512 CPUs; 1: exact "
                                      "counts)")
            command.add_argument("--compensation", choices=choices(Compensation),
                                 help="default: refit for modhifi and modhifi-greedy, none for "
                                      "the baselines")
            command.add_argument("--steps", type=int, default=1,
                                 help="iterative mode: rounds of score, remove, compensate, recalibrate")
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


def _check(args: argparse.Namespace) -> None:
    """Every numeric option in range and every output path writable, before any work starts."""
    def given(name: str):
        return getattr(args, name, None)

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
        from modhifi.text.encoder import is_text_model

        if args.command in ("prune", "unlearn") and is_text_model(args.model) \
                and Path(args.out).exists():
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
            _progress(f"{args.command} on this model runs in process 0 alone; the other "
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
