"""Datasets: fixed, disjoint, deterministic splits; clear errors for missing or malformed files."""
import gzip
import struct

import pytest
import torch

from modhifi.data import load_dataset, read_idx
from modhifi.errors import UserError


def _fingerprints(split):
    # One int per image, so overlaps between splits can be checked by set intersection.
    return set(torch.tensor([hash(bytes(img.flatten().tolist())) for img in split.images]).tolist())


@pytest.mark.parametrize("spec", ["digits", "fashion-mnist"])
def test_splits_are_deterministic_and_disjoint(spec):
    first, second = load_dataset(spec), load_dataset(spec)
    for name in ("train", "calibration", "test"):
        assert torch.equal(getattr(first, name).images, getattr(second, name).images)
        assert torch.equal(getattr(first, name).labels, getattr(second, name).labels)
    if spec == "digits":  # image identity is checkable on the small set
        assert not _fingerprints(first.calibration) & _fingerprints(first.test)
    assert len(first.train) + len(first.calibration) + len(first.test) == \
        {"digits": 1797, "fashion-mnist": 70000}[spec]
    assert first.calibration.images.dtype == torch.uint8


def test_fashion_mnist_has_the_documented_splits():
    data = load_dataset("fashion-mnist")
    assert (len(data.train), len(data.calibration), len(data.test)) == (55000, 5000, 10000)
    assert data.input_shape == (1, 28, 28) and data.classes[5] == "Sandal"
    # Calibration is held out of the official training split: every class is represented.
    assert torch.bincount(data.calibration.labels, minlength=10).min() > 400


def test_batches_are_normalised_floats():
    data = load_dataset("digits")
    x, y = next(data.test.batches(32, labels=True))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (32,)
    assert abs(float(x.mean())) < 1.0


def test_missing_fashion_mnist_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("modhifi.data.DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("MODHIFI_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download", offline)
    with pytest.raises(UserError, match="Fashion-MNIST not found.*nowhere.*dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_malformed_idx_files_are_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    truncated = tmp_path / "short.gz"
    truncated.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 100) + b"\0" * 10))
    with pytest.raises(UserError, match="truncated"):
        read_idx(truncated)


def test_idx_round_trip(tmp_path):
    path = tmp_path / "ok"
    path.write_bytes(struct.pack(">BBBBII", 0, 0, 8, 2, 2, 3) + bytes(range(6)))
    assert read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("spec", ["mnist", "cifar10:", "imagefolder:/no/such/dir"])
def test_unknown_or_missing_datasets_raise_one_line_errors(spec):
    with pytest.raises(UserError) as error:
        load_dataset(spec)
    assert "\n" not in str(error.value)


def test_imagefolder_reads_users_images(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(tmp_path / label / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}", calibration_size=4)
    assert data.classes == ("cat", "dog") and data.input_shape == (3, 224, 224)
    assert len(data.train) + len(data.calibration) + len(data.test) == 20


def test_a_test_folder_without_some_class_keeps_the_train_folders_labels(tmp_path):
    """train/ has cat, dog and eel; test/ only cat and eel: its eel images are class 2 (the
    folder alone would number them 1, dog's index). A class test/ has and train/ lacks is one
    line."""
    from PIL import Image

    from modhifi.errors import UserError

    for split, labels in (("train", ("cat", "dog", "eel")), ("test", ("cat", "eel"))):
        for label in labels:
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8)).save(tmp_path / split / label / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}", calibration_size=2)
    assert data.classes == ("cat", "dog", "eel")
    assert data.test.labels.tolist() == [0] * 4 + [2] * 4
    (tmp_path / "test" / "fox").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "fox" / "0.png")
    with pytest.raises(UserError, match=r"has classes that .* lacks \(fox\)"):
        load_dataset(f"imagefolder:{tmp_path}", calibration_size=2)


def test_an_image_folder_streams_its_images_batch_by_batch(tmp_path):
    """Loading reads only file headers; a batch reads its own files (oracle: PIL and the same
    resize and crop, file by file), so a file damaged after loading fails when its batch is
    read, in one line naming it."""
    from PIL import Image
    from torchvision.transforms import v2

    from modhifi.data import ImageFiles
    from modhifi.errors import UserError

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40, 30), (i * 40, 10 * (label == "dog"), 0)).save(
                    tmp_path / split / label / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}", calibration_size=4)
    assert all(isinstance(s.images, ImageFiles) for s in (data.train, data.calibration, data.test))
    assert data.input_shape == (3, 224, 224) and len(data.test) == 12
    files = sorted((tmp_path / "test").glob("*/*.png"))  # ImageFolder's order: class, then name
    resize = v2.Compose([v2.PILToTensor(), v2.Resize(224), v2.CenterCrop(224)])
    expected = torch.stack([resize(Image.open(f).convert("RGB")) for f in files[:5]])
    assert torch.equal(data.test.images[:5].to("cpu"), expected)
    assert torch.equal(next(data.test.batches(5)), data.test.normalise(expected))
    files[7].write_bytes(b"not an image any more")
    next(data.test.batches(5))  # files 0-4 only
    with pytest.raises(UserError, match=f"cannot read image {files[7]}"):
        list(data.test.batches(5))


def test_an_analysis_reads_an_image_folder_again_at_each_pass_and_holds_no_images(
        tmp_path, monkeypatch):
    """A calibration set on disk larger than memory: `Batches` make each batch from the files
    when it is read, so the statistics pass and the BatchNorm recalibration after pruning each
    read the files again and the analysis keeps no image; the moments equal those of the same
    batches held in memory."""
    from PIL import Image
    from torch import nn

    from modhifi import data as data_module
    from modhifi.data import Batches
    from modhifi.prune import analyse

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(8):
            Image.new("RGB", (40, 30), (i * 30, 60 * (label == "dog"), 7 * i)).save(
                tmp_path / label / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}", calibration_size=5)
    reads = []
    read_image = data_module._read_image
    monkeypatch.setattr(data_module, "_read_image",
                        lambda found, i: reads.append(i) or read_image(found, i))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, stride=8), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2)).eval()
    streamed = analyse(model, Batches(data.calibration, 2), device="cpu")
    assert isinstance(streamed.calibration, Batches) and len(streamed.calibration) == 3
    assert set(reads) == set(data.calibration.images.index.tolist())  # read from the files
    before = len(reads)
    streamed.apply(streamed.plan(0.25, round_to=1))  # BatchNorm recalibrated: read again
    assert len(reads) - before == 5
    held = analyse(model, list(data.calibration.batches(2)), device="cpu")
    for name, fidelity in held.fidelity.items():
        assert torch.allclose(streamed.fidelity[name].H, fidelity.H, rtol=1e-12)
