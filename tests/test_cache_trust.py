"""Trust around the caches (issue 21): `mlfd clean` removes only the stores mlfd wrote for
this experiment, and a chunk that fails its checksum when read gets its group rebuilt by the
re-run the error suggests, even where the manifest and the verification memo call it intact.
"""

import json
import os
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from helpers import LOCAL, bad, edit_experiment, run

from mlfd.cache import DAMAGED, MANIFEST, VERIFIED, CacheGroup, integrity, layout
from mlfd.cache.stream import TargetStream
from mlfd.errors import CorruptArtifact
from mlfd.stages.targets import target_group
from mlfd.storage.staging import set_read_only
from mlfd.workspace import Workspace


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _mlfd_group(path, fingerprint: dict) -> CacheGroup:
    """A small complete group written by mlfd's own writer."""
    g = CacheGroup(path, fingerprint)
    w = g.begin({"feat": ((6, 2, 4), "float16"), "labels": ((6,), "int64")})
    w.append("feat", np.arange(48, dtype=np.float32).reshape(6, 2, 4))
    w.append("labels", np.arange(6))
    w.close()
    return g


def _foreign_stores(shared: Path) -> None:
    """Stores mlfd never wrote for this experiment, beside its own."""
    plain = zarr.open_group(str(shared / "plain.zarr"), mode="w")  # somebody's zarr group
    plain.create_array("x", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]
    (shared / "x.zarr").mkdir()  # a directory merely named *.zarr
    (shared / "x.zarr" / "readme.txt").write_text("mine")
    # mlfd's store names, written by plain zarr: not its layout, no fingerprint
    zarr.open_group(str(shared / "targets-L4.zarr"), mode="w").create_array(
        "alpha", shape=(2,), dtype="int8")
    zarr.open_group(str(shared / "targets-L3.zarr" / "alpha" / "train"), mode="w").attrs[
        "complete"] = True
    # written by mlfd, but for a dataset this experiment does not have
    _mlfd_group(shared / "teachers-L3.zarr" / "gamma" / "train",
                {"kind": "teacher-embeddings", "level": 3, "dataset": "gamma", "split": "train"})


# and why each is left alone
FOREIGN = {"plain.zarr": "not a name mlfd gives a cache store",
           "x.zarr": "not a name mlfd gives a cache store",
           "targets-L4.zarr": "alpha/zarr.json is not in a cache group",
           "targets-L3.zarr": "alpha/train: no mlfd fingerprint",
           "teachers-L3.zarr": "gamma/train: not the teachers cache of this experiment"}


