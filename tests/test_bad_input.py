"""Bad input, table-driven, across the CLI, the Python API and the dashboard: each case is refused
with one line naming the problem and the fix (exit 2 on the CLI, an error box on a page), before
any work, leaving no file behind."""
import json
import math
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from modhifi import nets
from modhifi.__main__ import main
from modhifi.arguments import ONE_KIND_ONLY, build_parser, check_arguments
from modhifi.errors import UserError
from modhifi.fidelity import layer_fidelity
from modhifi.prune import analyse, prune_in_steps

APP = str(Path(__file__).resolve().parent.parent / "app.py")
ZOO = ("--model", "digits-cnn", "--device", "cpu")
PRUNE = ("prune", *ZOO, "--target", "0.3")
UNLEARN = ("unlearn", *ZOO, "--forget-class", "3")


# --- files the cases read: made in a temporary folder ---------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Damaged checkpoints, a file where a folder should be, an image folder with a bad image."""
    from PIL import Image

    from modhifi.zoo import checkpoint_state

    root = tmp_path_factory.mktemp("inputs")
    made = {"file": root / "a-file", "garbage": root / "garbage.pt"}
    made["file"].write_text("not a folder")
    made["garbage"].write_bytes(b"\x80\x04 certainly not a checkpoint")
    tiny = nets.tiny_cnn()
    base = {"model": "digits-cnn", "arch": None, "dataset": "digits", "num_classes": 10,
            "input_shape": [1, 8, 8]}
    variants = {
        "base-not-dict": {"base": "digits-cnn"},
        "base-bad-shape": {"base": {**base, "input_shape": [1, 8]}},
        "base-bad-removed": {"base": base, "removed": {"0": [999]}},
        "base-bad-group": {"base": base, "removed": {"no.such.layer": [0]}},
        "pruned": {"base": base, "removed": {}},
    }
    for name, meta in variants.items():
        made[name] = root / f"{name}.pt"
        torch.save(checkpoint_state(tiny, **meta), made[name])
    made["no-arch"] = root / "no-arch.pt"  # its base a file, with no architecture to build
    torch.save(checkpoint_state(tiny, base={**base, "model": str(made["pruned"])}, removed={}),
               made["no-arch"])
    for name in ("rgb", "images"):  # two-class RGB image folders; "images" has a broken file
        made[name] = root / name
        for label in ("cat", "dog"):
            (made[name] / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(made[name] / label / f"{i}.png")
    (made["images"] / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return made


# --- the command line ------------------------------------------------------------------------------

CLI_CASES = [
    # (id, argv with {name} for a path from `files` or {out} for a fresh output path, message)
    ("target-negative", (*PRUNE[:-1], "-0.1"), "must be in [0, 1)"),
    ("target-nan", (*PRUNE[:-1], "nan"), "must be in [0, 1)"),
    ("target-inf", (*PRUNE[:-1], "inf"), "must be in [0, 1)"),
    ("target-one", (*PRUNE[:-1], "1"), "must be in [0, 1)"),
    ("target-unreachable", (*PRUNE[:-1], "0.99", "--target-kind", "macs"), "cannot be reached"),
    ("calib-zero", (*PRUNE, "--calib-samples", "0"), "--calib-samples 0 must be at least 1"),
    ("calib-negative", (*PRUNE, "--calib-samples", "-3"), "must be at least 1"),
    ("calib-too-many", (*PRUNE, "--calib-samples", "100000"), "must be between 1 and 300"),
    ("batch-zero", ("info", *ZOO, "--batch-size", "0"), "--batch-size 0 must be at least 1"),
    ("batch-negative", ("info", *ZOO, "--batch-size", "-5"), "--batch-size -5 must be at least 1"),
    ("steps-zero", (*PRUNE, "--steps", "0"), "--steps 0 must be at least 1"),
    ("round-to-zero", (*PRUNE, "--round-to", "0"), "must be at least 1"),
    ("data-on-zoo", (*PRUNE, "--data", "fashion-mnist"), "does not apply to zoo model"),
    ("arch-on-zoo", (*PRUNE, "--arch", "resnet18"), "does not apply to zoo model"),
    ("out-under-a-file", (*PRUNE, "--out", "{file}/pruned.pt"), "is a file, not a folder"),
    ("out-is-a-folder", (*PRUNE, "--out", "{outdir}"), "is a folder"),
    ("scores-out-is-a-folder", ("scores", *ZOO, "--out", "{outdir}"), "is a folder"),
    ("scores-target", ("scores", *ZOO, "--target", "2", "--out", "{out}"), "must be in [0, 1)"),
    ("class-superscript", ("unlearn", *ZOO, "--forget-class", "²"), "no class '²'"),
    ("class-arabic-digit", ("unlearn", *ZOO, "--forget-class", "٣"), "no class '٣'"),
    ("class-too-large", ("unlearn", *ZOO, "--forget-class", "12"), "out of range"),
    ("class-negative", ("unlearn", *ZOO, "--forget-class", "-1"), "no class '-1'"),
    ("class-unknown-name", ("unlearn", *ZOO, "--forget-class", "Sandal"), "no class 'Sandal'"),
    ("k-zero", (*UNLEARN, "--k", "0"), "--k 0.0 is out of range"),
    ("k-large", (*UNLEARN, "--k", "1.5"), "--k 1.5 is out of range"),
    ("k-nan", (*UNLEARN, "--k", "nan"), "--k nan is out of range"),
    ("forget-target-large", (*UNLEARN, "--forget-target", "1.5"), "out of range"),
    ("forget-target-nan", (*UNLEARN, "--forget-target", "nan"), "out of range"),
    ("layers-zero", (*UNLEARN, "--layers", "0"), "--layers 0 must be at least 1"),
    ("layers-too-many", (*UNLEARN, "--layers", "99"), "pass --layers 1..2"),
    ("unlearn-out-under-a-file", (*UNLEARN, "--out", "{file}/x.pt"), "is a file, not a folder"),
    ("direction-with-k", (*UNLEARN, "--edit", "direction", "--k", "0.1"), "leave them out"),
    ("k-and-forget-target", (*UNLEARN, "--k", "0.1", "--forget-target", "0.05"),
     "leave one of them out"),
    ("direction-on-a-cnn", (*UNLEARN, "--edit", "direction"), "is for Transformers"),
    ("theory-calib-zero", ("theory", *ZOO, "--calib-samples", "0"), "default: 500 images"),
    ("model-unknown", ("info", "--model", "no-such-model"), "not a zoo model"),
    ("checkpoint-missing", ("info", "--model", "/no/file.pt", "--arch", "resnet18", "--data",
                            "digits"), "does not exist"),
    ("checkpoint-garbage", ("info", "--model", "{garbage}", "--arch", "resnet18", "--data",
                            "digits"), "cannot read"),
    ("base-not-dict", ("info", "--model", "{base-not-dict}"), "`base` is not a dict"),
    ("base-bad-shape", ("info", "--model", "{base-bad-shape}"), "three positive integers"),
    ("base-bad-channels", ("info", "--model", "{base-bad-removed}"), "lists channels"),
    ("base-bad-group", ("info", "--model", "{base-bad-group}"), "lists channels"),
    ("base-without-arch", ("info", "--model", "{no-arch}"), "names no architecture for its base"),
    ("out-is-the-model", ("prune", "--model", "{pruned}", "--target", "0.3", "--out",
                          "{pruned}"), "is the model given"),
    ("pruned-on-rgb-data", ("info", "--model", "{pruned}", "--data", "imagefolder:{rgb}"),
     "use the dataset it was made for"),
    ("grey-data-for-rgb-arch", ("info", "--model", "random", "--arch", "resnet18", "--data",
                                "digits"), "expects 3-channel images"),
    ("random-without-arch", ("info", "--model", "random", "--data", "digits"), "needs --arch"),
    ("unknown-arch", ("info", "--model", "random", "--arch", "lenet99", "--data", "digits"),
     "unknown architecture"),
    ("unknown-dataset", ("info", "--model", "random", "--arch", "resnet18", "--data", "mnist"),
     "unknown dataset"),
    ("corrupt-image", ("info", "--model", "random", "--arch", "resnet18", "--data",
                       "imagefolder:{images}"), "cannot read image"),
]


@pytest.mark.parametrize("argv, message", [case[1:] for case in CLI_CASES],
                         ids=[case[0] for case in CLI_CASES])
def test_the_cli_refuses_bad_input_in_one_line_with_exit_2(argv, message, files, tmp_path,
                                                           capsys):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    paths = {**{k: str(v) for k, v in files.items()}, "out": str(outputs / "result.csv"),
             "outdir": str(outputs)}
    argv = [arg.format(**paths) for arg in argv]
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("modhifi: error:")]
    assert code == 2 and out == ""
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert list(outputs.iterdir()) == []  # no partial or orphan file


EXAMPLES = {"arch": "resnet18", "data": "digits", "components": "heads", "allocation": "global",
            "steps": "2", "edit": "zero", "layers": "2", "k": "0.1"}


def test_a_class_is_found_by_its_name_before_its_index():
    """An image folder's classes may be numbers, sorted as text: `1` is the class named 1, not
    the second class (named 10); a number that names no class is an index."""
    from types import SimpleNamespace

    from modhifi.console import class_index

    folder = SimpleNamespace(name="imagefolder:x", classes=("1", "10", "2", "Sandal"))
    found = [class_index(folder, name) for name in ("1", "10", "2", "sandal", "3")]
    assert found == [0, 1, 2, 3, 3]
    with pytest.raises(UserError, match="out of range"):
        class_index(folder, "4")


@pytest.mark.parametrize("command, option", list(ONE_KIND_ONLY))
def test_an_option_for_the_other_kind_of_model_is_refused_before_anything_loads(command, option,
                                                                                capsys):
    """Each entry of the command line's table, given for a zoo model of the other kind: one
    line, and no other (nothing was loaded)."""
    only, _, _ = ONE_KIND_ONLY[command, option]
    command = "prune" if command == "*" else command
    needed = {"prune": ("--target", "0.3"), "unlearn": ("--forget-class", "0")}[command]
    model, kind = ("digits-cnn", "an image") if only == "text" else ("minilm-l6", "a text")
    flag = "--" + option.replace("_", "-")
    code = main([command, "--model", model, *needed, flag, EXAMPLES[option]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"modhifi: error: {flag} does not apply to {kind} model ("), lines
    assert lines[0].endswith(f"; leave {flag} out"), lines


@pytest.mark.parametrize("argv", [
    ("prune", "--model", "digits-cnn", "--target", "0.3", "--steps", "2", "--allocation", "global"),
    ("prune", "--model", "minilm-l6", "--target", "0.3", "--components", "heads"),
    ("prune", "--model", "minilm-l6", "--target", "0.3", "--allocation", "uniform", "--steps", "1"),
    ("unlearn", "--model", "digits-cnn", "--forget-class", "3", "--edit", "zero", "--k", "0.1"),
    ("theory", "--model", "digits-cnn", "--calib-samples", "64"),
], ids=["image-prune", "text-components", "text-what-it-does-anyway", "image-unlearn",
        "theory-calibrates"])
def test_an_option_for_its_own_kind_of_model_passes_the_checks(argv):
    """The other side of the table: what a kind of model takes (or, given to the other kind,
    asks for what that kind does anyway) is not refused."""
    check_arguments(build_parser().parse_args(list(argv)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(capsys):
    code = main(["info", "--model", "digits-cnn", "--device", "cuda", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "no CUDA GPU" in err, err


@pytest.mark.parametrize("argv", [("info", "--model", "digits-cnn"),
                                  ("unlearn", "--model", "digits-cnn", "--forget-class", "3")])
def test_calibration_images_are_an_option_only_of_the_commands_that_calibrate(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--calib-samples", "64"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --calib-samples 64" in capsys.readouterr().err


def test_the_message_arrives_before_the_work_starts(tmp_path, capsys):
    """An unwritable --out is refused before statistics are collected, not after the run."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    main([*PRUNE, "--out", str(blocker / "pruned.pt")])
    err = capsys.readouterr().err
    assert "is a file" in err and "statistics" not in err


def test_a_tiny_calibration_set_warns_but_runs(capsys):
    code = main([*PRUNE, "--calib-samples", "5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["calib_samples"] == 5
    assert "warning: 5 calibration images are fewer than the 32 input channels" in err


def test_pruned_model_and_channel_list_are_written_together_with_the_umask(tmp_path, capsys):
    out = tmp_path / "deeper" / "pruned.pt"
    assert main([*PRUNE, "--out", str(out), "--json"]) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ["pruned.pt", "pruned.pt.channels.json"]  # no temporary left over
    for path in out.parent.iterdir():  # the usual 0666 less the umask, not mkstemp's 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_failure_while_writing_leaves_neither_file(tmp_path):
    from modhifi.zoo import write_together

    def fails(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_together({tmp_path / "model.pt": lambda p: p.write_text("model"),
                        tmp_path / "model.pt.channels.json": fails})
    assert list(tmp_path.iterdir()) == []


def _umask() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask")), 8)


# --- the Python API ---------------------------------------------------------------------------------

def _conv_case():
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 3), torch.randn(6, 3, 8, 8)


def _fidelity():
    conv, x = _conv_case()
    return layer_fidelity(conv, x)


def _tiny_analysis():
    model = nets.tiny_cnn().eval()
    return analyse(model, [torch.randn(16, 1, 8, 8)], device=torch.device("cpu"),
                   input_shape=(1, 8, 8))


def _with_nan():
    conv, x = _conv_case()
    x[0, 0, 0, 0] = math.nan
    return layer_fidelity(conv, x)


API_CASES = [
    ("lam-negative", lambda: layer_fidelity(*_conv_case(), lam=-1), "lam=-1"),
    ("lam-nan", lambda: layer_fidelity(*_conv_case(), lam=math.nan), "must be a finite number"),
    ("Q-out-of-range", lambda: _fidelity().Q(99), "output channel 99 is out of range"),
    ("Q-not-an-int", lambda: _fidelity().Q(1.5), "output channel 1.5 is out of range"),
    ("subset-out-of-range", lambda: _fidelity().subset_fidelity(0, [99]), "out of range"),
    ("compensation-negative", lambda: _fidelity().compensation(-1, [0]), "out of range"),
    ("refit-out-of-range", lambda: _fidelity().refit_weight(torch.tensor([0, 7])), "out of range"),
    ("nan-inputs", _with_nan, "NaN or infinite"),
    ("no-prunable-layer", lambda: analyse(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                                          [torch.randn(4, 1, 8, 8)], device=torch.device("cpu"),
                                          input_shape=(1, 8, 8)), "no channel group"),
    ("inf-calibration", lambda: analyse(nets.tiny_cnn().eval(),
                                        [torch.full((4, 1, 8, 8), math.inf)],
                                        device=torch.device("cpu"), input_shape=(1, 8, 8)),
     "NaN or infinite"),
    ("empty-calibration", lambda: analyse(nets.tiny_cnn().eval(), [],
                                          device=torch.device("cpu"), input_shape=(1, 8, 8)),
     "calibration set is empty"),
    ("plan-nan", lambda: _tiny_analysis().plan(math.nan), "must be in [0, 1)"),
    ("plan-round-to-float", lambda: _tiny_analysis().plan(0.3, round_to=2.5), "at least 1"),
    ("plan-floor", lambda: _tiny_analysis().plan(0.3, floor=2), "floor 2"),
    ("steps-target", lambda: prune_in_steps(nets.tiny_cnn().eval(), [torch.randn(4, 1, 8, 8)],
                                            device=torch.device("cpu"), input_shape=(1, 8, 8),
                                            target=-0.1, steps=2), "must be in [0, 1)"),
]


@pytest.mark.parametrize("call, message", [case[1:] for case in API_CASES],
                         ids=[case[0] for case in API_CASES])
def test_the_api_refuses_bad_input_with_a_user_error(call, message):
    with pytest.raises(UserError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_analyse_leaves_a_train_mode_model_untouched():
    from oracles import assert_unchanged, snapshot

    model = nets.tiny_cnn().train()
    before = snapshot(model)
    analyse(model, [torch.randn(8, 1, 8, 8)], device=torch.device("cpu"), input_shape=(1, 8, 8))
    assert_unchanged(model, before)  # BatchNorm running stats and num_batches_tracked included


# --- the dashboard -----------------------------------------------------------------------------------

def _own_checkpoint(path: str, data: str) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=300)
    app.session_state["sidebar.model"] = "your checkpoint…"
    app.session_state["sidebar.device"] = "cpu"
    app.session_state["sidebar.checkpoint_path"] = path
    app.session_state["sidebar.checkpoint_data"] = data
    return app.run()


@pytest.mark.parametrize("name, data, message", [
    ("garbage", "digits", "cannot read"),
    ("base-bad-shape", "digits", "three positive integers"),
    ("pruned", "imagefolder:{rgb}", "use the dataset it was made for"),
    ("missing", "digits", "does not exist"),
    ("pruned", "imagefolder:{outside}", "is not inside"),  # not a folder the owner published
])
def test_the_dashboard_shows_one_error_box(name, data, message, files, tmp_path, monkeypatch):
    monkeypatch.setenv("MODHIFI_DATASETS_DIR", str(files["rgb"].parent))
    path = str(files.get(name, "/no/such/file.pt"))
    app = _own_checkpoint(path, data.format(rgb=files["rgb"], outside=tmp_path))
    assert not app.exception
    assert len(app.error) == 1 and message in app.error[0].value


def test_a_visitor_names_no_dataset_folder_where_the_owner_published_none(files, monkeypatch):
    """A free path would list any folder of the server in the error box (torchvision names the
    classes it found) and show its images: with no folder published, every folder is refused
    before anything is read; packaged datasets pass."""
    monkeypatch.delenv("MODHIFI_DATASETS_DIR", raising=False)
    app = _own_checkpoint(str(files["pruned"]), f"imagefolder:{files['rgb']}")
    assert not app.exception and len(app.error) == 1
    assert "MODHIFI_DATASETS_DIR is unset" in app.error[0].value
    assert "cat" not in app.error[0].value and "dog" not in app.error[0].value
    app = _own_checkpoint(str(files["pruned"]), "digits")
    assert not app.exception and not app.error


def test_an_upload_with_a_long_name_is_kept_and_the_oldest_go_past_the_limit(tmp_path,
                                                                              monkeypatch):
    """Kept under $MODHIFI_CACHE/uploads with its name cut to fit the file system (a 243-byte
    name raised "File name too long" in the sidebar, outside any page's error box); past the
    limit the oldest other uploads are removed."""
    import os

    from ui import sidebar

    monkeypatch.setenv("MODHIFI_CACHE", str(tmp_path))
    monkeypatch.setattr(sidebar, "MOST_UPLOAD_BYTES", 250)
    first = sidebar._store_upload("é" * 200 + ".pt", b"a" * 100)
    assert first.parent == tmp_path / "uploads" and first.read_bytes() == b"a" * 100
    assert len(first.name.encode()) <= 255 and first.name.endswith(".pt")
    os.utime(first, (1, 1))  # the oldest
    second = sidebar._store_upload("b.pt", b"b" * 100)
    third = sidebar._store_upload("c.pt", b"c" * 100)  # 300 bytes: the oldest goes
    assert not first.exists() and second.exists() and third.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "uploads"]


def test_the_dashboard_offers_only_the_servers_published_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "published.pt").write_bytes(b"")
    monkeypatch.setenv("MODHIFI_MODEL_DIR", str(tmp_path))
    app = AppTest.from_file(APP, default_timeout=300)
    app.session_state["sidebar.model"] = "your checkpoint…"
    app.run()
    assert not app.sidebar.text_input or all("path" not in t.label for t in app.sidebar.text_input)
    picker = [s for s in app.sidebar.selectbox if "server" in s.label]
    assert len(picker) == 1 and picker[0].options == ["published.pt"]


def test_legal_but_meaningless_inputs_carry_a_caveat():
    from conftest import subject

    from modhifi.data import Dataset
    from modhifi.prune import calibration_caveats

    model = nets.tiny_cnn()
    assert calibration_caveats(model, 32) == ()
    (caveat,) = calibration_caveats(model, 31)
    assert "31 calibration images are fewer than the 32 input channels" in caveat
    digits = subject("digits-cnn").dataset
    assert digits.caveats == ()
    test = digits.test.subset(digits.test.labels == 3)
    one_class = Dataset("one-class", digits.classes, digits.train, digits.calibration, test)
    assert "holds only 1 class" in one_class.caveats[0]
    assert "32 input channels" in analyse(model.eval(), [torch.randn(8, 1, 8, 8)],
                                          device=torch.device("cpu"),
                                          input_shape=(1, 8, 8)).caveats[0]
