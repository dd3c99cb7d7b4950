"""The command line's text-model commands (`info`, `prune`, `unlearn`, `scores` of a sentence
encoder on Debian's fortunes): each takes the parsed arguments and returns the command's flat
dict, as the image commands in `modhifi.__main__` do.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from modhifi.console import class_index, progress
from modhifi.errors import UserError
from modhifi.options import (CALIBRATION_TEXT, COMPONENT_LABELS, DEFAULT_COMPONENT,
                             DEFAULT_METHOD, Component, TextCompensation, check, choices,
                             default_compensation)
from modhifi.text.corpus import Corpus, load_fortunes


def is_text(args: argparse.Namespace) -> bool:
    """Whether `--model` is a text model (the command line has refused the options it cannot
    take: `modhifi.arguments.ONE_KIND_ONLY`)."""
    from modhifi.text.encoder import is_text_model

    return is_text_model(args.model)


def open_arguments(args: argparse.Namespace, corpus: Corpus | None = None):
    """The backend, the text subject and its calibration texts (`--calib-samples` checked
    against the corpus, loaded unless given, before the model is loaded)."""
    from modhifi.backend import choose_backend
    from modhifi.text.subject import open_text

    backend = choose_backend(args.device)
    corpus = corpus or load_fortunes()
    calibration = corpus.calibration
    given = getattr(args, "calib_samples", None)  # the commands that calibrate take it
    samples = min(CALIBRATION_TEXT, len(calibration)) if given is None else given
    if not samples <= len(calibration):
        raise UserError(f"--calib-samples {samples} must be at most {len(calibration)} for "
                        f"{corpus.name}")
    progress(f"loading {args.model} on {backend.description}")
    subject = open_text(args.model, device=backend.device, corpus=corpus)
    return backend, subject, calibration.texts[:samples]


def info(args: argparse.Namespace) -> dict:
    from modhifi.text.subject import info as report

    backend, subject, _ = open_arguments(args)
    return report(subject, backend=backend, batch_size=args.batch_size)


def prune(args: argparse.Namespace) -> dict:
    """ModHiFi-P on a text encoder's FFN neurons or attention heads (`modhifi.text`)."""
    import time

    from modhifi.prune.hold import meets
    from modhifi.text.components import analyse_text
    from modhifi.text.hold import hold_text_latency
    from modhifi.text.latency import measured_text_costs
    from modhifi.text.subject import compare_text, removed_rounds, save_text_model
    from modhifi.text.surgery import apply_plan
    from modhifi.zoo import cost_cache

    method, components = args.method or DEFAULT_METHOD, args.components or DEFAULT_COMPONENT
    compensation = check(TextCompensation, args.compensation or default_compensation(method))
    backend, subject, texts = open_arguments(args)
    costs, tries = None, None
    timing = subject.corpus.calibration.texts  # whatever --calib-samples: the same batches
    if args.target_kind == "latency":
        cache = cost_cache(args.model, subject.model, backend, args.batch_size, "fortunes")
        costs = measured_text_costs(subject.model, timing, backend=backend,
                                    batch_size=args.batch_size, cache=cache, progress=progress)
    progress(f"statistics and scores on {len(texts)} calibration texts")
    start = time.perf_counter()
    analysis = analyse_text(subject.model, texts, device=backend.device)
    if costs is not None:  # cut, time, and plan for more where it fell short
        held = hold_text_latency(analysis, args.target, kind=components, costs=costs,
                                 texts=timing, backend=backend, batch_size=args.batch_size,
                                 compensation=compensation, method=method,
                                 round_to=args.round_to)
        plan, pruned, tries = held.plan, held.model, list(held.asked)
    else:
        plan = analysis.plan(args.target, kind=components, target_kind=args.target_kind,
                             method=method, round_to=args.round_to)
        pruned = apply_plan(analysis, plan, compensation=compensation)
    seconds = time.perf_counter() - start
    progress(f"pruned in {seconds:.1f} s; evaluating and timing on {len(subject.corpus.test)} "
              "test texts")
    result = compare_text(subject, pruned, backend=backend, batch_size=args.batch_size)
    if args.out:
        save_text_model(pruned, Path(args.out), base=subject.base,
                        removed={"components": plan.kind, "removed": plan.removed()},
                        earlier=removed_rounds(subject.name))
        progress(f"wrote {args.out}")
    return {"model": subject.name, "method": method, "target": args.target,
            "target_kind": args.target_kind, "components": plan.kind,
            "allocation": "uniform", "compensation": compensation,
            "bn_recalibrated": False, "calib_samples": len(texts),
            "device": backend.description, "channels_before": plan.units_before,
            "channels_after": plan.units_after, **result,
            "speedup_planned": plan.speedup_planned,
            "latency_targets_tried": tries,  # the plans cut and timed until the target held
            "latency_target_met": (meets(args.target, 1 - 1 / result["speedup_measured"])
                                   if costs else None),  # by the measurement above
            "seconds": seconds}


