"""Tiny ImageNet, ImageNet-Sketch and CSV-listed datasets, against tiny trees made here."""

from __future__ import annotations

import io
import re
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mlfd.data import datasets, formats
from mlfd.data import download as dl
from mlfd.errors import DatasetNotFound, MlfdError


def save_image(path: Path, value: int = 0, mode: str = "RGB", size: tuple[int, int] = (8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new(mode, size, color).save(path, format=fmt)


# ----------------------------------------------------------------------------- Tiny ImageNet

TINY_WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted: labels follow sorted order


def make_tiny(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    # n03 has no entry, so its name falls back to the wnid; n00 is not one of the classes.
    (folder / "words.txt").write_text("n00\tunused\nn01\tgoldfish, Carassius auratus\nn02\tcat\n")
    for k, wnid in enumerate(TINY_WNIDS):
        for i in range(k + 2):  # n02: 2, n01: 3, n03: 4 training images
            image = folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            save_image(image, 10 * i, size=(64, 64))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    annotations = [("val_1.JPEG", "n03"), ("val_0.JPEG", "n02"), ("val_2.JPEG", "n01")]
    for i, (name, _) in enumerate(annotations):
        save_image(folder / "val" / "images" / name, 50 + i, size=(64, 64))
    (folder / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in annotations)
    )
    return folder


def test_tinyimagenet_layout(tmp_path):
    folder = make_tiny(tmp_path)
    ds = datasets.get_dataset("tinyimagenet", data_root=tmp_path, download=False)
    assert ds.classes == ["goldfish, Carassius auratus", "cat", "n03"]  # n01, n02, n03
    assert (ds.channels, ds.image_size, ds.splits()) == (3, (64, 64), ["train", "test"])
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    train = ds.load("train")
    assert train.images is None
    assert Counter(train.labels.tolist()) == {0: 3, 1: 2, 2: 4}
    assert all(Path(f).is_file() and "/images/" in f for f in train.files)
    assert Path(train.files[0]).name == "n01_0.JPEG" and train.labels[0] == 0
    test = ds.load("test")
    names = [Path(f).name for f in test.files]
    assert names == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG"]
    assert test.labels.tolist() == [1, 2, 0]  # n02, n03, n01 from val_annotations.txt
    assert Path(test.files[1]) == (folder / "val" / "images" / "val_1.JPEG").resolve()
    fp = ds.fingerprint()
    assert len(fp) == 64
    again = datasets.get_dataset("tinyimagenet", data_root=tmp_path, download=False)
    assert again.fingerprint() == fp
    save_image(folder / "val" / "images" / "val_0.JPEG", 99, size=(64, 64))
    again = datasets.get_dataset("tinyimagenet", data_root=tmp_path, download=False)
    assert again.fingerprint() != fp


def test_tinyimagenet_duplicate_names_stay_distinct(tmp_path):
    folder = make_tiny(tmp_path)
    (folder / "words.txt").write_text("n01\tcrane\nn02\tcrane\n")
    ds = datasets.get_dataset("tinyimagenet", data_root=tmp_path, download=False)
    assert ds.classes == ["crane (n01)", "crane (n02)", "n03"]


def test_tinyimagenet_missing_names_the_folder(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        datasets.get_dataset("tinyimagenet", data_root=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "tiny-imagenet-200") in message and "wnids.txt" in message
    assert "MLFD_DATA" in message and "download" in message and "\n" not in message


def test_tinyimagenet_bad_annotations_and_missing_images(tmp_path):
    folder = make_tiny(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn09\t0\t0\t1\t1\n")
    ds = datasets.get_dataset("tinyimagenet", data_root=tmp_path, download=False)
    with pytest.raises(DatasetNotFound, match="'n09' is not in wnids.txt"):
        ds.load("test")
    annotations.write_text("val_7.JPEG\tn01\t0\t0\t1\t1\n")
    ds = datasets.get_dataset("tinyimagenet", data_root=tmp_path, download=False)
    with pytest.raises(DatasetNotFound, match="val_7.JPEG"):
        ds.load("test")
    for f in (folder / "train" / "n02" / "images").iterdir():
        f.unlink()
    with pytest.raises(DatasetNotFound, match="class n02"):
        ds.load("train")


def test_tinyimagenet_download_from_file_url(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    make_tiny(staging)
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((staging / "tiny-imagenet-200").rglob("*")):
            zf.write(f, f.relative_to(staging).as_posix())
    monkeypatch.setattr(datasets.tinyimagenet, "TINYIMAGENET_URL", archive.as_uri())
    root = tmp_path / "root"
    ds = datasets.get_dataset("tinyimagenet", data_root=root, download=True)
    assert len(ds.load("train")) == 9 and len(ds.load("test")) == 3
    assert ds.load("test").labels.tolist() == [1, 2, 0]
    assert not (root / "tiny-imagenet-200.zip").exists()  # archive dropped after extraction


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_extract_zip_refuses_path_traversal(tmp_path, name):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"ok")
        zf.writestr(name, b"bad")
    dest = tmp_path / "dest"
    with pytest.raises(MlfdError, match="unsafe path"):
        dl.extract_zip(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "fine.txt").exists()


def test_extract_zip_refuses_symlinks(tmp_path):
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, b"/etc/passwd")
    with pytest.raises(MlfdError, match="links refused"):
        dl.extract_zip(archive, tmp_path / "dest")
    with pytest.raises(MlfdError, match="cannot extract"):
        dl.extract_zip(io.BytesIO(b"not a zip"), tmp_path / "dest")


# ----------------------------------------------------------------------------- ImageNet-Sketch

SKETCH_COUNTS = {"n01": 10, "n02": 5, "n03": 7}


def make_sketch(base: Path, order: list[str]) -> None:
    """Same tree, files created in the given class order and reversed within classes."""
    for wnid in order:
        for i in reversed(range(SKETCH_COUNTS[wnid])):
            ext = (".JPEG", ".jpg", ".png")[i % 3]
            save_image(base / wnid / f"{i}{ext}", 20 * i)


def split_names(ds) -> dict[str, list[str]]:
    return {
        s: [str(Path(f).relative_to(Path(f).parents[1])) for f in ds.load(s).files]
        for s in ds.splits()
    }


def test_imagenet_sketch_split(tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    make_sketch(root_a / "imagenet-sketch" / "sketch", ["n01", "n02", "n03"])
    make_sketch(root_b / "imagenet-sketch", ["n03", "n01", "n02"])  # flat layout, other order
    ds = datasets.get_dataset("imagenet-sketch", data_root=root_a, download=False)
    assert ds.classes == ["n01", "n02", "n03"] and ds.channels == 3
    assert ds.image_size == (8, 8) and ds.mean == datasets.IMAGENET_MEAN
    train, test = ds.load("train"), ds.load("test")
    assert len(train) + len(test) == 22 and len(test) == round(22 * 0.2)
    assert set(train.files).isdisjoint(test.files)
    every = {str(f.resolve()) for f in (root_a / "imagenet-sketch").rglob("*") if f.is_file()}
    assert set(train.files) | set(test.files) == every
    # Stratified: each class gives about a fifth of its images to test.
    test_counts = Counter(test.labels.tolist())
    for k, n in enumerate(SKETCH_COUNTS.values()):
        assert abs(test_counts[k] - 0.2 * n) <= 1 and test_counts[k] >= 1
    for split in (train, test):  # labels match the wnid folder of each file
        assert [ds.classes[y] for y in split.labels] == [Path(f).parent.name for f in split.files]

    again = datasets.get_dataset("imagenet-sketch", data_root=root_a, download=False)
    other = datasets.get_dataset("imagenet-sketch", data_root=root_b, download=False)
    assert split_names(again) == split_names(ds) == split_names(other)
    assert other.fingerprint() == ds.fingerprint()  # same bytes, same split


def test_imagenet_sketch_missing_says_where(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        datasets.get_dataset("imagenet-sketch", data_root=tmp_path, download=True)
    message = str(err.value)
    assert str(tmp_path / "imagenet-sketch") in message and "sketch/<wnid>" in message
    assert "Hugging Face" in message and "Kaggle" in message and "\n" not in message


# ----------------------------------------------------------------------------- CSV lists


def make_images(folder: Path, names: list[str], mode: str = "RGB") -> None:
    for i, name in enumerate(names):
        save_image(folder / name, 30 * i, mode=mode, size=(6, 5))


def test_csv_with_split_column_and_string_labels(tmp_path):
    make_images(tmp_path / "img", ["a.png", "b.png", "c.png", "d.png", "e.png"])
    absolute = (tmp_path / "img" / "e.png").resolve()
    listing = tmp_path / "lists" / "pets.csv"
    listing.parent.mkdir()
    listing.write_text(
        "path,label,split\n"
        "../img/a.png,dog,train\n"
        "../img/b.png,cat,TRAIN\n"
        "\n"
        f"{absolute},dog,test\n"
        "../img/c.png,bird,val\n"
        "../img/d.png,cat,train\n"
    )
    ds = datasets.get_dataset(str(listing))
    assert ds.name == "pets" and ds.classes == ["bird", "cat", "dog"]
    assert (ds.channels, ds.image_size) == (3, (5, 6)) and ds.mean == datasets.IMAGENET_MEAN
    assert ds.splits() == ["train", "val", "test"]
    train = ds.load("train")
    assert [Path(f).name for f in train.files] == ["a.png", "b.png", "d.png"]
    assert train.labels.tolist() == [2, 1, 1]
    assert train.files[0] == str((tmp_path / "img" / "a.png").resolve())
    assert ds.load("val").labels.tolist() == [0]
    assert ds.load("test").files == [str(absolute)] and ds.load("test").labels.tolist() == [2]
    assert len(ds.fingerprint()) == 64


def test_csv_folder_with_int_labels(tmp_path):
    folder = tmp_path / "digits"
    make_images(folder / "pics", ["0.png", "1.png", "2.png", "3.png"], mode="L")
    (folder / "train.csv").write_text("label,path,note\n3,pics/0.png,x\n0,pics/1.png,y\n")
    (folder / "test.csv").write_text("\ufeffPath,Label\npics/2.png,1\n")  # BOM + capitals
    (folder / "val.csv").write_text("path,label\npics/3.png,3\n")
    ds = datasets.get_dataset(folder)
    assert ds.name == "digits" and ds.classes == ["0", "1", "2", "3"]
    assert ds.channels == 1 and ds.mean == datasets.IMAGENET_GRAY_MEAN
    assert ds.splits() == ["train", "val", "test"]
    assert ds.load("train").labels.tolist() == [3, 0]
    assert ds.load("train").files[1] == str((folder / "pics" / "1.png").resolve())
    assert ds.load("test").labels.tolist() == [1] and ds.load("val").labels.tolist() == [3]


def test_csv_labels_mixed_are_names():
    classes, labels = formats.csv_labels(["10", "2", "x"])
    assert classes == ["10", "2", "x"] and labels.tolist() == [0, 1, 2]
    classes, labels = formats.csv_labels(["10", "2", "+2"])
    assert len(classes) == 11 and labels.tolist() == [10, 2, 2]
    with pytest.raises(DatasetNotFound, match="negative class index -1"):
        formats.csv_labels(["1", "-1"])


def test_image_folder_still_wins_over_train_csv(tmp_path):
    root = tmp_path / "both"
    for cls in ("a", "b"):
        save_image(root / "train" / cls / "x.png")
        save_image(root / "test" / cls / "y.png")
    (root / "train.csv").write_text("nonsense\n")
    assert datasets.get_dataset(root).classes == ["a", "b"]


def _csv_error(tmp_path: Path, text: str) -> str:
    make_images(tmp_path / "img", ["a.png", "b.png"])
    listing = tmp_path / "list.csv"
    listing.write_text(text)
    with pytest.raises(DatasetNotFound) as err:
        datasets.get_dataset(listing)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("file,label,split\nimg/a.png,x,train\n", r"lacks column\(s\) path"),
        ("path,label\nimg/a.png,x\n", r"lacks column\(s\) split.*train.csv"),
        ("", "found nothing"),
        ("path,label,split\nimg/a.png,x,train\nimg/b.png,y,holdout\n", "unknown split 'holdout'"),
        ("path,label,split\nimg/a.png,x,train\nimg/zz.png,y,test\nimg/yy.png,y,test\n",
         "line 3 not found: .*zz.png"),
        ("path,label,split\nimg/a.png,x,test\n", "no rows with split 'train'"),
        ("path,label,split\nimg/a.png,x,train\n", "no rows with split 'test' or 'val'"),
        ("path,label,split\n", "no rows with split 'train'"),
        ("path,label,split\nimg/a.png,,train\n", "line 2: empty path or label"),
        ("path,label,split\nimg/a.png,x\n", "line 2: too few fields"),
    ],
)
def test_csv_errors(tmp_path, text, expected):
    assert re.search(expected, _csv_error(tmp_path, text))


def test_csv_folder_errors(tmp_path):
    folder = tmp_path / "lists"
    make_images(folder, ["a.png"])
    (folder / "train.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(DatasetNotFound, match="no test.csv"):
        datasets.get_dataset(folder)
    (folder / "test.csv").write_text("path,label\n")
    with pytest.raises(DatasetNotFound, match=r"split 'test' is empty \(.*test.csv\)"):
        datasets.get_dataset(folder)
    (folder / "test.csv").write_text("path,label\nmissing.png,x\n")
    with pytest.raises(DatasetNotFound, match="missing.png"):
        datasets.get_dataset(folder)
    (folder / "test.csv").write_bytes(b"path,label\n\xff\xfe,x\n")
    with pytest.raises(DatasetNotFound, match="cannot read CSV"):
        datasets.get_dataset(folder)


def test_unsupported_file_mentions_csv(tmp_path):
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(DatasetNotFound, match=r"\.csv list"):
        datasets.get_dataset(other)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(DatasetNotFound, match="train.csv and test.csv"):
        datasets.get_dataset(empty_dir)


def test_new_names_are_registered():
    assert {"tinyimagenet", "imagenet-sketch"} <= set(datasets.list_datasets())
