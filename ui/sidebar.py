"""The sidebar: which model (a zoo model or the visitor's checkpoint), how many calibration
images, which device; and `selection()`, what every page reads of it."""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import streamlit as st

from modhifi import options, prune, zoo
from modhifi.errors import UserError
from modhifi.requests import SEPARATOR, ModelRef
from modhifi.text.encoder import ZOO_TEXT
from ui import cache, keys, url

OWN_CHECKPOINT = "your checkpoint…"
CALIBRATION_CHOICES = (250, 500, 1000, 2000)
SERVER_MODELS_VARIABLE = "MODHIFI_MODEL_DIR"  # a folder whose checkpoints visitors may pick
SERVER_DATA_VARIABLE = "MODHIFI_DATASETS_DIR"  # a folder whose subfolders visitors may name
MOST_UPLOAD_BYTES = 2 * 2**30  # kept uploads past it go, the oldest first


def sidebar() -> None:
    """Model (zoo or own checkpoint), calibration size and device pickers."""
    names = [n for n, e in zoo.ZOO.items() if e.checkpoint.is_file()] + text_models() + [OWN_CHECKPOINT]
    url.restore(keys.MODEL, lambda name: name in names)  # shareable links: ?model=digits-cnn
    st.sidebar.selectbox("Model", names, key=keys.MODEL, format_func=_model_label)
    if st.session_state[keys.MODEL] == OWN_CHECKPOINT:
        st.sidebar.selectbox("Architecture", zoo.torchvision_archs(), key=keys.CHECKPOINT_ARCH)
        st.sidebar.text_input("Dataset", key=keys.CHECKPOINT_DATA, placeholder="fashion-mnist",
                              help="fashion-mnist, digits, or cifar10:DIR / imagefolder:DIR for "
                                   f"a folder DIR inside ${SERVER_DATA_VARIABLE}")
        upload = st.sidebar.file_uploader("Checkpoint (.pt state_dict)", type=["pt", "pth"],
                                          key=keys.CHECKPOINT_UPLOAD)
        if upload is not None:
            try:
                stored = _store_upload(upload.name, upload.getvalue())
                st.session_state[keys.CHECKPOINT_PATH] = str(stored)
            except OSError as error:
                st.sidebar.error(f"cannot keep the upload on the server ({error.strerror}): "
                                 "try again later, or a smaller file")
        elif _uploaded(st.session_state.get(keys.CHECKPOINT_PATH)):
            del st.session_state[keys.CHECKPOINT_PATH]  # the upload was removed: so is its choice
        if upload is None and server_checkpoints():
            # Only files the server's owner published: a free path field would tell a visitor
            # which files exist anywhere on the server.
            st.sidebar.selectbox(f"…or a checkpoint on the server ({SERVER_MODELS_VARIABLE})",
                                 server_checkpoints(), key=keys.CHECKPOINT_PATH, index=None,
                                 format_func=lambda path: Path(path).name)
    text = st.session_state[keys.MODEL] in text_models()
    first = url.initial(keys.CALIBRATION, lambda count: count in CALIBRATION_CHOICES)
    calibration = st.session_state.get(keys.CALIBRATION, first or cache.CALIBRATION_DEFAULT)
    st.sidebar.select_slider("Calibration quotations" if text else "Calibration images",
                             CALIBRATION_CHOICES, value=calibration, key=keys.CALIBRATION,
                             help="Unlabeled held-out samples the method reads (a text model reads "
                                  "at most its whole calibration split).")
    st.sidebar.selectbox("Device", options.choices(options.DeviceChoice), key=keys.DEVICE)
    try:
        st.sidebar.caption(f"Scoring backend: {cache.backend(st.session_state[keys.DEVICE]).description}")
    except UserError as error:
        st.sidebar.error(str(error))


def text_models() -> list[str]:
    """The zoo's text models whose package is installed."""
    from importlib.util import find_spec

    return [name for name, (module, _, _) in ZOO_TEXT.items() if find_spec(module) is not None]


def _model_label(name: str) -> str:
    if name == OWN_CHECKPOINT:
        return name
    return f"{name} — {'fortunes' if name in ZOO_TEXT else zoo.ZOO[name].dataset}"


def is_text(selection: cache.Selection) -> bool:
    return selection.model.arch is None and selection.model.spec in ZOO_TEXT


