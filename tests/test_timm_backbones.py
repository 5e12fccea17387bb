"""Any timm model as the backbone (feature width read from the built model, the published
ResNet constructions kept), a misspelt name refused with a suggestion, local weights into a
non-published backbone, and ``fastlt export``: the backbone and classifier as safetensors that
timm loads strictly and that predict what fastlt predicts."""
from __future__ import annotations

import json

import pytest
import torch

from fastlt.config.loader import load_config
from fastlt.config.recipes import resolve_config
from fastlt.errors import CheckpointError, ConfigError
from fastlt.models import BCLModel
from fastlt.models.bcl import check_backbone
from fastlt.training.checkpoint import save_weights

timm = pytest.importorskip("timm")


def test_a_timm_model_outside_the_recipes_is_a_backbone_with_its_own_width():
    torch.manual_seed(0)
    m = BCLModel("resnet18", num_classes=5, feat_dim=8).eval()
    # resnet18's pooled feature width is 512 (BasicBlock ResNets), unlike the 2048 of resnet50.
    assert m.fc.weight.shape == (512, 5) and m.head[0].in_features == 512
    # the reference's initialisation: the last BatchNorm gamma of each residual block starts at 1
    assert all(float(b.bn2.weight.detach().min()) == 1.0 for b in m.backbone.layer1)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 5) and out.z.shape == (2, 8) and out.centers.shape == (5, 8)


def test_a_misspelt_backbone_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match=r"model.backbone: 'resnet18x' is neither resnet32 nor a timm model; "
                                          r"did you mean .*resnet18"):
        check_backbone("resnet18x")
    with pytest.raises(ConfigError, match=r"'resnet33' is neither .* did you mean .*resnet32\b"):
        check_backbone("resnet33")  # fastlt's own CIFAR ResNet is among the suggestions
    cfg = load_config(resolve_config("demo"), ["model.backbone=convnext_atto"])  # any timm name is accepted
    assert cfg.model.backbone == "convnext_atto"
    with pytest.raises(ConfigError, match="expected resnet32 or a timm model name"):
        load_config(resolve_config("demo"), ["model.backbone=../evil"])


def test_local_timm_weights_load_into_a_non_published_backbone(tmp_path):
    from safetensors.torch import save_file

    from fastlt.models.pretrained import load_pretrained

    torch.manual_seed(1)
    donor = timm.create_model("resnet18", pretrained=False, num_classes=10)  # a user's local timm file, with fc
    save_file(donor.state_dict(), str(tmp_path / "r18.safetensors"))
    m = BCLModel("resnet18", num_classes=5, feat_dim=8)
    msg = load_pretrained(m, str(tmp_path / "r18.safetensors"), "backbone")
    assert "missing none" in msg
    assert torch.equal(m.backbone.conv1.weight, donor.conv1.weight)
    assert torch.equal(m.backbone.layer4[1].bn2.running_var, donor.layer4[1].bn2.running_var)


@pytest.mark.parametrize("use_norm", [True, False], ids=["cosine", "linear"])
def test_export_loads_strictly_into_timm_and_predicts_the_same_classes(tmp_path, use_norm, capsys):
    from safetensors.torch import load_file

    from fastlt.cli import main

    torch.manual_seed(2)
    model = BCLModel("resnet18", num_classes=7, feat_dim=8, use_norm=use_norm).eval()
    sig = {"backbone": "resnet18", "num_classes": 7, "use_norm": use_norm}
    save_weights(tmp_path / "best.pt", model, {"epoch": 3, "signature": sig})
    assert main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--out", str(tmp_path / "exp")]) == 0
    info = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert info["timm_model"] == "resnet18" and info["num_classes"] == 7 and info["classifier"] == "fc"

    net = timm.create_model("resnet18", pretrained=False, num_classes=7)
    net.load_state_dict(load_file(str(tmp_path / "exp" / "model.safetensors")), strict=True)
    bare = timm.create_model("resnet18", pretrained=False, num_classes=0)
    bare.load_state_dict(load_file(str(tmp_path / "exp" / "backbone.safetensors")), strict=True)
    net.eval(), bare.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x).logits, net(x)
        feats = bare(x)
    # float32 convolutions of the same weights on the same input, in the same order: equal to
    # rounding (the backbones are one module's tensors); the classifier is exact (linear) or
    # the same logits times ||h|| per sample (cosine), so the arg-max and ranking agree.
    torch.testing.assert_close(feats, model.backbone(x), rtol=0, atol=0)
    assert torch.equal(ours.argsort(dim=1), theirs.argsort(dim=1))
    if use_norm:
        torch.testing.assert_close(theirs, ours * feats.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)


def test_export_of_the_cifar_resnet32_says_it_is_not_a_timm_model(tmp_path):
    from fastlt.models.export import export_timm

    model = BCLModel("resnet32", num_classes=4, feat_dim=8, use_norm=False)
    save_weights(tmp_path / "best.pt", model, {"signature": {"backbone": "resnet32", "use_norm": False}})
    with pytest.raises(CheckpointError, match="backbone 'resnet32' is not a timm model"):
        export_timm(tmp_path / "best.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
