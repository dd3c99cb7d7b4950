"""The command line: `python -m modhifi COMMAND` (also installed as `modhifi`).

Every command returns one flat dict; `--json` prints it as one JSON object on stdout, otherwise
as aligned `key: value` lines. Progress goes to stderr. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from modhifi.errors import UserError


def _models(args: argparse.Namespace) -> dict:
    from modhifi.zoo import ZOO, model_card

    rows = []
    for name, entry in ZOO.items():
        card = model_card(name)
        rows.append({"name": name, "arch": entry.arch, "dataset": entry.dataset,
                     "accuracy": card.get("test_accuracy"), "params": card.get("params"),
                     "macs": card.get("macs"), "trained": entry.checkpoint.is_file()})
    return {"models": rows}


def _info(args: argparse.Namespace) -> dict:
    from modhifi.metrics import count_cost, evaluate, measure_latency

    backend, subject = _open(args)
    model, dataset = subject.loaded.model, subject.dataset
    result = evaluate(model, dataset.test, device=backend.device, num_classes=dataset.num_classes)
    cost = count_cost(model, dataset.input_shape)
    latency = measure_latency(model, dataset.input_shape, backend=backend,
                              batch_size=args.batch_size)
    return {"model": subject.loaded.name, "arch": subject.loaded.arch, "dataset": dataset.name,
            "device": backend.description, "accuracy": result.accuracy,
            "per_class_accuracy": dict(zip(dataset.classes, result.per_class)),
            "macs": cost.macs, "params": cost.params, "batch_size": args.batch_size,
            "latency_ms": latency.optimised.median_ms,
            "latency_ms_eager": latency.eager.median_ms, "trained": subject.loaded.trained}


def _open(args: argparse.Namespace):
    from modhifi.backend import choose_backend
    from modhifi.zoo import open_subject

    backend = choose_backend(args.device)
    _progress(f"loading {args.model} on {backend.description}")
    return backend, open_subject(args.model, device=backend.device, arch=args.arch, data=args.data)


def _progress(line: str) -> None:
    print(f"modhifi: {line}", file=sys.stderr, flush=True)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], str]] = {
    "models": (_models, "list the built-in model zoo"),
    "info": (_info, "accuracy, MACs, params and latency of a model"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modhifi", description="ModHiFi Studio command line")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--json", action="store_true", help="print one JSON object")
        command.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        if name != "models":
            command.add_argument("--model", required=True,
                                 help="zoo name or checkpoint path (with --arch and --data)")
            command.add_argument("--arch", help="torchvision architecture of a checkpoint")
            command.add_argument("--data", help="dataset of a checkpoint: fashion-mnist, digits, "
                                                "cifar10:DIR, imagefolder:DIR")
            command.add_argument("--batch-size", type=int, default=64,
                                 help="batch size for latency timing")
    return parser


def _print(result: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, list):
            for row in value:
                print("  ".join(f"{k}={v}" for k, v in row.items()))
        else:
            print(f"{key:>20}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = COMMANDS[args.command][0](args)
    except UserError as error:
        print(f"modhifi: error: {error}", file=sys.stderr)
        return 2
    _print(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
