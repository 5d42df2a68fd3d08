"""Image folders are scanned before training: bad files, hidden files, empty classes, pixel
limits, 16-bit PNGs read alike by both pipelines."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import bad, make_npz, run
from PIL import Image

from mlfd.data import datasets, formats
from mlfd.data.datasets import Split
from mlfd.data.pipelines import InputSpec, TorchPipeline
from mlfd.data.sampling import eval_order
from mlfd.errors import MlfdError

FAST = ["--levels", 1, "--input-size", 32, "--epochs", 1, "--batch-size", 16, "--device", "cpu",
        "--pipeline", "torch"]


@pytest.fixture(autouse=True)
def default_policy():
    """--max-image-pixels and --drop-empty-classes are per-process settings: reset them."""
    formats.set_image_policy()
    yield
    formats.set_image_policy()


def pipelines():
    """Both backends (DALI runs in its CPU mode here)."""
    out = [TorchPipeline]
    try:
        from mlfd.data.pipelines.dali import DaliPipeline
    except ImportError:  # DALI is a Linux-only dependency
        return out
    return [*out, DaliPipeline]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, pixels: np.ndarray, depth: int = 8, size=None) -> Path:
    """A PNG written byte by byte: 16-bit colour (which PIL cannot write), or a header that
    declares ``size`` (width, height) over a few real bytes (a decompression bomb)."""
    pixels = np.asarray(pixels, ">u2" if depth == 16 else np.uint8)
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    rows = b"".join(b"\0" + pixels[i].tobytes() for i in range(h))
    width, height = size or (w, h)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                     + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))
    return path


def bomb(path: Path) -> Path:
    """Under 1 KiB on disk, 20000x20000 RGB (1.2 GB) once decoded."""
    return write_png(path, np.zeros((2, 2, 3)), size=(20000, 20000))


def image_folder(root: Path, train: int = 6, test: int = 3, size: int = 16) -> Path:
    """Two learnable classes (a bright block on the left or on the right)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c, col in (("left", 2), ("right", 9)):
            for i in range(n):
                x = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                x[2:8, col:col + 5] = 220
                path = root / split / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x).save(path)
    return root


def macos_litter(folder: Path) -> None:
    """What a folder copied from a Mac (or unzipped) carries beside the images."""
    (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder.parent / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / ".thumbs").mkdir()
    (folder / ".thumbs" / "0.png").write_bytes(b"not an image either")


# ----------------------------------------------------------------------------- CLI


def test_zero_byte_image_stops_distill_then_skip_goes_on(tmp_path, capsys):
    data = image_folder(tmp_path / "digits")
    (data / "train" / "right" / "x.png").write_bytes(b"")  # zero bytes
    macos_litter(data / "train" / "left")
    beta = make_npz(tmp_path / "beta.npz", 1)
    w = tmp_path / "w"
    args = ["--workdir", w, "--teacher", f"{data}=test_resnet", "--teacher",
            f"{beta}=test_resnet", "--dataset", "digits", *FAST]

    line = bad(capsys, "distill", *args)
    assert line == ("error: 1 unreadable image in digits/train, first digits/train/right/x.png "
                    "(empty file); --skip-bad-images goes on without them (all listed in "
                    f"{w}/reports/bad-images-digits.txt)")
    assert not list(w.rglob("*.safetensors"))  # stopped before any model was trained
    listing = (w / "reports" / "bad-images-digits.txt").read_text()
    assert f"train\t{data / 'train' / 'right' / 'x.png'}\tempty file" in listing
    assert "._0.png" not in listing and ".thumbs" not in listing  # not images of the dataset

    code, out, err = run(capsys, "distill", *args, "--skip-bad-images")
    assert code == 0, err
    assert "[scan] digits: skipped 1 unreadable image of 19 (--skip-bad-images" in err
    assert (w / "students" / "digits" / "L1" / "last.safetensors").exists()
    teacher = json.loads((w / "teachers" / "digits" / "last.json").read_text())
    ds = datasets.get_dataset(data)
    assert len(ds.load("train")) == 13  # the zero-byte file is listed, the litter is not
    assert teacher["dataset_fingerprint"] != ds.fingerprint()  # the skip is in its data

    # The skip holds for later commands on the same files: eval finds nothing stale.
    code, out, err = run(capsys, "eval", "--workdir", w, "--device", "cpu", "--pipeline",
                         "torch", "--json")
    assert code == 0, err
    assert "skipped 1 unreadable image of 19 (an earlier --skip-bad-images" in err
    rows = json.loads(out)["rows"]
    assert {r["status"] for r in rows if r["dataset"] == "digits"} == {"complete"}


