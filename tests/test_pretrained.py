"""Pretrained initialisation (fastlt.models.pretrained, ``model.pretrained``): real timm weights
saved as .pth and .safetensors, and fastlt's own best.pt, loaded bit-exactly; the failures a
user meets (another class count, another architecture, a pickle that is not a state dict)
named in one line."""
from __future__ import annotations

import pickle

import pytest
import torch

from fastlt.training.checkpoint import save_weights
from fastlt.errors import CheckpointError
from fastlt.models import BCLModel
from fastlt.models.pretrained import load_pretrained


def _differs(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def timm_resnet50(tmp_path_factory):
    """A timm ResNet-50 with its 1000-class classifier (random weights: nothing is downloaded),
    saved the two ways people keep weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    net = timm.create_model("resnet50", pretrained=False)
    state = net.state_dict()
    d = tmp_path_factory.mktemp("timm")
    torch.save(state, d / "resnet50.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "resnet50.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, d / "wrapped.pth")
    return state, d


@pytest.mark.parametrize("name", ["resnet50.pth", "resnet50.safetensors", "wrapped.pth"])
def test_timm_weights_load_into_the_backbone_bit_exactly(timm_resnet50, name):
    state, d = timm_resnet50
    torch.manual_seed(0)
    model = BCLModel("resnet50", num_classes=5, feat_dim=8, use_norm=True, hidden_dim=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _differs(model.backbone.state_dict(), {k: state[k] for k in model.backbone.state_dict()})
    msg = load_pretrained(model, d / name, "backbone")
    own = model.backbone.state_dict()
    assert not _differs(own, {k: state[k] for k in own}), "backbone differs from the file"
    for k, v in own.items():
        assert v.dtype == state[k].dtype
    # The heads keep their initialisation; the file's classifier has no place in the backbone.
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert not _differs(heads, {k: before[k] for k in heads})
    assert "\n" not in msg and msg.startswith(f"pretrained: {len(own)} tensors from ")
    # (a .safetensors file keeps its tensors in sorted order)
    assert any(f"missing none; unexpected (ignored) 2: {x}, {y}" in msg for x, y in
               (("fc.weight", "fc.bias"), ("fc.bias", "fc.weight"))), msg


@pytest.fixture(scope="module")
def fastlt_weights(tmp_path_factory):
    torch.manual_seed(1)
    model = BCLModel("resnet32", num_classes=6, feat_dim=16, use_norm=False, hidden_dim=32)
    for p in model.parameters():  # not the initialisation a fresh model would draw
        p.data.add_(0.25)
    path = tmp_path_factory.mktemp("fastlt") / "best.pt"
    save_weights(path, model, {"epoch": 3, "signature": {}})
    return model.state_dict(), path


def test_fastlt_best_pt_loads_the_whole_model_or_the_backbone(fastlt_weights):
    state, path = fastlt_weights
    torch.manual_seed(2)
    whole = BCLModel("resnet32", num_classes=6, feat_dim=16, use_norm=False, hidden_dim=32)
    msg = load_pretrained(whole, path, "all")
    assert not _differs(whole.state_dict(), state)
    assert msg.startswith(f"pretrained: {len(state)} tensors from ") and "into the model;" in msg

    torch.manual_seed(2)
    other_c = BCLModel("resnet32", num_classes=4, feat_dim=16, use_norm=False, hidden_dim=32)
    fc_before = other_c.fc.weight.detach().clone()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(other_c, path, "all")
    text = str(e.value)
    assert "\n" not in text
    assert "tensor 'fc.weight' has shape (6, 64)" in text and "but (4, 64) in the model" in text
    assert "model.pretrained_scope: backbone" in text
    msg = load_pretrained(other_c, path, "backbone")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    assert not _differs(other_c.backbone.state_dict(), backbone)
    assert torch.equal(other_c.fc.weight, fc_before)
    assert "classifier/head tensors are not loaded" in msg


def test_missing_and_unexpected_keys_are_listed_in_one_line(timm_resnet50, tmp_path):
    state, _ = timm_resnet50
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.2.")}
    partial["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    model = BCLModel("resnet50", num_classes=5, feat_dim=8, use_norm=True, hidden_dim=16)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(model, path, "backbone")
    text = str(e.value)
    missing = [k for k in model.backbone.state_dict() if k.startswith("layer4.2.") and "num_batches" not in k]
    assert "\n" not in text
    assert f"missing {len(missing)}: {', '.join(missing[:4])} (+{len(missing) - 4} more)" in text
    assert "unexpected 3: fc.weight, fc.bias, extra.weight" in text


def test_files_that_cannot_be_pretrained_weights(timm_resnet50, tmp_path):
    state, d = timm_resnet50
    model = BCLModel("resnet32", num_classes=6, feat_dim=16, use_norm=False, hidden_dim=32)
    with pytest.raises(CheckpointError, match=r"'conv1.weight' has shape \(64, 3, 7, 7\) .* but \(16, 3, 3, 3\)"):
        load_pretrained(model, d / "resnet50.pth", "backbone")
    renamed = tmp_path / "renamed.pth"
    torch.save({f"features.{k}": v for k, v in state.items()}, renamed)
    with pytest.raises(CheckpointError, match="none of its names match .* is it for another backbone"):
        load_pretrained(model, renamed, "backbone")
    with pytest.raises(CheckpointError, match="pretrained_scope: all needs fastlt weights"):
        load_pretrained(model, d / "resnet50.pth", "all")
    with pytest.raises(CheckpointError, match="does not exist. fastlt downloads nothing"):
        load_pretrained(model, tmp_path / "nope.pth", "backbone")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot load .* safely"):
        load_pretrained(model, evil, "backbone")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors"):
        load_pretrained(model, bad, "backbone")
    notes = tmp_path / "notes.pth"
    torch.save({"lr": 0.1, "epoch": 3}, notes)
    with pytest.raises(CheckpointError, match=r"holds a dict with keys \['lr', 'epoch'\], not a state dict"):
        load_pretrained(model, notes, "backbone")
