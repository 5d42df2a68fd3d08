"""Dataset registry and readers, against small files made here (and the real ones if present)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlfd.data import datasets, formats
from mlfd.data import download as dl
from mlfd.errors import DatasetNotFound, MlfdError

REPO = Path(__file__).resolve().parents[1]
MINIS = ("mnist-mini", "fashion-mnist-mini", "animal-mnist-mini")


# ----------------------------------------------------------------------------- file makers


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX written by hand (not with formats.write_idx) so the reader is checked independently."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
    header += b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        data[prefix] = (x, y)
    return data


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.fixture
def trusted(monkeypatch):
    """--trust-data: the pickles made here are not the published files (checksums differ)."""
    monkeypatch.setitem(datasets.base._TRUST, "on", True)


def make_cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = cifar_rows(2, i)
        rows[name] = data
        write_pickle(folder / name, {b"data": data, b"labels": [i % 10, (i + 3) % 10]})
    names = [
        n.encode()
        for n in (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        )
    ]
    write_pickle(folder / "batches.meta", {b"label_names": names})
    return rows


def make_cifar100(root: Path) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rows = {"train": cifar_rows(3, 10), "test": cifar_rows(2, 11)}
    for name, data in rows.items():
        labels = list(range(len(data)))
        write_pickle(
            folder / name, {b"data": data, b"fine_labels": labels, b"coarse_labels": labels}
        )
    write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    return rows


def save_png(path: Path, mode: str, size=(6, 5), value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_pickle_layout_is_nhwc(tmp_path, trusted):
    rows = make_cifar10(tmp_path)
    ds = datasets.get_dataset("cifar10", data_root=tmp_path, download=False)
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    assert (ds.channels, ds.image_size, ds.num_classes) == (3, (32, 32), 10)
    assert ds.mean == (0.4914, 0.4822, 0.4465)
    train = ds.load("train")
    assert train.images.shape == (10, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.files is None
    assert train.labels.dtype == np.int64
    assert train.labels.tolist() == [0, 3, 1, 4, 2, 5, 3, 6, 4, 7]
    first = rows["data_batch_1"][0]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    for h, w, c in [(0, 0, 0), (0, 1, 0), (5, 7, 1), (31, 30, 2), (12, 0, 2)]:
        assert train.images[0, h, w, c] == first[c * 1024 + h * 32 + w]
    second_batch = rows["data_batch_2"][1]
    assert train.images[3, 2, 3, 1] == second_batch[1024 + 2 * 32 + 3]
    test = ds.load("test")
    assert len(test) == 2 and test.labels.tolist() == [5, 8]
    assert ds.load("train") is train  # memoised
    assert ds.splits() == ["train", "test"]


def test_cifar100_fine_labels(tmp_path, trusted):
    rows = make_cifar100(tmp_path)
    ds = datasets.get_dataset("cifar100", data_root=tmp_path, download=False)
    # the names are the registry's (the published meta's), not read from the meta file
    assert ds.num_classes == 100 and ds.classes[7] == "beetle" and ds.classes[-1] == "worm"
    train = ds.load("train")
    assert train.labels.tolist() == [0, 1, 2]
    assert train.images[2, 4, 9, 2] == rows["train"][2][2048 + 4 * 32 + 9]
    assert ds.load("test").images.shape == (2, 32, 32, 3)


def test_cifar_malformed_batch(tmp_path, trusted):
    make_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(bad, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    ds = datasets.get_dataset("cifar10", data_root=tmp_path, download=False)
    with pytest.raises(DatasetNotFound, match="test_batch"):
        ds.load("test")


def test_cifar_download_from_file_url(tmp_path, monkeypatch, trusted):
    staging = tmp_path / "staging"
    make_cifar10(staging)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = dict(datasets.cifar._CIFAR["cifar10"], url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(datasets.cifar._CIFAR, "cifar10", spec)
    root = tmp_path / "root"
    ds = datasets.get_dataset("cifar10", data_root=root, download=True)
    assert len(ds.load("train")) == 10
    assert not (root / "cifar-10-python.tar.gz").exists()  # archive dropped after extraction


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx(tmp_path, gz):
    data = write_idx_set(tmp_path / "fashion-mnist", gz)
    ds = datasets.get_dataset("fashion-mnist", data_root=tmp_path, download=False)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.mean == (0.2860,) and ds.channels == 1
    train = ds.load("train")
    assert train.images.shape == (6, 28, 28, 1)
    assert np.array_equal(train.images[..., 0], data["train"][0])
    assert train.images[4, 13, 21, 0] == data["train"][0][4, 13, 21]
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.load("test").labels.tolist() == [0, 1, 2, 3]


def test_mnist_idx_when_no_pickle(tmp_path):
    data = write_idx_set(tmp_path / "mnist", gz=True)
    ds = datasets.get_dataset("mnist", data_root=tmp_path, download=False)
    assert ds.splits() == ["train", "test"]
    assert np.array_equal(ds.load("test").images[..., 0], data["t10k"][0])


def test_idx_roundtrip_and_other_dtypes(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    formats.write_idx(tmp_path / "a.idx.gz", arr)
    back = formats.read_idx(tmp_path / "a.idx.gz")
    assert back.dtype == np.int32 and np.array_equal(back, arr)


def test_corrupt_idx_magic(tmp_path):
    write_idx_set(tmp_path / "fashion-mnist", gz=False)
    path = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0] = 0x42
    path.write_bytes(bytes(raw))
    ds = datasets.get_dataset("fashion-mnist", data_root=tmp_path, download=False)
    with pytest.raises(DatasetNotFound, match="bad IDX magic.*train-images-idx3-ubyte"):
        ds.load("train")


def test_idx_size_and_count_mismatch(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5])
    with pytest.raises(DatasetNotFound, match="malformed IDX"):
        formats.read_idx(path)
    images = tmp_path / "i"
    labels = tmp_path / "l"
    images.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    labels.write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DatasetNotFound, match="3 images but 2 labels"):
        formats.read_idx_pair(images, labels)


# ----------------------------------------------------------------------------- MNIST pickle


def test_mnist_pickle_converts_back_to_uint8(tmp_path, trusted):
    rng = np.random.default_rng(3)
    parts, truth = [], []
    for n in (5, 3, 4):
        u8 = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        u8[0, 0], u8[0, 1] = 255, 0
        parts.append(((u8 / 256).astype(np.float32), np.arange(n, dtype=np.int64)))
        truth.append(u8)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.pkl.gz").write_bytes(gzip.compress(pickle.dumps(tuple(parts))))
    ds = datasets.get_dataset("mnist", data_root=tmp_path, download=False)
    assert ds.splits() == ["train", "val", "test"]
    assert ds.mean == (0.1307,) and ds.classes == [str(d) for d in range(10)]
    for split, u8 in zip(("train", "val", "test"), truth, strict=True):
        got = ds.load(split)
        assert got.images.shape == (len(u8), 28, 28, 1) and got.images.dtype == np.uint8
        assert np.array_equal(got.images.reshape(len(u8), 784), u8)
    assert ds.load("train").images[0, 0, 0, 0] == 255
    assert ds.load("val").labels.tolist() == [0, 1, 2]


def test_mnist_pickle_rejects_non_k256_pixels(tmp_path):
    x = np.full((2, 784), 0.3, np.float32)
    path = tmp_path / "m.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(((x, np.zeros(2, np.int64)),) * 3)))
    with pytest.raises(DatasetNotFound, match="k/256"):
        formats.read_mnist_pickle(path)


# ----------------------------------------------------------------------------- Animal-MNIST


def make_animal(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """30 images, 10 per class (sorted by label like the real file); 2 exact duplicates."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 10)
    images[4] = images[1]  # duplicate inside class 0
    images[25] = images[21]  # duplicate inside class 2
    folder = root / "animal-mnist"
    folder.mkdir(parents=True)
    (folder / "animal_data_version_3.gz").write_bytes(gzip.compress(pickle.dumps(images)))
    (folder / "animal_label_version_3.gz").write_bytes(gzip.compress(pickle.dumps(labels)))
    return images, labels


