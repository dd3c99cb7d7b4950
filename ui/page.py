"""What every page does around its body: bad input shown as a message, and remembered widget
values kept within what the current model allows."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import streamlit as st

from modhifi.errors import UserError
from modhifi.requests import ModelRef


def guarded(render: Callable[[], None]) -> None:
    """Run a page body; bad input or a full device becomes a message, never a traceback."""
    try:
        render()
    except UserError as error:
        st.error(str(error))
    except MemoryError:
        st.error("out of memory: choose fewer calibration images or a smaller model")
    except RuntimeError as error:
        if "out of memory" not in str(error):
            raise
        st.error("the device ran out of memory: choose fewer calibration images, or the CPU")


def lower_to(key: str, most: int) -> None:
    """Lower a widget's remembered number to `most` if it no longer fits (call before the widget:
    e.g. a layer count chosen for one edit, when another edit reaches fewer layers)."""
    if (st.session_state.get(key) or 0) > most:
        st.session_state[key] = most


def download_stem(model: ModelRef, what: str) -> str:
    """A file name (without suffix) that says which model and what was done to it, e.g.
    `digits-cnn-pruned-modhifi-macs0.50`; safe on every file system."""
    name = Path(model.spec).stem if model.arch is not None else model.spec
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{what}")
