"""The sidebar: which model (a zoo model or the visitor's checkpoint), how many calibration
images, which device; and `selection()`, what every page reads of it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import streamlit as st

from modhifi import options, prune, zoo
from modhifi.errors import UserError
from modhifi.requests import SEPARATOR, ModelRef
from modhifi.text.encoder import ZOO_TEXT
from ui import cache, keys, url

OWN_CHECKPOINT = "your checkpoint…"
CALIBRATION_CHOICES = (250, 500, 1000, 2000)
UPLOADS = Path.home() / ".cache" / "modhifi" / "uploads"
SERVER_MODELS_VARIABLE = "MODHIFI_MODEL_DIR"  # a folder whose checkpoints visitors may pick


def sidebar() -> None:
    """Model (zoo or own checkpoint), calibration size and device pickers."""
    names = [n for n, e in zoo.ZOO.items() if e.checkpoint.is_file()] + text_models() + [OWN_CHECKPOINT]
    url.restore(keys.MODEL, lambda name: name in names)  # shareable links: ?model=digits-cnn
    st.sidebar.selectbox("Model", names, key=keys.MODEL, format_func=_model_label)
    if st.session_state[keys.MODEL] == OWN_CHECKPOINT:
        st.sidebar.selectbox("Architecture", zoo.torchvision_archs(), key=keys.CHECKPOINT_ARCH)
        st.sidebar.text_input("Dataset", key=keys.CHECKPOINT_DATA, placeholder="cifar10:/data/cifar",
                              help="fashion-mnist, digits, cifar10:DIR or imagefolder:DIR")
        upload = st.sidebar.file_uploader("Checkpoint (.pt state_dict)", type=["pt", "pth"],
                                          key=keys.CHECKPOINT_UPLOAD)
        if upload is not None:
            st.session_state[keys.CHECKPOINT_PATH] = str(_store_upload(upload.name, upload.getvalue()))
        elif server_checkpoints():
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


def _store_upload(name: str, data: bytes) -> Path:
    """Keep an upload on disk under a content-addressed name (checkpoints are read by path)."""
    safe = Path(name).name.replace(SEPARATOR, "_")  # a ModelRef's path holds no separator
    path = UPLOADS / f"{hashlib.sha256(data).hexdigest()[:16]}-{safe}"
    if not path.exists():
        zoo.write_atomically(path, lambda p: p.write_bytes(data))
    return path


def model() -> ModelRef:
    """The model picked in the sidebar: a zoo name, or the visitor's checkpoint."""
    # The sidebar's choice; before the sidebar has run (a page opened by its own address), the
    # address's model.
    name = (st.session_state.get(keys.MODEL)
            or url.initial(keys.MODEL, lambda name: name in zoo.ZOO or name in ZOO_TEXT)
            or next(iter(zoo.ZOO)))
    if name != OWN_CHECKPOINT:
        return ModelRef(name)
    path = st.session_state.get(keys.CHECKPOINT_PATH) or ""
    data = st.session_state.get(keys.CHECKPOINT_DATA) or ""
    if not path or not data:
        raise UserError("choose a checkpoint (upload or path) and its dataset in the sidebar")
    return ModelRef(path, arch=st.session_state.get(keys.CHECKPOINT_ARCH), data=data)


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
    return chosen