def test_dedupe_keeps_first_occurrence():
    images = np.zeros((5, 2, 2), np.uint8)
    images[1, 0, 0] = 1
    images[3, 0, 0] = 1
    images[4, 1, 1] = 9
    assert formats.dedupe(images).tolist() == [0, 1, 4]


def test_animal_dedupe_then_stratified_disjoint_split(tmp_path, trusted):
    images, labels = make_animal(tmp_path)
    ds = datasets.get_dataset("animal-mnist", data_root=tmp_path, download=False)
    assert ds.classes[0] == "bear" and ds.classes[9] == "zebra"
    train, test = ds.load("train"), ds.load("test")
    assert len(train) + len(test) == 28  # the two duplicates are gone
    assert len(test) == round(28 * 0.2)
    # Stratified: each class's test share follows its size (class 0 and 2 have 9, class 1 has 10).
    assert sorted(np.bincount(test.labels, minlength=3).tolist()) == [2, 2, 2]
    train_rows = {img.tobytes() for img in train.images}
    test_rows = {img.tobytes() for img in test.images}
    assert len(train_rows) == len(train) and len(test_rows) == len(test)
    assert not train_rows & test_rows
    # Every image keeps its own label.
    by_bytes = {img.tobytes(): int(lab) for img, lab in zip(images, labels, strict=True)}
    for img, lab in zip(train.images[..., 0], train.labels, strict=True):
        assert by_bytes[img.tobytes()] == lab
    # fixed statistics of the published files' train split (checked on them in
    # test_data_root_safety.py), not of these
    assert (ds.mean, ds.std) == (datasets.animal.ANIMAL_MEAN, datasets.animal.ANIMAL_STD)
    again = datasets.get_dataset("animal-mnist", data_root=tmp_path, download=False)
    assert np.array_equal(again.load("test").images, test.images)  # seeded -> reproducible


