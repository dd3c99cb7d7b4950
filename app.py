"""ModHiFi Studio: the frame (page config, sidebar) and the router over pages/."""
import streamlit as st

from modhifi.backend import quiet_dependency_warnings
from ui import page, sidebar

quiet_dependency_warnings()  # at every run of the script, before its work (idempotent)

st.set_page_config(page_title="ModHiFi Studio", page_icon=":material/tune:", layout="wide")
sidebar.sidebar()
navigation = st.navigation([
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("pages/fidelity.py", title="Fidelity", icon=":material/local_fire_department:"),
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/unlearn.py", title="Unlearn", icon=":material/visibility_off:"),
    st.Page("pages/theory.py", title="Theory", icon=":material/functions:"),
])
with page.frame():
    navigation.run()
