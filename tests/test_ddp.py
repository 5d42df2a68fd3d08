"""torchrun / DDP: N processes train what one process trains, with the same global batch.

One experiment (two tiny datasets, LayerNorm ViTs without dropout, L1 fusion without
dropout) runs end to end once in one process and once with `--nproc 2` (gloo on CPU).
Every trained model of the two runs must agree up to float reduction order, which is
measured here against a deliberately different run that must fail the same bound. Both
runs write caches of tiny shards, so that the two ranks each extract several shards of
one array: the caches must be equal bit for bit.

The datasets' sizes leave the last global batch uneven: 113 = 7 * 16 + 1 training images
give rank 1 no sample at all in the last step of every teach and distill epoch, and
113 + 120 = 233 fused rows end in a batch of 9 (5 + 4).
"""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import bad, make_npz, quiet, tree_snapshot
from safetensors.torch import load_file

from mlfd.cache import CacheGroup, layout, shard_ranges
from mlfd.config import DatasetEntry, Experiment
from mlfd.engine.metrics import read_jsonl
from mlfd.errors import MlfdError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["--device", "cpu", "--pipeline", "torch"]
MODELS = ["teachers/alpha", "teachers/beta", "joint/L1", "students/alpha/L1"]

# ||w_N - w_1|| / ||w_1|| over all tensors of a model. Float reduction order alone gives
# 0.1e-5 to 1e-5 here (two processes against one; max |diff| <= 9e-5 at max |w| 1.0), and
# up to 3.4e-5 with twice the steps or one thread instead of two. +10 % learning rate on
# one teacher gives 7e-3; averaging the ranks' losses as plain DDP does (wrong for the
# uneven last batch: rank 1 has none) gives 3.5e-3 on teacher alpha.
REL_TOL = 3e-4


def _experiment(root: Path) -> Path:
    a = make_npz(root / "alpha.npz", 0, classes=3, n_train=113, n_test=24)
    b = make_npz(root / "beta.npz", 1, classes=4, n_train=120, n_test=24, channels=3)
    exp = Experiment(preset="custom", levels=1, datasets=[
        DatasetEntry("alpha", str(a), "test_vit", 32), DatasetEntry("beta", str(b), "test_vit", 32)])
    for cfg in (exp.teach, exp.fuse, exp.distill):
        cfg.epochs, cfg.batch_size = 2, 16
    exp.fuse.dropout = 0.0  # dropout draws differ per rank: exact only without it
    exp.cache.views = 2
    exp.budget = "fixed"  # the epochs above: this compares process counts, not budgets
    path = root / "experiment.yaml"
    exp.save(path)
    return path


