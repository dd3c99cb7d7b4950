"""Every dashboard page renders headlessly (Streamlit AppTest); controls change the numbers."""
import ast
import io
import json
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from oracles import prune_page_numbers
from ui import keys

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = ["pages/overview.py", "pages/fidelity.py", "pages/prune.py", "pages/unlearn.py",
         "pages/theory.py"]
OTHER_ZOO_MODELS = ["fmnist-resnet", "fmnist-vgg", "fmnist-vit"]  # digits-cnn: every test here


def open_page(page: str, **state) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=300)
    app.session_state["sidebar.model"] = "digits-cnn"
    app.session_state["sidebar.device"] = "cpu"
    app.session_state["sidebar.calibration"] = 250
    for key, value in state.items():
        app.session_state[key] = value
    app.run()
    return app.switch_page(page).run()


def metrics(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def submit(app: AppTest) -> AppTest:
    """Press the Unlearn page's submit button (its controls sit in a form)."""
    return app.button(key=keys.UNLEARN_SUBMIT).click().run()


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(page):
    app = open_page(page)
    assert not app.exception and not app.error
    assert app.title[0].value


@pytest.mark.zoo
@pytest.mark.parametrize("model", OTHER_ZOO_MODELS)
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_for_every_zoo_model(page, model):
    """The default view of every page, on the Fashion-MNIST models too (opt in: -m zoo)."""
    app = open_page(page, **{"sidebar.model": model})
    assert not app.exception and not app.error
    assert app.title[0].value and app.metric


def test_overview_shows_accuracy_macs_params_latency():
    app = open_page("pages/overview.py")
    links = [link.proto for link in app.get("page_link")]  # the guided start
    assert [link.page for link in links] == ["fidelity", "prune", "prune"]
    assert "method=l1" in links[2].query_string and "model=digits-cnn" in links[2].query_string
    shown = metrics(app)
    assert float(shown["Test accuracy"].rstrip("%")) > 90
    assert shown["MACs / image"] == "0.30 M"
    assert shown["Parameters"] == "5.2 k"
    assert any(label.startswith("Latency") for label in shown)


def test_moving_the_sparsity_slider_changes_accuracy_and_macs():
    app = open_page("pages/prune.py")
    before = metrics(app)
    app.slider(key="prune.target").set_value(0.7).run()
    after = metrics(app)
    assert not app.exception
    # What the library computes for each position alone (250 calibration images, as set).
    assert (before["Accuracy"], before["MACs / image"]) == prune_page_numbers(
        "digits-cnn", 0.5, samples=250)
    assert (after["Accuracy"], after["MACs / image"]) == prune_page_numbers(
        "digits-cnn", 0.7, samples=250)
    assert float(after["MACs / image"].split()[0]) < float(before["MACs / image"].split()[0])


def test_the_guided_links_of_a_checkpoint_name_no_server_path(tmp_path):
    """A zoo model is named in the links (they open the same anywhere); a checkpoint's path is
    the server's (an upload's, under its cache), so it is left out: the session keeps it."""
    import torch

    from modhifi.zoo import checkpoint_state, load_model

    path = tmp_path / "mine.pt"
    digits = load_model("digits-cnn", device=torch.device("cpu"))
    torch.save(checkpoint_state(digits.model, base={"model": "digits-cnn", "arch": None,
                                                    "dataset": "digits", "num_classes": 10,
                                                    "input_shape": [1, 8, 8]}, removed={}), path)
    app = open_page("pages/overview.py", **{"sidebar.model": "your checkpoint…",
                                            "sidebar.checkpoint_path": str(path),
                                            "sidebar.checkpoint_data": "digits"})
    assert not app.exception
    links = [link.proto.query_string for link in app.get("page_link")]
    assert links and "method=l1" in links[-1] and not any("model=" in q for q in links)


def test_a_bad_upload_shows_an_error_not_an_exception(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    app = open_page("pages/overview.py", **{"sidebar.model": "your checkpoint…",
                                            "sidebar.checkpoint_path": str(bad),
                                            "sidebar.checkpoint_data": "digits"})
    assert not app.exception
    assert app.error and "cannot read" in app.error[0].value


def test_choosing_a_forget_class_changes_forget_accuracy():
    app = open_page("pages/unlearn.py")

    def forget() -> tuple[str, str]:  # (forget accuracy after, change from before)
        metric = next(m for m in app.metric if m.label == "Forget accuracy")
        return metric.value, metric.delta

    first = forget()
    assert float(first[0].rstrip("%")) < 50  # the default class is forgotten
    assert app.selectbox(key="unlearn.class").value == 5  # digits-cnn's first view (zoo entry)
    app.selectbox(key="unlearn.class").set_value(6)  # 92% before
    submit(app)
    assert not app.exception
    # What the library computes for class 6 with the page's defaults.
    import torch

    from modhifi.unlearn import unlearn
    from modhifi.zoo import open_subject

    chosen = open_subject("digits-cnn", device=torch.device("cpu"))
    result = unlearn(chosen.loaded.model, chosen.dataset, forget_class=6, device="cpu")
    assert forget()[0] == f"{result.after.forget_accuracy:.1%}"
    assert "“6”" in app.subheader[-1].value


def test_switching_to_negate_lowers_a_layer_count_that_no_longer_fits():
    """digits-cnn: 2 layers can be zeroed, 1 negated (the one as wide as the head's input)."""
    app = open_page("pages/unlearn.py")
    app.number_input(key="unlearn.layers").set_value(2)
    submit(app)
    assert not app.exception and app.number_input(key="unlearn.layers").max == 2
    app.selectbox(key="unlearn.edit").set_value("negate")
    submit(app)
    assert not app.exception and not app.error
    assert app.number_input(key="unlearn.layers").max == 1
    assert app.number_input(key="unlearn.layers").value == 1
    # The direction edit is for Transformers: on this CNN, one error box (layers left out).
    app.number_input(key="unlearn.layers").set_value(None)
    app.selectbox(key="unlearn.edit").set_value("direction")
    submit(app)
    assert not app.exception and len(app.error) == 1 and "is for Transformers" in app.error[0].value


@pytest.mark.zoo
def test_the_direction_edit_forgets_a_vit_class_on_the_page():
    """fmnist-vit (opt in: -m zoo): "by architecture" is the class-direction gate, and the page
    says which neuron of which layer became the gate."""
    app = open_page("pages/unlearn.py", **{"sidebar.model": "fmnist-vit"})
    assert not app.exception and not app.error
    assert any("of blocks.3.ffn.fc1 → blocks.3.ffn.fc2 made a gate" in c.value
               for c in app.caption)
    # The direction edit chosen with the pair edits' controls set: they are greyed out and left
    # out of the request (which refuses them with a direction edit), not an error box.
    app.number_input(key=keys.UNLEARN_LAYERS).set_value(2)
    app.toggle(key=keys.UNLEARN_AUTO).set_value(False)
    app.selectbox(key=keys.UNLEARN_EDIT).set_value("direction")
    submit(app)
    assert not app.exception and not app.error
    assert app.number_input(key=keys.UNLEARN_LAYERS).disabled
    assert app.toggle(key=keys.UNLEARN_AUTO).disabled and app.slider(key=keys.UNLEARN_K).disabled
    assert any("made a gate" in c.value for c in app.caption)


def test_a_damaging_edit_is_flagged_before_the_test_split_says_so():
    """digits-cnn: forgetting "0" changes 68% of the other classes' calibration predictions (a
    warning), forgetting "5" (the page's first view) 10% (none)."""
    app = open_page("pages/unlearn.py", **{"unlearn.class": 0})
    assert any("other classes' predictions" in w.value for w in app.warning)
    app.selectbox(key="unlearn.class").set_value(5)
    submit(app)
    assert not app.exception and not app.warning


def test_a_forget_target_above_zero_spares_the_other_classes():
    """digits-cnn, class 3: aiming for 5% instead of 0% on calibration images keeps more of the
    other classes (measured: retain 38% -> 70%)."""
    app = open_page("pages/unlearn.py", **{"unlearn.class": 3})
    def retain() -> float:
        return float(next(m for m in app.metric if m.label == "Retain accuracy").value.rstrip("%"))

    strict = retain()
    app.number_input(key="unlearn.target").set_value(0.05)
    submit(app)
    assert not app.exception and retain() > strict + 10


def test_greedy_selection_and_channel_multiples_change_the_plan():
    app = open_page("pages/prune.py")
    app.slider(key="prune.target").set_value(0.3).run()  # within reach in multiples of 16
    app.selectbox(key="prune.method").set_value("modhifi-greedy").run()
    app.select_slider(key="prune.round_to").set_value(1).run()
    exact = metrics(app)["Channels kept"]
    app.select_slider(key="prune.round_to").set_value(16).run()
    assert not app.exception
    kept = metrics(app)["Channels kept"]  # "kept / total"
    assert kept != exact and int(kept.split("/")[0]) % 16 == 0


def test_the_unlearn_form_runs_the_unlearning_on_submit_only(monkeypatch):
    """Changing a control reruns the page without unlearning again (the last result stays);
    submitting runs it once for the new choice."""
    from modhifi import unlearn

    calls = []
    real = unlearn.unlearn

    def counted(*args, **kwargs):
        calls.append(kwargs["forget_class"])
        return real(*args, **kwargs)

    monkeypatch.setattr(unlearn, "unlearn", counted)
    # a choice no other test makes, so that the shared caches do not hold it yet
    app = open_page("pages/unlearn.py", **{"unlearn.class": 8, "unlearn.target": 0.02})
    assert not app.exception and calls == [8]
    shown = metrics(app)
    app.selectbox(key="unlearn.class").set_value(9).run()  # changed, not submitted
    assert not app.exception and calls == [8] and metrics(app) == shown
    assert "“8”" in app.subheader[-1].value
    app.selectbox(key="unlearn.class").set_value(9)  # AppTest drops a staged value at a rerun
    submit(app)
    assert not app.exception and calls == [8, 9] and metrics(app) != shown
    assert "“9”" in app.subheader[-1].value
    app.run()  # a rerun with nothing changed keeps the result without unlearning again
    assert calls == [8, 9] and "“9”" in app.subheader[-1].value


def test_the_direction_edit_gets_the_forget_target_whatever_the_disabled_toggle_says(
        monkeypatch):
    """The direction edit always chooses its strength for the target: a "choose k
    automatically" left off for the pair edits (now disabled) does not drop it."""
    from modhifi import unlearn
    from modhifi.errors import UserError

    asked, real = [], unlearn.unlearn

    def direction_refused(*args, **kwargs):  # the request is what is tested: no ViT needed
        asked.append({key: kwargs[key] for key in ("edit", "k", "target_forget_accuracy")})
        if kwargs["edit"] == "direction":
            raise UserError("stopped here")
        return real(*args, **kwargs)

    monkeypatch.setattr(unlearn, "unlearn", direction_refused)
    app = open_page("pages/unlearn.py", **{"unlearn.class": 2})
    app.toggle(key=keys.UNLEARN_AUTO).set_value(False)
    submit(app)  # k by hand, for the pair edits
    asked.clear()
    app.number_input(key=keys.UNLEARN_TARGET).set_value(0.05)
    app.selectbox(key=keys.UNLEARN_EDIT).set_value("direction")
    submit(app)
    assert app.toggle(key=keys.UNLEARN_AUTO).disabled and not app.exception
    assert asked == [{"edit": "direction", "k": None, "target_forget_accuracy": 0.05}]


def test_a_model_pruned_from_a_downloaded_pruned_model_downloads_and_reloads(tmp_path):
    """The Prune page's download of a model opened from a pruned checkpoint (one a visitor
    downloaded and uploaded again) reloads as the page's model: rebuilt from the first base."""
    import torch

    from modhifi.requests import ModelRef, PruneRequest
    from modhifi.zoo import load_model
    from ui.cache import Selection, pruned, pruned_download, subject

    request = PruneRequest(target=0.2)
    once = tmp_path / "once.pt"
    once.write_bytes(pruned_download(Selection(ModelRef("digits-cnn"), "cpu", 250), request)[0])
    selection = Selection(ModelRef(str(once)), "cpu", 250)
    twice = tmp_path / "twice.pt"
    twice.write_bytes(pruned_download(selection, request)[0])
    reloaded = load_model(str(twice), device=torch.device("cpu")).model
    images = next(subject(selection.opened).dataset.test.batches(64))
    with torch.no_grad():
        assert torch.equal(reloaded(images), pruned(selection, request)(images))


# --- session-state keys: defined once in ui/keys.py, never spelled in a page ----------------------

WIDGETS = {"button", "checkbox", "color_picker", "data_editor", "date_input", "download_button",
           "file_uploader", "form", "form_submit_button", "multiselect", "number_input", "pills",
           "radio", "segmented_control", "select_slider", "selectbox", "slider", "text_area",
           "text_input", "time_input", "toggle",
           "target_slider"}  # ui.page's slider: its callers name the key
SCRIPTS = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")),
           *sorted(p for p in (ROOT / "ui").glob("*.py") if p.name != "keys.py")]


def test_keys_are_defined_once():
    values = [v for name, v in vars(keys).items() if name.isupper()]
    assert len(values) == len(set(values)), "two constants in ui/keys.py share a key"
    assert all(re.fullmatch(r"(sidebar|overview|fidelity|prune|unlearn|theory)\.[a-z_]+", v)
               for v in values)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_widget_has_a_key_from_ui_keys(path):
    """Every widget call names its key as `keys.NAME`; no page spells a session-state key."""
    source = path.read_text()
    assert not re.search(r"session_state\s*\[\s*[\"']|session_state\.get\(\s*[\"']|key\s*=\s*[\"']",
                         source), "a literal key: use a constant from ui/keys.py"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in WIDGETS:
            key = next((k.value for k in node.keywords if k.arg == "key"), None)
            if node.func.attr == "form":  # st.form's key is its first argument
                key = key or (node.args[0] if node.args else None)
            where = f"{path.name}:{node.lineno} {node.func.attr}"
            if path.name == "page.py" and isinstance(key, ast.Name) and key.id == "key":
                continue  # a helper passing on its caller's key (checked at the call)
            assert isinstance(key, ast.Attribute) and isinstance(key.value, ast.Name) and \
                key.value.id == "keys" and hasattr(keys, key.attr), where


def test_the_sparsity_curve_draws_every_method():
    app = open_page("pages/prune.py")
    app.toggle(key="prune.curve").set_value(True).run()
    assert not app.exception and not app.error
    chart = app.get("plotly_chart")[-1]  # the last chart: accuracy against MACs reduction
    names = {trace["name"] for trace in json.loads(chart.proto.spec)["data"]}
    assert names == {"modhifi-greedy (refit)", "modhifi (refit)", "modhifi (rescale)",
                     "l1 (none)", "activation (none)", "random (none)", "you are here"}
    app.slider(key="prune.target").set_value(0.7).run()  # the curve stays, the star moves
    star = [t for t in json.loads(app.get("plotly_chart")[-1].proto.spec)["data"]
            if t["name"] == "you are here"]
    assert star and star[0]["y"][0] == pytest.approx(float(metrics(app)["Accuracy"].rstrip("%")) / 100,
                                                     abs=5e-5)


# --- the text model (all-MiniLM-L6-v2 on fortunes) ---------------------------------------------

def open_text_page(page: str, **state) -> AppTest:
    return open_page(page, **{"sidebar.model": "minilm-l6", **state})


@pytest.mark.parametrize("page", ["pages/overview.py", "pages/fidelity.py", "pages/theory.py"])
# the Prune and Unlearn pages: their own tests below
def test_every_page_renders_for_the_text_model(page):
    app = open_text_page(page)
    assert not app.exception and not app.error
    assert app.title[0].value


def test_the_text_prune_page_shows_the_library_numbers_and_the_try_it_box():
    import torch

    from modhifi.requests import ModelRef
    from modhifi.text.encoder import embed
    from modhifi.text.quality import agreement
    from modhifi.text.surgery import apply_plan
    from ui import text_cache
    from ui.cache import Selection

    app = open_text_page("pages/prune.py")
    shown = metrics(app)
    # The page's analysis (a library object, cached for every session) and the library's own
    # plan, surgery, encoding and comparison of the first 400 test quotations.
    selection = Selection(ModelRef("minilm-l6"), "cpu", 250)
    analysis = text_cache.analysis(selection)
    dense = text_cache.subject(selection.opened)
    pruned = apply_plan(analysis, analysis.plan(0.3, kind="ffn", method="modhifi-greedy"))
    texts = dense.corpus.test.texts[:400]
    expected = agreement(embed(dense.model, texts, device="cpu"), embed(pruned, texts, device="cpu"))
    assert shown["Embedding cosine"] == f"{expected.embedding_cosine:.4f}"
    assert shown["Same nearest neighbour"] == f"{expected.retrieval_agreement:.1%}"
    assert shown["Kept: FFN neurons"] == f"{6 * 1072} / {6 * 1536}"
    found = [frame.value for frame in app.dataframe if "similarity" in frame.value]
    assert len(found) == 2 and all(len(frame) == 5 for frame in found)
    run = app.session_state["prune.history"][-1]  # the run history has the same figures
    assert f"{run['embedding cosine']:.4f}" == shown["Embedding cosine"]
    similarity = torch.tensor(found[0]["similarity"].to_numpy())
    assert torch.all(similarity[:-1] >= similarity[1:])
    app.slider(key="prune.target").set_value(0.6).run()
    assert not app.exception
    assert float(metrics(app)["Embedding cosine"]) < float(shown["Embedding cosine"])
    app.radio(key="prune.components").set_value("heads").run()
    assert not app.exception and metrics(app)["Kept: attention heads"].endswith("/ 72")


def test_the_text_unlearn_page_forgets_a_category_and_the_numbers_are_the_models():
    """The page (opening on "art") shows the library's edit of its plan, its forget figure is
    that encoder's accuracy on the test quotations, and the try-it box no longer reads a
    sentence about art as "art"."""
    import torch

    from modhifi.requests import ModelRef, TextUnlearnRequest
    from modhifi.text.encoder import embed
    from modhifi.text.forget import apply_plan
    from ui import text_cache
    from ui.cache import Opened

    app = open_text_page("pages/unlearn.py")
    assert not app.exception and not app.error
    opened = Opened(ModelRef("minilm-l6"), "cpu")
    result = text_cache.forgotten(opened, TextUnlearnRequest(category=0))
    dense = text_cache.subject(opened)
    rebuilt = apply_plan(dense.model, result.plan)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(),
                                                 result.model.state_dict().values()))
    test = dense.corpus.test
    rows = [i for i, label in enumerate(test.labels) if label == 0]  # category 0, "art"
    art = embed(result.model, [test.texts[i] for i in rows], device="cpu")
    recognised = (dense.probe.predict(art) == 0).double()
    assert metrics(app)["Forget accuracy"] == f"{float(recognised.mean()):.1%}"
    # The try-it box searches the embeddings the audit made: the edited model's own.
    assert torch.allclose(result.test_embeddings[rows], art, atol=1e-5)
    captions = [caption.value for caption in app.caption]
    assert "dense model — reads the sentence as “art”" in captions
    assert not any(c.startswith("edited model — reads the sentence as “art”") for c in captions)
    found = [frame.value for frame in app.dataframe if "similarity" in frame.value]
    assert len(found) == 2 and all(len(frame) == 5 for frame in found)