def test_stratified_sample_proportions_and_seed():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    pick = formats.stratified_sample(labels, 20, seed=0, salt="t")
    assert np.bincount(labels[pick]).tolist() == [12, 6, 2]
    assert len(set(pick.tolist())) == 20
    assert np.array_equal(pick, formats.stratified_sample(labels, 20, seed=0, salt="t"))
    assert not np.array_equal(pick, formats.stratified_sample(labels, 20, seed=1, salt="t"))
    train, test = formats.stratified_split(labels, 0.25, seed=0)
    assert np.bincount(labels[test]).tolist() == [15, 8, 2]  # tie goes to the lower class
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))


# ----------------------------------------------------------------------------- custom paths


@pytest.mark.parametrize("other", ["test", "val"])
def test_image_folder(tmp_path, other):
    root = tmp_path / "shapes"
    for split, n in (("train", 2), (other, 1)):
        for cls in ("square", "circle"):
            for i in range(n):
                save_png(root / split / cls / f"{i}.PNG", "RGB", value=(10, 20, 30))
    (root / "train" / "circle" / "notes.txt").write_text("not an image")
    ds = datasets.get_dataset(str(root))
    assert ds.name == "shapes" and ds.classes == ["circle", "square"]
    assert (ds.channels, ds.image_size) == (3, (5, 6))
    assert ds.mean == datasets.IMAGENET_MEAN
    assert ds.splits() == ["train", other]
    train = ds.load("train")
    assert train.images is None and len(train.files) == 4
    assert train.labels.tolist() == [0, 0, 1, 1]
    assert all(Path(f).is_absolute() and f.endswith(".PNG") for f in train.files)
    assert "/circle/" in train.files[0] and "/square/" in train.files[3]
    assert ds.load(other).labels.tolist() == [0, 1]
    assert len(ds.fingerprint()) == 64