def _mlfd(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFD_NO_PROGRESS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "mlfd_cli.main", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _one_thread(*args) -> int:
    """`mlfd ARGS` in this process on one thread, as each rank runs (--nproc's default on
    two cores): two threads on cores busy with the other rank would only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return quiet(*args)
    finally:
        torch.set_num_threads(threads)


def _workdir(root: Path, name: str) -> Path:
    w = root / name
    w.mkdir()
    shutil.copy(root / "experiment.yaml", w / "experiment.yaml")
    return w


# Tiny cache shards: 8 samples (of 2 views of 64 fp16 values) per shard of the teachers'
# training arrays, 16 per test array; the labels and the 3-class logits stay one shard.
SMALL_SHARDS = {"CHUNK_BYTES": 1024, "SHARD_BYTES": 2048}

# Started in every rank of the two-process run: the same tiny shards, and a log of every
# file each rank writes, through zarr or mlfd's own shard writer (which rank wrote which
# shard).
SITE = """
import os
if "RANK" in os.environ:  # a rank, not the launcher
    import mlfd.cache.layout as layout
    from zarr.storage import LocalStore
    layout.CHUNK_BYTES, layout.SHARD_BYTES = {CHUNK_BYTES}, {SHARD_BYTES}
    _log = os.path.join({writes!r}, "rank" + os.environ["RANK"] + ".txt")
    _set = LocalStore._set

    async def _logged(self, key, value, *args, **kwargs):
        with open(_log, "a") as f:
            f.write(str(self.root / key) + "\\n")
        return await _set(self, key, value, *args, **kwargs)

    LocalStore._set = _logged
    import mlfd.cache.shards as shards  # whole shards mlfd writes itself
    _write_file = shards.write_file

    def _logged_file(path, parts):
        with open(_log, "a") as f:
            f.write(str(path) + "\\n")
        return _write_file(path, parts)

    shards.write_file = _logged_file
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process workdir, two-process workdir, the two-process command's result); the
    files each rank wrote through zarr are listed in <root>/writes/rank<r>.txt."""
    root = tmp_path_factory.mktemp("ddp")
    _experiment(root)
    one, two = _workdir(root, "one"), _workdir(root, "two")
    with pytest.MonkeyPatch.context() as m:
        for k, v in SMALL_SHARDS.items():
            m.setattr(layout, k, v)
        assert _one_thread("distill", "--workdir", one, "--dataset", "alpha", *LOCAL) == 0
    site, writes = root / "site", root / "writes"
    site.mkdir()
    writes.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(writes=str(writes), **SMALL_SHARDS))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    res = _mlfd("distill", "--workdir", two, "--dataset", "alpha", "--nproc", 2, "--json", *LOCAL,
                env={"PYTHONPATH": path})
    assert res.returncode == 0, res.stderr
    return one, two, res


def _weights(stem: Path) -> dict[str, torch.Tensor]:
    return {k: v.float().clone() for k, v in load_file(str(stem) + ".safetensors").items()}


def _rel_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    num = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa)
    den = sum(float(wa[k].pow(2).sum()) for k in wa)
    return (num / den) ** 0.5


@pytest.mark.parametrize("model", MODELS)
def test_two_processes_train_what_one_does(runs, model):
    one, two, _ = runs
    assert _rel_diff(one / model / "last", two / model / "last") <= REL_TOL
    rows1, rows2 = read_jsonl(one / model / "metrics.jsonl"), read_jsonl(two / model /
                                                                        "metrics.jsonl")
    assert [r["epoch"] for r in rows2] == [1, 2]  # each epoch once: rank 0 alone writes
    for r1, r2 in zip(rows1, rows2):
        # the loss is reduced over both ranks' shares: the one-process mean
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)
        assert r2["top1"] == pytest.approx(r1["top1"], abs=1 / 24 + 1e-9)  # a borderline image


def test_the_bound_catches_a_different_learning_rate(runs, tmp_path):
    """The tolerance is not vacuous: +10 % lr on one teacher's single-process run fails it."""
    one, _, _ = runs
    w = tmp_path / "w"
    shutil.copytree(one, w)
    assert _one_thread("teach", "--workdir", w, "--dataset", "alpha", "--force", "--lr",
                       0.0011, *LOCAL) == 0
    assert _rel_diff(one / "teachers/alpha/last", w / "teachers/alpha/last") > REL_TOL


def test_only_rank_0_speaks_and_the_files_are_one_run_s(runs):
    one, two, res = runs

    def files(w):  # the cache's integrity memo is written only when files look settled
        return sorted(p for p in tree_snapshot(w) if not p.endswith("verified.json"))

    assert files(two) == files(one)  # nothing left over by a rank, nothing missing
    doc = json.loads(res.stdout)  # exactly one JSON document on stdout
    assert [s["verb"] for s in doc["steps"]] == ["teach", "teach", "cache", "fuse", "cache",
                                                "distill"]
    assert "Traceback" not in res.stderr and "rank 1" not in res.stderr
    assert res.stderr.count("teach alpha epoch 1/2") == 1  # logged by rank 0 only
    assert yaml.safe_load((two / "experiment.yaml").read_text()) == \
        yaml.safe_load((one / "experiment.yaml").read_text())


def test_batchnorm_model_in_two_processes(tmp_path):
    """BatchNorm normalises each rank's half batch (no SyncBN): close to one process, not
    equal. The multi-head baseline also exercises one-batch-per-dataset steps."""
    _experiment(tmp_path)
    args = ["teach", "--dataset", "all", "--baseline", "multi-head", "--arch", "test_resnet",
            "--epochs", 1, "--json", *LOCAL]
    w1, w2 = _workdir(tmp_path, "w1"), _workdir(tmp_path, "w2")
    assert _one_thread(*args, "--workdir", w1) == 0
    res = _mlfd(*args, "--workdir", w2, "--nproc", 2)
    assert res.returncode == 0, res.stderr
    top1 = [read_jsonl(w / "baselines/multi-head-test_resnet/metrics.jsonl")[-1]["top1"]
            for w in (w1, w2)]
    assert json.loads(res.stdout)["metrics"]["top1"] == top1[1]
    assert abs(top1[0] - top1[1]) <= 0.2, top1  # measured: 0.354 and 0.396
    # the weights drift apart with per-rank statistics (2.6e-2 measured), but stay far
    # closer than another seed's model (about 0.5)
    stem = "baselines/multi-head-test_resnet/last"
    assert _rel_diff(w1 / stem, w2 / stem) <= 0.1


def test_a_failure_on_another_rank_ends_the_run_with_its_error(tmp_path):
    """Rank 1 fails alone: rank 0 must not hang, and the user gets rank 1's one line."""
    _experiment(tmp_path)
    w = _workdir(tmp_path, "w")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import mlfd.engine.loop as loop\n"
        "    from mlfd.errors import MlfdError\n"
        "    def fit(**kw):\n"
        "        raise MlfdError('injected failure on rank 1')\n"
        "    loop.fit = fit\n")
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    res = _mlfd("teach", "--workdir", w, "--dataset", "alpha", "--nproc", 2, *LOCAL,
                env={"PYTHONPATH": path}, timeout=180)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["error: injected failure on rank 1"], res.stderr
    assert "Traceback" not in res.stderr
    assert not (w / "teachers" / "alpha").exists()