def test_the_prune_page_says_how_much_the_plan_removes_against_what_was_asked():
    """digits-cnn at half the MACs: multiples of 8 channels overshoot, and the page says by how
    much (the library's plan for the same request is the oracle)."""
    from modhifi import bench
    from modhifi.backend import choose_backend
    from modhifi.zoo import open_subject

    app = open_page("pages/prune.py")
    subject = open_subject("digits-cnn", device=__import__("torch").device("cpu"))
    analysis = bench.live_analysis(subject.loaded.model, subject.dataset,
                                   backend=choose_backend("cpu"), samples=250)
    plan = analysis.plan(0.5, target_kind="macs")
    assert plan.achieved >= 0.5
    captions = " ".join(c.value for c in app.caption)
    assert f"Asked to remove 50% of the MACs; the plan removes {plan.achieved:.1%}." in captions
    overshoot = [box.value for box in app.info if "more than the 50% asked" in box.value]
    assert bool(overshoot) == (plan.achieved > 0.52)
    app.select_slider(key="prune.round_to").set_value(1).run()
    exact = " ".join(c.value for c in app.caption)
    assert f"the plan removes {analysis.plan(0.5, target_kind='macs', round_to=1).achieved:.1%}" in exact


def test_the_prune_page_compares_the_refit_with_the_library_sequential_refit():
    """The toggle's accuracy is the library's sequential refit of the same plan, evaluated on
    the same test images (all 360 of digits)."""
    from modhifi import bench, metrics as evaluation
    from modhifi.backend import choose_backend
    from modhifi.zoo import open_subject

    app = open_page("pages/prune.py")
    app.toggle(key=keys.PRUNE_SEQUENTIAL).set_value(True).run()
    assert not app.exception and not app.error
    subject = open_subject("digits-cnn", device=__import__("torch").device("cpu"))
    analysis = bench.live_analysis(subject.loaded.model, subject.dataset,
                                   backend=choose_backend("cpu"), samples=250)
    plan = analysis.plan(0.5, target_kind="macs")
    expected = evaluation.evaluate(analysis.apply(plan, compensation="sequential"),
                                   subject.dataset.test, device="cpu",
                                   num_classes=subject.dataset.num_classes)
    assert metrics(app)["Accuracy, sequential refit"] == f"{expected.accuracy:.2%}"
    app.selectbox(key=keys.PRUNE_COMPENSATION).set_value("rescale").run()
    assert "Accuracy, sequential refit" not in metrics(app)  # compared with the refit only