def test_image_folder_gray_and_errors(tmp_path):
    gray = tmp_path / "gray"
    for cls in ("a", "b"):  # two classes: one alone is refused
        save_png(gray / "train" / cls / "x.png", "L")
        save_png(gray / "test" / cls / "y.jpg", "L")
    ds = datasets.get_dataset(gray)
    assert ds.channels == 1 and len(ds.mean) == 1

    mismatch = tmp_path / "mismatch"
    save_png(mismatch / "train" / "a" / "x.png", "L")
    save_png(mismatch / "test" / "b" / "x.png", "L")
    with pytest.raises(DatasetNotFound, match="class mismatch"):
        datasets.get_dataset(mismatch)

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(DatasetNotFound, match="no class folders"):
        datasets.get_dataset(empty)

    no_images = tmp_path / "noimg"
    (no_images / "train" / "a").mkdir(parents=True)
    (no_images / "test" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFound, match="no images"):
        datasets.get_dataset(no_images)

    only_train = tmp_path / "only"
    save_png(only_train / "train" / "a" / "x.png", "L")
    with pytest.raises(DatasetNotFound, match="no test/ or val/"):
        datasets.get_dataset(only_train)


def test_npz_dataset(tmp_path):
    x_train = np.zeros((4, 5, 6), np.uint8)
    x_train[2, 3, 4] = 200
    x_test = np.full((2, 5, 6), 0.5, np.float32)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=[0, 1, 2, 1], x_test=x_test, y_test=[2, 0])
    ds = datasets.get_dataset(path)
    assert ds.name == "tiny" and ds.classes == ["0", "1", "2"]
    assert (ds.channels, ds.image_size) == (1, (5, 6))
    train = ds.load("train")
    assert train.images.shape == (4, 5, 6, 1) and train.images[2, 3, 4, 0] == 200
    assert train.labels.tolist() == [0, 1, 2, 1]
    assert ds.load("test").images.dtype == np.uint8 and ds.load("test").images[0, 0, 0, 0] == 128
    assert ds.mean == (round(200 / (4 * 30) / 255, 6),)
    fp = ds.fingerprint()
    shutil.copy(path, tmp_path / "copy.npz")
    assert datasets.get_dataset(tmp_path / "copy.npz").fingerprint() == fp

    rgb = tmp_path / "rgb.npz"
    np.savez(
        rgb,
        x_train=np.zeros((2, 4, 4, 3), np.uint8),
        y_train=[0, 1],
        x_test=np.zeros((1, 4, 4, 3), np.uint8),
        y_test=[1],
        classes=np.array(["cat", "dog"]),
    )
    ds = datasets.get_dataset(str(rgb))
    assert ds.channels == 3 and ds.classes == ["cat", "dog"] and len(ds.mean) == 3


def test_npz_errors(tmp_path):
    missing = tmp_path / "missing.npz"
    np.savez(missing, x_train=np.zeros((2, 4, 4), np.uint8), y_train=[0, 1])
    with pytest.raises(DatasetNotFound, match="missing keys x_test, y_test"):
        datasets.get_dataset(missing)
    bad_dtype = tmp_path / "int.npz"
    np.savez(
        bad_dtype,
        x_train=np.zeros((2, 4, 4), np.int64),
        y_train=[0, 1],
        x_test=np.zeros((1, 4, 4), np.int64),
        y_test=[0],
    )
    with pytest.raises(DatasetNotFound, match="dtype int64"):
        datasets.get_dataset(bad_dtype)
    out_of_range = tmp_path / "float.npz"
    np.savez(
        out_of_range,
        x_train=np.full((2, 4, 4), 3.0),
        y_train=[0, 1],
        x_test=np.zeros((1, 4, 4)),
        y_test=[0],
    )
    with pytest.raises(DatasetNotFound, match=r"\[0, 1\]"):
        datasets.get_dataset(out_of_range)
    mismatch = tmp_path / "count.npz"
    np.savez(
        mismatch,
        x_train=np.zeros((2, 4, 4), np.uint8),
        y_train=[0, 1, 1],
        x_test=np.zeros((1, 4, 4), np.uint8),
        y_test=[0],
    )
    with pytest.raises(DatasetNotFound, match="2 images but 3 labels"):
        datasets.get_dataset(mismatch)
    empty = tmp_path / "empty.npz"
    np.savez(
        empty,
        x_train=np.zeros((0, 4, 4), np.uint8),
        y_train=np.zeros(0, np.int64),
        x_test=np.zeros((1, 4, 4), np.uint8),
        y_test=[0],
    )
    with pytest.raises(DatasetNotFound, match="empty"):
        datasets.get_dataset(empty)