def test_nproc_with_an_indivisible_batch_writes_nothing(tmp_path, capsys):
    a, b = make_npz(tmp_path / "a.npz", 0), make_npz(tmp_path / "b.npz", 1)
    w = tmp_path / "w"
    line = bad(capsys, "teach", "--workdir", w, "--teacher", f"{a}=test_vit", "--teacher",
               f"{b}=test_vit", "--input-size", 32, "--batch-size", 15, "--nproc", 2, *LOCAL)
    assert "--nproc 2: teach.batch_size 15 does not split over 2 processes" in line, line
    assert "use a --batch-size divisible by 2" in line
    assert not w.exists()


def test_nproc_is_checked_before_anything_is_written(tmp_path, capsys, monkeypatch):
    _experiment(tmp_path)
    w = _workdir(tmp_path, "w")
    before = tree_snapshot(w)
    assert "--nproc must be >= 1, got 0" in bad(capsys, "fuse", "--workdir", w, "--nproc", 0,
                                                 "--device", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")  # as torchrun starts a process
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "drop it inside torchrun" in bad(capsys, "distill", "--workdir", w, "--nproc", 2,
                                            *LOCAL)
    assert tree_snapshot(w) == before


def test_collectives_are_identities_in_one_process():
    from mlfd.engine import distributed as dist

    assert (dist.world(), dist.rank(), dist.is_main(), dist.active()) == (1, 0, True, False)
    assert dist.all_reduce_sum([3, 4.5]) == [3.0, 4.5]
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(t, "max") is t and t.tolist() == [1.0, 2.0]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.on_main(lambda x: x + 1, 1) == 2
    m = torch.nn.Linear(2, 1)
    m(torch.ones(1, 2)).sum().backward()
    before = m.weight.grad.clone()
    dist.sum_gradients(m)  # nothing to sum with: the gradient stays
    assert torch.equal(m.weight.grad, before)


# --------------------------------------------------------------------------- sharded caches


def _groups(w: Path) -> list[Path]:
    """Every cache group of a workdir, as <store>.zarr/<dataset>/<split>."""
    return sorted(p.parent.relative_to(w / "cache")
                  for p in (w / "cache").glob("*.zarr/*/*/zarr.json"))


@pytest.fixture(scope="module")
def extracted_by_one(runs):
    """A copy of the two-process workdir whose caches one process extracted again
    (--force) from the same teachers and joint teacher: the reference for its caches."""
    _, two, _ = runs
    ref = two.parent / "ref"
    shutil.copytree(two, ref)
    with pytest.MonkeyPatch.context() as m:
        for k, v in SMALL_SHARDS.items():
            m.setattr(layout, k, v)
        assert _one_thread("cache", "--workdir", ref, "--levels", 1, "--force", *LOCAL) == 0
    return ref


def test_two_processes_extract_the_caches_one_does_bit_for_bit(runs, extracted_by_one):
    """Each rank rendered and embedded only its rows, in other batches than one process:
    the stored values are still identical (no value depends on its batch-mates: eval-mode
    LayerNorm models, row-wise matmuls on CPU), and each group's manifest covers exactly
    the files it has, all intact."""
    _, two, _ = runs
    one = extracted_by_one
    groups = _groups(two)
    assert [g.as_posix() for g in groups] == [
        "targets-L1.zarr/alpha/train", "teachers-L1.zarr/alpha/test",
        "teachers-L1.zarr/alpha/train", "teachers-L1.zarr/beta/test",
        "teachers-L1.zarr/beta/train"]
    import zarr

    for rel in groups:
        g1, g2 = (zarr.open_group(str(w / "cache" / rel), mode="r") for w in (one, two))
        ids = [json.loads((w / "cache" / rel / "manifest.json").read_text())["id"]
               for w in (one, two)]
        assert ids[0] != ids[1]  # the reference group was written again, not copied
        fingerprint = dict(g2.attrs)["fingerprint"]
        assert CacheGroup(two / "cache" / rel, fingerprint).reason() == "ok"
        names = sorted(dict(g1.attrs)["arrays"])
        assert sorted(dict(g2.attrs)["arrays"]) == names and "labels" in names
        assert len(names) >= 3
        for name in names:
            a, b = g1[name][...], g2[name][...]
            assert a.dtype == b.dtype and a.shape == b.shape, (rel, name)
            assert np.array_equal(a, b), (rel, name, float(np.abs(a - b).max()))


def _shard(path: Path) -> tuple[str, str, int] | None:
    """(group, array, shard index) of a shard file <group>/<array>/c/<shard>/..., the
    staging group .<split>.partial named as the <split> it is promoted to; None for
    other files."""
    parts = path.parts
    if "c" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("c")
    group = Path(*parts[:i - 1]).as_posix()
    for split in ("train", "test"):
        group = group.replace(f"/.{split}.partial", f"/{split}")
    return group, parts[i - 1], int(parts[i + 1])


def _shard_writes(log: Path) -> list[tuple[str, str, int]]:
    """Every shard file a rank wrote, in order, from its log."""
    return [s for line in log.read_text().splitlines() if (s := _shard(Path(line)))]


def test_each_rank_writes_its_own_shards_once(runs):
    """No shard file is written by both ranks (no locks needed), none twice, every shard of
    the final caches was written, and both ranks share each many-shard array in two
    contiguous runs of shards; the groups' metadata is rank 0's alone."""
    _, two, _ = runs
    logs = {r: two.parent / "writes" / f"rank{r}.txt" for r in (0, 1)}
    writes = {r: _shard_writes(p) for r, p in logs.items()}
    assert not [line for line in logs[1].read_text().splitlines()
                if not line.split("/c/")[1:]]  # rank 1: shard files only, no zarr.json
    counts = Counter(writes[0] + writes[1])
    assert max(counts.values()) == 1, counts.most_common(3)
    final = {s for p in (two / "cache").rglob("*") if p.is_file() and (s := _shard(p))}
    assert set(counts) == final
    for data in ("alpha", "beta"):
        group = (two / "cache" / "teachers-L1.zarr" / data / "train").as_posix()
        for array in ("alpha", "beta"):  # 113 or 120 samples: 15 shards of 8
            mine = [sorted(s for g, a, s in writes[r] if (g, a) == (group, array))
                    for r in (0, 1)]
            assert mine[0] and mine[1] and mine[0][-1] + 1 == mine[1][0], mine
            assert mine[0] + mine[1] == list(range(15))


@pytest.mark.parametrize(("n", "step", "world", "expected"), [
    (113, 16, 2, [(0, 64), (64, 113)]),  # 8 shards, the last one a tail of 1 row
    (113, 16, 3, [(0, 32), (32, 80), (80, 113)]),
    (128, 16, 4, [(0, 32), (32, 64), (64, 96), (96, 128)]),
    (20, 16, 4, [(0, 0), (0, 16), (16, 16), (16, 20)]),  # 2 shards, 4 ranks: two get none
    (5, 16, 2, [(0, 0), (0, 5)]),
    (0, 16, 2, [(0, 0), (0, 0)]),
    (50, 10, 1, [(0, 50)]),
])
def test_shard_ranges_cut_at_shard_boundaries(n, step, world, expected):
    ranges = shard_ranges(n, step, world)
    assert ranges == expected
    rows = np.concatenate([np.arange(a, b) for a, b in ranges])
    assert rows.tolist() == list(range(n))  # contiguous, disjoint, complete, in rank order
    assert all(a % step == 0 and (b % step == 0 or b == n) for a, b in ranges)
    shards = [-(-b // step) - a // step for a, b in ranges]
    assert max(shards) - min(shards) <= 1  # whole shards dealt out evenly


def test_shard_ranges_refuse_nonsense():
    with pytest.raises(ValueError, match="world >= 1"):
        shard_ranges(10, 4, 0)
    with pytest.raises(ValueError, match="step >= 1"):
        shard_ranges(10, 0, 2)


@pytest.fixture
def small_shards(monkeypatch):
    """Array a (n, 3) float32: 10 rows per shard; b (n, 2, 2) float16: 16; labels: 16."""
    monkeypatch.setattr(layout, "CHUNK_BYTES", 64)
    monkeypatch.setattr(layout, "SHARD_BYTES", 128)


def _data(n=50):
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((n, 3)).astype(np.float32),
            "b": rng.standard_normal((n, 2, 2)).astype(np.float16),
            "labels": rng.integers(0, 10, n)}


def _spec(d):
    return {k: (v.shape, v.dtype.name) for k, v in d.items()}


def _rank_writes(w, d, upto=None, batch=3):
    """What one rank does in a stage: labels whole (the writer keeps its own rows), then
    each array from its cursor to the end of its range (or row ``upto``), batch by batch."""
    w.append("labels", d["labels"], start=0)
    for k in ("a", "b"):
        start, stop = w.cursor(k), w.rows(k)[1]
        stop = stop if upto is None else min(stop, upto)
        for s in range(start, stop, batch):
            w.append(k, d[k][s:min(s + batch, stop)], start=s)


def _sharded(g, d, world, upto=None):
    """``world`` ranks' writers, run one after another in this process (the store needs no
    collectives: the stage adds them); rank r stops at row upto[r] (None: its range's end)."""
    shares = g.prepare(_spec(d), world)
    writers = [g.join(_spec(d), shares, r) for r in range(world)]
    for r, w in enumerate(writers):
        _rank_writes(w, d, None if upto is None else upto[r])
    return shares, writers


def _same(g, d):
    out = g.load()
    for k in d:
        np.testing.assert_array_equal(out[k], d[k])


def test_more_ranks_than_shards(tmp_path, small_shards):
    d, g = _data(), CacheGroup(tmp_path / "g", {"x": 1})
    shares, writers = _sharded(g, d, 6)
    assert shares["ranges"]["labels"] == [[0, 0], [0, 16], [16, 32], [32, 32], [32, 48],
                                          [48, 50]]  # 4 shards for 6 ranks
    writers[0].close([w.held() for w in writers])
    _same(g, d)
    assert g.status() == "ok" and not g.staging.exists()
    assert sorted(p.name for p in g.path.glob("*.json")) == ["manifest.json", "zarr.json"]


def test_sharded_extraction_resumes_with_other_world_sizes(tmp_path, small_shards):
    """Killed with rank 0 inside its range and rank 1 done, resumed by three ranks, then
    killed again and finished by one process: each resume keeps every whole shard the
    ranks finished and ends with the values of an uninterrupted write."""
    d, g = _data(), CacheGroup(tmp_path / "g", {"x": 1})
    # a: 5 shards of 10 rows, 2 ranks: [0, 20) and [20, 50); rank 0 is killed at row 12,
    # one whole shard in, rank 1 finishes
    shares, _ = _sharded(g, d, 2, upto=[12, None])
    assert shares["ranges"]["a"] == [[0, 20], [20, 50]]
    torn = g.staging / "a" / "c" / "1" / "0"  # rank 0's next shard, torn by the kill
    torn.parent.mkdir()
    torn.write_bytes(b"torn")
    # three ranks: a is cut [0, 10) [10, 30) [30, 50); done are rows 0-10 and 20-50, so
    # rank 0 is done, rank 1 redoes from row 10 (shard 1 went), rank 2 is done
    shares = g.prepare(_spec(d), 3)
    assert shares["ranges"]["a"] == [[0, 10], [10, 30], [30, 50]]
    assert shares["cursors"]["a"] == [10, 10, 50]
    assert not torn.exists() and (g.staging / "a" / "c" / "2" / "0").exists()
    writers = [g.join(_spec(d), shares, r) for r in range(3)]
    _rank_writes(writers[1], d, upto=24)  # killed again: rows 10-20 are a whole shard
    assert (g.staging / "progress.rank1.json").exists()
    # one process: a from row 20 (shard 2, rows 20-30, was left to rank 1 to rewrite: not
    # durable in these shares, so it goes), b from 0 (rank 0 never wrote its rows 0-16)
    w = g.begin(_spec(d))
    assert (w.cursor("a"), w.cursor("b"), w.cursor("labels")) == (20, 0, 50)
    assert not (g.staging / "a" / "c" / "2" / "0").exists()
    assert not list(g.staging.glob("progress.rank*"))  # progress.json holds the cursors
    _rank_writes(w, d)
    w.close()
    _same(g, d)
    assert g.status() == "ok"


def test_a_range_left_unwritten_is_one_line_naming_the_rows(tmp_path, small_shards):
    d, g = _data(), CacheGroup(tmp_path / "g", {"x": 1})
    # a: 5 shards of 10 rows, 2 ranks: [0, 20) and [20, 50); rank 1 stops at row 40
    _, writers = _sharded(g, d, 2, upto=[None, 40])
    with pytest.raises(MlfdError) as e:
        writers[0].close([w.held() for w in writers])
    msg = str(e.value)
    assert "\n" not in msg and str(g.path) in msg
    assert "rows 40–50 of array a are missing (rank 1 of 2 wrote 20–40 of its 20–50)" in msg
    assert g.status() == "missing"  # nothing promoted
    w = g.join(_spec(d), json.loads((g.staging / "progress.json").read_text())["shares"], 1)
    _rank_writes(w, d)  # the rank's rows after all: now the group closes
    writers[0].close([writers[0].held(), w.held()])
    _same(g, d)


def test_default_cache_memory_is_shared_by_the_local_processes(monkeypatch):
    import importlib

    from mlfd.stages.common import RunOptions

    distill = importlib.import_module("mlfd.stages.distill")  # the module, not the stage

    monkeypatch.setattr(distill, "default_budget", lambda device: 1200)
    opts = RunOptions(torch.device("cpu"))
    assert distill.cache_budget(opts) == 1200
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # as torchrun sets it
    assert distill.cache_budget(opts) == 300
    assert distill.cache_budget(opts, 3) == 400  # --dry-run --nproc 3
    opts.cache_memory = 1000  # --cache-memory is per process already
    assert distill.cache_budget(opts) == 1000
