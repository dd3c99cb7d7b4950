"""The what-if loop: every pruning a visitor looks at goes into their session's run history,
a table they can pick runs from to compare side by side and to mark on the accuracy curve.

The history is per session (a visitor's own runs, never another's) and holds plain rows, so
nothing in it refers to a shared model or analysis.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from ui import keys

MOST_RUNS = 50  # the oldest go first
SETTINGS = ("model", "method", "target", "target kind", "options")  # what makes a run a run


def record(run: dict) -> None:
    """Add a run (a flat row: the settings, then the figures); a run seen again keeps its place
    and number and takes its newest figures (e.g. a speed-up measured), so that the rows a
    visitor picked still are the runs they picked."""
    runs = st.session_state.setdefault(keys.HISTORY, [])
    settings = {k: v for k, v in run.items() if k in SETTINGS}
    for i, seen in enumerate(runs):
        if {k: v for k, v in seen.items() if k in SETTINGS} == settings:
            runs[i] = {"run": seen["run"], **run}
            return
    runs.append({"run": max(r["run"] for r in runs) + 1 if runs else 1, **run})
    del runs[:-MOST_RUNS]


def table(model: str) -> pd.DataFrame:
    """This session's runs on `model`, oldest first."""
    runs = [r for r in st.session_state.get(keys.HISTORY, []) if r["model"] == model]
    return pd.DataFrame(runs)


def show(model: str, also: str = "") -> pd.DataFrame:
    """The "Your runs" section: the runs on `model`, rows to pick, and the picked ones side by
    side; returns the picked rows (`also`: what else picking does, for the caption)."""
    st.subheader("Your runs")
    st.caption("Every setting you looked at in this session. Pick rows to compare them side by "
               f"side{' ' + also if also else ''}.")
    picked = pick(model)
    if len(picked) > 1:
        st.dataframe(picked.drop(columns="model").set_index("run").T.astype(str))
    return picked


def pick(model: str) -> pd.DataFrame:
    """Show the runs on `model` as a table whose rows can be picked; the picked rows."""
    runs = table(model)
    if runs.empty:
        return runs
    # A table per model: the browser keeps a table's picked rows by position, whatever it shows.
    shown = st.dataframe(runs.drop(columns="model"), hide_index=True,
                         key=f"{keys.HISTORY_TABLE}.{model}", on_select="rerun",
                         selection_mode="multi-row", column_config={
                             "accuracy": st.column_config.NumberColumn(format="percent"),
                             "MACs": st.column_config.NumberColumn(format="localized")})
    rows = sorted(row for row in shown.selection.rows if row < len(runs))  # older runs gone
    return runs.iloc[rows]
