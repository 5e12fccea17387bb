"""Where the DALI training pipeline's CPU time goes, each part measured alone, in one process:

1. the Python per-sample sources (``pipelines.dali_sources``): what DALI's reader process runs
   for every sample — the background call and the foreground call — and, inside them, reading
   the file with its header check, the keyed generator, the view parameters, the keyed
   parameter tables (RandAugment's stages) and the CutMix draw;
2. decode alone (DALI's CPU ``decoders.image`` over the same files, batch 32);
3. the whole DALI graph (sources in their reader process, decode, augment, paste, normalise).

Rates are per CPU second (the process's, or its tree's, CPU time), i.e. what one core does,
so that the other jobs of a shared machine do not lower them. The sources' rate is the ceiling
of one reader process: the Python side of one training
process delivers at most that many samples per second per reader (``py_num_workers``). Same
data as ``bench/bench_pipeline.py`` (640 JPEGs of 400×350, 224 px ImageNet recipe with
RandAugment, CutMix p 0.5, batch 32).

    .venv/bin/python bench/dali_source_ceiling.py

Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BATCH, SIZE, ROUNDS = 32, 224, 3


class _Info:
    """DALI's SampleInfo, as far as the sources read it."""

    def __init__(self, idx: int):
        self.epoch_idx, self.idx_in_epoch = 0, idx


def _best_rate(fn, n: int, rounds: int = ROUNDS) -> float:
    """Calls per CPU second (this process's CPU time, so a loaded machine does not lower it) of
    the cheapest of ``rounds`` rounds of ``fn(i)`` for i < n: the rate of one core."""
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for i in range(n):
            fn(i)
        best = min(best, time.process_time() - t)
    return n / best


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from fastlt.data import LongTailedList, make_synthetic_lt
    from fastlt.pipelines import TrainPipelineSpec
    from fastlt.pipelines.common import check_encoded_image, cutmix_boxes, keyed_rng
    from fastlt.pipelines.dali_sources import BackgroundSource, ForegroundSource, SourceConfig
    from fastlt.pipelines.dali_train import DaliTrainPipeline

    syn = make_synthetic_lt(ROOT / "data_cache" / "bench-pipeline-400x350", num_classes=10, imb_factor=0.1,
                            n_max=160, image_size=(350, 400), seed=0, n_val=1)
    ds = LongTailedList(syn.root, syn.train_list)
    spec = TrainPipelineSpec(dataset=ds, recipe="imagenet", image_size=SIZE, batch_size=BATCH, num_workers=2, seed=0,
                             cutmix_prob=0.5, randaugment=True, augment=True)
    pipe = DaliTrainPipeline(spec)
    cfg = SourceConfig(dataset=ds, recipe="imagenet", plan=pipe.plan, image_size=SIZE, augment=True,
                       tables=pipe.tables, seed=0, rank=0, cutmix_prob=0.5, cutmix_per_sample=False,
                       cutmix_alpha=1.0, on_error="raise", base_epoch=0, base_step=0)
    bg, fg = BackgroundSource(cfg), ForegroundSource(cfg)
    n = pipe.plan.steps_per_epoch * BATCH
    hw = (350, 400)
    out: dict = {"samples_per_epoch": n}

    # 1. The sources, whole and by part (calls per second, one process, one thread).
    out["source_background_per_s"] = _best_rate(lambda i: bg(_Info(i)), n)
    out["source_foreground_per_s"] = _best_rate(lambda i: fg(_Info(i)), n)
    out["source_sample_per_s"] = _best_rate(lambda i: (bg(_Info(i)), fg(_Info(i))), n)
    out["part_read_and_header_per_s"] = _best_rate(lambda i: check_encoded_image(ds.read_bytes(i)), n)
    out["part_keyed_rng_per_s"] = _best_rate(lambda i: keyed_rng(0, 0, i, 0), n)
    rngs = [keyed_rng(0, 0, i, 0) for i in range(n)]
    out["part_view_params_3_views_per_s"] = _best_rate(lambda i: bg._view_params(rngs[i], hw, 3), n)
    out["part_randaugment_tables_per_s"] = _best_rate(lambda i: pipe.tables.draw(rngs[i]), n)
    out["part_epoch_indices_and_position_per_s"] = _best_rate(
        lambda i: (pipe.plan.epoch_indices(0), pipe.plan.position(*divmod(i, BATCH))), n)
    out["part_cutmix_draw_per_s"] = _best_rate(
        lambda i: cutmix_boxes(0, 0, i // BATCH, [i], SIZE, SIZE, prob=0.5, per_sample=False, alpha=1.0), n)

    # 2. DALI's CPU decode alone over the same files.
    from nvidia.dali import fn, pipeline_def

    files = [np.frombuffer(ds.read_bytes(i), np.uint8) for i in range(n)]

    @pipeline_def(batch_size=BATCH, num_threads=2, device_id=None)
    def decode_only():
        data = fn.external_source(source=lambda info: files[info.idx_in_epoch % n], batch=False)
        return fn.decoders.image(data, device="cpu")

    dec = decode_only()
    dec.build()
    dec.run()
    best = float("inf")
    for _ in range(ROUNDS):
        t = time.process_time()  # every DALI thread of this process
        for _ in range(n // BATCH):
            dec.run()
        best = min(best, time.process_time() - t)
    out["dali_decode_only_img_per_cpu_s"] = n / best
    del dec

    # 3. The whole DALI training graph (reader process, decode, augment, paste, normalise).
    for _ in pipe.epoch(0):  # build and warm
        pass
    from bench_pipeline import _tree_cpu_seconds  # this process, its DALI threads and reader process

    best, wall = float("inf"), float("inf")
    for e in range(1, ROUNDS + 1):
        t, w = _tree_cpu_seconds(), time.perf_counter()
        for _ in pipe.epoch(e):
            pass
        best, wall = min(best, _tree_cpu_seconds() - t), min(wall, time.perf_counter() - w)
    pipe.close()
    out["dali_full_pipeline_samples_per_cpu_s"] = n / best
    out["dali_full_pipeline_samples_per_s_wall"] = n / wall
    out["load_avg_1min"] = os.getloadavg()[0]
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    main()
