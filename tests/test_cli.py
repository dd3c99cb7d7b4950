"""The command line: contract keys, --json purity, one-line errors with exit code 2.

The commands run in this process (`oracles.command_line`) with what they write to the file
descriptors captured (`capfd`: a library printing from C would show too); the way out of a
real process, exit code and streams, is the one subprocess below."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from oracles import command_line

ROOT = Path(__file__).resolve().parent.parent


def test_models_lists_the_zoo_as_json(capfd):
    done = command_line(capfd, "models", "--json")
    assert done.returncode == 0
    rows = json.loads(done.stdout)["models"]
    assert {r["name"] for r in rows} == {"fmnist-resnet", "fmnist-vgg", "fmnist-vit", "digits-cnn",
                                        "minilm-l6"}
    assert all({"arch", "dataset", "accuracy", "params", "macs"} <= set(r) for r in rows)


def test_info_prints_the_contract_keys(capfd):
    done = command_line(capfd, "info", "--model", "digits-cnn", "--json", "--device", "cpu",
                        "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)  # stdout holds exactly one JSON object
    assert {"model", "arch", "dataset", "device", "accuracy", "per_class_accuracy", "macs",
            "params", "batch_size", "latency_ms"} <= set(info)
    assert info["accuracy"] > 0.95 and info["batch_size"] == 8 and info["latency_ms"] > 0
    assert len(info["per_class_accuracy"]) == 10


def test_bad_input_is_one_line_on_stderr_and_exit_2():
    """The way out of a real process; every refusal is tested in this one (test_bad_input.py)."""
    done = subprocess.run([sys.executable, "-m", "modhifi", "info", "--model", "no-such-model",
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "not a zoo model" in errors[0]


def test_bench_quick_prints_its_keys(capfd):
    done = command_line(capfd, "bench", "--quick", "--model", "digits-cnn", "--json", "--device",
                        "cpu", "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"accuracy_modhifi", "accuracy_best_baseline", "macs_ratio", "speedup_measured",
            "slider_median_s", "slider_p95_s"} <= set(result)
    assert result["batch_size"] == 8  # the speed-ups timed at the batch size asked
    assert result["macs_ratio"] >= 2.0 and 0 < result["slider_median_s"] <= result["slider_p95_s"]


def test_unlearn_and_scores_follow_the_contract(tmp_path, capfd):
    done = command_line(capfd, "unlearn", "--model", "digits-cnn", "--forget-class", "3", "--json",
                        "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"model", "forget_class", "edit", "layers", "k", "device", "forget_accuracy_before",
            "forget_accuracy_after", "retain_accuracy_before", "retain_accuracy_after", "mia_before",
            "mia_after", "probe_accuracy_before", "probe_accuracy_after", "seconds"} <= set(result)
    assert result["forget_accuracy_after"] < result["forget_accuracy_before"]
    out = tmp_path / "scores.csv"
    done = command_line(capfd, "scores", "--model", "digits-cnn", "--target", "0.3", "--out",
                        str(out), "--json")
    assert done.returncode == 0, done.stderr
    header = out.read_text().splitlines()[0]
    assert header == "layer,out_channel,in_channel,singleton_fidelity,saliency,kept"


def test_theory_prints_the_contract_keys(capfd):
    done = command_line(capfd, "theory", "--model", "digits-cnn", "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"model", "layers", "max_ratio", "hifi_share"} <= set(report)
    for layer in report["layers"]:
        assert {"layer", "local_error", "global_error", "ratio", "bound_constant"} <= set(layer)
        assert layer["global_error"] <= layer["bound_constant"] ** 2 * layer["local_error"] * (1 + 1e-6)


def test_a_modified_model_modified_again_reloads_as_reported(tmp_path, capfd):
    """Unlearn, prune the edited model, unlearn the pruned one: each `--out` reloads from the
    first base (a base is never a modified model) with the figures its command reported, and
    the channel list beside the last names every round removed."""
    def cli(*args):
        done = command_line(capfd, *args, "--json", "--device", "cpu")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    edited, pruned, again = (tmp_path / name for name in ("edited.pt", "pruned.pt", "again.pt"))
    first = cli("unlearn", "--model", "digits-cnn", "--forget-class", "3", "--out", str(edited))
    cut = cli("prune", "--model", str(edited), "--target", "0.2", "--calib-samples", "200",
              "--out", str(pruned))
    last = cli("unlearn", "--model", str(pruned), "--forget-class", "5", "--out", str(again))
    assert cli("info", "--model", str(edited))["per_class_accuracy"]["3"] == pytest.approx(
        first["forget_accuracy_after"], abs=1e-9)
    reloaded = cli("info", "--model", str(pruned))
    assert (reloaded["accuracy"], reloaded["macs"]) == (cut["accuracy_after"], cut["macs_after"])
    reloaded = cli("info", "--model", str(again))
    assert reloaded["macs"] == cut["macs_after"]
    assert reloaded["per_class_accuracy"]["5"] == pytest.approx(last["forget_accuracy_after"],
                                                               abs=1e-9)
    rounds = json.loads((tmp_path / "again.pt.channels.json").read_text())
    assert rounds == json.loads((tmp_path / "pruned.pt.channels.json").read_text())
    assert sum(map(len, rounds.values())) == cut["channels_before"] - cut["channels_after"]


def test_scores_with_a_forget_class_keep_every_layer_of_both_scores(tmp_path, capfd):
    """The pruning scores of every consumer and the forget-class saliency of every edited layer
    (the first convolution and the classifier too), each empty where the other is not scored."""
    import pandas as pd

    def scores(*args):
        out = tmp_path / f"{len(args)}.csv"
        done = command_line(capfd, "scores", "--model", "digits-cnn", "--target", "0.3", *args,
                            "--out", str(out), "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout), pd.read_csv(out)

    (_, pruning), (forget, both) = scores(), scores("--forget-class", "3")
    assert list(both.columns) == list(pruning.columns)  # the contract's order
    pairs = ["layer", "out_channel", "in_channel"]
    scored = both.dropna(subset="singleton_fidelity")
    pd.testing.assert_frame_equal(  # the pruning scores, every row of them
        scored[[*pairs, "singleton_fidelity"]].reset_index(drop=True),
        pruning[[*pairs, "singleton_fidelity"]].reset_index(drop=True))
    edited = set(both.dropna(subset="saliency")["layer"])
    assert set(pruning["layer"]) < set(both["layer"]) == set(pruning["layer"]) | edited
    assert forget["layers"] == both["layer"].nunique() and forget["rows"] == len(both)
