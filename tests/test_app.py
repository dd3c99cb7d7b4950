"""Every dashboard page renders headlessly (Streamlit AppTest) without an exception."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def run_app(model: str = "digits-cnn") -> AppTest:
    app = AppTest.from_file(APP, default_timeout=180)
    app.session_state["sidebar.model"] = model
    app.session_state["sidebar.device"] = "cpu"
    return app.run()


def test_overview_shows_accuracy_macs_params_latency():
    app = run_app()
    assert not app.exception
    shown = {metric.label: metric.value for metric in app.metric}
    assert float(shown["Test accuracy"].rstrip("%")) > 90
    assert shown["MACs / image"] == "0.30 M"
    assert shown["Parameters"] == "5.2 k"
    assert any(label.startswith("Latency") for label in shown)
