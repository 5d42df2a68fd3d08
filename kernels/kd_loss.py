"""Fused multi-level KD loss (paper Eq. 3, design §4) as one Triton pass, Liger-Kernel style.

    L = g*CE_ls(y, s) + a*T^2*softCE(softmax(t/T), log_softmax(s/T)) + sum_k b_k*MSE(u_k, v_k)

Design
------
* One launch of ``_kd_fused_kernel`` over a 1-D grid computes everything. The first
  ``n_logit`` programs each own ``BLOCK_M`` rows of the logits; every later program owns one
  ``(BLOCK_R rows x BLOCK_D columns)`` tile of one level. Seen per sample, the tiles enumerate
  the virtual row ``[u_1 | u_2 | ... | u_K]`` chunk by chunk, but each level is read in place
  through its own base pointer and (row, column) strides, so no concatenated copy exists and
  teacher views (transposed, sliced) are read without ``.contiguous()``.
* Level slots are unrolled with ``tl.constexpr`` up to ``MAX_SLOTS`` (4) per launch: each slot
  gets its own pointer arguments, so Triton specialises dtype, 16-byte alignment and unit
  column stride per level (vectorised loads), and tile shapes can differ per level. A program
  finds its slot by comparing its id with the slots' cumulative tile counts. For K > 4 the
  host loops: further launches of the same kernel carry levels 5-8, 9-12, ... without logits.
* Levels are viewed as (B, D_k) with ``reshape``; only where no strided 2-D view exists (e.g.
  an NHWC map permuted to NCHW) does that copy, costing one B x D_k buffer for that input.
* Logits: for C <= BLOCK_C the row block is loaded once and kept in registers; wider C uses
  two sweeps over column chunks (online max/sum-exp, then outputs), so any C works; a chunk
  whose columns are all -inf (masked classes) leaves the running stats as they were.
  Stats are kept for s, s/T (sharing max(s)) and t/T; each loss term is accumulated as
  ``sum_c w_c * (log z - (x_c - m))`` which stays accurate for logits of magnitude 1e4.
* Gradients ``dL/ds`` and ``dL/du_k`` are written during forward in the input dtype (fp32
  math throughout); ``backward`` only rescales them in place by the scalar grad_output, so a
  second backward through the same graph (retain_graph) is refused. Teacher inputs get no
  gradient.
* Labels follow ``F.cross_entropy``: ``IGNORE_INDEX`` (-100) drops a row from the CE term and
  its mean (the KD and MSE terms still average over all B rows); any other label outside
  [0, C) raises. A teacher row that is all -inf has no distribution: as in the torch
  reference, the KD term and that row's gradient are NaN.
* The entry point checks shapes, dtypes and devices on the host (the kernel trusts them and
  would read out of bounds) and scans the labels on device (tiny reductions over B labels
  and one host sync per call, which also yields the CE denominator).
* Determinism: no atomics. Every program writes its already-weighted partial sum into its
  own slot of a zeroed ``(n_terms, P)`` buffer; ``_finalize_kernel`` (one program) sums each
  row in a fixed order into the per-term values and the total, so reruns are bitwise equal.
* Runs on CUDA and, under ``TRITON_INTERPRET=1``, on CPU tensors (larger tiles there because
  the interpreter's cost grows with the number of programs).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

MAX_SLOTS = 4  # level slots unrolled per launch
_GPU_TILE = 4096  # elements per program tile on GPU (16/thread with 8 warps)
_INTERP_TILE = 1 << 16  # fewer, larger programs under the interpreter
IGNORE_INDEX = -100  # F.cross_entropy's default, which the torch backend uses
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _logits_out(s, t, cols, cmask, y, m_s, m_t, inv_zs, inv_zsT, inv_zt, log_zs, log_zsT,
                inv_T, ce_w, aT_B, one_m_eps, eps_C):
    """Gradient tile and per-row loss contributions for one chunk of columns, given final stats.

    ``ce_w`` is the per-row CE weight: g / (labelled rows), or 0 on ignored rows.
    """
    ds = s - m_s[:, None]  # <= 0; -inf on padding columns
    e_s = tl.exp(ds) * inv_zs[:, None]
    e_sT = tl.exp(ds * inv_T) * inv_zsT[:, None]
    p_t = tl.exp((t - m_t[:, None]) * inv_T) * inv_zt[:, None]
    q = tl.where(cols[None, :] == y[:, None], one_m_eps + eps_C, eps_C)
    grad = ce_w[:, None] * (e_s - q) + aT_B * (e_sT - p_t)
    cm = cmask[None, :]
    ds = tl.where(cm, ds, 0.0)  # keeps 0 * inf out of the padding lanes
    ce = tl.sum(tl.where(cm, q * (log_zs[:, None] - ds), 0.0), axis=1)
    kd = tl.sum(tl.where(cm, p_t * (log_zsT[:, None] - ds * inv_T), 0.0), axis=1)
    return grad, ce, kd


@triton.jit
def _logits_block(blk, s_ptr, t_ptr, y_ptr, gs_ptr, B, C, s_rs, t_rs,
                  inv_T, g_N, aT_B, one_m_eps, eps_C,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr,
                  IGNORE: tl.constexpr):
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
    labelled = rmask & (y != IGNORE)  # ignored rows add neither CE nor its gradient
    ce_w = tl.where(labelled, g_N, 0.0)
    offs = tl.arange(0, BLOCK_C)
    s_row = s_ptr + r64[:, None] * s_rs
    t_row = t_ptr + r64[:, None] * t_rs
    g_row = gs_ptr + r64[:, None] * C
    if ONE_PASS:
        cmask = offs < C
        mask = rmask[:, None] & cmask[None, :]
        # rows past B load zeros (finite stats); only padding columns become -inf
        s = tl.load(s_row + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.where(cmask[None, :], s, float("-inf"))
        t = tl.where(cmask[None, :], t, float("-inf"))
        m_s = tl.max(s, axis=1)
        m_t = tl.max(t, axis=1)
        ds = s - m_s[:, None]
        z_s = tl.sum(tl.exp(ds), axis=1)
        z_sT = tl.sum(tl.exp(ds * inv_T), axis=1)
        z_t = tl.sum(tl.exp((t - m_t[:, None]) * inv_T), axis=1)
        grad, ce, kd = _logits_out(s, t, offs, cmask, y, m_s, m_t, 1.0 / z_s, 1.0 / z_sT,
                                   1.0 / z_t, tl.log(z_s), tl.log(z_sT),
                                   inv_T, ce_w, aT_B, one_m_eps, eps_C)
        tl.store(g_row + offs[None, :], grad.to(gs_ptr.dtype.element_ty), mask=mask)
    else:
        # sweep 1: online max / sum-exp for s, s/T (same max, scaled) and t/T
        m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
        z_s = tl.zeros([BLOCK_M], tl.float32)
        z_sT = tl.zeros([BLOCK_M], tl.float32)
        z_t = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            cmask = cols < C
            mask = rmask[:, None] & cmask[None, :]
            s = tl.load(s_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.where(cmask[None, :], s, float("-inf"))
            t = tl.where(cmask[None, :], t, float("-inf"))
            ms_new = tl.maximum(m_s, tl.max(s, axis=1))
            mt_new = tl.maximum(m_t, tl.max(t, axis=1))
            # A row that has seen only -inf keeps max -inf; shifting by 0 instead avoids
            # -inf - -inf = NaN: its sums stay 0 until a finite max rescales them by exp(-inf).
            ms_ref = tl.where(ms_new == float("-inf"), 0.0, ms_new)
            mt_ref = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            ds = s - ms_ref[:, None]
            z_s = z_s * tl.exp(m_s - ms_ref) + tl.sum(tl.exp(ds), axis=1)
            z_sT = z_sT * tl.exp((m_s - ms_ref) * inv_T) + tl.sum(tl.exp(ds * inv_T), axis=1)
            z_t = z_t * tl.exp((m_t - mt_ref) * inv_T) + tl.sum(
                tl.exp((t - mt_ref[:, None]) * inv_T), axis=1)
            m_s = ms_new
            m_t = mt_new
        inv_zs = 1.0 / z_s
        inv_zsT = 1.0 / z_sT
        inv_zt = 1.0 / z_t
        log_zs = tl.log(z_s)
        log_zsT = tl.log(z_sT)
        ce = tl.zeros([BLOCK_M], tl.float32)
        kd = tl.zeros([BLOCK_M], tl.float32)
        # sweep 2: gradients and loss terms with the final stats
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            cmask = cols < C
            mask = rmask[:, None] & cmask[None, :]
            s = tl.load(s_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.where(cmask[None, :], s, float("-inf"))
            t = tl.where(cmask[None, :], t, float("-inf"))
            grad, ce_c, kd_c = _logits_out(s, t, cols, cmask, y, m_s, m_t, inv_zs, inv_zsT,
                                           inv_zt, log_zs, log_zsT,
                                           inv_T, ce_w, aT_B, one_m_eps, eps_C)
            tl.store(g_row + cols[None, :], grad.to(gs_ptr.dtype.element_ty), mask=mask)
            ce += ce_c
            kd += kd_c
    ce = tl.sum(tl.where(labelled, ce, 0.0), axis=0)
    kd = tl.sum(tl.where(rmask, kd, 0.0), axis=0)
    return ce, kd


@triton.jit
def _level_tile(tile, u_ptr, v_ptr, gu_ptr, B, D, su_r, su_c, sv_r, sv_c, gscale,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Squared-error sum of one (rows x cols) tile of a level; writes its gradient tile."""
    n_dblk = tl.cdiv(D, BLOCK_D)
    rows = (tile // n_dblk) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    u = tl.load(u_ptr + r64 * su_r + c * su_c, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + r64 * sv_r + c * sv_c, mask=mask, other=0.0).to(tl.float32)
    d = u - v  # zero on masked lanes
    tl.store(gu_ptr + r64 * D + c, (gscale * d).to(gu_ptr.dtype.element_ty), mask=mask)
    return tl.sum(tl.sum(d * d, axis=1), axis=0)


@triton.jit
def _kd_fused_kernel(
    part_ptr, P, lvl_row0,
    s_ptr, t_ptr, y_ptr, gs_ptr, B, C, s_rs, t_rs,
    inv_T, g_N, aT_B, one_m_eps, eps_C, ce_scale, kd_scale, n_logit,
    u0, v0, g0, D0, su0r, su0c, sv0r, sv0c, sc0, gs0, e0,
    u1, v1, g1, D1, su1r, su1c, sv1r, sv1c, sc1, gs1, e1,
    u2, v2, g2, D2, su2r, su2c, sv2r, sv2c, sc2, gs2, e2,
    u3, v3, g3, D3, su3r, su3c, sv3r, sv3c, sc3, gs3, e3,
    NUM_LEVELS: tl.constexpr, HAS_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr, IGNORE: tl.constexpr,
    BR0: tl.constexpr, BD0: tl.constexpr, BR1: tl.constexpr, BD1: tl.constexpr,
    BR2: tl.constexpr, BD2: tl.constexpr, BR3: tl.constexpr, BD3: tl.constexpr,
):
    # e_k: cumulative end (exclusive) of slot k's tiles in the grid, after the logit programs
    pid = tl.program_id(0)
    # constexpr guards stay separate ifs: they drop whole branches at compile time
    if HAS_LOGITS:  # noqa: SIM102
        if pid < n_logit:
            ce, kd = _logits_block(pid, s_ptr, t_ptr, y_ptr, gs_ptr, B, C, s_rs, t_rs,
                                   inv_T, g_N, aT_B, one_m_eps, eps_C,
                                   BLOCK_M, BLOCK_C, ONE_PASS, IGNORE)
            tl.store(part_ptr + pid, ce * ce_scale)
            tl.store(part_ptr + P + pid, kd * kd_scale)
    if NUM_LEVELS >= 1:  # noqa: SIM102
        if (pid >= n_logit) & (pid < e0):
            j = pid - n_logit
            sq = _level_tile(j, u0, v0, g0, B, D0, su0r, su0c, sv0r, sv0c, gs0, BR0, BD0)
            tl.store(part_ptr + lvl_row0 * P + j, sq * sc0)
    if NUM_LEVELS >= 2:  # noqa: SIM102
        if (pid >= e0) & (pid < e1):
            j = pid - e0
            sq = _level_tile(j, u1, v1, g1, B, D1, su1r, su1c, sv1r, sv1c, gs1, BR1, BD1)
            tl.store(part_ptr + (lvl_row0 + 1) * P + j, sq * sc1)
    if NUM_LEVELS >= 3:  # noqa: SIM102
        if (pid >= e1) & (pid < e2):
            j = pid - e1
            sq = _level_tile(j, u2, v2, g2, B, D2, su2r, su2c, sv2r, sv2c, gs2, BR2, BD2)
            tl.store(part_ptr + (lvl_row0 + 2) * P + j, sq * sc2)
    if NUM_LEVELS >= 4:  # noqa: SIM102
        if (pid >= e2) & (pid < e3):
            j = pid - e2
            sq = _level_tile(j, u3, v3, g3, B, D3, su3r, su3c, sv3r, sv3c, gs3, BR3, BD3)
            tl.store(part_ptr + (lvl_row0 + 3) * P + j, sq * sc3)


@triton.jit
def _finalize_kernel(part_ptr, terms_ptr, loss_ptr, n_terms, P, BLOCK_P: tl.constexpr):
    """Single program: fixed-order sums of each term's partials, then of the terms."""
    offs = tl.arange(0, BLOCK_P)
    total = tl.sum(tl.zeros([BLOCK_P], tl.float32), axis=0)
    for i in range(n_terms):
        acc = tl.zeros([BLOCK_P], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            acc += tl.load(part_ptr + i * P + p0 + offs, mask=p0 + offs < P, other=0.0)
        term = tl.sum(acc, axis=0)
        tl.store(terms_ptr + i, term)
        total += term
    tl.store(loss_ptr, total)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, D) view of x; reshape copies only when no strided 2-D view exists (e.g. permuted maps)."""
    return x.reshape(x.shape[0], -1)


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _kd_forward(s, t, y, us, vs, cfg, n_labelled):
    """Launches the fused pass; returns (loss, terms, grad_s, [grad_u_k])."""
    B, C = s.shape
    K = len(us)
    dev = s.device
    tile = _INTERP_TILE if _interpreted(dev) else _GPU_TILE
    num_warps = 8
    if s.stride(1) != 1:
        s = s.contiguous()
    if t.stride(1) != 1:
        t = t.contiguous()  # teacher logits are small (B x C): a copy costs little
    y = y.contiguous()

    block_c = min(_pow2(C), tile)
    block_m = min(max(1, tile // block_c), _pow2(B))
    n_logit = triton.cdiv(B, block_m)

    grad_s = torch.empty((B, C), dtype=s.dtype, device=dev)
    u2 = [_as_rows(u) for u in us]
    v2 = [_as_rows(v) for v in vs]
    grad_u = [torch.empty(u.shape, dtype=u.dtype, device=dev) for u in u2]
    shapes = []
    for u in u2:
        D = u.shape[1]
        bd = min(_pow2(D), tile)
        br = min(max(1, tile // bd), _pow2(B))
        shapes.append((D, br, bd, triton.cdiv(B, br) * triton.cdiv(D, bd)))

    n_terms = 2 + K
    P = max([n_logit] + [n for *_, n in shapes])
    part = torch.zeros((n_terms, P), dtype=torch.float32, device=dev)

    groups = [list(range(i, min(i + MAX_SLOTS, K))) for i in range(0, K, MAX_SLOTS)] or [[]]
    # launch on the inputs' GPU, not whichever is current
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        _launch(groups, part, P, n_logit, shapes, u2, v2, grad_u, s, t, y, grad_s, cfg,
                n_labelled, block_m, block_c, num_warps)
        terms = torch.empty(n_terms, dtype=torch.float32, device=dev)
        loss = torch.empty((), dtype=torch.float32, device=dev)
        _finalize_kernel[(1,)](part, terms, loss, n_terms, P,
                               BLOCK_P=min(_pow2(P), 1024), num_warps=4)
    grad_u = [gu.view(u.shape) for gu, u in zip(grad_u, us, strict=True)]
    return loss, terms, grad_s, grad_u


def _launch(groups, part, P, n_logit, shapes, u2, v2, grad_u, s, t, y, grad_s, cfg,
            n_labelled, block_m, block_c, num_warps):
    B, C = s.shape
    T = float(cfg.temperature)
    g = float(cfg.ce_weight)
    a = float(cfg.soft_weight)
    eps = float(cfg.label_smoothing)
    # CE is a mean over labelled rows; with none, F.cross_entropy's 0/0 is NaN (zero gradient)
    g_N = g / n_labelled if n_labelled else 0.0
    ce_scale = g / n_labelled if n_labelled else float("nan")
    for gi, lv in enumerate(groups):
        has_logits = gi == 0
        nl = n_logit if has_logits else 0
        slot_args, blocks = [], {}
        end = nl
        for j in range(MAX_SLOTS):
            if j < len(lv):
                k = lv[j]
                D, br, bd, n = shapes[k]
                u, v, gu = u2[k], v2[k], grad_u[k]
                end += n
                b = float(cfg.level_weights[k])
                slot_args += [u, v, gu, D, u.stride(0), u.stride(1), v.stride(0), v.stride(1),
                              b / (B * D), 2.0 * b / (B * D), end]
            else:
                br, bd = 1, 16
                slot_args += [s, t, grad_s, 1, 0, 1, 0, 1, 0.0, 0.0, end]
            blocks[f"BR{j}"] = br
            blocks[f"BD{j}"] = bd
        if end == 0:
            continue
        _kd_fused_kernel[(end,)](
            part, P, 2 + (lv[0] if lv else 0),
            s, t, y, grad_s, B, C, s.stride(0), t.stride(0),
            1.0 / T, g_N, a * T / B, 1.0 - eps, eps / C, ce_scale, a * T * T / B, nl,
            *slot_args,
            NUM_LEVELS=len(lv), HAS_LOGITS=has_logits,
            BLOCK_M=block_m, BLOCK_C=block_c, ONE_PASS=block_c >= C, IGNORE=IGNORE_INDEX,
            **blocks, num_warps=num_warps,
        )


class _KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, n_levels, n_labelled, s, t, y, *feats):
        us, vs = feats[:n_levels], feats[n_levels:]
        loss, terms, grad_s, grad_u = _kd_forward(s, t, y, us, vs, cfg, n_labelled)
        ctx.n_levels = n_levels
        ctx.used = False
        ctx.save_for_backward(grad_s, *grad_u)
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        if ctx.used:
            raise RuntimeError("kd_loss_triton: backward twice through one graph is unsupported "
                               "(gradients are rescaled in place)")
        ctx.used = True
        grads = ctx.saved_tensors
        # the gradients were written during forward; scaling in place avoids new buffers
        for gr in grads:
            gr.mul_(grad_loss.to(gr.device))
        n = ctx.n_levels
        return (None, None, None, grads[0], None, None, *grads[1:], *([None] * n))


def _check_inputs(s, t, y, us, vs, cfg):
    """Host-side checks only (metadata, no device work): the kernel trusts every shape."""
    if s.dim() != 2 or s.numel() == 0:
        raise ValueError(f"student logits must be a non-empty (B, C) tensor, got {tuple(s.shape)}")
    B, C = s.shape
    if t.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(t.shape)} do not match student logits {(B, C)}")
    if y.shape != (B,):
        raise ValueError(f"labels {tuple(y.shape)} must have shape ({B},)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {y.dtype}")
    if not (len(us) == len(vs) == len(cfg.level_weights)):
        raise ValueError(f"{len(us)} student levels, {len(vs)} teacher levels and "
                         f"{len(cfg.level_weights)} level weights must agree in number")
    named = [("student logits", s), ("teacher logits", t), ("labels", y)]
    for k, (u, v) in enumerate(zip(us, vs, strict=True)):
        lvl = f"level L{k + 1}"
        if u.dim() == 0 or v.dim() == 0 or u.shape[0] != B or v.shape[0] != B:
            raise ValueError(f"{lvl}: student {tuple(u.shape)} and teacher {tuple(v.shape)} "
                             f"must both lead with batch {B}")
        if u.numel() != v.numel() or u.numel() == 0:
            raise ValueError(f"{lvl}: student {tuple(u.shape)} and teacher {tuple(v.shape)} "
                             "must hold the same, non-zero number of values per sample")
        named += [(f"{lvl} student", u), (f"{lvl} teacher", v)]
    for what, x in named:
        if x is not y and x.dtype not in _FLOATS:
            raise ValueError(f"{what} has dtype {x.dtype}; expected float16, bfloat16, "
                             "float32 or float64")
        if x.device != s.device:
            raise ValueError(f"{what} is on {x.device} but student logits are on {s.device}")


def _count_labelled(y, C):
    """Rows with a class label (not IGNORE_INDEX); raises on labels outside [0, C).

    The kernel only compares labels with column indices, so a bad one would silently drop
    the CE target. Cost per call: tiny reductions over B labels and one host sync.
    """
    labelled = y != IGNORE_INDEX
    bad = labelled & ((y < 0) | (y >= C))
    n_bad, n_labelled = torch.stack((bad.sum(), labelled.sum())).tolist()
    if n_bad:
        first = y[bad][0].item()
        raise ValueError(f"{n_bad} label(s) outside [0, {C}), e.g. {first}; "
                         f"only {IGNORE_INDEX} (ignored) may lie outside")
    return n_labelled


def kd_loss_triton(student_logits, teacher_logits, labels, student_feats, teacher_feats, cfg):
    """Fused Triton backend of ``mlfd.losses.kd_loss``: returns ``(loss, terms)`` like the reference."""
    us = list(student_feats)
    vs = [v.detach() for v in teacher_feats]
    _check_inputs(student_logits, teacher_logits, labels, us, vs, cfg)
    n_labelled = _count_labelled(labels, student_logits.shape[1])
    loss, terms = _KDLossFunction.apply(cfg, len(us), n_labelled, student_logits,
                                        teacher_logits.detach(), labels, *us, *vs)
    names = ["ce", "kd"] + [f"mse_L{k + 1}" for k in range(len(us))]
    return loss, {name: terms[i] for i, name in enumerate(names)}
