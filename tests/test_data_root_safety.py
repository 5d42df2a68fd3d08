"""A data root is untrusted: pickles are read with a restricted unpickler and checked against
their published checksums, an npz with pickled objects is refused, a dry run writes and
fetches nothing (design.md section 13)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import LOCAL, TINY, bad, make_npz, run, tree_snapshot

from mlfd.data import datasets, formats
from mlfd.data import download as dl
from mlfd.errors import DatasetNotFound, MlfdError


class _Evil:
    """Unpickling this creates ``marker``: what a crafted dataset file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil_bytes(marker: Path) -> bytes:
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_Evil(probe), protocol=2))  # the payload is live with plain pickle
    assert probe.exists()
    probe.unlink()
    return payload


@pytest.fixture(autouse=True)
def _policy(monkeypatch):
    """--trust-data lasts until the next command sets it (a process runs one): restore the
    default after each test, so no other test reads with it."""
    monkeypatch.setitem(datasets.base._TRUST, "on", False)
    monkeypatch.setitem(dl._FETCH, "on", True)


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def urlopen(url, *a, **k):
        calls.append(url)
        raise AssertionError(f"network call during a dry run: {url}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def _cifar10(root: Path, evil: str | None = None, marker: Path | None = None) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        obj = {b"data": data, b"labels": [i % 10, (i + 1) % 10, (i + 2) % 10, (i + 3) % 10]}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [f"class{i}".encode() for i in range(10)]}, protocol=2))
    if evil:
        (folder / evil).write_bytes(_evil_bytes(marker))


def _mnist_pickle(n=(20, 4, 8), seed=0) -> tuple[bytes, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    parts, truth = [], []
    for k in n:
        u8 = rng.integers(0, 256, (k, 784), dtype=np.uint8)
        parts.append(((u8 / 256).astype(np.float32), (np.arange(k) % 10).astype(np.int64)))
        truth.append(u8)
    return pickle.dumps(tuple(parts), protocol=2), truth


def _experiment(tmp_path: Path, name: str) -> list:
    other = make_npz(tmp_path / "other.npz", 0)
    return ["--workdir", tmp_path / "w", "--teacher", f"{name}=test_resnet",
            "--teacher", f"{other}=test_resnet"]


# --------------------------------------------------------------------------- the unpickler


def test_restricted_unpickler_refuses_any_other_global(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(_evil_bytes(marker)))
    with pytest.raises(formats.UnsafePickle, match=r"mnist\.pkl\.gz: it asks for \S*open"):
        formats.read_mnist_pickle(path, known=None)
    assert not marker.exists()
    # only latin-1 for _codecs.encode (how Python 3 writes bytes at protocol 2)
    sneaky = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    path.write_bytes(sneaky)
    with pytest.raises(DatasetNotFound, match="codec 'zlib' is refused"):
        formats.read_mnist_pickle(path, known=None)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_numpy_pickles(tmp_path, protocol):
    """What numpy writes at each protocol (_reconstruct, _frombuffer, scalar, bytes)."""
    raw, truth = _mnist_pickle(seed=protocol)
    parts = pickle.loads(raw)
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(parts, protocol=protocol))
    got = formats.read_mnist_pickle(path, known=None)
    assert np.array_equal(got["val"][0].reshape(-1, 784), truth[1])
    assert got["test"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    labels = {b"labels": [np.int64(3), 4], b"set": {1, 2}}
    path.write_bytes(pickle.dumps(labels, protocol=protocol))
    assert formats.pickles._unpickle(path, "bytes", None) == labels


# --------------------------------------------------------------------------- MNIST pickle


def test_evil_mnist_pickle_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    (root / "mnist" / "mnist.pkl.gz").write_bytes(gzip.compress(_evil_bytes(marker)))
    cmd = ["teach", *_experiment(tmp_path, "mnist"), "--dataset", "mnist", "--data-root", root,
           *TINY]
    for extra in ([], ["-n"]):  # not the published file: refused before anything is read
        line = bad(capsys, *cmd, *extra)
        assert "mnist.pkl.gz is not the published file" in line and "--trust-data" in line
    line = bad(capsys, *cmd, "--trust-data")
    assert "refusing to unpickle" in line and "mnist.pkl.gz" in line and "open" in line
    code, out, err = run(capsys, *cmd, "--trust-data", "-n")  # a dry run unpickles nothing
    assert code == 0, err
    assert not marker.exists()


def test_re_encoded_mnist_needs_trust_data(tmp_path, capsys, monkeypatch):
    raw, truth = _mnist_pickle()
    published = gzip.compress(raw, mtime=0)
    monkeypatch.setattr(datasets.mnist, "MNIST_PICKLE_DIGESTS", frozenset({
        f"md5:{hashlib.md5(published).hexdigest()}", f"sha256:{hashlib.sha256(raw).hexdigest()}"}))
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    target = root / "mnist" / "mnist.pkl.gz"
    for copy in (published, gzip.compress(raw, mtime=1)):  # the file, or its content, matches
        target.write_bytes(copy)
        images = datasets.get_dataset("mnist", root).load("val").images
        assert np.array_equal(images.reshape(-1, 784), truth[1])
    # the same arrays re-pickled (another protocol): valid, but not the published bytes
    target.write_bytes(gzip.compress(pickle.dumps(pickle.loads(raw), protocol=4)))
    with pytest.raises(formats.ChecksumMismatch, match="not the published file"):
        datasets.get_dataset("mnist", root)
    cmd = ["teach", *_experiment(tmp_path, "mnist"), "--dataset", "mnist", "--data-root", root,
           *TINY]
    line = bad(capsys, *cmd)
    assert str(target) in line and "not the published file" in line and "--trust-data" in line
    code, out, err = run(capsys, *cmd, "--trust-data")
    assert code == 0, err
    assert (tmp_path / "w" / "teachers" / "mnist").is_dir()
    monkeypatch.setitem(datasets.base._TRUST, "on", True)
    ds = datasets.get_dataset("mnist", root)
    assert np.array_equal(ds.load("test").images.reshape(-1, 784), truth[2])


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("evil", ["batches.meta", "data_batch_1"])
def test_evil_cifar_pickle_runs_nothing(tmp_path, capsys, evil):
    marker = tmp_path / "PWNED"
    root = tmp_path / "data"
    _cifar10(root, evil, marker)
    cmd = ["teach", *_experiment(tmp_path, "cifar10"), "--dataset", "cifar10",
           "--data-root", root, *TINY]
    for extra in (["-n"], []):
        line = bad(capsys, *cmd, *extra)
        assert "cifar-10-batches-py" in line and "is not the published file" in line
        assert "--trust-data" in line
    code, out, err = run(capsys, *cmd, "--trust-data", "-n")  # the class names are the registry's
    assert code == 0, err
    if evil == "data_batch_1":
        line = bad(capsys, *cmd, "--trust-data")
        assert "refusing to unpickle" in line and "data_batch_1" in line
    assert not marker.exists()


def test_cifar_checksums_cover_every_file():
    for spec in datasets.cifar._CIFAR.values():
        assert set(spec["md5s"]) == {p.name for p in datasets.cifar._cifar_files(spec, Path("."))}
    assert len(datasets.cifar.CIFAR100_CLASSES) == len(set(datasets.cifar.CIFAR100_CLASSES)) == 100
    assert sorted(datasets.cifar.CIFAR100_CLASSES) == datasets.cifar.CIFAR100_CLASSES


# --------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("root_state", ["nonexistent", "empty"])
def test_dry_run_writes_and_fetches_nothing(tmp_path, capsys, monkeypatch, no_network,
                                            root_state):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    if root_state == "empty":
        root.mkdir()
    other = make_npz(tmp_path / "other.npz", 0)
    before = tree_snapshot(tmp_path)
    # the command: the trio preset (its animal-mnist cannot be downloaded)
    line = bad(capsys, "distill", "--dataset", "mnist", "--data-root", root, "-n", *LOCAL)
    assert "animal-mnist" in line
    for names in (["mnist", "fashion-mnist"], ["cifar10", "cifar100", "tinyimagenet"]):
        teachers = [a for n in names for a in ("--teacher", f"{n}=test_resnet")]
        code, out, err = run(capsys, "distill", *teachers, "--teacher", f"{other}=test_resnet",
                             "--data-root", root, "-n", *LOCAL)
        assert code == 0, err
        assert "1. teach" in out and "nothing was run or written" in out
        for name in names:
            assert f"[plan] data: {name}: not in {root}/" in out
        assert out.count("a real run downloads it from http") == len(names)
    assert tree_snapshot(tmp_path) == before
    assert no_network == []


def test_download_refused_while_fetching_is_off(tmp_path, no_network):
    with dl.no_fetch():
        ds = datasets.get_dataset("cifar10", tmp_path / "data")
        assert ds.pending and ds.num_classes == 10 and ds.classes[0] == "airplane"
        with pytest.raises(DatasetNotFound, match="without --dry-run downloads it"):
            ds.load("train")
        with pytest.raises(MlfdError, match="fetches nothing"):
            dl.download_file("https://example.invalid/x", tmp_path / "x")
    assert dl.fetch_allowed()  # restored after the block
    assert not (tmp_path / "data").exists() and no_network == []


# --------------------------------------------------------------------------- npz


def test_npz_with_object_arrays_is_bad_input(tmp_path, capsys):
    good = make_npz(tmp_path / "good.npz", 0)
    arrays = dict(np.load(good))
    for key, value in (("x_train", np.array([object()] * 48, dtype=object)),
                       ("classes", np.array(["a", 1, None], dtype=object))):
        path = tmp_path / f"bad_{key}.npz"
        np.savez(path, **{**arrays, key: value})
        with pytest.raises(DatasetNotFound, match=f"{path}: {key} is an object array"):
            datasets.get_dataset(str(path))
        for extra in ([], ["-n"]):
            code, out, err = run(capsys, "teach", "--workdir", tmp_path / "w", "--teacher",
                                 f"{path}=test_resnet", "--teacher", f"{good}=test_resnet",
                                 *extra, *TINY)
            assert code == 2 and "Traceback" not in err
            assert err.strip().splitlines() == [
                f"error: cannot read npz {path}: {key} is an object array (pickled Python "
                "objects are refused); save plain numeric or string arrays"]


# --------------------------------------------------------------------------- real files


def test_published_files_pass_as_they_are(shared_data, tmp_path):
    mnist = datasets.get_dataset("mnist", shared_data)
    assert len(mnist.load("train")) == 50000 and len(mnist.load("test")) == 10000
    # a gunzipped or re-compressed copy holds the published pickle: accepted by its checksum
    content = gzip.decompress((shared_data / "mnist" / "mnist.pkl.gz").read_bytes())
    assert formats.pickles._matches(content, datasets.mnist.MNIST_PICKLE_DIGESTS)
    animal = datasets.get_dataset("animal-mnist", shared_data)
    train = animal.load("train")
    assert len(train) + len(animal.load("test")) == 9716
    # the fixed statistics are those of the published files' training split
    fixed = (datasets.animal.ANIMAL_MEAN, datasets.animal.ANIMAL_STD)
    assert datasets.channel_stats(train.images) == fixed
