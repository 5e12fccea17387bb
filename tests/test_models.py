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
    """Hand-picked inputs and class vectors whose cosines are known: output = 30 · cos(x, w_j)
    whatever the lengths of x and w_j."""
    fc = NormedLinear(3, 3)
    with torch.no_grad():  # columns: class 0 along e0 (length 2), class 1 along e1, class 2 along e0 + e1
        fc.weight.copy_(torch.tensor([[2.0, 0.0, 5.0], [0.0, 0.5, 5.0], [0.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, -3.0, 0.0], [0.0, 0.0, 7.0], [4.0, 4.0, 0.0]])
    r = 30 / 2 ** 0.5  # cos 45° · 30
    want = torch.tensor([[30.0, 0.0, r], [0.0, -30.0, -r], [0.0, 0.0, 0.0], [r, r, 30.0]])
    # fp32 normalisations and a 3-term dot product: a few ulp of 30.
    torch.testing.assert_close(fc(x), want, atol=1e-5, rtol=1e-6)
    assert fc.class_weights().shape == (3, 3) and torch.equal(fc.class_weights()[2], torch.tensor([5.0, 5.0, 0.0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="'resnet18x' is neither resnet32 nor a timm model"):
        BCLModel("resnet18x", 10)
    with pytest.raises(ValueError, match="num_features"):
        BCLModel(torch.nn.Linear(3, 4), 10)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        BCLModel("resnet32", 1)


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_timm_resnets_keep_the_reference_initialisation(name):
    """The reference's ResNeXt starts every block's last BatchNorm γ at 1; timm's default
    (zero_init_last=True) would start it at 0."""
    from timm.models.resnet import Bottleneck

    from fastlt.models import build_backbone

    net, _ = build_backbone(name)
    blocks = [m for m in net.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    for b in blocks:
        assert torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight))


def test_freeze_bn_keeps_running_statistics_in_training():
    from fastlt.models import BCLModel

    torch.manual_seed(0)
    # float64: the CPU convolution picks its algorithm by batch size, and in float32 the logits of a
    # batch of 2 and of 6 differ by rounding alone (seen: 9.5e-5 absolute, 2.1e-6 relative, over
    # float32's default 1.3e-6). In float64 that rounding is ~1e-13, so the default float64
    # tolerance (1e-7) still catches any real dependence on the rest of the batch (batch
    # statistics would move the logits by O(1)).
    model = BCLModel("resnet32", 5, feat_dim=8, use_norm=False, freeze_bn=True).double().train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [b.running_mean.clone() for b in bns]
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64) * 3 + 1
    out = model(x)
    assert all(not b.training for b in bns) and model.training
    assert all(torch.equal(b.running_mean, m) for b, m in zip(bns, before))
    # Frozen statistics: a sample's output does not depend on the rest of its batch.
    torch.testing.assert_close(model(x[:2]).logits, out.logits[:2])
    out.logits.sum().backward()
    assert bns[0].weight.grad is not None  # the affine weights still train


def test_sync_bn_converts_every_batchnorm_and_needs_cuda(tmp_path, capsys):
    from conftest import tiny_config, write_config
    from fastlt.cli import train_main
    from fastlt.config.loader import config_from_dict
    from fastlt.models import build_model

    cfg = tiny_config(tmp_path / "data", tmp_path, model={"sync_bn": True}, run={"device": "cpu"})
    model = build_model(config_from_dict(cfg), 6)
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == 33  # 31 backbone + 2 heads
    assert train_main(["--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    assert "model.sync_bn: torch's SyncBatchNorm runs on CUDA devices only" in capsys.readouterr().err
