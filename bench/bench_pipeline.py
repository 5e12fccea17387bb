"""Training-pipeline throughput: the DALI CPU graph against the torch DataLoader
backend on this machine, same recipe, same cores, same data, rounds interleaved.

Both backends produce the full training batch of docs/design.md §3 at 224 px with the
ImageNet-style recipe of §1 (view 0: RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4, 0),
timm's RandAugment 'rand-n2-m10-mstd0.5'; views 1–2: RandomResizedCrop, flip, jitter p 0.8,
grayscale p 0.2; the foreground view where CutMix pastes, per batch with probability 0.5), from
~400×350 JPEGs written by ``fastlt.data.make_synthetic_lt(image_size=(350, 400))`` (cached
under ``data_cache/``). Workers: ``num_workers=2`` for both — two DataLoader worker processes
for torch; two DALI CPU threads (plus its one Python reader process) for DALI.

**Interleaved rounds.** One round is one whole epoch (the same 640 images for both backends)
from a persistent pipeline: the DALI graph is built and warmed once, as in training; the torch
loader starts its workers per epoch, as it does in training. After one warm-up epoch each, the
rounds alternate in one process — DALI, torch, DALI, torch, … — so that whatever else runs on a
shared machine loads both backends alike; run one after the other, the backends saw different
load and the ratio moved with it. Both kinds of round are self-contained: a DALI epoch leaves
no work running behind it (its next epoch's prefetch starts with that epoch's first run;
measured: no CPU used by the process tree in the 3 s after an epoch), and the torch loader's
workers start and stop inside their epoch.

The two tests report the rounds of that one schedule (run once per module by a fixture):
images/s uses each backend's fastest round, as ``bench/check_floors.py`` does with
``bench/floors.json``. Next to it each test records the CPU time its backend's rounds cost the
whole process tree (main process, DALI threads, DataLoader and DALI reader processes) per
image — a cost that does not depend on how much of the machine the benchmark got (Linux
``/proc``; omitted elsewhere) — and the load average before and after the schedule.

Environment: ``FASTLT_BENCH_PIPELINE_ROUNDS`` (default 4) rounds per backend.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastlt.data import LongTailedList, make_synthetic_lt
from fastlt.pipelines import TrainPipelineSpec, build_train_pipeline, dali_available

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 224
BATCH = 32
WORKERS = 2
ROUNDS = int(os.environ.get("FASTLT_BENCH_PIPELINE_ROUNDS", "4"))
GROUP = "pipeline_cpu_imagenet_recipe_224px_b32_from_400x350_jpeg"
HAVE_DALI = dali_available()[0]


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
    import timm
    import torch
    import torchvision

    ok, dali = dali_available()
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "dali": dali if ok else None}


@dataclass
class Rounds:
    """One backend's timed rounds of the interleaved schedule."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] | None = field(default_factory=list)
    """Process-tree CPU seconds of each round (None without /proc)."""

    def cpu_ms_per_image(self, images: int) -> float | None:
        if not self.cpu_seconds or not self.seconds:
            return None
        return round(1000 * sum(self.cpu_seconds) / (images * len(self.seconds)), 2)

    def cores(self) -> list[float] | None:
        """CPU cores the process tree kept busy in each round (CPU seconds / wall seconds)."""
        return None if not self.cpu_seconds else [round(c / s, 2) for c, s in zip(self.cpu_seconds, self.seconds)]


@dataclass
class Schedule:
    """What one interleaved schedule measured: images per round, the order the rounds ran in,
    each backend's rounds, the 1-minute load average before and after."""

    images: int
    order: list[str]
    rounds: dict[str, Rounds]
    load_before: float
    load_after: float
    torch_threads: int


@pytest.fixture(scope="module")
def schedule(request, dataset) -> Schedule:
    """Warm up both pipelines, then run ROUNDS rounds of each backend alternately (see the
    module docstring), timing each epoch with ``time.perf_counter`` (pytest-benchmark's default
    timer)."""
    import torch

    timer = time.perf_counter
    backends = ["dali", "torch"] if HAVE_DALI else ["torch"]
    rounds = 1 if request.config.getoption("benchmark_disable", False) else ROUNDS
    pipes = {b: build_train_pipeline(_spec(dataset), b) for b in backends}
    images = pipes["torch"].steps_per_epoch * BATCH
    result = {b: Rounds() for b in backends}
    order = []
    # One intra-op thread in this process, as the other suites pin it: the DataLoader workers use
    # one each anyway, and DALI's threads are its own (num_workers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for pipe in pipes.values():  # warm-up: DALI builds its graph, caches fill
            for _ in pipe.epoch(0):
                pass
        load_before = os.getloadavg()[0]
        for epoch in range(1, rounds + 1):
            for b in backends:
                cpu0, t0 = _tree_cpu_seconds(), timer()
                n = sum(len(batch) for batch in pipes[b].epoch(epoch))
                t1, cpu1 = timer(), _tree_cpu_seconds()
                if n != images:
                    raise RuntimeError(f"{b} produced {n} images in epoch {epoch}; expected {images}")
                result[b].seconds.append(t1 - t0)
                if cpu0 is None:
                    result[b].cpu_seconds = None
                else:
                    result[b].cpu_seconds.append(cpu1 - cpu0)
                order.append(b)
        load_after = os.getloadavg()[0]
    finally:
        torch.set_num_threads(threads)
        for pipe in pipes.values():
            pipe.close()
    return Schedule(images, order, result, load_before, load_after, torch_threads=1)


