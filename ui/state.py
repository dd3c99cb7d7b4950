"""The only place with Streamlit caches and session-state keys.

Models and the backend live in `st.cache_resource` and are shared by every session, so they are
never mutated: pages get results computed from them, and modifications work on copies.
Derived numbers live in `st.cache_data`, keyed by plain ids (model name, device).
"""
from __future__ import annotations

import streamlit as st

from modhifi import backend as _backend
from modhifi import metrics, zoo
from modhifi.errors import UserError

MODEL = "sidebar.model"  # session-state key of the chosen zoo model
DEVICE = "sidebar.device"


@st.cache_resource(show_spinner=False)
def backend(choice: str) -> _backend.Backend:
    return _backend.choose_backend(choice)


@st.cache_resource(show_spinner="Loading model and data…")
def subject(name: str, device_choice: str) -> zoo.Subject:
    return zoo.open_subject(name, device=backend(device_choice).device)


@st.cache_data(show_spinner="Evaluating on the test split…")
def evaluation(name: str, device_choice: str) -> metrics.Evaluation:
    chosen = subject(name, device_choice)
    return metrics.evaluate(chosen.loaded.model, chosen.dataset.test,
                            device=backend(device_choice).device,
                            num_classes=chosen.dataset.num_classes)


@st.cache_data(show_spinner="Counting MACs…")
def cost(name: str, device_choice: str) -> metrics.Cost:
    chosen = subject(name, device_choice)
    return metrics.count_cost(chosen.loaded.model, chosen.dataset.input_shape)


@st.cache_data(show_spinner="Timing the forward pass…")
def latency(name: str, device_choice: str, batch_size: int) -> metrics.Latency:
    chosen = subject(name, device_choice)
    return metrics.measure_latency(chosen.loaded.model, chosen.dataset.input_shape,
                                   backend=backend(device_choice), batch_size=batch_size)


def selection() -> tuple[str, str]:
    """(model name, device choice) picked in the sidebar."""
    return st.session_state.get(MODEL, next(iter(zoo.ZOO))), st.session_state.get(DEVICE, "auto")


def sidebar() -> None:
    """Model and device pickers; shows which device the scoring backend uses."""
    names = [n for n, e in zoo.ZOO.items() if e.checkpoint.is_file()]
    st.sidebar.selectbox("Model", names, key=MODEL,
                         format_func=lambda n: f"{n} — {zoo.ZOO[n].dataset}")
    st.sidebar.selectbox("Device", ("auto", "cpu", "cuda"), key=DEVICE)
    try:
        st.sidebar.caption(f"Scoring backend: {backend(st.session_state[DEVICE]).description}")
    except UserError as error:
        st.sidebar.error(str(error))


def guarded(render) -> None:
    """Run a page body; a UserError becomes a message in the page, never a traceback."""
    try:
        render()
    except UserError as error:
        st.error(str(error))
