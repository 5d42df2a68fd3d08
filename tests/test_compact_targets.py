"""Compact targets (issue 19 §3): int8 with per-row/channel scales, and top-K logits."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from helpers import LOCAL, edit_experiment, run

from mlfd.cache import CacheGroup, TargetStream, layout
from mlfd.cache.quant import channel_group, dequantise, quantise, scale_name, topk_pack, topk_unpack
from mlfd.losses import KDLossConfig
from mlfd.losses.kd import kd_loss_reference


@pytest.fixture
def small_shards(monkeypatch):
    """Tiny chunks and shards: the arrays span many of both, values and scales alike."""
    monkeypatch.setattr(layout, "CHUNK_BYTES", 256)
    monkeypatch.setattr(layout, "SHARD_BYTES", 256 * 4)


def _maps(n=40, v=3, c=8, hw=4, seed=0):
    """(N, V, C, H, W) maps whose channels differ in range by 100x, with zero groups."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, v, c, hw, hw)) * np.logspace(-1, 1, c)[:, None, None]
    x = np.maximum(x, 0)  # ReLU-like, as the joint teacher's maps
    x[3] = 0  # a zero row (every view and channel)
    x[5, 1, 4:] = 0  # one zero (row, view, channel group)
    return x.astype(np.float32)


# --------------------------------------------------------------------------- quantiser