def test_download_names_say_which_model_and_what_was_done():
    from modhifi.requests import ModelRef
    from ui.page import download_stem

    assert download_stem(ModelRef("digits-cnn"), "pruned-modhifi-macs0.50") == \
        "digits-cnn-pruned-modhifi-macs0.50"
    own = ModelRef("/tmp/my model.pt", arch="resnet18", data="digits")
    assert download_stem(own, "forget-T-shirt/top") == "my_model-forget-T-shirt_top"


def test_no_page_uses_the_deprecated_use_container_width():
    sources = [p.read_text() for p in [ROOT / "app.py", *(ROOT / "pages").glob("*.py"),
                                       *(ROOT / "ui").glob("*.py")]]
    assert not any("use_container_width" in source for source in sources)


def test_the_sliders_span_what_the_model_can_reach_and_the_default_renders():
    """fmnist-vit cannot lose half its MACs (only FFN neurons go) and digits-cnn cannot lose 90%
    of its channels in multiples of 8: each slider ends where the library's plans end (the
    oracle: `Analysis.most` on the same analysis), and a remembered value beyond it is lowered
    instead of showing an error."""
    import math

    from modhifi import bench
    from modhifi.backend import choose_backend
    from modhifi.zoo import open_subject

    vit = open_page("pages/prune.py", **{"sidebar.model": "fmnist-vit", "prune.kind": "macs"})
    assert not vit.exception and not vit.error and metrics(vit)["Accuracy"]
    slider = vit.slider(key="prune.target")
    assert slider.max < 0.5 and slider.value == slider.max
    fidelity = open_page("pages/fidelity.py", **{"fidelity.target": 0.9})
    assert not fidelity.exception and not fidelity.error
    slider = fidelity.slider(key="fidelity.target")
    subject = open_subject("digits-cnn", device=__import__("torch").device("cpu"))
    most = bench.live_analysis(subject.loaded.model, subject.dataset,
                               backend=choose_backend("cpu"), samples=250).most()
    assert slider.max == pytest.approx(math.floor(most / 0.05 + 1e-9) * 0.05) and most < 0.9
    assert slider.value == slider.max