# ----------------------------------------------------------------------------- registry errors


def test_unknown_name_and_split():
    with pytest.raises(DatasetNotFound, match="'nope' not found.*mnist-mini"):
        datasets.get_dataset("nope")
    ds = datasets.get_dataset("mnist-mini")
    with pytest.raises(MlfdError, match="no split 'val'"):
        ds.load("val")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "animal-mnist", "cifar10", "cifar100"])
def test_missing_root_names_the_path(tmp_path, name):
    root = tmp_path / "empty-root"
    with pytest.raises(DatasetNotFound) as err:
        datasets.get_dataset(name, data_root=root, download=False)
    message = str(err.value)
    assert str(root) in message and "MLFD_DATA" in message and "\n" not in message


def test_default_data_root(monkeypatch, tmp_path, trusted):
    monkeypatch.setenv("MLFD_DATA", str(tmp_path))
    assert datasets.default_data_root() == tmp_path
    make_cifar100(tmp_path)
    assert datasets.get_dataset("cifar100", download=False).num_classes == 100
    monkeypatch.delenv("MLFD_DATA")
    assert datasets.default_data_root() == Path.home() / ".cache" / "mlfd" / "data"


def test_register_dataset_decorator(monkeypatch):
    monkeypatch.setattr(datasets.registry, "_REGISTRY", dict(datasets.registry._REGISTRY))

    @datasets.register_dataset("toy")
    def toy(root, download):
        split = datasets.Split(labels=[0, 1], images=np.zeros((2, 2, 2, 1), np.uint8))
        return datasets.Dataset(
            "toy", ["a", "b"], 1, (2, 2), (0.5,), (0.5,), "here", "none", loader=lambda s: split
        )

    assert "toy" in datasets.list_datasets()
    ds = datasets.get_dataset("toy")
    assert ds.num_classes == 2 and len(ds.load("test")) == 2
    assert len(ds.fingerprint()) == 64


# ----------------------------------------------------------------------------- embedded


def test_embedded_subsets():
    manifest = json.loads((datasets.EMBEDDED_DIR / datasets.MANIFEST_NAME).read_text())
    for name in MINIS:
        entry = manifest["datasets"][name]
        path = datasets.EMBEDDED_DIR / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["seed"] == 0 and entry["license"] and entry["sources"]
        ds = datasets.get_dataset(name)
        assert ds.fingerprint() == entry["sha256"]
        assert (ds.channels, ds.image_size, ds.num_classes) == (1, (28, 28), 10)
        arrays = {}
        for split, n in (("train", 3000), ("test", 1000)):
            got = ds.load(split)
            assert got.images.shape == (n, 28, 28, 1) and got.images.dtype == np.uint8
            assert got.labels.dtype == np.int64
            counts = np.bincount(got.labels, minlength=10)
            assert counts.tolist() == entry["class_counts"][split]
            assert counts.min() >= 0.07 * n and counts.max() <= 0.13 * n  # every class present
            arrays[f"x_{split}"], arrays[f"y_{split}"] = got.images[..., 0], got.labels
        assert formats.arrays_sha256(arrays) == entry["content_sha256"]
        assert datasets.channel_stats(ds.load("train").images) == (ds.mean, ds.std)
    assert datasets.get_dataset("animal-mnist-mini").classes[5] == "elephant"
    assert datasets.get_dataset("fashion-mnist-mini").classes[1] == "Trouser"
    total = sum(e["bytes"] for e in manifest["datasets"].values())
    assert total < 5_000_000


