"""The reference KD loss against a hand computation and design §4's gradient formulas."""

import math

import pytest
import torch

from mlfd.errors import MlfdError
from mlfd.losses import KDLossConfig, kd_loss, kd_loss_reference, resolve_backend


def test_hand_computed_case():
    # B=1, C=2, K=1 with D=2: every term by hand.
    s = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0])
    u = [torch.tensor([[1.0, 3.0]], dtype=torch.float64)]
    v = [torch.tensor([[0.0, 1.0]], dtype=torch.float64)]
    cfg = KDLossConfig(ce_weight=1.0, soft_weight=0.5, temperature=2.0, level_weights=(0.1,))
    loss, terms = kd_loss_reference(s, t, y, u, v, cfg)
    ce = -math.log(math.e / (math.e + 1))  # -log softmax(s)_0
    pt = [math.exp(0) / (math.exp(0) + math.exp(1)), math.exp(1) / (math.exp(0) + math.exp(1))]
    zs = math.exp(0.5) + math.exp(0)
    log_qs = [0.5 - math.log(zs), 0.0 - math.log(zs)]
    soft = -(pt[0] * log_qs[0] + pt[1] * log_qs[1])
    mse = ((1 - 0) ** 2 + (3 - 1) ** 2) / 2
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-12)
    assert terms["kd"].item() == pytest.approx(0.5 * 4 * soft, abs=1e-12)
    assert terms["mse_L1"].item() == pytest.approx(0.1 * mse, abs=1e-12)
    assert loss.item() == pytest.approx(ce + 2 * soft + 0.1 * mse, abs=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_gradients_match_design_formulas(smoothing, T):
    torch.manual_seed(0)
    B, C = 5, 7
    g, a, b = 0.7, 0.6, (0.2, 0.3)
    s = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, C, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    u = [torch.randn(B, 3, dtype=torch.float64, requires_grad=True),
         torch.randn(B, 2, 2, 2, dtype=torch.float64, requires_grad=True)]
    v = [torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 2, 2, 2, dtype=torch.float64)]
    cfg = KDLossConfig(g, a, T, b, smoothing)
    loss, terms = kd_loss_reference(s, t, y, u, v, cfg)
    loss.backward()
    q = torch.nn.functional.one_hot(y, C).double() * (1 - smoothing) + smoothing / C
    ds = g / B * (torch.softmax(s, 1) - q) + a * T / B * (torch.softmax(s / T, 1) -
                                                          torch.softmax(t / T, 1))
    assert torch.allclose(s.grad, ds.detach(), atol=1e-12)
    for k in range(2):
        D = u[k][0].numel()
        du = 2 * b[k] / (B * D) * (u[k] - v[k])
        assert torch.allclose(u[k].grad, du.detach(), atol=1e-12)
    assert sum(terms.values()).item() == pytest.approx(loss.item(), rel=1e-12)


def test_teacher_inputs_get_no_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    u, v = torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    loss, _ = kd_loss(s, t, torch.tensor([0, 1, 2]), [u], [v], KDLossConfig(level_weights=(1.0,)))
    loss.backward()
    assert t.grad is None and v.grad is None and s.grad is not None and u.grad is not None


def test_shape_and_option_errors():
    s = torch.randn(3, 4)
    with pytest.raises(MlfdError):
        kd_loss(s, torch.randn(3, 5), torch.zeros(3, dtype=torch.long), [], [], KDLossConfig())
    with pytest.raises(MlfdError):
        kd_loss(s, s, torch.zeros(3, dtype=torch.long), [torch.randn(3, 2)], [torch.randn(3, 3)],
                KDLossConfig(level_weights=(1.0,)))
    with pytest.raises(MlfdError):
        KDLossConfig(temperature=0)
    with pytest.raises(MlfdError):
        resolve_backend("fastest", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_ignored_labels_leave_ce_only():
    # label -100 (F.cross_entropy's ignore_index) drops a row from CE and from CE's mean only
    torch.manual_seed(0)
    B, C, T, eps = 4, 5, 2.0, 0.1
    s = torch.randn(B, C, dtype=torch.float64)
    t = torch.randn(B, C, dtype=torch.float64)
    u, v = [torch.randn(B, 3, dtype=torch.float64)], [torch.randn(B, 3, dtype=torch.float64)]
    y = torch.tensor([1, -100, 3, -100])
    cfg = KDLossConfig(ce_weight=1.0, soft_weight=1.0, temperature=T, level_weights=(1.0,),
                       label_smoothing=eps)
    loss, terms = kd_loss(s, t, y, u, v, cfg)
    logp = torch.log_softmax(s, 1)
    ce = [-(1 - eps) * logp[i, y[i]] - eps / C * logp[i].sum() for i in (0, 2)]
    soft = -(torch.softmax(t / T, 1) * torch.log_softmax(s / T, 1)).sum(1)
    assert terms["ce"].item() == pytest.approx(sum(ce).item() / 2, abs=1e-12)
    assert terms["kd"].item() == pytest.approx(T * T * soft.mean().item(), abs=1e-12)
    assert terms["mse_L1"].item() == pytest.approx(((u[0] - v[0]) ** 2).mean().item(), abs=1e-12)