def test_a_small_test_split_is_evaluated_whole_and_says_so():
    """digits-cnn has 360 test images, fewer than the live prefix: no toggle, and the caption
    says the accuracy before is on all of them, the same figure as the Overview's."""
    app = open_page("pages/prune.py")
    assert not [t for t in app.toggle if t.key == "prune.full"]
    accuracy = metrics(open_page("pages/overview.py"))["Test accuracy"]
    assert any(f"Before: {accuracy} on all 360 test images" in c.value for c in app.caption)


def test_class_names_that_look_like_numbers_are_categories_and_the_forgotten_one_is_marked():
    from ui import figures

    frame = __import__("pandas").DataFrame({"class": [str(i) for i in range(10)],
                                            "accuracy": [0.9] * 10})
    figure = figures.class_bars(frame, highlight="3")
    assert figure.layout.xaxis.type == "category"
    assert [shape.x0 for shape in figure.layout.shapes] == [2.5]
    names = [str(i) for i in range(10)]
    confusion = figures.confusion([[int(i == j) for j in range(10)] for i in range(10)], names)
    assert confusion.layout.xaxis.type == confusion.layout.yaxis.type == "category"


def test_the_address_reproduces_the_view_and_follows_the_widgets():
    """A link with ?model=…&calibration=…&target=…&kind=… opens that view; moving the slider
    rewrites it; a value the model cannot take falls back to the default instead of failing."""
    app = AppTest.from_file(APP, default_timeout=300)
    app.query_params.update({"model": "digits-cnn", "calibration": "250", "target": "0.3",
                             "kind": "channels"})
    app.session_state["sidebar.device"] = "cpu"
    app.switch_page("pages/prune.py").run()
    assert app.select_slider(key="sidebar.calibration").value == 250
    assert not app.exception and not app.error
    assert app.title[0].value == "Prune — ModHiFi-P" and metrics(app)["MACs / image"] == \
        open_page("pages/prune.py", **{"prune.kind": "channels", "prune.target": 0.3}).metric[1].value
    assert app.slider(key="prune.target").value == 0.3
    assert app.radio(key="prune.kind").value == "channels"
    app.slider(key="prune.target").set_value(0.45).run()
    assert app.query_params["target"] == "0.45" and app.query_params["model"] == "digits-cnn"
    forget = AppTest.from_file(APP, default_timeout=300)
    forget.query_params.update({"model": "digits-cnn", "forget": "99", "target": "7"})
    forget.session_state["sidebar.device"] = "cpu"
    forget.session_state["sidebar.calibration"] = 250
    forget.switch_page("pages/unlearn.py").run()
    assert not forget.exception and forget.selectbox(key="unlearn.class").value == 5  # default


