"""Training-pipeline throughput: the DALI CPU graph against the torch DataLoader
backend on this machine, same recipe, same cores, same data.

Both backends produce the full training batch of ARCHITECTURE §3 at 224 px with the
ImageNet-style recipe of §1 (view 0: RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4, 0),
RandAugment n=2 m=10; views 1–2: RandomResizedCrop, flip, jitter p 0.8, grayscale p 0.2;
the foreground view where CutMix pastes, per batch with probability 0.5), from ~400×350
JPEGs written by ``fastlt.data.make_synthetic_lt(image_size=(350, 400))`` (cached under
``data_cache/``). Workers: ``num_workers=2`` for both — two DataLoader worker processes for
torch; two DALI CPU threads (plus its one Python reader process) for DALI.

One benchmark round is one whole epoch from the persistent pipeline (the DALI graph is
built and warmed once, as in training; the torch loader starts its workers per epoch, as
it does in training). Images/s counts classification images (B per step). The DALI test
stores both rates and their ratio in its ``extra_info`` and prints them;
``bench/floors.json`` holds the issue's target (≥ 1.5×) for ``make bench``.

Wall-clock rates on a shared machine move with whatever else runs, so each test also
records the CPU time its whole process tree (main process, DALI threads, DataLoader and
DALI reader processes) spent per image over all rounds: a cost that does not depend on
how much of the machine the benchmark got (Linux ``/proc``; omitted elsewhere).

Environment: ``FASTLT_BENCH_PIPELINE_ROUNDS`` (default 3) rounds per backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastlt.data import LongTailedList, make_synthetic_lt
from fastlt.pipelines import TrainPipelineSpec, build_train_pipeline, dali_available

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 224
BATCH = 32
WORKERS = 2
ROUNDS = int(os.environ.get("FASTLT_BENCH_PIPELINE_ROUNDS", "3"))
GROUP = "pipeline_cpu_imagenet_recipe_224px_b32_from_400x350_jpeg"
_RATES: dict[str, float] = {}
_CPU_MS: dict[str, float | None] = {}


@pytest.fixture(scope="module")
def dataset():
    syn = make_synthetic_lt(ROOT / "data_cache" / "bench-pipeline-400x350", num_classes=10, imb_factor=0.1,
                            n_max=160, image_size=(350, 400), seed=0, n_val=1)
    return LongTailedList(syn.root, syn.train_list)


def _spec(ds) -> TrainPipelineSpec:
    return TrainPipelineSpec(dataset=ds, recipe="imagenet", image_size=IMAGE_SIZE, batch_size=BATCH,
                             num_workers=WORKERS, seed=0, cutmix_prob=0.5, randaugment=True, augment=True)


def _report(request, line: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():  # shown even though pytest captures output
        print(line)


def _tree_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process, its live descendants and its reaped children."""
    if not os.path.isdir("/proc/self"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parent[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, stack = set(), [os.getpid()]
    while stack:
        pid = stack.pop()
        tree.add(pid)
        stack.extend(c for c, pp in parent.items() if pp == pid and c not in tree)
    t = os.times()
    return sum(cpu.get(p, 0.0) for p in tree) + t.children_user + t.children_system


def _versions() -> dict:
    import PIL
    import torch
    import torchvision

    ok, dali = dali_available()
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "dali": dali if ok else None}


def _run(benchmark, request, backend: str, ds) -> float:
    pipe = build_train_pipeline(_spec(ds), backend)
    epochs = iter(range(1, 10_000))
    images = pipe.steps_per_epoch * BATCH
    try:
        for _ in pipe.epoch(0):  # warm-up: DALI builds its graph, caches fill
            pass

        def one_epoch():
            n = 0
            for batch in pipe.epoch(next(epochs)):
                n += len(batch)
            return n

        cpu0 = _tree_cpu_seconds()
        n = benchmark.pedantic(one_epoch, rounds=ROUNDS, iterations=1)
        cpu1 = _tree_cpu_seconds()
        assert n == images
    finally:
        pipe.close()
    rate = images / benchmark.stats.stats.min
    _RATES[backend] = rate
    cpu_ms = None if cpu0 is None else round(1000 * (cpu1 - cpu0) / (images * ROUNDS), 2)
    _CPU_MS[backend] = cpu_ms
    benchmark.extra_info.update(backend=backend, images_per_epoch=images, images_per_s=round(rate, 1),
                                image_size=IMAGE_SIZE, batch_size=BATCH, num_workers=WORKERS,
                                source_jpeg_hw=(350, 400), cpu_affinity=len(os.sched_getaffinity(0)),
                                cpu_ms_per_image=cpu_ms, load_average_1min=round(os.getloadavg()[0], 2),
                                **_versions())
    _report(request, f"\n[pipeline] {backend}: {rate:.1f} images/s (best of {ROUNDS} epochs of {images} images), "
                     f"{cpu_ms} CPU-ms/image, load average {os.getloadavg()[0]:.1f}")
    return rate


@pytest.mark.benchmark(group=GROUP)
def test_pipeline_torch_dataloader(benchmark, request, dataset):
    _run(benchmark, request, "torch", dataset)


@pytest.mark.skipif(not dali_available()[0], reason="DALI is not installed (pip install nvidia-dali-cuda130)")
@pytest.mark.benchmark(group=GROUP)
def test_pipeline_dali_cpu(benchmark, request, dataset):
    rate = _run(benchmark, request, "dali", dataset)
    if "torch" in _RATES:
        ratio = rate / _RATES["torch"]
        benchmark.extra_info.update(torch_images_per_s=round(_RATES["torch"], 1), ratio_vs_torch=round(ratio, 2))
        line = f"[pipeline] DALI CPU / torch DataLoader = {ratio:.2f}x images/s (target >= 1.5x)"
        if _CPU_MS.get("torch") and _CPU_MS.get("dali"):
            cpu_ratio = _CPU_MS["torch"] / _CPU_MS["dali"]
            benchmark.extra_info.update(cpu_cost_ratio_vs_torch=round(cpu_ratio, 2))
            line += f"; {cpu_ratio:.2f}x less CPU time per image"
        _report(request, line)
