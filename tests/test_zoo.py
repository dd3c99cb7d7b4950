"""The model zoo: every model loads and reaches its accuracy; checkpoints load safely or not at all."""
import os
import subprocess
import sys

import pytest
import torch

from modhifi.errors import UserError
from modhifi.metrics import count_cost, evaluate
from modhifi.zoo import ZOO, build_torchvision, load_model, model_card, save_checkpoint

from conftest import subject


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_reaches_its_accuracy_on_the_full_test_split(name, cpu):
    chosen = subject(name)
    result = evaluate(chosen.loaded.model, chosen.dataset.test, device=cpu.device,
                      num_classes=chosen.dataset.num_classes)
    assert result.samples == len(chosen.dataset.test)
    assert result.accuracy >= ZOO[name].min_accuracy
    assert result.accuracy == pytest.approx(model_card(name)["test_accuracy"], abs=1e-4)
    cost = count_cost(chosen.loaded.model, chosen.dataset.input_shape)  # what `models` lists
    assert (model_card(name)["macs"], model_card(name)["params"]) == (cost.macs, cost.params)


def test_mismatched_checkpoint_lists_every_mismatch(tmp_path):
    wrong = ZOO["digits-cnn"].build()
    save_checkpoint(tmp_path / "wrong.pt", wrong)
    with pytest.raises(UserError, match="does not fit the architecture: missing conv1.weight") as error:
        load_model(str(tmp_path / "wrong.pt"), device=torch.device("cpu"), arch="resnet18")
    assert "more" in str(error.value) and "\n" not in str(error.value)
    state = build_torchvision("resnet18", num_classes=10).state_dict()
    state["fc.weight"] = torch.zeros(5, 512)
    torch.save(state, tmp_path / "head.pt")
    with pytest.raises(UserError, match=r"fc.weight: \(5, 512\) in file, \(10, 512\) in model"):
        load_model(str(tmp_path / "head.pt"), device=torch.device("cpu"), arch="resnet18")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": payload}, path)
    # Proof that the file really runs code when unpickled unsafely (in a throwaway process).
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   check=False, capture_output=True)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match="refused to load .*unpickle code"):
        load_model(str(path), device=torch.device("cpu"), arch="resnet18")
    assert not marker.exists()


def test_bad_checkpoint_paths_and_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "none.pt"), device=torch.device("cpu"), arch="resnet18")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_model(str(tmp_path / "junk.pt"), device=torch.device("cpu"), arch="resnet18")
    with pytest.raises(UserError, match="unknown architecture"):
        load_model("random", device=torch.device("cpu"), arch="alexnet9")


def test_every_torchvision_classification_builder_is_an_architecture():
    from modhifi.zoo import torchvision_archs

    assert len(torchvision_archs()) >= 80 and {"resnet18", "swin_t", "regnet_y_400mf"} <= set(
        torchvision_archs())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "regnet_x_400mf", "swin_t"])
def test_torchvision_architectures_build_without_downloading(arch):
    loaded = load_model("random", device=torch.device("cpu"), arch=arch, num_classes=7)
    assert not loaded.trained and "untrained" in loaded.name
    out_features = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    assert out_features == 7


def test_checkpoint_round_trip_is_atomic_and_exact(tmp_path):
    model = ZOO["digits-cnn"].build()
    save_checkpoint(tmp_path / "m.pt", model, arch="digits-cnn")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(v, state["state_dict"][k]) for k, v in model.state_dict().items())


def test_the_retrained_reference_is_the_recipe_on_the_split_without_the_class():
    """Oracle: the zoo recipe run on a training split built image by image without the class;
    the reference never predicts the class, keeps the others, and leaves torch's global
    generator as it found it."""
    from modhifi import training
    from modhifi.audit import audit
    from modhifi.zoo import retrainable, retrained_without

    digits, forget = subject("digits-cnn"), 4
    train = digits.dataset.train
    state = torch.get_rng_state()
    reference = retrained_without("digits-cnn", digits.dataset, forget, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    keep = torch.tensor([i for i, label in enumerate(train.labels.tolist()) if label != forget])
    oracle, _ = training.train(ZOO["digits-cnn"].build, train.subset(keep),
                               config=ZOO["digits-cnn"].train, log=lambda line: None)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 oracle.state_dict().values()))
    assert not reference.training and all(p.grad is None for p in reference.parameters())
    result = audit(reference, digits.dataset, forget_class=forget, device="cpu")
    assert result.forget_accuracy == 0.0 and result.retain_accuracy > 0.9

    assert retrainable("digits-cnn") and not retrainable("fmnist-resnet")
    assert not retrainable("assets/digits-cnn.pt")
    with pytest.raises(UserError, match="not a zoo model that trains within .* digits-cnn$"):
        retrained_without("fmnist-resnet", digits.dataset, forget, device="cpu")