def test_every_run_goes_into_the_session_history_once():
    """Each setting looked at is a row with the figures the page showed; coming back to a
    setting updates its row (in place: picked rows stay the runs picked) instead of adding a
    copy; picked runs are drawn on the curve."""
    from ui import figures

    app = open_page("pages/prune.py")
    shown = [metrics(app)["Accuracy"]]
    for target in (0.7, 0.3, 0.7):
        app.slider(key="prune.target").set_value(target).run()
        shown.append(metrics(app)["Accuracy"])
    assert not app.exception
    runs = app.session_state["prune.history"]
    assert [r["target"] for r in runs] == [0.5, 0.7, 0.3] and [r["run"] for r in runs] == [1, 2, 3]
    assert [f"{r['accuracy']:.2%}" for r in runs] == [shown[0], shown[3], shown[2]]
    curve = figures.sparsity_curve(__import__("pandas").DataFrame(
        {"macs_reduction": [1.0, 2.0], "accuracy": [0.9, 0.8], "method": ["m", "m"]}),
        pinned=[("run 1", 1.5, 0.85)])
    assert [t.name for t in curve.data][-1] == "picked runs"


def test_the_channel_card_shows_the_library_card_and_removes_only_that_channel():
    from modhifi import bench, metrics as evaluation
    from modhifi.backend import choose_backend
    from modhifi.prune import card
    from modhifi.zoo import open_subject

    app = open_page("pages/fidelity.py", **{"fidelity.layer": "3", "fidelity.channel": 5})
    assert not app.exception and not app.error
    subject = open_subject("digits-cnn", device=__import__("torch").device("cpu"))
    analysis = bench.live_analysis(subject.loaded.model, subject.dataset,
                                   backend=choose_backend("cpu"), samples=250)
    expected = card.channel_card(analysis, "3", 5)
    shown = metrics(app)
    assert shown["Output error without it, refitted"] == f"{expected.error_refit:.2%}"
    rank = f"{expected.ranks['modhifi']} of {expected.group_size}"
    assert shown["Rank in its group (ModHiFi)"] == rank
    # The greedy explanation: the library's steps, and the channel's own step in the label.
    steps = card.greedy_steps(analysis, "3", 5)
    label = (f"Greedy selection: channel 5 is added at step {expected.ranks['modhifi-greedy']} "
             f"of {len(steps)}")
    assert any(expander.label.startswith(label) for expander in app.expander)
    table = next(frame.value for frame in app.dataframe if "union_rank" in frame.value)
    __import__("pandas").testing.assert_frame_equal(table.reset_index(drop=True), steps)
    app.toggle(key="fidelity.remove_one").set_value(True).run()
    pruned = analysis.apply(card.without_channel(analysis, expected))
    after = evaluation.evaluate(pruned, subject.dataset.test, device="cpu",
                                num_classes=subject.dataset.num_classes)
    assert metrics(app)["Accuracy without it"] == f"{after.accuracy:.2%}"


