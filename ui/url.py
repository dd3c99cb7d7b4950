"""The page's state in its address (`st.query_params`), so that a link reproduces a view: the
model and its calibration size, the pruning target, its kind and method, and the class to forget.

A value in the address is read once per session, before the widget it belongs to first runs;
from then on the widgets lead and the address follows them (`follow`, after every run).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from ui import keys

# session-state key -> (query parameter, how to read its text)
PARAMETERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    keys.MODEL: ("model", str),
    keys.CALIBRATION: ("calibration", int),
    keys.PRUNE_TARGET: ("target", float),
    keys.PRUNE_KIND: ("kind", str),
    keys.PRUNE_METHOD: ("method", str),
    keys.UNLEARN_CLASS: ("forget", int),
}


def initial(key: str, allowed: Callable[[Any], bool] = lambda value: True) -> Any | None:
    """The address's value for a widget that has not run yet in this session and that the
    widget `allowed`; None otherwise (a mistyped link falls back to the widget's default)."""
    name, read = PARAMETERS[key]
    text = st.query_params.get(name)
    if key in st.session_state or text is None:
        return None
    try:
        value = read(text)
    except ValueError:
        return None
    return value if allowed(value) else None


def restore(key: str, allowed: Callable[[Any], bool] = lambda value: True) -> None:
    """Put the address's value into a widget's state before it first runs (widgets whose
    value= is not passed: select boxes and radios; a slider takes `initial` as its value)."""
    value = initial(key, allowed)
    if value is not None:
        st.session_state[key] = value


def follow() -> None:
    """Write the current widgets' values into the address (after the page has run)."""
    for key, (name, _) in PARAMETERS.items():
        if key in st.session_state and st.session_state[key] is not None:
            value = st.session_state[key]
            text = f"{value:g}" if isinstance(value, float) else str(value)
            if st.query_params.get(name) != text:
                st.query_params[name] = text
