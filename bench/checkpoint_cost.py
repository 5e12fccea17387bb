"""Checkpoint cost: how long a resumable checkpoint blocks training, and how many bytes it writes,
for the ImageNet-LT recipe's model (ResNeXt-50 32x4d, 1000 classes) at ZeRO stage 0, 1 and 2.

Each rank builds the model and the DeepSpeed engine the way the trainer does
(``fastlt.models.build_model`` + ``fastlt.training.engine.build_engine``: fastlt's SGD with
momentum, the recipe's precision and channels-last), takes one optimizer step on a tiny random
batch (so that the optimizer holds its momentum buffers, as at any epoch end), then saves
``--reps`` checkpoints through ``fastlt.training.checkpoint.CheckpointManager.save`` (or, with
``--async``, ``run.async_checkpoint``'s path: the blocking part of the save, then the wait for
the write before the next save). The input size does not change what is saved, so the step
runs at ``--image-size`` (default 64 px) to stay cheap on a CPU.

The save time of one checkpoint is measured from a barrier before the call to the return of
the call, on every rank; the figure reported is the slowest rank's (training continues only
when all ranks have returned: the next step's collectives wait for the last one). The bytes are
the sizes of the files in the published checkpoint directory, grouped as DeepSpeed's model
states file (module weights and, at ZeRO-0, the whole optimizer state), the ZeRO optimizer
shards (one per rank), and fastlt's RNG and meta files.

Run (2 CPU ranks, gloo)::

    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 bench/checkpoint_cost.py \\
        --out /tmp/ckpt_cost --json bench/results/checkpoint_cost_cpu.json

A plain ``python bench/checkpoint_cost.py`` is a world of one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "imagenet_lt_resnext50_90ep.yaml"


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(RECIPE),
                   help="recipe whose model and engine are built (default: %(default)s)")
    p.add_argument("--stages", default="0,1,2", help="ZeRO stages to measure, comma-separated (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="checkpoints saved per stage (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="input size of the one optimizer step (default: 64)")
    p.add_argument("--out", required=True, help="scratch folder for the checkpoints (removed stage by stage)")
    p.add_argument("--json", default=None, help="also write the figures there as JSON (rank 0)")
    p.add_argument("--async", dest="async_save", action="store_true",
                   help="save with run.async_checkpoint: true (the blocking part only is timed)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def _group(name: str) -> str:
    if name == "mp_rank_00_model_states.pt":
        return "model_states"
    if name.startswith("zero_pp_rank_") and name.endswith("_optim_states.pt"):
        return "optimizer_shards"
    if name.startswith("rng_rank"):
        return "rng"
    if name == "meta.json":
        return "meta"
    return "other"


def _files(path: Path) -> dict:
    sizes = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    groups: dict = {}
    for name, n in sizes.items():
        groups[_group(name)] = groups.get(_group(name), 0) + n
    return {"files": sizes, "groups": groups, "total": sum(sizes.values())}


def _one_step(engine, image_size: int, micro: int) -> None:
    """One forward/backward/step on random images, touching every output (so every parameter
    has a gradient and the optimizer a momentum buffer for it)."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(micro, 3, image_size, image_size)
    out = engine(x)
    loss = sum(t.float().square().mean() for t in out)
    engine.backward(loss)
    engine.step()