def test_the_unlearn_page_draws_the_attack_evidence_and_the_feature_plane():
    app = open_page("pages/unlearn.py")
    assert not app.exception and not app.error
    charts = [json.loads(chart.proto.spec)["data"] for chart in app.get("plotly_chart")]
    names = [{trace.get("name") for trace in chart} for chart in charts]
    assert {"member", "non-member"} in names  # the membership histograms
    forgotten = [t for chart in charts for t in chart if t.get("marker", {}).get("symbol") == "x"]
    assert forgotten and all(t["name"].startswith("5") for t in forgotten)  # class "5", crosses


def test_the_unlearn_page_compares_the_edit_with_the_model_retrained_without_the_class():
    """digits-cnn trains in seconds: the page shows the retrained model's audit, the edit's
    agreement with it, and a retrained column and histogram, equal to the library's."""
    from modhifi import audit, zoo
    from modhifi.unlearn import unlearn

    app = open_page("pages/unlearn.py", **{"unlearn.class": 7})
    assert not app.exception and not app.error
    digits = zoo.open_subject("digits-cnn", device="cpu")
    reference = zoo.retrained_without("digits-cnn", digits.dataset, 7, device="cpu")
    expected = audit.audit(reference, digits.dataset, forget_class=7, device="cpu")
    edited = unlearn(digits.loaded.model, digits.dataset, forget_class=7, device="cpu").model
    same = audit.agreement(edited, reference, digits.dataset.test, forget_class=7, device="cpu")
    shown = metrics(app)
    assert shown["Retrained: forget accuracy"] == f"{expected.forget_accuracy:.1%}"
    assert shown["Retrained: retain accuracy"] == f"{expected.retain_accuracy:.2%}"
    assert shown["Agrees with retrained: “7”"] == f"{same.forget:.1%}"
    assert shown["Agrees with retrained: others"] == f"{same.retain:.1%}"
    table = next(frame.value for frame in app.dataframe if "metric" in frame.value)
    assert list(table.columns) == ["metric", "before", "after", "retrained"]
    assert table["retrained"].iloc[0] == expected.forget_accuracy
    charts = [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]
    facets = [a["text"] for chart in charts for a in chart["layout"].get("annotations", [])]
    assert "retrained" in facets  # the membership histograms' third panel


def test_the_invariance_chart_has_one_legend_entry_per_model_and_amounts_in_pixels():
    import pandas as pd

    from ui import figures

    rows = [(model, f"layer {d}", d, transform, amount, 0.1 * d * amount, 1.0)
            for model in ("dense", "pruned")
            for transform, amounts in (("translation", (0, 1, 2)), ("deformation", (0.5, 1.0)))
            for amount in amounts for d in range(3)]
    figure = figures.invariance(pd.DataFrame(rows, columns=[
        "model", "layer", "depth", "transform", "amount", "relative_change", "lipschitz_bound"]))
    assert sorted(t.name for t in figure.data if t.showlegend) == ["dense", "pruned"]
    assert len(figure.data) == 2 * (2 + 2)  # the zero shift is not drawn
    assert {t.text[-1] for t in figure.data} == {"1 px", "2 px", "0.5 px"}
    assert [a.text for a in figure.layout.annotations] == ["circular shift (pixels)",
                                                          "smooth deformation (pixels)"]