@pytest.mark.parametrize("group", [None, 1, 8])
def test_map_scales_are_per_row_view_channel_group_against_float64(group):
    x = _maps()
    g = group or 4  # 4x4 maps: 3 channels hold 48 values, 4 divide the 8 channels
    assert channel_group(x.shape) == 4 and channel_group((9, 2, 128, 2, 2)) == 16
    assert channel_group((9, 2, 64, 7, 7)) == 1
    q, scale = quantise(x, group)
    x64 = x.astype(np.float64)
    grouped = x64.reshape(40, 3, 8 // g, g * 16)
    ref_scale = np.float32(np.abs(grouped).max(axis=3) / 127)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (40, 3, 8 // g)
    np.testing.assert_array_equal(scale, ref_scale)
    s64 = np.repeat(scale.astype(np.float64), g, axis=2)[..., None, None]
    ref_q = np.where(s64 > 0, np.rint(x64 / np.where(s64 > 0, s64, 1)), 0)
    np.testing.assert_array_equal(q, ref_q)
    assert np.abs(q).max() == 127  # the range is used
    # |error| <= scale / 2 in float64 (q * scale is exact in float64)
    err = np.abs(x64 - q.astype(np.float64) * s64)
    assert (err <= s64 / 2).all()
    # zero groups: scale 0, values 0, dequantised exactly 0
    assert (scale[3] == 0).all() and (q[3] == 0).all() and (q[5, 1, 4:] == 0).all()
    if g <= 4:  # channels 4-7 of (5, 1) are a zero group of their own
        assert (s64[5, 1, 4:] == 0).all() and (s64[5, 1, :4] > 0).all()
    deq = dequantise(torch.from_numpy(q), torch.from_numpy(scale))
    assert deq.dtype == torch.float32 and (deq[3] == 0).all() and (deq[5, 1, 4:] == 0).all()
    # float32 dequantisation rounds the exact float64 product once
    np.testing.assert_array_equal(deq.numpy(), (q.astype(np.float64) * s64).astype(np.float32))


def test_vector_and_logit_scales_are_per_row_view():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((30, 2, 10)) * 7).astype(np.float32)
    x[4, 0] = 0
    q, scale = quantise(torch.from_numpy(x))  # torch input: the targets stage passes tensors
    assert scale.shape == (30, 2, 1)
    np.testing.assert_array_equal(
        scale[..., 0], np.float32(np.abs(x.astype(np.float64)).max(axis=2) / 127))
    err = np.abs(x.astype(np.float64) - q * scale.astype(np.float64))
    assert (err <= scale.astype(np.float64) / 2).all() and scale[4, 0, 0] == 0
    assert (q[4, 0] == 0).all()


def test_non_finite_values_are_refused():
    from mlfd.errors import MlfdError

    with pytest.raises(MlfdError, match="not finite"):
        quantise(np.array([[[1.0, np.nan]]], dtype=np.float32))


# --------------------------------------------------------------------------- store


def _write_int8(path, d, batch=7):
    g = CacheGroup(path, {"x": 1})
    w = g.begin({"L2": (d["L2"].shape, "int8"), "logits": (d["logits"].shape, "int8"),
                 "labels": (d["labels"].shape, "int64")})
    for k, v in d.items():
        for s in range(0, len(v), batch):
            w.append(k, torch.from_numpy(v[s:s + batch]) if k != "labels" else v[s:s + batch])
    w.close()
    return g


def test_int8_group_reads_back_the_same_bits_whole_streamed_and_in_plain_zarr(
        tmp_path, small_shards):
    rng = np.random.default_rng(2)
    d = {"L2": _maps(), "logits": (rng.standard_normal((40, 3, 6)) * 4).astype(np.float32),
         "labels": rng.integers(0, 6, 40)}
    g = _write_int8(tmp_path / "g", d)
    assert g.status() == "ok"
    # plain zarr: int8 values and float32 scales beside them, the scales in the values' rows
    z = zarr.open_group(str(tmp_path / "g"), mode="r")
    assert z["L2"].dtype == np.int8 and z[scale_name("L2")].dtype == np.float32
    assert z[scale_name("L2")].shape == (40, 3, 2) and z[scale_name("logits")].shape == (40, 3, 1)
    assert z[scale_name("L2")].shards[0] == z["L2"].shards[0] < 40  # several shards, aligned
    expect = {}
    for k in ("L2", "logits"):
        q, s = quantise(d[k])
        np.testing.assert_array_equal(z[k][...], q)
        np.testing.assert_array_equal(z[scale_name(k)][...], s)
        expect[k] = dequantise(torch.from_numpy(q), torch.from_numpy(s))
    whole = g.tensors(g.load())
    assert set(whole) == {"L2", "logits", "labels"}  # the scales are multiplied in
    for k in ("L2", "logits"):
        assert whole[k].dtype == torch.float32 and torch.equal(whole[k], expect[k])
    # streamed: the rows of a shuffled (sample, view) order, bitwise the whole reader's
    order = np.stack([rng.permutation(np.repeat(np.arange(40), 3)),
                      rng.integers(0, 3, 120)], axis=1)
    got = {k: [] for k in ("L2", "logits")}
    for b in TargetStream(g.open_read(), ["L2", "logits"], order, 16, chunk_rows=4, window=3):
        for k in got:
            got[k].append(b[k])
    idx, view = torch.from_numpy(order[:, 0]), torch.from_numpy(order[:, 1])
    for k in got:
        streamed = torch.cat(got[k])
        assert streamed.dtype == torch.float32
        assert torch.equal(streamed, whole[k][idx, view])
    # a resident (whole) array beside streamed ones: the same bits as well
    res = g.tensors(g.load(["logits"]))
    b = next(iter(TargetStream(g.open_read(), ["L2", "logits"], order, 120, chunk_rows=4,
                               window=10, resident=res)))
    assert torch.equal(b["logits"], whole["logits"][idx, view])
    assert torch.equal(b["L2"], whole["L2"][idx, view])


def test_int8_write_resumes_with_its_scales(tmp_path, small_shards):
    """A killed int8 write resumes at a shard both the values and the scales finished."""
    d = {"L2": _maps(), "logits": np.ones((40, 3, 6), np.float32),
         "labels": np.arange(40) % 6}
    g = CacheGroup(tmp_path / "g", {"x": 1})
    spec = {"L2": (d["L2"].shape, "int8"), "logits": (d["logits"].shape, "int8"),
            "labels": ((40,), "int64")}
    w = g.begin(spec)
    w.append("L2", d["L2"][:29])  # then killed
    at = w.cursor("L2")
    assert 0 < at < 29 and at == w.held()[scale_name("L2")]
    w = g.begin(spec)  # resumed
    assert w.cursor("L2") == at
    w.append("L2", d["L2"][at:], start=at)
    w.append("logits", d["logits"])
    w.append("labels", d["labels"])
    w.close()
    q, s = quantise(d["L2"])
    np.testing.assert_array_equal(g.load(["L2"])["L2"], q)
    np.testing.assert_array_equal(g.load([scale_name("L2")])[scale_name("L2")], s)


# --------------------------------------------------------------------------- top-K


def test_topk_keeps_the_top_logits_exactly_and_the_row_minimum_elsewhere():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy((rng.standard_normal((12, 10)) * 3).astype(np.float32))
    packed, index = topk_pack(logits, 5)
    assert packed.shape == (12, 6) and index.shape == (12, 5)
    full = topk_unpack(packed, index, 10)
    top = logits.topk(5, dim=1)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top.indices, True)
    assert torch.equal(full[kept], logits[kept])  # the kept logits exact
    low = logits.min(dim=1, keepdim=True).values.expand_as(logits)
    assert torch.equal(full[~kept], low[~kept])  # the rest: the row's minimum
    # soft-CE from the expanded targets against a float64 reference
    student = torch.from_numpy(rng.standard_normal((12, 10)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, 12))
    cfg = KDLossConfig(ce_weight=0.0, soft_weight=1.0, temperature=2.0, level_weights=())
    _, terms = kd_loss_reference(student, full, labels, [], [], cfg)
    t64 = logits.double().numpy()
    t64 = np.where(kept.numpy(), t64, t64.min(axis=1, keepdims=True))
    p = np.exp(t64 / 2 - t64.max(axis=1, keepdims=True) / 2)
    p /= p.sum(axis=1, keepdims=True)
    s64 = student.double().numpy() / 2
    logq = s64 - s64.max(axis=1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(axis=1, keepdims=True))
    ref = 4 * float(-(p * logq).sum(axis=1).mean())  # T^2 * soft-CE
    assert terms["kd"].item() == pytest.approx(ref, rel=1e-6, abs=1e-7)
    # (and top-K changed it: the reference is not the full-logit soft-CE)
    full_ref = 4 * float(-(F.softmax(logits.double() / 2, 1).numpy() * logq).sum(axis=1).mean())
    assert abs(ref - full_ref) > 1e-3