def _record_rounds(benchmark, seconds: list[float]) -> None:
    """Give rounds timed by :func:`schedule` to pytest-benchmark as this test's rounds, so that its
    table, its JSON and ``bench/check_floors.py`` use them. pytest-benchmark has no public call
    for rounds timed outside ``benchmark(...)`` / ``pedantic`` (ionelmc/pytest-benchmark#52, open);
    this uses the two internals that the workaround there uses, and says so if they change."""
    if benchmark.disabled:
        benchmark._mode = "benchmark.pedantic(...)"
        return
    if not (hasattr(benchmark, "_make_stats") and hasattr(benchmark, "_mode")):
        raise RuntimeError(f"this pytest-benchmark ({type(benchmark).__module__}) has no BenchmarkFixture._make_stats/"
                           f"_mode, through which bench_pipeline.py records its interleaved rounds; pin "
                           f"pytest-benchmark<6 (setup.py's test extra) or update _record_rounds")
    benchmark._mode = "benchmark.pedantic(...)"  # what pedantic sets: the fixture counts as used once
    stats = benchmark._make_stats(1)
    for s in seconds:
        stats.update(s)


def _record(benchmark, request, backend: str, sched: Schedule) -> float:
    mine = sched.rounds[backend]
    _record_rounds(benchmark, mine.seconds)
    rate = sched.images / min(mine.seconds)
    cpu_ms = mine.cpu_ms_per_image(sched.images)
    benchmark.extra_info.update(
        backend=backend, images_per_epoch=sched.images, images_per_s=round(rate, 1),
        rounds_images_per_s=[round(sched.images / s, 1) for s in mine.seconds], round_order=sched.order,
        image_size=IMAGE_SIZE, batch_size=BATCH, num_workers=WORKERS, source_jpeg_hw=(350, 400),
        cpu_affinity=len(os.sched_getaffinity(0)), cpu_ms_per_image=cpu_ms, rounds_cores_busy=mine.cores(),
        load_average_1min=(round(sched.load_before, 2), round(sched.load_after, 2)),
        torch_threads=sched.torch_threads, **_versions())
    _report(request, f"\n[pipeline] {backend}: {rate:.1f} images/s (best of {len(mine.seconds)} interleaved epochs "
                     f"of {sched.images} images; rounds {benchmark.extra_info['rounds_images_per_s']}), "
                     f"{cpu_ms} CPU-ms/image (cores busy per round {mine.cores()}), "
                     f"load average {sched.load_before:.1f} -> {sched.load_after:.1f}")
    return rate


@pytest.mark.benchmark(group=GROUP)
def test_pipeline_torch_dataloader(benchmark, request, schedule):
    _record(benchmark, request, "torch", schedule)


@pytest.mark.skipif(not HAVE_DALI, reason="DALI is not installed (pip install nvidia-dali-cuda130)")
@pytest.mark.benchmark(group=GROUP)
def test_pipeline_dali_cpu(benchmark, request, schedule):
    rate = _record(benchmark, request, "dali", schedule)
    torch_rounds, dali_rounds = schedule.rounds["torch"], schedule.rounds["dali"]
    torch_rate = schedule.images / min(torch_rounds.seconds)
    ratio = rate / torch_rate
    # Pairwise: each DALI round against the torch round right after it (same load, seconds apart).
    pairs = [t / d for d, t in zip(dali_rounds.seconds, torch_rounds.seconds)]
    benchmark.extra_info.update(torch_images_per_s=round(torch_rate, 1), ratio_vs_torch=round(ratio, 2),
                                pairwise_ratios=[round(r, 2) for r in pairs])
    line = (f"[pipeline] DALI CPU / torch DataLoader = {ratio:.2f}x images/s (best rounds; per DALI-torch pair "
            f"{', '.join(f'{r:.2f}' for r in pairs)})")
    t_ms, d_ms = torch_rounds.cpu_ms_per_image(schedule.images), dali_rounds.cpu_ms_per_image(schedule.images)
    if t_ms and d_ms:
        benchmark.extra_info.update(cpu_cost_ratio_vs_torch=round(t_ms / d_ms, 2))
        line += f"; {t_ms / d_ms:.2f}x less CPU time per image ({t_ms} -> {d_ms} ms)"
    _report(request, line)
