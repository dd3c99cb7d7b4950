"""What every page does around its body: bad input shown as a message, and remembered widget
values kept within what the current model allows."""
from __future__ import annotations

import math
import re
import runpy
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from modhifi.errors import UserError
from modhifi.requests import ModelRef
from ui import url


APP = Path(__file__).resolve().parent.parent / "app.py"
_frame = threading.local()  # each session's script runs on its own thread


@contextmanager
def frame():
    """app.py runs the chosen page inside this: the page then knows the sidebar is drawn."""
    _frame.on = True
    try:
        yield
    finally:
        _frame.on = False


def guarded(render: Callable[[], None]) -> None:
    """Run a page body; bad input or a full device becomes a message, never a traceback. The
    address then follows the widgets (`url.follow`)."""
    if not getattr(_frame, "on", False):
        # Streamlit's older pages-folder routing runs a page file on its own, without app.py,
        # until the first run in the process has called st.navigation: a shared link opened on
        # a fresh server. Run the frame, which runs this page inside it; the frame's widgets
        # take the identity they have in every later run (that of the main script).
        context = get_script_run_ctx()
        with context.run_with_active_hash(context.pages_manager.main_script_hash):
            runpy.run_path(str(APP), run_name="__main__")
        return
    try:
        render()
        url.follow()
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


STEP = 0.05  # of every target slider


def target_slider(container, label: str, *, key: str, most: float, default: float,
                  what: str) -> float | None:
    """A slider over the targets a plan can reach, 0 to `most` (rounded down to a step), that
    keeps the user's choice when the range changes (lowered to fit). None, with a message, when
    nothing can be removed.

    Args:
        what: what the target is a share of ("channels", "MACs", ...), for the help text.
    """
    top = math.floor(most / STEP + 1e-9) * STEP
    if top < STEP:
        container.info(f"Nothing can be removed with these options: every group keeps its floor "
                       f"or whole multiples (at most {most:.1%} of the {what}).")
        return None
    # A new range makes a new widget, which starts from `value`: the remembered choice (or the
    # address's, on a first visit), lowered to fit; so is the remembered state itself.
    lower_to(key, top)
    first = url.initial(key, lambda value: 0 <= value <= top) if key in url.PARAMETERS else None
    value = min(st.session_state.get(key, default if first is None else first), top)
    return container.slider(label, 0.0, round(top, 2), value, step=STEP, key=key,
                            help=f"Up to {most:.1%} of the {what} can be removed with these "
                                 "options: each group keeps a floor and whole multiples.")


def class_picker(container, label: str, names: list[str], *, key: str, default: int) -> int:
    """A selectbox of class (or category) indices shown by name, restored from a shared link."""
    url.restore(key, lambda index: 0 <= index < len(names))
    return container.selectbox(label, range(len(names)), index=default,
                               format_func=names.__getitem__, key=key)


def download_stem(model: ModelRef, what: str) -> str:
    """A file name (without suffix) that says which model and what was done to it, e.g.
    `digits-cnn-pruned-modhifi-macs0.50`; safe on every file system."""
    name = Path(model.spec).stem if model.arch is not None else model.spec
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{what}")


def side_by_side(found) -> None:
    """The try-it search of a text page: one column per model (`found` from
    `text_cache.try_it` or `try_forgotten`), the category the probe reads the sentence as above
    its nearest quotations."""
    names = list(dict.fromkeys(found["model"]))
    for column, name in zip(st.columns(len(names)), names):
        rows = found[found["model"] == name]
        column.caption(f"{name} model — reads the sentence as “{rows['sentence read as'].iloc[0]}”")
        column.dataframe(rows.drop(columns=["model", "sentence read as"]), hide_index=True)