# --------------------------------------------------------------------------- experiment


def test_int8_topk_rebuilds_the_targets_says_why_and_trains(ws, capsys):
    from mlfd.stages.cache import teacher_group
    from mlfd.stages.targets import target_group
    from mlfd.workspace import Workspace

    fp16 = target_group(Workspace.open(ws), 2, "alpha")
    fp16_bytes = fp16.load()["logits"].nbytes
    edit_experiment(ws, "cache", dtype="int8", logits_topk=2)
    code, out, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", "-n", *LOCAL)
    assert code == 0, err
    lines = (out + err).splitlines()
    [targets] = [ln for ln in lines if "joint targets L2" in ln]
    assert targets.lstrip().startswith("1.")  # the first step: nothing upstream is redone
    assert "alpha: stale: dtype float16 → int8" in targets and "logits_topk" in targets
    # the teacher-embedding cache stays float16: neither it nor the joint teacher is redone
    assert any(ln.lstrip().startswith("=") and "teacher embeddings L2" in ln for ln in lines)
    assert any(ln.lstrip().startswith("=") and "joint teacher L2" in ln for ln in lines)
    ws_ = Workspace.open(ws)
    assert teacher_group(ws_, 2, "alpha", "train").status() == "ok"
    code, out, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", *LOCAL)
    assert code == 0, err
    g = target_group(Workspace.open(ws), 2, "alpha")
    assert g.status() == "ok"
    assert g.dtypes()["logits"] == "int8" and g.dtypes()["logits_index"] == "int16"
    raw = g.load()
    n, v = raw["labels"].shape[0], raw["logits"].shape[1]
    assert raw["logits"].shape == (n, v, 3) and raw["logits_index"].shape == (n, v, 2)
    assert raw["logits"].nbytes < fp16_bytes
    fp = json.loads((ws_.student_dir("alpha", 2) / "last.json").read_text())["fingerprint"]
    # streamed (a tiny cache memory): the stream reads int8 values, scales and indices
    code, out, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha",
                         "--cache-memory", "1KiB", *LOCAL)
    assert code == 0, err
    assert "streaming" in out + err
    streamed = json.loads((ws_.student_dir("alpha", 2) / "last.json").read_text())
    assert streamed["fingerprint"] != fp and streamed["complete"]
    exp = yaml.safe_load((ws / "experiment.yaml").read_text())
    assert exp["cache"]["dtype"] == "int8" and exp["cache"]["logits_topk"] == 2


def _demo_targets(n=3000, views=4):
    """Targets of the demo's shape (3000 images x 4 views; logits, L1 (128,), L2 (128, 2, 2))
    from the demo's joint teacher (its L2 architecture, seeded weights) over ReLU features
    of the demo teachers' L2 shapes."""
    from mlfd.models.joint import JointTeacher

    torch.manual_seed(0)
    teacher = [[(256,), (64, 2, 2)], [(64,), (64, 2, 2)], [(64,), (64, 4, 4)]]
    joint = JointTeacher(teacher, [10, 10, 10], 2, width=128, embed_dim=128).eval()
    feats = [torch.relu(torch.randn(n * views, *t[1])) for t in teacher]
    with torch.no_grad():
        l1, l2 = joint(feats)
        logits = joint.logits(l1, 0)
    return {"logits": logits.reshape(n, views, -1), "L1": l1.reshape(n, views, -1),
            "L2": l2.reshape(n, views, *l2.shape[1:]),
            "labels": torch.randint(0, 10, (n,)).numpy()}


def test_int8_targets_are_at_least_1_5x_smaller_than_float16(tmp_path):
    d = _demo_targets()
    assert d["L2"].shape == (3000, 4, 128, 2, 2)
    sizes = {}
    for dtype in ("float16", "int8"):
        g = CacheGroup(tmp_path / dtype / "targets-L2.zarr" / "mnist-mini" / "train", {"x": 1})
        w = g.begin({k: (tuple(v.shape), "int64" if k == "labels" else dtype)
                     for k, v in d.items()})
        for k, v in d.items():
            w.append(k, v)
        w.close()
        sizes[dtype] = g.nbytes()  # the whole group: values, scales, metadata, manifest
        back = g.tensors(g.load())
        for k in ("logits", "L1", "L2"):  # close to the values either way
            err = (back[k].float() - d[k]).abs().max().item()
            assert err <= d[k].abs().max().item() / 100
    assert sizes["float16"] / sizes["int8"] >= 1.5, sizes
