"""fastlt.models: every backbone trains (forward + backward) on a tiny input; BCL head shapes."""
import pytest
import torch
import torch.nn.functional as F

from fastlt.models import BACKBONES, BCLModel, NormedLinear


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_forward_backward(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = BCLModel(name, num_classes=7, feat_dim=16, use_norm=name != "resnet32", **kwargs)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.logits.shape == (2, 7) and out.z.shape == (2, 16) and out.centers.shape == (7, 16)
    torch.testing.assert_close(out.z.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out.centers.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(out.z, F.normalize(out.z_raw, dim=1))
    loss = out.logits.logsumexp(1).mean() + (out.z @ out.centers.t()).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.parameters().__next__().grad.abs().sum() > 0


def test_head_widths_follow_spec():
    m = BCLModel("resnet32", 10, feat_dim=128, use_norm=False)
    assert m.head[0].out_features == 512 and m.head[-1].out_features == 128  # m = 512 for ResNet-32
    assert isinstance(m.fc, torch.nn.Linear) and m.class_weights().shape == (10, 64)
    m = BCLModel("resnet50", 10, feat_dim=1024)
    assert m.head[0].in_features == 2048 and m.head[0].out_features == 2048  # m = h for ImageNet backbones
    assert m.head_fc[-1].out_features == 1024 and m.class_weights().shape == (10, 2048)


def test_normed_linear_is_scaled_cosine():
    fc = NormedLinear(5, 3)
    x = torch.randn(4, 5)
    want = 30 * F.normalize(x, dim=1) @ F.normalize(fc.weight, dim=0)
    torch.testing.assert_close(fc(x), want)
    assert fc(x).abs().max() <= 30 + 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'"):
        BCLModel("resnet18", 10)
    with pytest.raises(ValueError, match="num_features"):
        BCLModel(torch.nn.Linear(3, 4), 10)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        BCLModel("resnet32", 1)