def test_batchnorm_recalibration_is_offered_only_where_there_is_batchnorm():
    vit = open_page("pages/prune.py", **{"sidebar.model": "fmnist-vit"})
    assert not [t for t in vit.toggle if t.label == "Recalibrate BatchNorm"]
    assert any("No BatchNorm in this model" in c.value for c in vit.caption)
    cnn = open_page("pages/prune.py")
    assert [t for t in cnn.toggle if t.label == "Recalibrate BatchNorm"]


def test_the_architecture_and_per_group_overrides_follow_the_library():
    """digits-cnn: a share typed into the overrides table gives the library's plan with that
    override; the architecture draws every layer, and each group's accuracy when pruned alone
    (shown on hover) is the library's for that one-group plan."""
    import torch

    from modhifi import bench, metrics as measures
    from modhifi.backend import choose_backend
    from modhifi.prune.architecture import only_group
    from modhifi.zoo import open_subject

    edits = {"edited_rows": {1: {"remove": 0.75}}, "added_rows": [], "deleted_rows": []}
    app = open_page("pages/prune.py", **{"prune.kind": "channels", "prune.target": 0.3,
                                          "prune.overrides": edits, "prune.alone": True})
    assert not app.exception and not app.error

    cpu = torch.device("cpu")
    subject = open_subject("digits-cnn", device=cpu)
    analysis = bench.live_analysis(subject.loaded.model, subject.dataset,
                                   backend=choose_backend("cpu"), samples=250)
    group = analysis.structure.groups[1].name
    plan = analysis.plan(0.3, overrides={group: 0.75})
    assert metrics(app)["Channels kept"] == f"{plan.channels_after} / {plan.channels_before}"
    live = subject.dataset.test.subset(slice(0, bench.LIVE_TEST_IMAGES))
    alone = {g.name: measures.evaluate(analysis.apply(only_group(analysis, plan, g.name)), live,
                                       device=cpu, num_classes=10).accuracy
             for g in plan.groups if g.removed}
    hover = " ".join(text for chart in app.get("plotly_chart")
                     for trace in json.loads(chart.proto.spec)["data"]
                     for text in trace.get("hovertext", []))
    assert all(f"{accuracy:.2%}" in hover for accuracy in alone.values())
    assert hover.count("Conv2d") + hover.count("Linear") == len(analysis.structure.order)

    # Another scope lists other groups in the table's rows: the edits are dropped, not moved.
    app.radio(key="prune.scope").set_value("internal").run()
    inside = analysis.plan(0.3, scope="internal")
    assert metrics(app)["Channels kept"] == f"{inside.channels_after} / {inside.channels_before}"


def open_with_cost_file(tmp_path, monkeypatch, model: str, target: float) -> tuple[AppTest, str]:
    """The Prune page of a zoo model at a latency target, its cost model kept under tmp_path;
    the page and the one cost model file's text."""
    monkeypatch.setenv("MODHIFI_CACHE", str(tmp_path))
    app = open_page("pages/prune.py", **{"sidebar.model": model, "prune.kind": "latency",
                                         "prune.target": target})
    assert not app.exception and not app.error
    files = list((tmp_path / "latency").glob(f"{model}.latency-b64-*.json"))
    assert len(files) == 1
    return app, files[0].read_text()


def test_a_latency_target_plans_with_the_measured_cost_model_and_shows_planned_beside_measured(
        tmp_path, monkeypatch):
    """The page times digits-cnn's layers once (kept under MODHIFI_CACHE) and plans with them:
    the library's plan from the same cost model file is the oracle."""
    from modhifi import bench
    from modhifi.backend import choose_backend
    from modhifi.prune import CostModel
    from modhifi.zoo import open_subject

    app, saved = open_with_cost_file(tmp_path, monkeypatch, "digits-cnn", 0.1)
    costs = CostModel.from_json(saved)
    subject = open_subject("digits-cnn", device=__import__("torch").device("cpu"))
    analysis = bench.live_analysis(subject.loaded.model, subject.dataset,
                                   backend=choose_backend("cpu"), samples=250)
    plan = analysis.plan(0.1, target_kind="latency", costs=costs)
    captions = " ".join(c.value for c in app.caption)
    assert f"Asked to remove 10% of the latency; the plan removes {plan.achieved:.1%}." in captions
    assert f"Predicted speed-up {plan.speedup_planned:.2f}×" in captions
    app.toggle(key=keys.PRUNE_SPEED).set_value(True).run()
    assert metrics(app)["Planned (cost model)"] == f"{plan.speedup_planned:.2f}×"
    assert app.session_state["prune.history"][-1]["planned speed-up"] == round(
        plan.speedup_planned, 3)


