"""method.reference_parallelism=dp4 reproduces the published runs' nn.DataParallel over four GPUs,
at any world size (fastlt.models.replica_bn, the dp4 centre head of fastlt.models.bcl).

The reference: a 4-process gloo simulation of DataParallel's split — process k takes the k-th
``torch.chunk`` of the global batch [view 0, view 1, view 2] and runs plain BatchNorm (or the
plain-BatchNorm model) on it; the gradients of the replicas are summed with gloo, the running
statistics kept are process 0's, and the centres are the four replicas' head outputs
concatenated and cut to C rows. fastlt with the switch runs in one process (W = 1) and over 2
and 4 gloo ranks, each holding its step-major share laid out [view 0, view 1, view 2].

Everything runs in float64, where the only differences are summation orders (group statistics
combined from per-rank partial statistics in Chan's formula, gradients summed by gloo): ≲ 1e-14
relative on O(1) values, so 1e-10 absolute leaves margin and still catches any misassigned row
(errors of order 1).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastlt.models.bcl import BCLModel
from fastlt.models.replica_bn import ReplicaGroupBatchNorm, convert_replica_batchnorm, replica_layout

B, CH, HW = 8, 5, 3          # global batch of 8 samples: 24 rows, DataParallel groups of 6
C, PX = 100, 8               # the model check: CIFAR-100's 100 classes, 8 px images
TOL = dict(rtol=0, atol=1e-10)


def _bn_case():
    """Seeded global batch, BatchNorm state and a fixed linear functional of the output."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3 * B, CH, HW, HW, generator=g, dtype=torch.float64) * 2 + 1
    w = torch.randn(3 * B, CH, HW, HW, generator=g, dtype=torch.float64)
    bn = nn.BatchNorm2d(CH).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    return x, w, bn


def _model(dp4: bool = True) -> BCLModel:
    torch.manual_seed(0)
    return BCLModel("resnet32", C, feat_dim=16, use_norm=False, hidden_dim=32,
                    reference_parallelism="dp4" if dp4 else "none").double().train()


def _model_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.randn(3 * B, 3, PX, PX, generator=g, dtype=torch.float64)


def _plain_bn(module: nn.Module, kind) -> nn.Module:
    """``module`` with each ReplicaGroupBatchNorm swapped back to a plain ``kind`` of the same state."""
    for name, child in module.named_children():
        if isinstance(child, ReplicaGroupBatchNorm):
            bn = kind(child.num_features).double()
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            _plain_bn(child, kind)
    return module


def _dataparallel_replica() -> BCLModel:
    """The dp4 model as one of DataParallel's replicas runs it: plain BatchNorm on its own chunk."""
    model = _model()
    _plain_bn(model.backbone, nn.BatchNorm2d)  # the ResNet-32's BatchNorms are 2-d,
    _plain_bn(model.head, nn.BatchNorm1d)      # the contrastive head's is 1-d
    assert not any(isinstance(m, ReplicaGroupBatchNorm) for m in model.modules())
    return model


def _local_rows(rank: int, world: int) -> torch.Tensor:
    """Global rows of rank's share: samples rank·b … of each view, laid out [view 0, view 1, view 2]."""
    b = B // world
    return torch.cat([torch.arange(v * B + rank * b, v * B + (rank + 1) * b) for v in range(3)])


def _bn_state(bn: nn.Module) -> dict:
    return {"mean": bn.running_mean.clone(), "var": bn.running_var.clone(), "n": bn.num_batches_tracked.clone()}


def _model_out(model: BCLModel, x: torch.Tensor) -> dict:
    out = model(x)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    return {"logits": out.logits.detach(), "z": out.z.detach(), "centers": out.centers.detach(),
            "centers_raw": out.centers_raw.detach(), "stats": stats}