def test_clean_caches_under_a_shared_cache_uri_removes_only_this_experiments(ws, tmp_path,
                                                                            capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    for s in (ws / "cache").glob("*.zarr"):
        os.replace(s, shared / s.name)
    want = {p.name: _size(p) for p in shared.iterdir()}
    assert set(want) == {"teachers-L2.zarr", "targets-L2.zarr"}
    _foreign_stores(shared)
    foreign = {n: _snapshot(shared / n) for n in FOREIGN}
    edit_experiment(ws, "cache", uri=str(shared))

    code, out, err = run(capsys, "clean", "--workdir", ws, "--caches", "--dry-run", "--json")
    assert code == 0, err
    assert {Path(r["path"]).name for r in json.loads(out)["left_alone"]} == set(FOREIGN)
    assert {p.name for p in shared.iterdir()} == set(want) | set(FOREIGN)  # a dry run

    code, out, err = run(capsys, "clean", "--workdir", ws, "--caches", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert {Path(r["path"]).name: r["bytes"] for r in doc["removed"]} == want
    kept = {Path(r["path"]).name: r["reason"] for r in doc["left_alone"]}
    assert kept == FOREIGN
    for name, why in kept.items():  # one stderr line each
        assert f"left alone {shared / name}: {why}" in err.splitlines()
    assert {p.name for p in shared.iterdir()} == set(FOREIGN)
    assert {n: _snapshot(shared / n) for n in FOREIGN} == foreign  # untouched, byte for byte


def test_clean_in_the_workdir_never_removes_what_mlfd_did_not_make(ws, capsys):
    _foreign_stores(ws / "cache")
    (ws / "reports" / "notes.md").write_text("my notes")
    (ws / "teachers" / ".alpha.partial").mkdir()  # an interrupted run
    (ws / "data" / ".import.partial").mkdir(parents=True)  # not where mlfd stages runs
    ours = {n: _size(ws / "cache" / n) for n in ("teachers-L2.zarr", "targets-L2.zarr")}

    code, out, err = run(capsys, "clean", "--workdir", ws, "--caches", "--json")
    assert code == 0, err
    doc = json.loads(out)
    removed = {Path(r["path"]).relative_to(ws).as_posix(): r["bytes"] for r in doc["removed"]}
    assert removed == {"cache/teachers-L2.zarr": ours["teachers-L2.zarr"],
                       "cache/targets-L2.zarr": ours["targets-L2.zarr"],
                       "teachers/.alpha.partial": 0}
    assert {Path(r["path"]).name for r in doc["left_alone"]} == set(FOREIGN)
    assert {p.name for p in (ws / "cache").iterdir()} == set(FOREIGN)
    assert (ws / "data" / ".import.partial").is_dir()

    code, out, err = run(capsys, "clean", "--workdir", ws, "--all", "--json")
    assert code == 0, err
    doc = json.loads(out)
    removed = sorted(Path(r["path"]).relative_to(ws).as_posix() for r in doc["removed"])
    assert removed == ["joint", "reports/curves-alpha.png", "reports/curves-beta.png",
                       "reports/results.json", "reports/results.md", "students", "teachers"]
    left = {Path(r["path"]).relative_to(ws).as_posix(): r["reason"] for r in doc["left_alone"]}
    assert left == {"reports/notes.md": "not made by mlfd",
                    **{f"cache/{n}": why for n, why in FOREIGN.items()}}
    assert f"left alone {Path('reports/notes.md')}: not made by mlfd" in err.splitlines()
    assert sorted(p.name for p in ws.iterdir()) == [".mlfd.lock", "cache", "data",
                                                    "experiment.yaml", "reports"]
    assert [p.name for p in (ws / "reports").iterdir()] == ["notes.md"]
    assert {p.name for p in (ws / "cache").iterdir()} == set(FOREIGN)


def test_clean_caches_under_an_fsspec_url_keeps_foreign_stores(ws, capsys):
    fs = fsspec.filesystem("memory")
    url = "memory://trust-shared"
    fp = {"kind": "teacher-embeddings", "level": 2, "dataset": "alpha", "split": "train"}
    _mlfd_group(f"{url}/teachers-L2.zarr/alpha/train", fp)
    _mlfd_group(f"{url}/teachers-L2.zarr/beta/train", {**fp, "dataset": "beta"})
    ours = sum(fs.size(p) for p in fs.find("/trust-shared/teachers-L2.zarr"))
    fs.pipe({"/trust-shared/targets-L2.zarr/alpha/train/zarr.json": b'{"attributes": {}}',
             "/trust-shared/targets-L2.zarr/alpha/train/c/0": b"z" * 50})
    edit_experiment(ws, "cache", uri=url)
    try:
        code, out, err = run(capsys, "clean", "--workdir", ws, "--caches", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert [(r["path"], r["bytes"]) for r in doc["removed"]
                if r["path"].startswith(url)] == [(f"{url}/teachers-L2.zarr", ours)]
        assert doc["left_alone"] == [{"path": f"{url}/targets-L2.zarr",
                                      "reason": "alpha/train: no mlfd fingerprint"}]
        assert not fs.exists("/trust-shared/teachers-L2.zarr")
        assert fs.cat_file("/trust-shared/targets-L2.zarr/alpha/train/c/0") == b"z" * 50
    finally:
        fs.rm("/trust-shared", recursive=True)


# --------------------------------------------------------------------------- rebuild


def _age(root: Path) -> None:
    past = time.time() - 3600  # written long ago: the memo records their stat
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


def _flip(chunk: Path) -> None:
    """Bytes flipped in place, size kept, mtime restored."""
    st = chunk.stat()
    b = bytearray(chunk.read_bytes())
    b[20:36] = bytes(x ^ 0xFF for x in b[20:36])  # inside the first inner chunk
    chunk.write_bytes(bytes(b))
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))


def _hide_in_memo(g: Path, rel: str) -> None:
    """os.utime cannot restore the ctime, which the memo also keys on: record the damaged
    file's stat as the memo holds it where a rewrite does not show (a copy that keeps
    times, a file system whose ctime says nothing)."""
    memo = json.loads((g / VERIFIED).read_text())
    st = (g / rel).stat()
    memo["files"][rel] = [st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    (g / VERIFIED).write_text(json.dumps(memo))


def _match_manifest(g: Path, rel: str) -> None:
    """Damage that predates the manifest: its checksum of the file matches the bytes."""
    manifest = json.loads((g / MANIFEST).read_text())
    manifest["files"][rel] = [(g / rel).stat().st_size,
                              integrity._file_crc(layout._LocalDir(g), rel)]
    (g / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("hidden_by,rerun", [(_hide_in_memo, "distill"),
                                             (_match_manifest, "cache")])
def test_chunk_failing_its_checksum_on_read_is_rebuilt_by_the_suggested_rerun(
        ws, capsys, hidden_by, rerun):
    g = ws / "cache/targets-L2.zarr/alpha/train"
    rel = "logits/c/0/0/0"
    before = zarr.open_group(str(g), mode="r")["logits"][...]
    _age(g)
    group = target_group(Workspace.open(ws), 2, "alpha")
    assert group.status() == "ok" and (g / VERIFIED).exists()
    _flip(g / rel)
    hidden_by(g, rel)
    assert group.reason() == "ok"  # neither the manifest nor the memo sees the damage

    distill = ("distill", "--workdir", ws, "--dataset", "alpha", "--levels", 2, *LOCAL)
    msg = bad(capsys, *distill, "--force")
    assert msg == (f"error: cache {g}: corrupt: array logits failed to decode (ValueError); "
                   "re-run `mlfd cache` (or `mlfd distill`) to rebuild it, no --force needed")
    assert group.reason() == "corrupt: array logits failed to decode when read (ValueError)"
    assert not (g / VERIFIED).exists()  # the memo no longer vouches for any file

    args = distill if rerun == "distill" else ("cache", "--workdir", ws, "--levels", 2, *LOCAL)
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    assert "[cache] targets L2 alpha: corrupt: array logits failed to decode" in err
    if rerun == "distill":
        assert [(s["verb"], s["target"]) for s in json.loads(out)["steps"]] == [
            ("cache", "joint targets L2")]  # same values: the student stays
    else:
        # beta's targets too: the fixture distilled alpha only
        assert json.loads(out)["written"]["targets"] == ["alpha", "beta"]
    assert group.status() == "ok" and not (g / DAMAGED).exists()
    np.testing.assert_array_equal(zarr.open_group(str(g), mode="r")["logits"][...], before)
    code, out, err = run(capsys, *distill, "--json")
    assert code == 0 and json.loads(out)["steps"] == [], err


def _damaged_group(tmp_path) -> tuple[CacheGroup, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12, 2, 8)).astype(np.float16)
    g = CacheGroup(tmp_path / "targets-L2.zarr" / "d" / "train", {"x": 1})
    w = g.begin({"logits": (logits.shape, "float16"), "labels": ((12,), "int64")})
    w.append("labels", np.zeros(12, np.int64))
    w.append("logits", logits)
    w.close()
    _flip(g.path / "logits/c/0/0/0")
    _match_manifest(g.path, "logits/c/0/0/0")
    assert g.status() == "ok"
    return g, logits


def test_a_streamed_read_failure_marks_the_group_for_rebuild(tmp_path):
    g, logits = _damaged_group(tmp_path)
    order = np.stack(np.meshgrid(np.arange(12), np.arange(2), indexing="ij"), -1).reshape(-1, 2)
    stream = TargetStream(g.open_read(), ["logits"], order, 4, chunk_rows=12, window=1,
                          hint=g._rebuild_hint)
    with pytest.raises(CorruptArtifact, match="corrupt: array logits failed to decode"):
        list(stream)
    assert g.reason() == "corrupt: array logits failed to decode when read (ValueError)"
    # readers still get what is intact: view 1 is in another inner chunk
    np.testing.assert_array_equal(g.open_read()["logits"][:, 1], logits[:, 1])


def test_a_read_only_run_records_nothing_and_says_force(tmp_path):
    """eval and --dry-run hold no lock and write nothing: the advice is --force."""
    g, _ = _damaged_group(tmp_path)
    set_read_only(True)
    try:
        with pytest.raises(CorruptArtifact) as e:
            g.load()
    finally:
        set_read_only(False)
    assert str(e.value).endswith("failed to decode (ValueError); re-run `mlfd cache --force` "
                                 "to rebuild it")
    assert not (g.path / DAMAGED).exists() and g.status() == "ok"