@pytest.mark.zoo
def test_the_text_prune_page_plans_a_latency_target_with_the_measured_cost_model(tmp_path,
                                                                                 monkeypatch):
    """MiniLM's blocks are timed once (about half a minute; opt in: -m zoo), kept under
    MODHIFI_CACHE, and the page's caption is the library's plan from that cost model file."""
    from modhifi.requests import ModelRef
    from modhifi.text.latency import TextCosts
    from ui import text_cache
    from ui.cache import Selection

    app, saved = open_with_cost_file(tmp_path, monkeypatch, "minilm-l6", 0.2)
    costs = TextCosts.from_json(saved)
    analysis = text_cache.analysis(Selection(ModelRef("minilm-l6"), "cpu", 250))
    plan = analysis.plan(0.2, kind="ffn", target_kind="latency", costs=costs)
    captions = " ".join(c.value for c in app.caption)
    assert f"Predicted speed-up {plan.speedup_planned:.2f}×" in captions
    assert metrics(app)["Kept: FFN neurons"] == f"{plan.units_after} / {plan.units_before}"


@pytest.mark.parametrize("kind, words", [
    ("composition", "every point lies below it"),
    ("sequential", "a heuristic, not a bound"),
    ("unavailable", "No red line: a module after this layer"),
])
def test_the_theory_page_says_whether_c_l_is_a_bound(monkeypatch, kind, words):
    """Only a composed C_l is the theorem's bound: a product in forward order (a branching
    torchvision network) is a heuristic, and an unknown constant (LayerNorm, attention) draws
    no line and shows no number, where the page used to call each a bound (and print "nan")."""
    import dataclasses

    from ui import cache

    measured = cache.local_global

    def of_kind(selection, layer):
        result = measured(selection, layer)
        constant = float("nan") if kind == "unavailable" else result.bound_constant
        return dataclasses.replace(result, bound_kind=kind, bound_constant=constant)

    monkeypatch.setattr(cache, "local_global", of_kind)
    app = open_page("pages/theory.py")
    assert not app.exception and not app.error
    [caption] = [c.value for c in app.caption if c.value.startswith("Each point is one mask")]
    assert words in caption
    assert (metrics(app)["Bound's C_l²"] == "—") == (kind == "unavailable")
    names = {trace["name"].split(" C_l²")[0] for trace in
             json.loads(app.get("plotly_chart")[0].proto.spec)["data"] if "C_l²" in trace["name"]}
    assert names == {"composition": {"bound"}, "sequential": {"heuristic"},
                     "unavailable": set()}[kind]


def test_the_theory_page_of_a_checkpoint_with_dead_channels(tmp_path):
    """A mask that removes only dead inputs has local and global error 0, which log axes cannot
    show (the page raised); a checkpoint has no untrained reference ("—", not "nan%", and no
    comparison drawn from it)."""
    import base64

    import numpy as np
    import torch

    from modhifi.requests import ModelRef, PruneRequest
    from ui import cache

    selection = cache.Selection(ModelRef("digits-cnn"), "cpu", 250)
    state = torch.load(io.BytesIO(cache.pruned_download(selection, PruneRequest(target=0.3))[0]),
                       weights_only=True)
    for channel in (0, 1):  # the first BatchNorm's outputs 0 and 1: always zero after the ReLU
        state["state_dict"]["1.weight"][channel] = state["state_dict"]["1.bias"][channel] = 0.0
    path = tmp_path / "dead.pt"
    torch.save(state, path)
    app = open_page("pages/theory.py", **{"sidebar.model": "your checkpoint…",
                                          "sidebar.checkpoint_path": str(path),
                                          "sidebar.checkpoint_data": "digits"})
    app.selectbox(key=keys.THEORY_LAYER).set_value("3").run()
    assert not app.exception and not app.error
    assert metrics(app)["…the same architecture untrained"] == "—"
    points = [trace["x"] for trace in json.loads(app.get("plotly_chart")[0].proto.spec)["data"]
              if trace.get("mode") == "markers"]
    local = [np.frombuffer(base64.b64decode(x["bdata"]), x["dtype"]) if isinstance(x, dict)
             else np.array(x) for x in points]  # plotly packs numbers as base64 bytes
    assert local and all((x > 0).all() for x in local)


def test_the_fidelity_page_says_how_many_images_were_analysed():
    """The sidebar's 2,000 of digits' 300 calibration images: 300 analysed, and said."""
    app = open_page("pages/fidelity.py", **{"sidebar.calibration": 2000})
    assert not app.exception
    assert any(c.value.startswith("Statistics from 300 unlabeled calibration images")
               for c in app.caption)


def _history_page():
    import streamlit as st

    from ui import history

    model = st.selectbox("Model", ["A", "B"], key="model")
    target = st.number_input("target", 0.0, 1.0, 0.1, key="target")
    history.record({"model": model, "method": "m", "target": target, "target kind": "macs",
                    "options": "", "accuracy": 0.9})
    st.write(f"picked {len(history.show(model))}")


def test_picked_runs_survive_a_switch_to_a_model_with_fewer_runs():
    """The browser sends a table's picked rows by position, even once the table shows other
    runs: three runs picked at row 2 on model A, then model B (one run) read row 2 and raised.
    (The selection is sent as the browser sends it, through AppTest's widget states.)"""
    app = AppTest.from_function(_history_page, default_timeout=60).run()
    for target in (0.2, 0.3):
        app.number_input(key="target").set_value(target).run()

    def picking(rows):
        states = app._tree.get_widget_states()
        state = states.widgets.add()
        state.id = app.dataframe[0].proto.id
        state.string_value = json.dumps({"selection": {"rows": rows, "columns": [], "cells": []}})
        return states

    app._run(picking([2]))
    assert not app.exception and app.markdown[-1].value == "picked 1"
    app.selectbox(key="model").set_value("B")
    app._run(picking([2]))
    assert not app.exception and app.markdown[-1].value == "picked 0"