def unlearn(args: argparse.Namespace) -> dict:
    """ModHiFi-U on a text encoder: one category of fortunes forgotten (`modhifi.text.forget`)."""
    from modhifi.text.forget import forget_category
    from modhifi.text.subject import removed_rounds, save_text_model

    corpus = load_fortunes()
    category = class_index(corpus, args.forget_class)  # before the model loads
    backend, subject, _ = open_arguments(args, corpus)
    progress(f"forgetting category {category} ({corpus.categories[category]})")
    result = forget_category(subject.model, subject.probe, corpus, category=category,
                             device=backend.device, target=args.forget_target)
    if args.out:
        save_text_model(result.model, Path(args.out), base=subject.base, removed={},
                        earlier=removed_rounds(subject.name))
        progress(f"wrote {args.out}")
    return result.summary(model=subject.name, device=backend.description)


def scores(args: argparse.Namespace) -> dict:
    """Every (consumer, output, component) score of a text encoder: FFN down-projections (a
    component is a neuron) and attention outputs (a component is a head); with --forget-class,
    each last-layer neuron's contrast: how much more that category's texts activate it, in
    standard deviations (`modhifi.text.forget.contrast`)."""
    from modhifi.prune.tables import score_table
    from modhifi.text.components import analyse_text
    from modhifi.zoo import write_atomically

    corpus = load_fortunes()
    category = None if args.forget_class is None else class_index(corpus, args.forget_class)
    backend, subject, texts = open_arguments(args, corpus)
    analysis = analyse_text(subject.model, texts, device=backend.device)
    table = score_table(analysis)
    if category is not None:  # each last-layer neuron's contrast for the category
        from modhifi.text.forget import contrast, topic_statistics

        statistics = topic_statistics(subject.model, corpus.calibration, category=category,
                                      device=backend.device)
        edited, values = statistics.layer.ffn_down, contrast(statistics).tolist()
        table["forget_contrast"] = [values[i] if layer == edited else None
                                    for layer, i in zip(table["layer"], table["in_channel"])]
    if args.target is not None:  # left empty for a kind of component out of the target's reach
        kept, refusals = {}, []
        for kind in choices(Component):
            try:
                kept.update(analysis.kept_by_consumer(analysis.plan(args.target, kind=kind,
                                                                    method=DEFAULT_METHOD)))
            except UserError as refusal:
                refusals.append(refusal)
                progress(f"{COMPONENT_LABELS[kind]}: {refusal}; their `kept` is left empty")
        if not kept:
            raise refusals[0]
        table["kept"] = [channel in kept[layer] if layer in kept else None
                         for layer, channel in zip(table["layer"], table["in_channel"])]
    write_atomically(Path(args.out), lambda p: table.to_csv(p, index=False))
    return {"model": subject.name, "out": args.out, "rows": len(table),
            "layers": int(table["layer"].nunique()), "target": args.target}
