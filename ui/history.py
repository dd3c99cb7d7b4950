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
    """Add a run (a flat row: the settings, then the figures) unless it is the latest already;
    a run seen again moves to the end with its newest figures (e.g. a speed-up measured)."""
    runs = st.session_state.setdefault(keys.HISTORY, [])
    settings = {k: v for k, v in run.items() if k in SETTINGS}
    runs[:] = [r for r in runs if {k: v for k, v in r.items() if k in SETTINGS} != settings]
    runs.append({"run": (runs[-1]["run"] + 1) if runs else 1, **run})
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
    shown = st.dataframe(runs.drop(columns="model"), hide_index=True, key=keys.HISTORY_TABLE,
                         on_select="rerun", selection_mode="multi-row", column_config={
                             "accuracy": st.column_config.NumberColumn(format="percent"),
                             "MACs": st.column_config.NumberColumn(format="localized")})
    return runs.iloc[sorted(shown.selection.rows)] if shown.selection.rows else runs.iloc[:0]
