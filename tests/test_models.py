"""Level taps through timm's feature API, and the joint teacher's fusion shapes."""

import pytest
import torch

import mlfd  # noqa: F401  (torchvision remedy before timm)
from mlfd.errors import MlfdError
from mlfd.models import JointTeacher, LevelBackbone, Student, create_backbone, level_shapes

FAMILIES = [
    ("test_resnet", {}),  # ResNet
    ("test_efficientnet", {}),  # EfficientNet
    ("test_convnext", {}),  # ConvNeXt
    ("test_vit", {"img_size": 64}),  # Vision Transformer (tokens -> NCHW maps)
]


@pytest.mark.parametrize("arch,kw", FAMILIES)
def test_level_taps_match_timm_outputs(arch, kw):
    torch.manual_seed(0)
    model = create_backbone(arch, 7, **kw).eval()
    bb = LevelBackbone(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, embeds = bb(x, 3)
        ref_logits = model(x)
        ref_feats = model.forward_features(x)
        ref_l1 = model.forward_head(ref_feats, pre_logits=True)
        _, inter = model.forward_intermediates(x, output_fmt="NCHW")
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(embeds[0], ref_l1, atol=1e-5)
    # L2 is the last feature_info entry, L3 the one before, both NCHW.
    chs = [f["num_chs"] for f in model.feature_info]
    assert embeds[1].shape[:2] == (2, chs[-1]) and embeds[1].dim() == 4
    assert embeds[2].shape[:2] == (2, chs[-2]) and embeds[2].dim() == 4
    assert torch.allclose(embeds[1], inter[-1], atol=1e-5)
    assert torch.allclose(embeds[2], inter[-2], atol=1e-5)
    red = model.feature_info[-1]["reduction"]
    assert embeds[1].shape[-2:] == (64 // red, 64 // red)


def test_vit_maps_are_token_grids():
    bb = LevelBackbone(create_backbone("test_vit", 5, img_size=64))
    shapes = level_shapes(bb, 64, 2)
    # patch 16 at 64 px: a 4x4 grid of 64-d tokens; L1 is the pooled 64-d vector.
    assert shapes == [(64,), (64, 4, 4)]


def test_levels_outside_range_are_refused():
    bb = LevelBackbone(create_backbone("test_convnext", 3))
    assert bb.max_levels == 1 + len(bb.model.feature_info)
    with pytest.raises(MlfdError, match="outside 1..5"):
        bb.check_levels(6)
    with pytest.raises(MlfdError):
        bb.check_levels(0)


def _shapes(levels):
    nets = [("test_efficientnet", {}), ("test_convnext", {}), ("test_vit", {"img_size": 64})]
    return [level_shapes(LevelBackbone(create_backbone(a, 4, **kw)), 64, levels) for a, kw in nets]


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_joint_teacher_any_m_and_sizes(m, levels):
    shapes = _shapes(levels)[:m]
    joint = JointTeacher(shapes, [4, 6, 9][:m], levels, width=16, embed_dim=24, dropout=0.5)
    feats = [torch.randn(5, *s[levels - 1], requires_grad=True) for s in shapes]
    out = joint(feats)
    assert len(out) == levels
    assert out[0].shape == (5, 24)
    for k in range(1, levels):
        # Common size per level: the smallest teacher map at that level.
        h = min(s[k][1] for s in shapes)
        w = min(s[k][2] for s in shapes)
        assert out[k].shape == (5, 16, h, w)
        assert joint.embed_shapes[k] == (16, h, w)
    for d, c in enumerate([4, 6, 9][:m]):
        assert joint.logits(out[0], d).shape == (5, c)
    joint.logits(out[0], m - 1).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_joint_teacher_needs_two_teachers():
    with pytest.raises(MlfdError):
        JointTeacher(_shapes(2)[:1], [4], 2)


def test_student_adaptors_map_into_teacher_space_and_drop_at_export():
    bb = LevelBackbone(create_backbone("test_resnet", 5))
    s_shapes = level_shapes(bb, 64, 2)  # [(96,), (96, 2, 2)]
    student = Student(bb, s_shapes, [(24,), (16, 1, 1)])
    logits, embeds = student(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 5)
    assert embeds[0].shape == (3, 24) and embeds[1].shape == (3, 16, 1, 1)
    # The exported weights are exactly the plain timm model's.
    plain = create_backbone("test_resnet", 5)
    plain.load_state_dict(student.backbone.model.state_dict(), strict=True)


def test_joint_head_baseline_predicts_over_the_union():
    from mlfd.stages.baselines import MultiDatasetModel

    m = MultiDatasetModel("test_resnet", [3, 4], "joint-head")
    union = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 9.0, 0.0]])  # best: dataset 1, class 2
    m.forward = lambda x, d: union
    assert m.dataset_logits(None, 1).argmax(1).item() == 2
    assert m.dataset_logits(None, 1)[0, :4].tolist() == [0.0, 0.0, 9.0, 0.0]
    # For dataset 0 the winner is another dataset's class: never a correct prediction.
    assert m.dataset_logits(None, 0).argmax(1).item() == 5
    assert m.target(torch.tensor([2]), 1).item() == 5


def test_dense_fusion_is_concat_dropout_linear_gelu():
    """Paper 4.5: K = 1 fuses the concatenated vectors with one regularised linear layer
    (no per-teacher adaptors), and GELU follows it as in every neuron of the joint teacher."""
    torch.manual_seed(0)
    joint = JointTeacher([[(7,)], [(5,)], [(3,)]], [4, 6, 9], 1, embed_dim=8, dropout=0.9)
    linears = [m for m in joint.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 + 3  # the dense layer and the three heads
    assert joint.dense[0].in_features == 7 + 5 + 3
    feats = [torch.randn(4, d, dtype=torch.float64) for d in (7, 5, 3)]
    joint.double().eval()  # dropout off: a deterministic reference
    w, b = joint.dense[0].weight, joint.dense[0].bias
    z = torch.cat(feats, 1) @ w.T + b
    expect = 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))  # exact GELU, by its definition
    torch.testing.assert_close(joint(feats)[0], expect)


def test_map_fusion_l1_is_gelu_of_the_dense_layer():
    torch.manual_seed(0)
    joint = JointTeacher(_shapes(2), [4, 6], 2, width=16, embed_dim=24).double().eval()
    feats = [torch.randn(3, *s[1], dtype=torch.float64) for s in _shapes(2)]
    l1, l2 = joint(feats)
    pooled = l2.mean(dim=(2, 3))
    z = pooled @ joint.dense[0].weight.T + joint.dense[0].bias
    torch.testing.assert_close(l1, 0.5 * z * (1 + torch.erf(z / 2 ** 0.5)))