def _slowest(seconds: float, world: int) -> float:
    """The largest of every rank's ``seconds``."""
    import torch

    if world == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def _measure_stage(args, stage: int, proc) -> dict:
    import torch

    from fastlt.config.loader import load_config
    from fastlt.models import build_model
    from fastlt.training import distributed as dist
    from fastlt.training.checkpoint import CheckpointManager, model_signature
    from fastlt.training.engine import build_engine

    world = proc.world_size
    overrides = [f"deepspeed.zero_stage={stage}", f"data.batch_size={2 * world}", f"data.eval_batch_size={2 * world}",
                 f"data.image_size={args.image_size}"] + (["run.async_checkpoint=true"] if args.async_save else [])
    cfg = load_config(args.config, overrides)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, cfg.data.num_classes)
    signature = model_signature(model, cfg)
    engine, ds_config = build_engine(cfg, model, world)
    _one_step(engine, args.image_size, ds_config["train_micro_batch_size_per_gpu"])
    params = sum(p.numel() for p in model.parameters())

    folder = Path(args.out) / f"zero{stage}"
    if proc.rank == 0 and folder.exists():
        shutil.rmtree(folder)
    dist.barrier()
    extra = {"async_save": True} if args.async_save else {}
    ckpt = CheckpointManager(folder, keep_last=cfg.run.keep_last, rank=proc.rank, local_rank=proc.local_rank,
                             world_size=world, **extra)
    meta = {"signature": signature, "backbone": cfg.model.backbone, "num_classes": cfg.data.num_classes,
            "batch_size": cfg.data.batch_size, "steps_per_epoch": 1, "zero_stage": stage}
    times, waits = [], []
    for rep in range(args.reps):
        client = {"fastlt": {"epoch": rep + 1, "step": 0, "global_step": int(engine.global_steps), "scheduler": {},
                             "best": None, "history": [], "train_time_s": 0.0, "eval_pending": False}}
        dist.barrier()
        t0 = time.perf_counter()
        path = ckpt.save(engine, rep + 1, 0, client, meta)
        took = time.perf_counter() - t0
        times.append(_slowest(took, world))
        if args.async_save:  # what the next save (or the end of the run) waits for
            t0 = time.perf_counter()
            ckpt.wait()
            took = time.perf_counter() - t0
            waits.append(_slowest(took, world))
    dist.barrier()
    sizes = _files(path) if proc.rank == 0 else None
    result = {"zero_stage": stage, "parameters": params, "reps": args.reps,
              "save_s": {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}}
    if waits:
        result["write_wait_s"] = {"median": statistics.median(waits), "min": min(waits), "max": max(waits),
                                  "all": waits}
    if sizes is not None:
        shards = [n for name, n in sizes["files"].items() if _group(name) == "optimizer_shards"]
        per_rank = []
        for r in range(world):
            own = sizes["files"].get(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", 0)
            own += sizes["files"].get(f"rng_rank{r:05d}.pt", 0)
            if r == 0:
                own += sizes["groups"].get("model_states", 0) + sizes["groups"].get("meta", 0)
            per_rank.append(own)
        result.update(bytes_total=sizes["total"], bytes_by_group=sizes["groups"], bytes_per_rank=per_rank,
                      optimizer_shard_bytes=shards, files=sizes["files"])
    dist.barrier()
    if proc.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    del engine, model, ckpt
    gc.collect()
    return result


def main(argv=None) -> int:
    args = _args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    from fastlt.training import distributed as dist

    proc = dist.process_info()
    dist.prepare_process_env("cpu")
    dist.init_distributed("cpu", proc)
    results = []
    for stage in (int(s) for s in args.stages.split(",")):
        r = _measure_stage(args, stage, proc)
        results.append(r)
        if proc.rank == 0:
            s = r["save_s"]
            print(f"ZeRO-{stage}: save {s['median']:.2f} s median ({s['min']:.2f}-{s['max']:.2f}, {r['reps']} saves), "
                  f"{r['bytes_total'] / 1e6:.1f} MB in all, per rank {[round(b / 1e6, 1) for b in r['bytes_per_rank']]}"
                  f" MB; {json.dumps({k: round(v / 1e6, 2) for k, v in r['bytes_by_group'].items()})} MB"
                  + (f"; write finished {r['write_wait_s']['median']:.2f} s later (median)" if "write_wait_s" in r
                     else ""), flush=True)
    if proc.rank == 0:
        report = {"what": "fastlt checkpoint cost, ImageNet-LT recipe model", "config": str(args.config),
                  "ranks": proc.world_size, "async": args.async_save, "out": str(args.out),
                  "date": time.strftime("%Y-%m-%d", time.gmtime()), "host": platform.node(),
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                  "results": results}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