def test_each_zoo_models_first_forget_class_follows_its_measured_rule():
    """Class 0 unless forgetting it changes over 20% of the other classes' calibration
    predictions (the benchmark's CSV, calibration images only); then the least damaging class."""
    import csv
    from pathlib import Path

    for name, entry in ZOO.items():
        table = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / f"unlearn_{name}.csv"
        with table.open() as handle:
            agreement = {int(row["forget_class"]): float(row["calibration_retain_agreement"])
                         for row in csv.DictReader(handle)}
        expected = 0 if agreement[0] >= 0.8 else max(agreement, key=agreement.get)
        assert entry.forget_class == expected, name


def test_a_modified_models_base_names_its_files_by_absolute_paths(tmp_path, monkeypatch):
    """Made from a checkpoint and an image folder named relative to the folder the command ran
    in, a pruned model reloads from any other folder: its base names them absolutely (zoo names
    and packaged datasets as they are)."""
    import dataclasses

    from modhifi.data import load_dataset
    from modhifi.zoo import base_of

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.pt").write_bytes(b"")
    (tmp_path / "images").mkdir()
    digits = load_dataset("digits")
    monkeypatch.chdir(tmp_path)
    base = base_of("models/net.pt", "resnet18",
                   dataclasses.replace(digits, name="imagefolder:images"))
    assert base["model"] == str(tmp_path.resolve() / "models" / "net.pt")
    assert base["dataset"] == f"imagefolder:{tmp_path.resolve() / 'images'}"
    assert base_of("digits-cnn", None, digits)["model"] == "digits-cnn"
    assert base_of("digits-cnn", None, digits)["dataset"] == "digits"


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_pruned_checkpoint_reloads_under_no_grad_and_inference_mode(mode, tmp_path):
    """Rebuilding its shape traces the base's autograd graph (Torch-Pruning): a caller's
    no_grad or inference_mode made that fail."""
    from modhifi.prune import analyse
    from modhifi.zoo import base_of, checkpoint_state

    data = subject("digits-cnn")
    analysis = analyse(data.loaded.model, list(data.dataset.calibration.batches(128)),
                       device=torch.device("cpu"), input_shape=data.dataset.input_shape)
    plan = analysis.plan(0.3)
    pruned = analysis.apply(plan, compensation="none", recalibrate=False)
    path = tmp_path / "pruned.pt"
    torch.save(checkpoint_state(pruned, base=base_of("digits-cnn", None, data.dataset),
                                removed=plan.removed_channels()), path)
    images = next(data.dataset.test.batches(16))
    with mode():
        reloaded = load_model(str(path), device=torch.device("cpu")).model
        torch.testing.assert_close(reloaded(images), pruned(images))


def test_a_pruned_checkpoint_reloads_without_its_base_file(tmp_path):
    """The file holds every weight: its base's architecture is built, not read, so the pruned
    model reloads where the base checkpoint is not (moved, deleted, or another machine's); one
    made from an untrained network says so."""
    from types import SimpleNamespace

    import torchvision

    from modhifi.prune import analyse
    from modhifi.zoo import base_of, checkpoint_state

    torch.manual_seed(0)
    base = tmp_path / "net.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), base)
    loaded = load_model(str(base), device=torch.device("cpu"), arch="resnet18")
    images = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    analysis = analyse(loaded.model, images, device=torch.device("cpu"), input_shape=(3, 32, 32))
    plan = analysis.plan(0.3)
    pruned = analysis.apply(plan)
    data = SimpleNamespace(name="imagefolder:pictures", num_classes=10, input_shape=(3, 32, 32))
    path = tmp_path / "pruned.pt"
    for spec, trained in ((str(base), True), ("random", False)):
        torch.save(checkpoint_state(pruned, base=base_of(spec, "resnet18", data),
                                    removed=plan.removed_channels()), path)
        base.unlink(missing_ok=True)
        reloaded = load_model(str(path), device=torch.device("cpu"))
        assert reloaded.trained is trained
        with torch.no_grad():
            assert torch.equal(reloaded.model(images[0]), pruned(images[0]))