def _worker(rank: int, world: int, init_file: str, out_dir: str, simulate_dp: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, w, bn = _bn_case()
        result = {}
        if simulate_dp:  # process `rank` is DataParallel's replica `rank`: plain BatchNorm on its chunk
            replica = copy.deepcopy(bn)
            xs = x.chunk(4)[rank].clone().requires_grad_()
            y = replica(xs)
            (y * w.chunk(4)[rank]).sum().backward()
            grads = torch.cat([replica.weight.grad, replica.bias.grad])
            torch.distributed.all_reduce(grads)  # DataParallel sums the replicas' gradients
            result["dp"] = {"y": y.detach(), "x_grad": xs.grad, "param_grad": grads, **_bn_state(replica)}
            model = _dataparallel_replica()
            xm = _model_input().chunk(4)[rank]
            out = model(xm)
            stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
            # The replica's centre head, as the reference's forward computes it (this second call in
            # training mode gives the same rows; its running-statistics update is not kept).
            per_replica = F.normalize(model.head_fc(model.fc.weight.t()), dim=1).detach()  # (64, D)
            parts = [torch.empty_like(per_replica) for _ in range(world)]
            torch.distributed.all_gather(parts, per_replica)
            result["dp_model"] = {"logits": out.logits.detach(), "z": out.z.detach(),
                                  "centers": torch.cat(parts)[:C], "stats": stats}
        rows = _local_rows(rank, world)
        rbn = convert_replica_batchnorm(copy.deepcopy(bn))
        xl = x[rows].clone().requires_grad_()
        y = rbn(xl)
        (y * w[rows]).sum().backward()
        grads = torch.cat([rbn.weight.grad, rbn.bias.grad])
        torch.distributed.all_reduce(grads)
        result["fastlt"] = {"rows": rows, "y": y.detach(), "x_grad": xl.grad, "param_grad": grads, **_bn_state(rbn)}
        result["fastlt_model"] = {"rows": rows, **_model_out(_model(), _model_input()[rows])}
        torch.save(result, Path(out_dir) / f"{world}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _spawn(tmp_path: Path, world: int, simulate_dp: bool) -> list[dict]:
    # A file:// rendezvous: no port to pick, so no race with other processes on the machine.
    init = tmp_path / f"init-{world}"
    mp.spawn(_worker, args=(world, str(init), str(tmp_path), simulate_dp), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{world}-{r}.pt", weights_only=True) for r in range(world)]


def _assemble(parts: list[torch.Tensor], rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank rows put back in global order."""
    full = torch.empty((3 * B, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for p, r in zip(parts, rows):
        full[r] = p
    return full


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp4")
    four = _spawn(tmp, 4, simulate_dp=True)
    two = _spawn(tmp, 2, simulate_dp=False)
    return {"dp": [r["dp"] for r in four], "dp_model": [r["dp_model"] for r in four],
            4: [r["fastlt"] for r in four], 2: [r["fastlt"] for r in two],
            "model4": [r["fastlt_model"] for r in four], "model2": [r["fastlt_model"] for r in two]}


def _one_process_bn():
    x, w, bn = _bn_case()
    rbn = convert_replica_batchnorm(copy.deepcopy(bn))
    xg = x.clone().requires_grad_()
    y = rbn(xg)
    (y * w).sum().backward()
    return {"y": y.detach(), "x_grad": xg.grad, "param_grad": torch.cat([rbn.weight.grad, rbn.bias.grad]),
            **_bn_state(rbn)}


def test_one_process_bn_is_dataparallels_four_replicas(runs):
    one = _one_process_bn()
    dp = runs["dp"]
    # One process normalises each group with the call the replica makes: bit for bit.
    assert torch.equal(one["y"], torch.cat([d["y"] for d in dp]))
    assert torch.equal(one["x_grad"], torch.cat([d["x_grad"] for d in dp]))
    torch.testing.assert_close(one["param_grad"], dp[0]["param_grad"], **TOL)  # gloo's sum order
    for key in ("mean", "var", "n"):  # replica 0's running statistics, the ones DataParallel keeps
        assert torch.equal(one[key], dp[0][key]), key
    x, _, bn = _bn_case()
    whole = copy.deepcopy(bn)(x)  # the paper's semantics normalises all 24 rows together
    assert (whole - one["y"]).abs().max() > 0.1


@pytest.mark.parametrize("world", [2, 4])
def test_bn_equals_itself_at_world_sizes_two_and_four(runs, world):
    one = _one_process_bn()
    got = runs[world]
    rows = [g["rows"] for g in got]
    torch.testing.assert_close(_assemble([g["y"] for g in got], rows), one["y"], **TOL)
    torch.testing.assert_close(_assemble([g["x_grad"] for g in got], rows), one["x_grad"], **TOL)
    for g in got:
        torch.testing.assert_close(g["param_grad"], one["param_grad"], **TOL)
        for key in ("mean", "var"):
            torch.testing.assert_close(g[key], one[key], **TOL)
            assert torch.equal(g[key], got[0][key])  # every rank keeps the same statistics
        assert int(g["n"]) == 1


def test_dp4_model_is_dataparallels_model_at_world_sizes_one_two_four(runs):
    """The whole ResNet-32 BCL model: outputs in global order, the C pseudo-centres and every
    BatchNorm's running statistics equal the DataParallel simulation at W = 1, 2 and 4."""
    dp = runs["dp_model"]
    want = {"logits": torch.cat([d["logits"] for d in dp]), "z": torch.cat([d["z"] for d in dp]),
            "centers": dp[0]["centers"], "stats": dp[0]["stats"]}
    one = _model_out(_model(), _model_input())
    one["rows"] = torch.arange(3 * B)
    for label, got in (("W=1", [one]), ("W=2", runs["model2"]), ("W=4", runs["model4"])):
        rows = [g["rows"] for g in got]
        for key in ("logits", "z"):
            torch.testing.assert_close(_assemble([g[key] for g in got], rows), want[key], **TOL, msg=label)
        for g in got:
            torch.testing.assert_close(g["centers"], want["centers"], **TOL, msg=label)
            assert g["stats"].keys() == want["stats"].keys()
            for k, v in want["stats"].items():
                torch.testing.assert_close(g["stats"][k], v, **TOL, msg=f"{label} {k}")
    # Rows 64–99 of the pseudo-centres repeat rows 0–35 (DataParallel's concatenation, cut to C).
    assert torch.equal(one["centers"][64:], one["centers"][:36])
    assert one["centers"].shape == (C, 16)


def test_layout_groups_are_torch_chunk_of_the_global_batch():
    # 3B = 30: chunks of 8, 8, 8, 6; 3B = 6: three chunks of 2 (DataParallel then runs 3 replicas).
    assert replica_layout(30, 0, 1).sizes == (8, 8, 8, 6)
    assert replica_layout(6, 0, 1).sizes == (2, 2, 2)
    # W = 2, b = 4: rank 0 holds global rows 0–3, 8–11, 16–19; groups [0, 6), [6, 12), [12, 18), [18, 24).
    layout = replica_layout(12, 0, 2)
    assert layout.rows == ((4, 4, 2, 2), (2, 2, 4, 4)) and layout.local == ((0, 4), (4, 8), (8, 10), (10, 12))
    assert layout.spans_ranks and not replica_layout(24, 0, 1).spans_ranks
    with pytest.raises(ValueError, match="three views"):
        replica_layout(10, 0, 1)


def test_running_statistics_under_uneven_groups_are_group_zeros():
    x, _, bn = _bn_case()
    x = torch.cat([x, x[:6] * 0.5])  # 30 rows: groups of 8, 8, 8, 6
    rbn = convert_replica_batchnorm(copy.deepcopy(bn))
    y = rbn(x)
    ref = copy.deepcopy(bn)
    want = [ref(c) if k == 0 else copy.deepcopy(bn)(c) for k, c in enumerate(x.chunk(4))]
    assert torch.equal(y, torch.cat(want))
    assert torch.equal(rbn.running_mean, ref.running_mean) and torch.equal(rbn.running_var, ref.running_var)


def test_evaluation_uses_the_running_statistics():
    x, _, bn = _bn_case()
    rbn = convert_replica_batchnorm(copy.deepcopy(bn)).eval()
    assert torch.equal(rbn(x[:5]), copy.deepcopy(bn).eval()(x[:5]))  # any batch size in evaluation


@pytest.mark.parametrize("override, key", [({"model": {"sync_bn": True}}, "model.sync_bn"),
                                           ({"model": {"freeze_bn": True}}, "model.freeze_bn"),
                                           ({"model": {"backbone": "resnet50", "use_norm": False}}, "model.use_norm")])
def test_settings_dp4_cannot_reproduce_are_refused(tmp_path, override, key):
    from conftest import tiny_config
    from fastlt.config.loader import config_from_dict
    from fastlt.errors import ConfigError

    cfg = tiny_config(tmp_path, tmp_path, method={"reference_parallelism": "dp4"})
    for section, values in override.items():
        cfg[section].update(values)
    with pytest.raises(ConfigError, match=key):
        config_from_dict(cfg)
    with pytest.raises(ConfigError, match="method.reference_parallelism"):
        config_from_dict(tiny_config(tmp_path, tmp_path, method={"reference_parallelism": "dp2"}))


def test_a_dp4_run_trains_and_two_ranks_log_its_first_step(tmp_path):
    """fastlt train with the switch, in one process and over two deepspeed (gloo) ranks: both train
    with the published centre head, and the first step's losses — a function of the forward pass
    alone: the BatchNorm groups, the pseudo-centres, the global BalSCL — agree. Later steps are
    not compared: in fp32 a pre-activation within ~1e-6 of a ReLU's kink can land on either side
    of it under another summation order, and one flipped element is enough to move the next
    step's loss by 1e-3 (measured: one flip among 49k activations of the first step)."""
    from conftest import DEEPSPEED, TINY_CLASSES, events, launch_deepspeed, run_fastlt, tiny_config, weights, \
        write_config

    def config(name):
        cfg = tiny_config(tmp_path / "data", tmp_path, optim={"epochs": 1}, method={"reference_parallelism": "dp4"},
                          run={"name": name, "max_steps_per_epoch": 2, "log_every": 1})
        return write_config(tmp_path / f"{name}.yaml", cfg)

    run_fastlt("--config", config("one"))
    one = events(tmp_path / "one", "train")
    assert len(one) == 2 and all(torch.isfinite(torch.tensor([r["loss"] for r in one])))
    w = weights(tmp_path / "one" / "last.pt")
    # The head on the 64 columns of the (C × 64) classifier weight: its first layer takes C inputs.
    assert w["head_fc.0.weight"].shape == (32, TINY_CLASSES) and w["fc.weight"].shape == (TINY_CLASSES, 64)
    if not DEEPSPEED.is_file():
        pytest.skip(f"the deepspeed launcher is not installed at {DEEPSPEED}")
    launch_deepspeed(config("two"))  # the run ends by checking that both ranks hold the same weights
    two = events(tmp_path / "two", "train")
    # fp32 sums in other orders (gathered statistics, gloo): 1e-5 relative is ~100 rounding steps.
    for key in ("loss", "ce", "scl"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5), key
