"""Datasets and bad input: every failure names the file or the mismatch; check/skip-corrupt leave bad files out."""

import io

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gutout.pipelines import DatasetError, GutoutLoader, check_images, load_folder
from gutout.pipelines.datasets import load_fashion_mnist, scan_folder
from gutout.train.cli import main
from tests.conftest import fake_fashion_mnist


def jpeg_bytes(seed: int, size=(40, 30)) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.jpg").write_bytes(jpeg_bytes(10 * c + i))
    (root / "dog" / "notes.txt").write_text("not an image extension: ignored, as ImageFolder does")
    return root


def test_scan_orders_files_and_labels(folder):
    dataset = scan_folder(folder)
    assert dataset.classes == ("cat", "dog") and len(dataset) == 6
    assert dataset.files[:2] == ["cat/0.jpg", "cat/1.jpg"] and dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.fingerprint.startswith("n=6:") and dataset.fingerprint == scan_folder(folder).fingerprint


def test_missing_path_empty_class_and_no_classes_are_named(tmp_path, folder):
    with pytest.raises(DatasetError, match="nowhere does not exist"):
        scan_folder(tmp_path / "nowhere")
    (folder / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*empty holds no images"):
        scan_folder(folder)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(jpeg_bytes(0))
    with pytest.raises(DatasetError, match="no class folders under"):
        scan_folder(tmp_path / "flat")


def test_check_lists_bad_files_and_skip_corrupt_leaves_them_out(folder, capsys):
    good = jpeg_bytes(99)
    (folder / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "dog" / "text.jpg").write_text("this is not a JPEG")
    bad = check_images(scan_folder(folder))
    assert sorted(b.path.split("/")[-1] for b in bad) == ["text.jpg", "truncated.jpg"]
    assert all(b.reason for b in bad)
    kept = load_folder(folder, skip_corrupt=True)
    assert len(kept) == 6 and "cat/truncated.jpg" not in kept.files
    assert "skipping corrupt file" in capsys.readouterr().out
    result = CliRunner().invoke(main, ["check", str(folder)])
    assert result.exit_code == 1 and "truncated.jpg" in result.output and "8 files, 2 bad" in result.output
    clean = CliRunner().invoke(main, ["check", str(folder.parent / "nowhere")])
    assert clean.exit_code != 0 and "does not exist" in clean.output


def test_skip_corrupt_leaves_bad_files_out_under_a_relative_root(folder, monkeypatch):
    (folder / "dog" / "text.jpg").write_text("this is not a JPEG")
    monkeypatch.chdir(folder.parent)
    kept = load_folder(folder.name, skip_corrupt=True)  # "data", as `--data data` would give
    assert len(kept) == 6 and "dog/text.jpg" not in kept.files


def test_cifar_loads_from_the_folder_or_its_parent(tmp_path):
    import pickle

    from gutout.pipelines.datasets import load_cifar

    archive = tmp_path / "cifar-10-batches-py"
    archive.mkdir()
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = {b"data": torch.full((2, 3 * 32 * 32), i, dtype=torch.uint8).numpy(), b"labels": [i % 10, 1]}
        (archive / name).write_bytes(pickle.dumps(batch))
    (archive / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    for data in (archive, tmp_path):  # the archive's folder, or the folder it was unpacked in
        train = load_cifar("cifar10", "train", data)
        assert len(train) == 10 and train.classes[:2] == ("c0", "c1") and train.labels.tolist()[:2] == [0, 1]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DatasetError, match="cannot read .*elsewhere/data_batch_1"):
        load_cifar("cifar10", "train", tmp_path / "elsewhere")


def test_torch_backend_names_a_bad_file(folder):
    (folder / "cat" / "0.jpg").write_text("garbage")
    loader = GutoutLoader.from_folder(folder, batch_size=2, image_size=16, backend="torch", num_threads=0)
    with pytest.raises(DatasetError, match=r"cannot decode .*cat/0.jpg"):
        list(loader)


def test_fashion_mnist_from_a_folder_and_bad_idx_files(tmp_path):
    data = fake_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10)
    train = load_fashion_mnist("train", data)
    assert train.images.shape == (20, 28, 28, 1) and train.labels.dtype == torch.int64
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train", data)
    with pytest.raises(DatasetError, match="does not exist"):
        load_fashion_mnist("train", tmp_path / "missing")