def test_check_reports_every_bad_file_at_once(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "shapes", train=3, test=2)
    good = (data / "test" / "left" / "0.png").read_bytes()
    (data / "train" / "left" / "empty.png").write_bytes(b"")
    (data / "train" / "left" / "cut.png").write_bytes(good[: len(good) // 2])
    (data / "train" / "right" / "text.jpg").write_text("hello")
    Image.fromarray(np.zeros((4, 4), np.float32)).save(data / "test" / "right" / "f.png",
                                                        format="TIFF")  # float pixels
    bomb(data / "test" / "left" / "bomb.png")
    beta = make_npz(tmp_path / "beta.npz", 1)
    w = tmp_path / "w"
    line = bad(capsys, "check", "--workdir", w, "--teacher", f"{data}=test_resnet",
               "--teacher", f"{beta}=test_resnet")
    assert line.startswith("error: 5 unreadable images in shapes (train 3, test 2), first "
                           "shapes/train/left/cut.png (truncated); --skip-bad-images goes on")
    rows = [r.split("\t") for r in (w / "reports" / "bad-images-shapes.txt").read_text()
            .splitlines() if not r.startswith("#")]
    reasons = {Path(f).name: why for _, f, why in rows}
    assert reasons == {
        "bomb.png": "over the pixel limit: 400,000,000 pixels > 89,478,485 "
                    "(see --max-image-pixels)",
        "f.png": "wrong mode (F pixels)",
        "cut.png": "truncated",
        "empty.png": "empty file",
        "text.jpg": "not an image",
    }

    # The result is kept: the same files are not decoded again.
    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(formats, "read_image", no_decoding)
    assert bad(capsys, "check", "--workdir", w) == line
    code, out, err = run(capsys, "check", "--workdir", w, "--skip-bad-images")
    assert code == 0, err
    assert out.splitlines() == [f"shapes: 15 images, 5 bad left out (listed in {w}/reports/"
                                "bad-images-shapes.txt)",
                                "beta: images held in memory, no files to scan"]


def test_max_image_pixels_option(tmp_path, capsys):
    data = image_folder(tmp_path / "small", train=2, test=1)
    Image.new("RGB", (20, 20)).save(data / "train" / "left" / "big.png")
    beta = make_npz(tmp_path / "beta.npz", 1)
    line = bad(capsys, "check", "--workdir", tmp_path / "w", "--teacher", f"{data}=test_resnet",
               "--teacher", f"{beta}=test_resnet", "--max-image-pixels", 399)
    assert line.startswith("error: 1 unreadable image in small/train, first small/train/left/"
                           "big.png (over the pixel limit: 20x20 = 400 pixels > 399 (see "
                           "--max-image-pixels)); --skip-bad-images goes on without them")
    code, _, err = run(capsys, "check", "--workdir", tmp_path / "w", "--max-image-pixels", 400)
    assert code == 0, err


def test_empty_class_folder_is_an_error(tmp_path, capsys):
    data = image_folder(tmp_path / "three", train=2, test=1)
    for split in ("train", "test"):
        (data / split / "void").mkdir()
    beta = make_npz(tmp_path / "beta.npz", 1)
    args = ["--workdir", tmp_path / "w", "--teacher", f"{data}=test_resnet",
            "--teacher", f"{beta}=test_resnet"]
    line = bad(capsys, "check", *args)
    assert f"class folder {data / 'test' / 'void'} has no images" in line \
        or f"class folder {data / 'train' / 'void'} has no images" in line
    assert "--drop-empty-classes" in line
    code, out, err = run(capsys, "check", *args, "--drop-empty-classes")
    assert code == 0, err


# ----------------------------------------------------------------------------- listing


def test_hidden_files_and_other_extensions_are_not_images(tmp_path):
    data = image_folder(tmp_path / "d", train=2, test=1)
    macos_litter(data / "train" / "left")
    (data / "train" / "left" / "notes.txt").write_text("x")
    (data / "train" / "__MACOSX").mkdir()
    (data / "train" / "__MACOSX" / "._left").write_bytes(b"\0")
    (data / "test" / "__MACOSX").mkdir()
    ds = datasets.get_dataset(data)
    assert ds.classes == ["left", "right"]
    assert [Path(f).name for f in ds.load("train").files] == ["0.png", "1.png"] * 2


def test_empty_class_folders_refused_or_dropped(tmp_path):
    data = image_folder(tmp_path / "d", train=2, test=1)
    (data / "train" / "a_void").mkdir()
    (data / "test" / "a_void").mkdir()
    with pytest.raises(MlfdError, match="a_void has no images.*--drop-empty-classes"):
        datasets.get_dataset(data)
    formats.set_image_policy(drop_empty_classes=True)
    ds = datasets.get_dataset(data)
    assert ds.classes == ["left", "right"] and ds.num_classes == 2
    assert ds.load("train").labels.tolist() == [0, 0, 1, 1]
    assert ds.load("test").labels.tolist() == [0, 1]

    # Dropped from test only: the test labels still index train's classes.
    (data / "train" / "a_void" / "0.png").write_bytes((data / "train/left/0.png").read_bytes())
    ds = datasets.get_dataset(data)
    assert ds.classes == ["a_void", "left", "right"]
    assert ds.load("test").labels.tolist() == [1, 2]

    # A class with images in test but none in train stays refused.
    (data / "train" / "a_void" / "0.png").unlink()
    (data / "test" / "a_void" / "0.png").write_bytes((data / "test/left/0.png").read_bytes())
    with pytest.raises(MlfdError, match="'a_void' has images in test/ but none in train/"):
        datasets.get_dataset(data)


def test_excluded_rows_leave_the_split_and_change_the_fingerprint(tmp_path):
    ds = datasets.get_dataset(image_folder(tmp_path / "d", train=3, test=1))
    full = ds.fingerprint()
    ds.exclude({"train": [1, 4]})
    assert len(ds.load("train")) == 4 and len(ds.load_all("train")) == 6
    assert ds.load("train").labels.tolist() == [0, 0, 1, 1]
    assert ds.fingerprint() != full and ds.base_fingerprint() == full
    ds.exclude({})
    assert ds.fingerprint() == full and len(ds.load("train")) == 6


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("pipeline", pipelines(), ids=lambda p: p.name)
def test_decompression_bomb_refused_from_its_header(tmp_path, pipeline):
    split = Split(labels=[0, 1], files=[str(bomb(tmp_path / "bomb.png")),
                                        str(write_png(tmp_path / "ok.png", np.zeros((4, 4))))])
    with pytest.raises(MlfdError, match=r"bad image .*bomb\.png: over the pixel limit"):
        list(pipeline(split, InputSpec(size=(8, 8)), eval_order(2), 2))


@pytest.mark.parametrize("pipeline", pipelines(), ids=lambda p: p.name)
def test_pixel_limit_applies_in_both_pipelines(tmp_path, pipeline):
    split = Split(labels=[0], files=[str(write_png(tmp_path / "a.png", np.zeros((40, 40))))])
    formats.set_image_policy(max_image_pixels=1000)
    with pytest.raises(MlfdError, match=r"a\.png: over the pixel limit: 40x40 = 1,600 pixels"):
        list(pipeline(split, InputSpec(size=(8, 8)), eval_order(1), 1))
    formats.set_image_policy(max_image_pixels=1600)
    assert len(list(pipeline(split, InputSpec(size=(8, 8)), eval_order(1), 1))) == 1


@pytest.mark.parametrize("pipeline", pipelines(), ids=lambda p: p.name)
@pytest.mark.parametrize("channels", [1, 3], ids=["gray16", "rgb16"])
def test_16bit_png_scaled_like_a_float64_reference(tmp_path, pipeline, channels):
    rng = np.random.default_rng(channels)
    shape = (12, 10) if channels == 1 else (12, 10, 3)
    wide = rng.integers(0, 65536, shape).astype(np.uint16)
    wide.flat[:4] = [0, 255, 386, 65535]  # / 257: 0, 0.99, 1.502, 255 (v >> 8: 0, 0, 1, 255)
    path = write_png(tmp_path / "wide.png", wide, depth=16)
    # Same size and mean 0, std 1: the output is the 8-bit value / 255, unresampled.
    spec = InputSpec(size=(12, 10), channels=channels, mean=(0.0,), std=(1.0,))
    (batch,) = list(pipeline(Split(labels=[0], files=[str(path)]), spec, eval_order(1), 1))
    got = batch.images[0].numpy().transpose(1, 2, 0).astype(np.float64) * 255.0
    reference = wide.reshape(12, 10, channels) / 257.0  # 0..65535 -> 0..255, float64
    assert abs(got.mean() - reference.mean()) < 0.1  # not saturated (mean ~254)
    np.testing.assert_allclose(got, reference, atol=0.5 + 1e-3)  # rounded to 8 bits once
    np.testing.assert_allclose(got.flat[:4], [0, 1, 2, 255], atol=1e-3)


def test_fixed_size_dataset_refuses_other_sizes(tmp_path):
    from mlfd.stages.scan import _decode_all

    files = [str(write_png(tmp_path / f"{i}.png", np.zeros(shape)))
             for i, shape in enumerate([(8, 8), (8, 9), (8, 8, 3)])]
    split = Split(labels=[0, 1, 1], files=files)
    ds = datasets.Dataset(name="t", classes=["a", "b"], channels=3, image_size=(8, 8),
                     mean=(0.5,), std=(0.5,), source=str(tmp_path), license="-",
                     loader={"train": split, "test": split}.__getitem__, fixed_size=True)
    images, found = _decode_all("t", ds)
    assert images == 6
    assert [(b.split, b.row, b.reason) for b in found] == [
        ("train", 1, "unexpected size (9x8, the dataset's images are 8x8)"),
        ("test", 1, "unexpected size (9x8, the dataset's images are 8x8)")]