def test_embedded_animal_train_test_disjoint():
    ds = datasets.get_dataset("animal-mnist-mini")
    train = {img.tobytes() for img in ds.load("train").images}
    test = {img.tobytes() for img in ds.load("test").images}
    assert len(train) == 3000 and len(test) == 1000 and not train & test


def test_tampered_embedded_file(tmp_path, monkeypatch):
    copy = tmp_path / "embedded"
    shutil.copytree(datasets.EMBEDDED_DIR, copy)
    path = copy / "mnist-mini.npz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(datasets.embedded, "EMBEDDED_DIR", copy)
    ds = datasets.get_dataset("mnist-mini")
    with pytest.raises(DatasetNotFound, match="mnist-mini.npz is corrupt"):
        ds.load("train")
    assert len(datasets.get_dataset("fashion-mnist-mini").load("test")) == 1000  # others still fine
    path.unlink()
    with pytest.raises(DatasetNotFound, match="mnist-mini.npz"):
        datasets.get_dataset("mnist-mini")


def test_deterministic_npz_writer(tmp_path):
    arrays = {"x_train": np.arange(12, dtype=np.uint8).reshape(3, 2, 2), "y_train": np.arange(3)}
    formats.write_npz_deterministic(tmp_path / "a.npz", arrays)
    formats.write_npz_deterministic(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as npz:
        assert np.array_equal(npz["x_train"], arrays["x_train"])


# ----------------------------------------------------------------------------- download


def test_download_file_url_checksums(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"mlfd" * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "out"
    got = dl.download_file(src.as_uri(), out / "a.bin", md5=md5)
    assert got.read_bytes() == src.read_bytes()
    assert dl.download_file(src.as_uri(), out / "b.bin", sha256=sha).is_file()
    with pytest.raises(MlfdError, match="checksum mismatch"):
        dl.download_file(src.as_uri(), out / "c.bin", sha256="0" * 64)
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]  # nothing partial left
    with pytest.raises(DatasetNotFound, match="could not download"):
        dl.download_file((tmp_path / "absent").as_uri(), out / "d.bin")
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]


def test_extract_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(MlfdError, match="unsafe path"):
        dl.extract_tar(archive, tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()


# ----------------------------------------------------------------------------- real data


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_demo_data", REPO / "scripts" / "build_demo_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_files_match_sha256sums(shared_data):
    for line in (shared_data / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert formats.file_sha256(shared_data / name.lstrip("*")) == digest, name


def test_builder_reproduces_embedded(shared_data, tmp_path):
    manifest = _load_builder().build_all(shared_data, tmp_path, seed=0)
    shipped = json.loads((datasets.EMBEDDED_DIR / datasets.MANIFEST_NAME).read_text())
    assert manifest == shipped
    for name in MINIS:
        entry = shipped["datasets"][name]
        built = (tmp_path / entry["file"]).read_bytes()
        assert built == (datasets.EMBEDDED_DIR / entry["file"]).read_bytes()
    assert (tmp_path / datasets.MANIFEST_NAME).read_bytes() == (
        datasets.EMBEDDED_DIR / datasets.MANIFEST_NAME
    ).read_bytes()


def test_fashion_idx_download_from_file_mirror(tmp_path, monkeypatch):
    staging = tmp_path / "mirror"
    data = write_idx_set(staging, gz=True)
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in staging.iterdir()}
    dead = (tmp_path / "dead").as_uri() + "/"  # first mirror fails, the second serves
    monkeypatch.setattr(datasets.mnist, "FASHION_MIRRORS", [dead, staging.as_uri() + "/"])
    monkeypatch.setattr(datasets.mnist, "FASHION_MD5", md5s)
    ds = datasets.get_dataset("fashion-mnist", data_root=tmp_path / "root", download=True)
    assert np.array_equal(ds.load("train").images[..., 0], data["train"][0])
    with pytest.raises(DatasetNotFound, match="fashion-mnist"):
        datasets.get_dataset("fashion-mnist", data_root=tmp_path / "other", download=False)
