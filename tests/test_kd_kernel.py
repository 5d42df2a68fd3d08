"""The fused Triton KD loss against a float64 PyTorch oracle (runs under TRITON_INTERPRET=1 on CPU).

Inputs are fresh random draws each run; the seed is part of every failure message.
Tiny tiles (monkeypatched) push small shapes through the multi-block, masked-edge and
two-sweep (wide C) code paths that the GPU takes at real sizes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import mlfd.losses.kd as kd_mod
from mlfd.losses.kd import KDLossConfig, kd_loss, kd_loss_reference, term_names

kd_kernel = pytest.importorskip("mlfd_kernels.kd_loss")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (rtol, atol as a fraction of the reference gradient's max magnitude); math is fp32 in every
# case, so the loss is held to fp32 accuracy and only stored gradients carry the dtype's rounding
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 4e-3), torch.float16: (1e-3, 5e-4)}
LOSS_RTOL = 2e-5


@pytest.fixture
def seed():
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


@pytest.fixture(params=[16, None], ids=["tile16", "tiledefault"])
def tile(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(kd_kernel, "_INTERP_TILE", request.param)
        monkeypatch.setattr(kd_kernel, "_GPU_TILE", request.param)
    return request.param


def make_inputs(B, C, dims, dtype, scale=3.0, feat_dtype=None):
    feat_dtype = feat_dtype or dtype
    s = (torch.randn(B, C) * scale).to(dtype).requires_grad_()
    t = (torch.randn(B, C) * scale).to(dtype).requires_grad_()
    y = torch.randint(0, C, (B,))
    us = [torch.randn(B, *d).to(feat_dtype).requires_grad_() for d in dims]
    vs = [torch.randn(B, *d).to(feat_dtype).requires_grad_() for d in dims]
    return s, t, y, us, vs


def reference(s, t, y, us, vs, cfg, upstream):
    s64 = s.detach().double().requires_grad_()
    u64 = [u.detach().double().requires_grad_() for u in us]
    loss, terms = kd_loss_reference(s64, t.detach().double(), y, u64,
                                    [v.detach().double() for v in vs], cfg)
    (loss * upstream).backward()
    return loss.detach(), terms, s64.grad, [u.grad for u in u64]


def close(actual, expected, rtol, atol_frac, what, seed):
    expected = expected.double()
    atol = atol_frac * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} (seed {seed}): {m}")


def check_against_reference(s, t, y, us, vs, cfg, seed, upstream=3.0):
    dtype = s.dtype
    loss, terms = kd_kernel.kd_loss_triton(s, t, y, us, vs, cfg)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad
    assert list(terms) == term_names(len(us))
    for v in terms.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad
    (loss * upstream).backward()

    ref_loss, ref_terms, ref_gs, ref_gu = reference(s, t, y, us, vs, cfg, upstream)
    scale = max(abs(ref_loss.item()), 1e-3)
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=LOSS_RTOL, atol=1e-6 * scale,
                               msg=lambda m: f"loss (seed {seed}): {m}")
    for name in ref_terms:
        torch.testing.assert_close(terms[name].double(), ref_terms[name].double(),
                                   rtol=LOSS_RTOL, atol=2e-6 * scale,
                                   msg=lambda m, n=name: f"term {n} (seed {seed}): {m}")
    # the logged terms add up to the loss
    total = torch.stack(list(terms.values())).sum()
    torch.testing.assert_close(total, loss.detach(), rtol=1e-6, atol=1e-6 * scale)

    rtol, afrac = GRAD_TOL[dtype]
    assert s.grad is not None and s.grad.dtype == dtype and s.grad.shape == s.shape
    close(s.grad, ref_gs, rtol, afrac, "grad student logits", seed)
    for k, (u, g) in enumerate(zip(us, ref_gu, strict=True)):
        r, a = GRAD_TOL[u.dtype]
        assert u.grad is not None and u.grad.dtype == u.dtype and u.grad.shape == u.shape
        close(u.grad, g, r, a, f"grad u_{k + 1}", seed)
    assert t.grad is None
    for v in vs:
        assert v.grad is None


CASES = [
    # B, C, level shapes, T, eps, g, a, b_k
    (1, 7, [], 1.0, 0.0, 1.0, 1.0, ()),
    (5, 37, [(19,)], 2.0, 0.1, 1.0, 1.0, (0.7,)),
    (3, 100, [(6,), (3, 5, 7)], 5.0, 0.2, 0.2, 0.8, (1.3, 0.4)),
    (7, 23, [(33,), (2, 3, 3), (5,)], 2.0, 0.0, 1.0, 1.0, (0.5, 2.0, 1.0)),
    (6, 51, [(10,), (3, 2, 2)], 2.0, 0.1, 1.0, 0.0, (0.0, 1.5)),  # a = 0 and b_1 = 0
]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[f"K{len(c[2])}-B{c[0]}-C{c[1]}" for c in CASES])
def test_matches_float64_reference(case, dtype, tile, seed):
    B, C, dims, T, eps, g, a, b = case
    cfg = KDLossConfig(ce_weight=g, soft_weight=a, temperature=T, level_weights=b,
                       label_smoothing=eps)
    s, t, y, us, vs = make_inputs(B, C, dims, dtype)
    check_against_reference(s, t, y, us, vs, cfg, seed, upstream=3.0)
    for u, bk in zip(us, b, strict=True):
        if bk == 0.0:
            assert torch.count_nonzero(u.grad) == 0


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_large_logits_are_stable(T, dtype, tile, seed):
    cfg = KDLossConfig(temperature=T, level_weights=(1.0,), label_smoothing=0.1)
    s, t, y, us, vs = make_inputs(6, 45, [(13,)], dtype, scale=1e4)
    loss, terms = kd_kernel.kd_loss_triton(s, t, y, us, vs, cfg)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    s.grad = None
    for u in us:
        u.grad = None
    check_against_reference(s, t, y, us, vs, cfg, seed, upstream=1.0)
    assert torch.isfinite(s.grad.float()).all()


def test_non_contiguous_inputs(tile, seed):
    B, C = 5, 29
    cfg = KDLossConfig(temperature=2.0, level_weights=(0.5, 1.0, 2.0, 0.3), label_smoothing=0.1)
    s_big = torch.randn(B, C + 8).requires_grad_()
    s = s_big[:, 3:3 + C]  # student logits: row stride != C
    t = torch.randn(C, B).t()  # teacher logits transposed (column stride != 1)
    y = torch.randint(0, C, (B,))
    dims = [(11,), (9,), (3, 2, 2), (4, 3)]
    us = [torch.randn(B, *d).requires_grad_() for d in dims]
    vs = [
        torch.randn(11, B).t(),  # transposed: read in place through strides
        torch.randn(B, 18)[:, ::2],  # column stride 2
        torch.randn(B, 2, 2, 3).permute(0, 3, 1, 2),  # NHWC map viewed as NCHW
        torch.randn(2 * B, 4, 3)[::2],  # every other sample: row stride 24
    ]
    assert not any(v.is_contiguous() for v in vs)
    loss, terms = kd_kernel.kd_loss_triton(s, t, y, us, vs, cfg)
    (loss * -0.5).backward()
    ref_loss, ref_terms, ref_gs, ref_gu = reference(s, t, y, us, vs, cfg, -0.5)
    close(loss, ref_loss, LOSS_RTOL, 1e-7, "loss", seed)
    for name in ref_terms:
        close(terms[name], ref_terms[name], LOSS_RTOL, 1e-7, name, seed)
    close(s_big.grad[:, 3:3 + C], ref_gs, 1e-5, 1e-6, "grad s", seed)
    assert torch.count_nonzero(s_big.grad[:, :3]) == 0
    for k, (u, g) in enumerate(zip(us, ref_gu, strict=True)):
        close(u.grad, g, 1e-5, 1e-6, f"grad u_{k + 1}", seed)


def test_mixed_dtypes_per_level(tile, seed):
    cfg = KDLossConfig(temperature=2.0, level_weights=(1.0, 0.5), label_smoothing=0.05)
    B, C = 4, 21
    s = torch.randn(B, C).half().requires_grad_()
    t = torch.randn(B, C).bfloat16()
    y = torch.randint(0, C, (B,))
    us = [torch.randn(B, 12).bfloat16().requires_grad_(), torch.randn(B, 2, 5).requires_grad_()]
    vs = [torch.randn(B, 12).half(), torch.randn(B, 2, 5).bfloat16()]
    check_against_reference(s, t, y, us, vs, cfg, seed, upstream=2.0)


def test_more_levels_than_slots(tile, seed):
    # K > MAX_SLOTS: later levels go through additional launches of the same kernel
    K = kd_kernel.MAX_SLOTS + 2
    dims = [(3 + 2 * k,) for k in range(K)]
    cfg = KDLossConfig(temperature=2.0, level_weights=tuple(0.3 * (k + 1) for k in range(K)))
    s, t, y, us, vs = make_inputs(3, 10, dims, torch.float32)
    check_against_reference(s, t, y, us, vs, cfg, seed, upstream=0.25)


def test_deterministic(tile, seed):
    cfg = KDLossConfig(temperature=2.0, level_weights=(1.0, 0.5), label_smoothing=0.1)
    s, t, y, us, vs = make_inputs(9, 70, [(40,), (3, 3, 3)], torch.float32)
    outs = []
    for _ in range(2):
        for x in [s, *us]:
            x.grad = None
        loss, terms = kd_kernel.kd_loss_triton(s, t, y, us, vs, cfg)
        (loss * 3.0).backward()
        outs.append([loss.detach().clone(), *[v.clone() for v in terms.values()],
                     s.grad.clone(), *[u.grad.clone() for u in us]])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b), f"seed {seed}: rerun differs"


def test_backward_scales_by_upstream(seed):
    cfg = KDLossConfig(temperature=2.0, level_weights=(1.0,))
    s, t, y, us, vs = make_inputs(4, 12, [(8,)], torch.float32)
    loss, _ = kd_kernel.kd_loss_triton(s, t, y, us, vs, cfg)
    loss.backward()
    g1 = (s.grad.clone(), us[0].grad.clone())
    s.grad = None
    us[0].grad = None
    loss, _ = kd_kernel.kd_loss_triton(s, t, y, us, vs, cfg)
    (loss * 3.0).backward()
    torch.testing.assert_close(s.grad, 3.0 * g1[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(us[0].grad, 3.0 * g1[1], rtol=1e-6, atol=0)
    assert torch.count_nonzero(g1[0]) > 0 and torch.count_nonzero(g1[1]) > 0


def test_kd_loss_routes_triton_backend(monkeypatch, seed):
    calls = []
    real = kd_kernel.kd_loss_triton

    def spy(*args):
        calls.append(len(args))
        return real(*args)

    monkeypatch.setattr(kd_kernel, "kd_loss_triton", spy)
    assert kd_mod.BACKENDS["triton"] is not kd_mod.kd_loss_reference
    cfg = KDLossConfig(ce_weight=0.2, soft_weight=0.8, temperature=2.0,
                       level_weights=(1.0, 0.5), label_smoothing=0.1)
    s, t, y, us, vs = make_inputs(6, 30, [(16,), (4, 2, 2)], torch.float32)
    got_loss, got_terms = kd_loss(s, t, y, us, vs, cfg, backend="triton")
    assert calls == [6]
    got_loss.backward()
    grads = [s.grad.clone()] + [u.grad.clone() for u in us]
    for x in [s, *us]:
        x.grad = None
    ref_loss, ref_terms = kd_loss(s, t, y, us, vs, cfg, backend="torch")
    ref_loss.backward()
    torch.testing.assert_close(got_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert got_terms.keys() == ref_terms.keys()
    for name in ref_terms:
        torch.testing.assert_close(got_terms[name], ref_terms[name], rtol=1e-5, atol=1e-6)
    for g, x in zip(grads, [s, *us], strict=True):
        torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-7)


# -- masked teacher classes (-inf logits) ---------------------------------------------------
# With tile 16 and C = 17 the logits take the two-sweep path: chunk [0, 16), then [16, 17).


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_teacher_chunk_all_neg_inf(dtype, tile, seed):
    cfg = KDLossConfig(temperature=2.0, level_weights=(0.5,), label_smoothing=0.1)
    s, t, y, us, vs = make_inputs(4, 17, [(5,)], dtype)
    with torch.no_grad():
        t[0, :16] = float("-inf")  # whole first chunk: all mass on column 16
        t[1, 3:9] = float("-inf")  # part of the first chunk
        t[2, 16] = float("-inf")  # the whole second chunk
    check_against_reference(s, t, y, us, vs, cfg, seed, upstream=2.0)
    assert torch.isfinite(s.grad.float()).all()


def test_teacher_chunk_all_neg_inf_hand_computed(monkeypatch):
    monkeypatch.setattr(kd_kernel, "_INTERP_TILE", 16)
    monkeypatch.setattr(kd_kernel, "_GPU_TILE", 16)
    C, T, a = 17, 2.0, 0.5
    s = torch.zeros(1, C, requires_grad=True)
    t = torch.full((1, C), float("-inf"))
    t[0, 16] = 0.3
    cfg = KDLossConfig(ce_weight=1.0, soft_weight=a, temperature=T)
    loss, terms = kd_kernel.kd_loss_triton(s, t, torch.tensor([4]), [], [], cfg)
    loss.backward()
    # uniform student: CE = softCE = log 17; p_t is one-hot on column 16
    assert terms["ce"].item() == pytest.approx(math.log(C), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(a * T * T * math.log(C), rel=1e-6)
    expected = torch.full((1, C), (1.0 + a * T) / C)
    expected[0, 4] -= 1.0
    expected[0, 16] -= a * T
    torch.testing.assert_close(s.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                            "ignore:divide by zero:RuntimeWarning")  # the expected NaN
def test_all_neg_inf_teacher_row_is_nan_like_reference(tile, seed):
    # no teacher distribution exists: NaN KD term and gradient row, as F.softmax gives
    cfg = KDLossConfig(temperature=2.0, level_weights=(1.0,), label_smoothing=0.1)
    s, t, y, us, vs = make_inputs(3, 17, [(4,)], torch.float32)
    with torch.no_grad():
        t[1] = float("-inf")
    loss, terms = kd_kernel.kd_loss_triton(s, t, y, us, vs, cfg)
    loss.backward()
    ref_loss, ref_terms, ref_gs, ref_gu = reference(s, t, y, us, vs, cfg, 1.0)
    assert ref_loss.isnan() and loss.isnan() and terms["kd"].isnan()
    for name in ["ce", "mse_L1"]:
        close(terms[name], ref_terms[name], LOSS_RTOL, 1e-7, name, seed)
    assert s.grad[1].isnan().all() and ref_gs[1].isnan().all()
    close(s.grad[[0, 2]], ref_gs[[0, 2]], 1e-5, 1e-6, "grad s (finite rows)", seed)
    close(us[0].grad, ref_gu[0], 1e-5, 1e-6, "grad u_1", seed)


# -- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [10, -1, -101, 2**40])
def test_out_of_range_labels_raise(bad):
    s, t, y, us, vs = make_inputs(3, 10, [], torch.float32)
    y[1] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 10\)") as err:
        kd_kernel.kd_loss_triton(s, t, y, us, vs, KDLossConfig())
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def _both_backends(s, t, y, us, vs, cfg):
    out = []
    for backend in ["triton", "torch"]:
        for x in [s, *us]:
            x.grad = None
        loss, terms = kd_loss(s, t, y, us, vs, cfg, backend=backend)
        (loss * 1.5).backward()
        out.append((loss.detach(), terms, s.grad.clone(), [u.grad.clone() for u in us]))
    return out


def test_ignored_labels_match_torch_backend(tile, seed):
    # -100 is F.cross_entropy's ignore_index: out of CE and its mean, still in KD and MSE
    assert kd_kernel.IGNORE_INDEX == kd_mod.IGNORE_INDEX == -100
    cfg = KDLossConfig(ce_weight=0.7, temperature=2.0, level_weights=(1.0,), label_smoothing=0.1)
    s, t, y, us, vs = make_inputs(5, 19, [(7,)], torch.float32)
    y[[1, 3]] = -100
    (loss, terms, gs, gu), (ref_loss, ref_terms, ref_gs, ref_gu) = _both_backends(
        s, t, y, us, vs, cfg)
    close(loss, ref_loss, LOSS_RTOL, 1e-7, "loss", seed)
    for name in ref_terms:
        close(terms[name], ref_terms[name], LOSS_RTOL, 1e-7, name, seed)
    close(gs, ref_gs, 1e-5, 1e-6, "grad s", seed)
    close(gu[0], ref_gu[0], 1e-5, 1e-6, "grad u_1", seed)


def test_all_labels_ignored_match_torch_backend(tile, seed):
    # CE is 0/0 = NaN with a zero gradient in F.cross_entropy; the kernel mirrors both
    cfg = KDLossConfig(temperature=2.0, level_weights=(1.0,), label_smoothing=0.1)
    s, t, y, us, vs = make_inputs(3, 19, [(4,)], torch.float32)
    y[:] = -100
    (loss, terms, gs, gu), (ref_loss, ref_terms, ref_gs, ref_gu) = _both_backends(
        s, t, y, us, vs, cfg)
    assert loss.isnan() and ref_loss.isnan() and terms["ce"].isnan() and ref_terms["ce"].isnan()
    for name in ["kd", "mse_L1"]:
        close(terms[name], ref_terms[name], LOSS_RTOL, 1e-7, name, seed)
    close(gs, ref_gs, 1e-5, 1e-6, "grad s", seed)
    close(gu[0], ref_gu[0], 1e-5, 1e-6, "grad u_1", seed)


# -- input validation (host-side, before any launch) ----------------------------------------
B0, C0 = 3, 5
BAD_INPUTS = [
    ("student-1d", lambda: {"s": torch.randn(C0)}, "student logits must be"),
    ("empty-batch", lambda: {"s": torch.randn(0, C0), "t": torch.randn(0, C0),
                             "y": torch.zeros(0, dtype=torch.long)}, "non-empty"),
    ("teacher-classes", lambda: {"t": torch.randn(B0, C0 + 1)}, "teacher logits"),
    ("teacher-batch", lambda: {"t": torch.randn(B0 + 1, C0)}, "teacher logits"),
    ("labels-length", lambda: {"y": torch.zeros(B0 + 1, dtype=torch.long)}, "labels"),
    ("labels-2d", lambda: {"y": torch.zeros(B0, 1, dtype=torch.long)}, "labels"),
    ("labels-float", lambda: {"y": torch.zeros(B0)}, "labels must be integer"),
    ("level-count", lambda: {"vs": []}, "levels"),
    ("level-batch", lambda: {"us": [torch.randn(B0 + 1, 6)]}, "level L1"),
    ("level-width", lambda: {"vs": [torch.randn(B0, 7)]}, "level L1"),
    ("level-empty", lambda: {"us": [torch.randn(B0, 0)], "vs": [torch.randn(B0, 0)]}, "level L1"),
    ("student-dtype", lambda: {"s": torch.zeros(B0, C0, dtype=torch.long)}, "student logits has"),
    ("teacher-dtype", lambda: {"t": torch.zeros(B0, C0, dtype=torch.int32)}, "teacher logits has"),
    ("level-dtype", lambda: {"vs": [torch.zeros(B0, 6, dtype=torch.long)]}, "L1 teacher has"),
    ("teacher-device", lambda: {"t": torch.randn(B0, C0, device="meta")}, "teacher logits is on"),
    ("labels-device", lambda: {"y": torch.zeros(B0, dtype=torch.long, device="meta")}, "labels is"),
    ("level-device", lambda: {"us": [torch.randn(B0, 2, 3, device="meta")]}, "L1 student is on"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_rejects_mismatched_inputs(make, match):
    args = {"s": torch.randn(B0, C0), "t": torch.randn(B0, C0),
            "y": torch.randint(0, C0, (B0,)), "us": [torch.randn(B0, 2, 3)],
            "vs": [torch.randn(B0, 6)]}  # per-sample sizes match: reshaped to (B, 6) each
    args.update(make())
    cfg = KDLossConfig(level_weights=(1.0,))
    with pytest.raises(ValueError, match=match) as err:
        kd_kernel.kd_loss_triton(args["s"], args["t"], args["y"], args["us"], args["vs"], cfg)
    assert "\n" not in str(err.value)


def test_broadcast_views_are_read_in_place(tile, seed):
    # zero strides (expand) are valid layouts, not mismatches: read in place, never written
    cfg = KDLossConfig(temperature=2.0, level_weights=(1.0, 0.5))
    B, C = 4, 19
    s, _, y, us, _ = make_inputs(B, C, [(6,), (2, 3)], torch.float32)
    t = torch.randn(1, C).expand(B, C)
    vs = [torch.randn(6).expand(B, 6), torch.randn(1, 2, 1).expand(B, 2, 3)]
    check_against_reference(s, t, y, us, vs, cfg, seed, upstream=1.0)