def server_checkpoints() -> list[str]:
    """The .pt/.pth files in the folder named by MODHIFI_MODEL_DIR (none when it is unset)."""
    folder = os.environ.get(SERVER_MODELS_VARIABLE)
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix in (".pt", ".pth") and p.is_file())


def uploads() -> Path:
    """Where uploads are kept: beside the other caches (`data.cache_root()`)."""
    from modhifi.data import cache_root

    return cache_root() / "uploads"


def _uploaded(path: str | None) -> bool:
    return bool(path) and Path(path).parent == uploads()


def _store_upload(name: str, data: bytes) -> Path:
    """Keep an upload on disk under a content-addressed name (checkpoints are read by path),
    its name cut to 100 bytes (the file system allows 255); the oldest uploads go once they
    hold more than MOST_UPLOAD_BYTES."""
    safe = Path(name).name.replace(SEPARATOR, "_")  # a ModelRef's path holds no separator
    safe = safe.encode()[-100:].decode(errors="ignore")
    path = uploads() / f"{hashlib.sha256(data).hexdigest()[:16]}-{safe}"
    if not path.exists():
        zoo.write_atomically(path, lambda p: p.write_bytes(data))
    _evict(keep=path)
    return path


def _evict(keep: Path) -> None:
    """Remove the oldest uploads but `keep` while they hold more than MOST_UPLOAD_BYTES (other
    sessions may be storing or removing some at the same time)."""
    seen = {}  # path -> (modified, bytes)
    for path in uploads().iterdir():
        try:
            if path.is_file() and not path.name.startswith("."):  # not a write in progress
                seen[path] = (path.stat().st_mtime, path.stat().st_size)
        except FileNotFoundError:
            continue
    total = sum(size for _, size in seen.values())
    for path in sorted(seen, key=seen.get):  # the oldest first
        if total <= MOST_UPLOAD_BYTES:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= seen[path][1]


def _published_data(spec: str) -> str:
    """`spec` where its folder (`cifar10:DIR`, `imagefolder:DIR`) lies inside the folder the
    server's owner published: a free path would let a visitor read any folder of the server."""
    kind, _, folder = spec.partition(":")
    root = os.environ.get(SERVER_DATA_VARIABLE)
    if not folder or (root and Path(folder).resolve().is_relative_to(Path(root).resolve())):
        return spec
    where = f"inside {root}" if root else f"published here (${SERVER_DATA_VARIABLE} is unset)"
    raise UserError(f"the dataset folder {folder} is not {where}: the dashboard reads only the "
                    "folders its owner published; use fashion-mnist or digits, or ask them to "
                    "put it there")


def is_zoo(name: str) -> bool:
    """Whether `name` is one of the zoo's models (images or text): what an address may name."""
    return name in zoo.ZOO or name in ZOO_TEXT


def model() -> ModelRef:
    """The model picked in the sidebar: a zoo name, or the visitor's checkpoint."""
    # The sidebar's choice; before the sidebar has run (a page opened by its own address), the
    # address's model.
    name = (st.session_state.get(keys.MODEL)
            or url.initial(keys.MODEL, is_zoo)
            or next(iter(zoo.ZOO)))
    if name != OWN_CHECKPOINT:
        return ModelRef(name)
    path = st.session_state.get(keys.CHECKPOINT_PATH) or ""
    data = st.session_state.get(keys.CHECKPOINT_DATA) or ""
    if not path or not data:
        raise UserError("choose a checkpoint (upload or path) and its dataset in the sidebar")
    return ModelRef(path, arch=st.session_state.get(keys.CHECKPOINT_ARCH),
                    data=_published_data(data))


def selection() -> cache.Selection:
    """Model, device and calibration size picked in the sidebar; caveats shown above the page."""
    chosen = cache.Selection(model(), st.session_state.get(keys.DEVICE, "auto"),
                             st.session_state.get(keys.CALIBRATION, cache.CALIBRATION_DEFAULT))
    if is_text(chosen):
        return chosen  # fortunes has no caveats, and the text analysis checks its own input
    opened = cache.subject(chosen.opened)
    images = min(chosen.samples, len(opened.dataset.calibration))
    for caveat in opened.dataset.caveats + prune.calibration_caveats(opened.loaded.model, images):
        st.warning(caveat)  # legal but meaningless: say so above the numbers
    # what is analysed: the pages say it, and 1,000 or 2,000 of digits' 300 are one analysis
    return replace(chosen, samples=images)
