"""Two ranks through the `deepspeed` launcher on CPU (DS_ACCELERATOR=cpu, gloo), as a cluster
launches fastlt (docs/design.md §3 "Distributed"): ZeRO-1 partitions the SGD state over the two
ranks, both replicas must hold identical weights after the steps, and a 2-rank resume loads
the ZeRO shards back.

On the CPU accelerator the launcher takes `--num_gpus N` as the number of local ranks (one
process each; it would otherwise count NUMA nodes).
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import yaml

from conftest import DEEPSPEED, launch_deepspeed as _launch

# slow: two deepspeed launches of two ranks each (`make test-slow`).
pytestmark = [pytest.mark.slow, pytest.mark.cluster,
              pytest.mark.skipif(not DEEPSPEED.is_file(), reason=f"the deepspeed launcher is not installed at "
                                                                  f"{DEEPSPEED}")]


def _digest(state: dict) -> str:
    """SHA-256 over names and raw bytes, in state-dict order (written independently of fastlt)."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).tolist()))
    return h.hexdigest()


def test_two_ranks_hold_identical_weights_and_resume_their_zero_shards(tmp_path):
    cfg = {
        "model": {"backbone": "resnet32", "feat_dim": 16, "use_norm": False, "hidden_dim": 32},
        "data": {"kind": "synthetic", "root": str(tmp_path / "data"),
                 "synthetic": {"num_classes": 6, "imb_factor": 0.2, "n_max": 40, "image_size": 16, "n_val": 4},
                 "augment_recipe": "imagenet", "image_size": 16, "batch_size": 16, "eval_batch_size": 8,
                 "randaugment": False},
        "method": {"l_d_warm": 0, "scaling_factor": [20, 255], "topk": 3, "temperature": 0.1},
        "optim": {"epochs": 1, "lr": 0.05},
        "deepspeed": {"zero_stage": 1, "grad_clip": 1.0},
        "pipeline": {"backend": "torch", "num_workers": 0},
        "run": {"output_dir": str(tmp_path / "runs"), "name": "two", "log_every": 1, "max_steps_per_epoch": 3},
    }
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = _launch(config)
    run = tmp_path / "runs" / "two"
    assert "2 rank(s) on cpu" in proc.stdout and "3 steps/epoch of 8/rank" in proc.stdout
    # Rank 0 logs alone: one line per step, not one per rank.
    assert sum(ln.startswith("epoch 0/1 step 1/3") for ln in proc.stdout.splitlines()) == 1

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    d0, d1 = metrics["replica_digests"]
    assert d0 == d1, "the two ranks hold different weights"
    assert d0 == _digest(torch.load(run / "last.pt", weights_only=True)["model"])  # the digests are of the weights

    # ZeRO-1: each rank wrote its own optimizer shard, and each its own RNG state.
    ckpt = run / "checkpoints" / "epoch0001_step000000"
    names = sorted(p.name for p in ckpt.iterdir())
    assert [n for n in names if n.startswith("zero_pp_rank_")] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "rng_rank00000.pt" in names and "rng_rank00001.pt" in names

    # A second epoch on 2 ranks from the checkpoint: the shards load back (weights_only) and
    # the replicas still agree.
    before = shutil.copy(run / "last.pt", tmp_path / "epoch1.pt")
    proc = _launch(config, "--resume", "auto", "--set", "optim.epochs=2")
    assert f"resumed from {ckpt}: epoch 1 step 0" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["replica_digests"][0] == metrics["replica_digests"][1]
    assert metrics["replica_digests"][0] != _digest(torch.load(before, weights_only=True)["model"])  # it trained
