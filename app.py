"""ModHiFi Studio: the frame (page config, sidebar) and the router over pages/."""
import streamlit as st

from ui import state

st.set_page_config(page_title="ModHiFi Studio", page_icon=":material/tune:", layout="wide")
state.sidebar()
st.navigation([
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("pages/fidelity.py", title="Fidelity", icon=":material/local_fire_department:"),
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/unlearn.py", title="Unlearn", icon=":material/visibility_off:"),
    st.Page("pages/theory.py", title="Theory", icon=":material/functions:"),
]).run()
