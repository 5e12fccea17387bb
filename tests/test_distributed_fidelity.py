"""The paper's objective at any world size (docs/design.md §3 "Distributed = one big GPU"):

* the global BalSCL over gloo: each rank holds half of a batch of leaf features; the mean of the
  ranks' losses is the one-process loss on the whole batch, and each rank's feature gradient
  divided by the world size is the one-process gradient of its rows (fp64, 1e-10);
* ``deepspeed --num_gpus 2`` and one process with the same global batch log the same losses
  step by step, on a configuration whose normalisation cannot depend on the batch split: a ViT
  backbone (LayerNorm normalises each token) and ``model.freeze_bn`` for the two heads' BatchNorm
  (running statistics), so each sample's output is the same whatever else is in its rank's
  share; everything else — the sample sequence, the CutMix coin, the global contrast set, the
  averaged gradients — is the same by construction. (A frozen-BN ResNet-32 from scratch would
  do too, but without its normalisation it diverges within three steps);
* a run written with 2 ranks resumes with 1 rank and continues the identical data sequence
  (its losses are those of the 2-rank run's next epoch).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import DEEPSPEED, events, launch_deepspeed, run_fastlt, tiny_config, weights, write_config

B, D, C = 12, 5, 4
COUNTS = [30, 12, 6, 3]


def _batch():
    g = torch.Generator().manual_seed(7)
    features = F.normalize(torch.randn(B, 2, D, generator=g, dtype=torch.float64), dim=2)
    labels = torch.randint(0, C, (B,), generator=g)
    centers = F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1)
    return features, labels, centers


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from fastlt.method.losses import BalancedSupConLoss

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        features, labels, centers = _batch()
        b = B // world
        mine = features[rank * b:(rank + 1) * b].clone().requires_grad_()
        cen = centers.clone().requires_grad_()
        loss = BalancedSupConLoss(COUNTS, temperature=0.1, scope="global")(cen, mine, labels[rank * b:(rank + 1) * b])
        loss.backward()
        torch.save({"loss": loss.detach(), "features": mine.grad, "centers": cen.grad}, Path(out_dir) / f"{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_global_balscl_over_two_gloo_ranks_is_the_one_process_loss_and_gradient(tmp_path):
    from fastlt.method.losses import BalancedSupConLoss

    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]

    features, labels, centers = _batch()
    full = features.clone().requires_grad_()
    cen = centers.clone().requires_grad_()
    loss = BalancedSupConLoss(COUNTS, temperature=0.1)(cen, full, labels)  # one process, whole batch
    loss.backward()
    torch.testing.assert_close(sum(g["loss"] for g in got) / world, loss.detach(), rtol=0, atol=1e-10)
    b = B // world
    for r, g in enumerate(got):
        torch.testing.assert_close(g["features"] / world, full.grad[r * b:(r + 1) * b], rtol=0, atol=1e-10)
    # The centers are replicated: their data-parallel (averaged) gradient is the one-process one.
    torch.testing.assert_close(sum(g["centers"] for g in got) / world, cen.grad, rtol=0, atol=1e-10)
    # scope="local" would contrast each half alone: a different loss.
    local = BalancedSupConLoss(COUNTS, temperature=0.1, scope="local")
    halves = [local(centers, features[r * b:(r + 1) * b], labels[r * b:(r + 1) * b]) for r in range(world)]
    assert abs(float(sum(halves) / world) - float(loss.detach())) > 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data_root):
    """A 2-rank and a 1-rank run of the same global batch (2 epochs of 3 steps, logged every
    step), and a 1-rank continuation of the 2-rank run's epoch-1 checkpoint."""
    if not DEEPSPEED.is_file():
        pytest.skip(f"the deepspeed launcher is not installed at {DEEPSPEED}")
    root = tmp_path_factory.mktemp("fidelity")
    data = tiny_data_root

    def config(name: str) -> Path:
        vit = {"backbone": "vit_small_patch16_224", "backbone_kwargs": {"img_size": 16, "patch_size": 8},
               "use_norm": True, "freeze_bn": True}
        cfg = tiny_config(data, root, model=vit, optim={"epochs": 2, "lr": 0.01},
                          data={"batch_size": 16}, method={"l_d_warm": 0},
                          run={"name": name, "log_every": 1, "max_steps_per_epoch": 3, "eval_every": 2})
        return write_config(root / f"{name}.yaml", cfg)

    launch_deepspeed(config("two"))
    run_fastlt("--config", config("one"))
    one_rank = config("resumed")
    resumed = run_fastlt("--config", one_rank, "--resume", root / "two" / "checkpoints" / "epoch0001_step000000")
    out = {name: [(r["epoch"], r["step"], r["loss"], r["ce"], r["scl"]) for r in events(root / name, "train")]
           for name in ("two", "one", "resumed")}
    out["resumed_stdout"] = resumed.stdout
    return out


def _close(a, b):
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b):
        assert x[2:] == pytest.approx(y[2:], rel=1e-4, abs=1e-5), (x, y)


@pytest.mark.cluster
@pytest.mark.slow  # the runs fixture: a 2-rank deepspeed launch and two 1-rank runs
def test_two_ranks_log_the_one_process_losses(runs):
    two, one = runs["two"], runs["one"]
    assert len(two) == len(one) == 6
    _close(two, one)


@pytest.mark.cluster
@pytest.mark.slow  # the runs fixture: a 2-rank deepspeed launch and two 1-rank runs
def test_a_two_rank_run_resumes_on_one_rank_with_the_same_data(runs):
    resumed = runs["resumed"]
    assert [r[0] for r in resumed] == [1, 1, 1]  # epoch 1 only: epoch 0 came from the checkpoint
    _close(resumed, [r for r in runs["two"] if r[0] == 1])
    assert "was written by 2 rank(s) and this run has 1: the sample sequence" in runs["resumed_stdout"]


def test_zero_shards_are_not_read_by_another_partitioning(tmp_path, tiny_data_root, capsys):
    """A ZeRO checkpoint resumed with ZeRO-0 is refused before DeepSpeed starts; DeepSpeed itself
    would stop with an AttributeError traceback."""
    from fastlt.cli import train_main

    cfg = tiny_config(tiny_data_root, tmp_path, optim={"epochs": 1}, deepspeed={"zero_stage": 1},
                      run={"name": "z", "max_steps_per_epoch": 2})
    path = write_config(tmp_path / "z.yaml", cfg)
    run_fastlt("--config", path)
    assert train_main(["--config", str(path), "--resume", "auto", "--set", "deepspeed.zero_stage=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds its optimizer state in ZeRO shards" in err[0], err
    assert "--set deepspeed.zero_stage=1" in err[0]
    # On another number of ranks the shards are not refused: they are re-partitioned through
    # DeepSpeed's universal checkpoint (tests/test_cluster.py). model.pretrained still reads a
    # ZeRO checkpoint directory (the module file holds whole weights).
    from fastlt.training.checkpoint import CheckpointManager, read_meta
    from fastlt.models.pretrained import read_state_dict

    ckpt = tmp_path / "z" / "checkpoints" / "epoch0001_step000000"
    manager = CheckpointManager(tmp_path / "z" / "checkpoints", world_size=2)
    manager.check_compatible(ckpt, read_meta(ckpt), read_meta(ckpt)["signature"], zero_stage=1)
    start, fastlt_weights = read_state_dict(ckpt)
    assert fastlt_weights
    end = weights(tmp_path / "z" / "last.pt")
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in end)
