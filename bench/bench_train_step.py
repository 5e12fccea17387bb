"""Train-step throughput: how many training images per second the whole fastlt step
sustains, next to what the model alone allows and to the published implementation's step.

For each case (a recipe at a batch size, on one device) three steps are timed (in the order
1, 3, 2, so that the last test of a case can report the ratios):

1. ``test_step_model_only``: fastlt's step (``fastlt.method.objective.train_step``: one forward over the
   three views, rectified label, LA-CE + BalSCL, backward, optimizer step, through the same
   engine as the trainer) on synthetic tensors already on the device: the ceiling.
2. ``test_step_fastlt``: the same step fed by fastlt's real training pipeline (the backend
   ``fastlt.pipelines.select_backend`` picks; every figure is labelled with it) on a synthetic
   long-tailed JPEG set (``fastlt.data.make_synthetic_lt``, cached under ``data_cache/``).
3. ``test_step_published``: the published implementation's step (``bench/published_baseline.py``:
   PIL decoding and augmentation of six views per sample in two DataLoaders, CutMix after
   loading, dense B×C×D label, BalSCL with its per-element list, eager soft CE, fp32, host
   syncs every step) on the same JPEG set and the same model architecture.

All steps run in the ConCutMix phase (epoch > l_d_warm: rectified labels). One benchmark round
is ``steps`` consecutive steps from one persistent iterator, so a round measures sustained
throughput, not one step served from a full prefetch queue; CUDA is synchronised at the end of
each round. Images/s counts the classification images, B per step (the two contrastive views
that each image also contributes are not counted). The data stall is the time the host spent
blocked waiting for the next batch over the round's time; on a GPU this bounds from above the
time the GPU sat idle for want of data (the GPU may still be working through queued steps while
the host waits).

Each case's last test stores the ratios (2)/(1) and (2)/(3) in its ``extra_info`` and prints a
summary; ``bench/floors.json`` holds floors for them (``make bench`` checks the ``min`` round
times: (2)/(1) = t(1)/t(2) and (2)/(3) = t(3)/t(2), same images per round in all three).

Cases: ``cpu-resnet32-32px-b32`` (the CIFAR-size ResNet-32, fp32, small enough for a 2-core
machine) and, skipped without CUDA, ResNeXt-50 at 224 px with bf16 autocast and channels-last
at the per-GPU batches of ImageNet-LT's 256 over 2 and 8 GPUs (``cuda-resnext50-224px-b128-*``,
``-b32-*``), each eager and compiled (``run.compile: default``, ``-compiled``; the warm-up
rounds pay the compilation), and ``cuda-vits16-224px-b128-bf16`` (ViT-S/16). The published step
is timed for the b128 eager cases only. ``bench/gpu_check.sh`` runs the CUDA cases.

Environment:
    FASTLT_BENCH_ENGINE = auto | deepspeed | torch
        the fastlt step's engine: DeepSpeed (what the trainer uses; ``auto`` takes it when it
        imports) or a plain torch optimizer with the same forward/backward/step (``torch``: where
        DeepSpeed is not installed; ``fastlt.training.engine.PlainEngine``). An explicit ``deepspeed``
        that cannot be met is an error.
    FASTLT_PIPELINE = dali | torch
        overrides the ``auto`` pipeline backend (see ``fastlt.pipelines.select_backend``).
    FASTLT_BENCH_STEP_ROUNDS = "steps,rounds,warmup"
        overrides every case's round size and counts (quick checks).
    FASTLT_BENCH_STEP_SUMMARY = path
        also write every finished case's figures and ratios there as JSON (bench/gpu_check.sh).
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlt.config.loader import Config, config_from_dict

ENGINES = ("auto", "deepspeed", "torch")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class StepCase:
    """One train-step benchmark: a fastlt config (model, data, method, precision, pipeline) and
    how many steps to time."""

    name: str
    device: str
    config: dict
    steps: int
    """Steps per benchmark round."""
    rounds: int
    warmup: int
    """Warm-up rounds (not measured): first batches, worker start-up, cuDNN autotuning."""
    threads: int | None = None
    """torch intra-op threads of the benchmark process (None: as the trainer sets them)."""
    published: bool = True
    """Also time the published implementation's step (one per model is enough: it does not
    depend on fastlt's compile setting)."""
    notes: tuple = field(default_factory=tuple)

    def timing(self) -> tuple[int, int, int]:
        raw = os.environ.get("FASTLT_BENCH_STEP_ROUNDS")
        if not raw:
            return self.steps, self.rounds, self.warmup
        try:
            steps, rounds, warmup = (int(v) for v in raw.split(","))
        except ValueError:
            raise ValueError(f"FASTLT_BENCH_STEP_ROUNDS must be 'steps,rounds,warmup' (three integers, e.g. 2,3,1); "
                             f"got {raw!r}") from None
        if steps < 1 or rounds < 1 or warmup < 0:
            raise ValueError(f"FASTLT_BENCH_STEP_ROUNDS: steps and rounds must be >= 1 and warmup >= 0; got {raw!r}")
        return steps, rounds, warmup

    def cfg(self) -> Config:
        return config_from_dict(self.config)


def _imagenet_method() -> dict:
    # The ImageNet-LT recipe of docs/design.md §2 (ResNeXt-50 row).
    return dict(alpha=1.0, beta=0.35, tau=0.99, l_d_warm=0, scaling_factor=[200, 255], topk=30, temperature=0.07,
                cutmix_prob=0.5)


def _gpu_case(name: str, backbone: str, channels_last: bool, batch: int = 128, compile: str = "off",
              published: bool = True) -> StepCase:
    return StepCase(
        name=name, device="cuda", steps=6, rounds=4, warmup=2, published=published,
        config=dict(
            model=dict(backbone=backbone, feat_dim=1024, use_norm=True, channels_last=channels_last),
            # 100 classes (the synthetic set holds at most 144); 320 px JPEGs, cropped to 224.
            data=dict(kind="synthetic", root="data_cache/bench-step-gpu",
                      synthetic=dict(num_classes=100, imb_factor=0.1, n_max=60, image_size=320, n_val=1, seed=0),
                      augment_recipe="imagenet", image_size=224, normalization="imagenet", batch_size=batch,
                      randaugment=True),
            method=_imagenet_method(),
            optim=dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
            deepspeed=dict(precision="bf16", autocast=True, zero_stage=0),
            pipeline=dict(backend="auto", num_workers=_cores()),
            # Compiled cases: warm-up rounds pay the compilation, measured rounds do not.
            run=dict(device="cuda", seed=0, compile=compile)),
        notes=("C=100 classes: the synthetic JPEG set holds at most 144",
               f"per-GPU batch {batch}: ImageNet-LT's 256 over {256 // batch} GPU(s)"))


CASES = [
    # One intra-op thread: the model gets one core and the data workers the other, as on a GPU
    # machine the model has the device and the data the host cores. With two threads, every
    # OpenMP barrier stalls while another process holds a core, and on this shared 2-core
    # machine the step time varied tenfold with the load.
    StepCase(
        name="cpu-resnet32-32px-b32", device="cpu", steps=2, rounds=4, warmup=1, threads=1,
        notes=("main process with 1 torch thread; data workers on the other core",),
        config=dict(
            model=dict(backbone="resnet32", feat_dim=128, use_norm=False),
            data=dict(kind="synthetic", root="data_cache/bench-step-cpu",
                      synthetic=dict(num_classes=20, imb_factor=0.02, n_max=250, image_size=40, n_val=1, seed=0),
                      augment_recipe="imagenet", image_size=32, normalization="imagenet", batch_size=32,
                      randaugment=True),
            # The CIFAR recipe's loss settings (docs/design.md §2), K limited by the 20 classes.
            method=dict(alpha=2.0, beta=0.6, tau=1.0, l_d_warm=0, scaling_factor=[20, 255], topk=5,
                        temperature=0.1, cutmix_prob=0.5),
            optim=dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
            deepspeed=dict(precision="fp32", zero_stage=0),
            pipeline=dict(backend="auto", num_workers=min(2, _cores())),
            run=dict(device="cpu", seed=0))),
    # ResNeXt-50 at the per-GPU batches of ImageNet-LT's 256 over 2 and 8 GPUs, eager and compiled.
    _gpu_case("cuda-resnext50-224px-b128-bf16-cl", "resnext50_32x4d", channels_last=True),
    _gpu_case("cuda-resnext50-224px-b128-bf16-cl-compiled", "resnext50_32x4d", channels_last=True,
              compile="default", published=False),
    _gpu_case("cuda-resnext50-224px-b32-bf16-cl", "resnext50_32x4d", channels_last=True, batch=32, published=False),
    _gpu_case("cuda-resnext50-224px-b32-bf16-cl-compiled", "resnext50_32x4d", channels_last=True, batch=32,
              compile="default", published=False),
    _gpu_case("cuda-vits16-224px-b128-bf16", "vit_small_patch16_224", channels_last=False),
]


# --------------------------------------------------------------------------------------
# Engines: the trainer's DeepSpeed engine, or the same three calls on a plain optimizer
# --------------------------------------------------------------------------------------


def select_engine(requested: str | None = None) -> str:
    """Resolve FASTLT_BENCH_ENGINE to "deepspeed" or "torch" (see the module docstring)."""
    requested = requested or os.environ.get("FASTLT_BENCH_ENGINE", "auto")
    if requested not in ENGINES:
        raise ValueError(f"FASTLT_BENCH_ENGINE must be one of {ENGINES}; got {requested!r}")
    have = importlib.util.find_spec("deepspeed") is not None
    if requested == "deepspeed" and not have:
        raise RuntimeError("FASTLT_BENCH_ENGINE=deepspeed but deepspeed is not installed; install it "
                           "(pip install deepspeed) or set FASTLT_BENCH_ENGINE=torch")
    return "deepspeed" if requested == "deepspeed" or (requested == "auto" and have) else "torch"


@dataclass
class FastltStep:
    """fastlt's model, engine and objective for one case, built with the functions the trainer uses."""

    cfg: Config
    engine: object
    objective: object
    device: torch.device
    engine_label: str

    def __call__(self, batch):
        from fastlt.method.objective import train_step

        return train_step(self.engine, self.objective, batch, rectify=True)


def build_fastlt_step(cfg: Config, class_counts) -> FastltStep:
    from fastlt.training.engine import PlainEngine, precision_of
    from fastlt.models import build_model
    from fastlt.method.objective import ConCutMixObjective, compile_step
    from fastlt.training.schedule import build_optimizer

    device = cfg.run.device
    engine_kind = select_engine()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, len(class_counts))
    precision = precision_of(cfg.deepspeed)
    if engine_kind == "deepspeed":
        import deepspeed

        from fastlt.training import distributed as dist
        from fastlt.training.engine import build_engine

        bound = os.environ.get("DS_ACCELERATOR")
        if torch.distributed.is_initialized() and bound not in (None, device):
            pytest.skip(f"DeepSpeed in this process is bound to the {bound} accelerator; run the cpu and cuda "
                        "cases in separate processes (pytest -k cpu / -k cuda)")
        dist.prepare_process_env(device)
        if not torch.distributed.is_initialized():
            dist.init_distributed(device, dist.process_info())
        engine, _ = build_engine(cfg, model, world_size=1)
        label = (f"deepspeed {deepspeed.__version__} "
                 f"({cfg.deepspeed.precision}{' autocast' if precision.autocast_dtype is not None else ''})")
    else:
        if cfg.deepspeed.low_precision_weights:
            raise ValueError(f"deepspeed.precision={cfg.deepspeed.precision} without autocast needs DeepSpeed's "
                             "low-precision weights; set deepspeed.autocast=true or install DeepSpeed")
        model = model.to(device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        engine = PlainEngine(model, build_optimizer(cfg.optim, model.parameters()), precision.autocast_dtype)
        label = f"torch optimizer, no DeepSpeed ({cfg.deepspeed.precision}{' autocast' if precision.autocast_dtype else ''})"
    engine.train()
    objective = ConCutMixObjective(cfg.method, class_counts).to(device)
    compile_step(engine, objective, cfg.run.compile, cfg.run.compile_backend)  # as the trainer does
    if cfg.run.compile != "off":
        label += f", torch.compile {cfg.run.compile}"
    return FastltStep(cfg, engine, objective, torch.device(device), label)


# --------------------------------------------------------------------------------------
# Batches: synthetic device tensors, fastlt's pipeline, the published loaders
# --------------------------------------------------------------------------------------


def synthetic_batch(cfg: Config, num_classes: int, device):
    """A TrainBatch of random tensors already on ``device``, in the layout and dtype the pipelines
    deliver for ``cfg``; every sample mixed (the label rectification runs on all of them, as after
    the warm-up)."""
    from fastlt.pipelines import TrainBatch, train_spec
    from fastlt.pipelines.batch import image_layout

    g = torch.Generator().manual_seed(0)
    b, s = cfg.data.batch_size, cfg.data.image_size
    dtype, memory_format = image_layout(train_spec(cfg, None, batch_size=b))
    images = torch.randn(3 * b, 3, s, s, generator=g).to(device, dtype).contiguous(memory_format=memory_format)
    return TrainBatch(images=images,
                      label_a=torch.randint(0, num_classes, (b,), generator=g).to(device),
                      label_b=torch.randint(0, num_classes, (b,), generator=g).to(device),
                      lam=torch.rand(b, generator=g).to(device), mixed=torch.ones(b, dtype=torch.bool).to(device))


def fastlt_pipeline(cfg: Config, dataset):
    """fastlt's training pipeline for ``cfg``, with the spec the trainer builds (one rank)."""
    from fastlt.pipelines import build_train_pipeline, select_backend, train_spec

    spec = train_spec(cfg, dataset, batch_size=cfg.data.batch_size, device=cfg.run.device)
    return build_train_pipeline(spec, select_backend(cfg.pipeline.backend))


def endless(epochs):
    """Chain the epochs of an iterator factory ``epochs(e)`` for e = 0, 1, 2, ..."""
    for e in itertools.count():
        yield from epochs(e)


# --------------------------------------------------------------------------------------
# Rounds and results
# --------------------------------------------------------------------------------------


class Rounds:
    """Times rounds of ``steps`` steps: ``fetch()`` returns the next batch (the host's wait on
    data), ``step(batch)`` trains on it; CUDA is synchronised at the end of each round."""

    def __init__(self, fetch, step, steps: int, device: str):
        self.fetch, self.step, self.steps = fetch, step, steps
        self.cuda = torch.device(device).type == "cuda"
        self.log: list[tuple[float, float]] = []

    def __call__(self):
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(self.steps):
            t = time.perf_counter()
            batch = self.fetch()
            wait += time.perf_counter() - t
            self.step(batch)
        if self.cuda:
            torch.cuda.synchronize()  # host sync: the round ends when the device has finished it
        self.log.append((time.perf_counter() - t0, wait))

    def summary(self, warmup: int, images_per_round: int) -> dict:
        measured = self.log[warmup:]
        if not measured:
            raise RuntimeError(f"no measured rounds: {len(self.log)} rounds ran, {warmup} of them warm-up")
        times = np.array([t for t, _ in measured])
        waits = np.array([w for _, w in measured])
        return {"round_min_s": float(times.min()), "round_median_s": float(np.median(times)),
                "images_per_s": images_per_round / float(times.min()),
                "images_per_s_median": images_per_round / float(np.median(times)),
                "data_stall": float(waits.sum() / times.sum()),
                "data_stall_min_round": float(waits[times.argmin()] / times.min()),
                "measured_rounds": len(measured)}


# case name -> step kind -> results of this run, for the ratios in the last test of the case
RESULTS: dict[str, dict[str, dict]] = {}
# case name -> {"steps": {kind: figures}, "ratios": {...}}: what FASTLT_BENCH_STEP_SUMMARY receives
SUMMARY: dict[str, dict] = {}
KINDS = {"model_only": "(1) model only", "fastlt": "(2) fastlt step", "published": "(3) published step"}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case(request):
    c = request.param
    if c.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{c.name}: needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    if c.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer and the published code set it
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    yield c
    torch.set_num_threads(threads)
    RESULTS.pop(c.name, None)
    gc.collect()
    if c.device == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def case_data(case):
    from fastlt.data.build import build_datasets

    cfg = case.cfg()
    data = build_datasets(cfg)
    return cfg, data


@pytest.fixture(scope="module")
def fastlt_step(case, case_data):
    cfg, data = case_data
    step = build_fastlt_step(cfg, data.class_counts)
    if case.threads:
        # After the build: the trainer's process setup sets the thread count (cores per rank).
        torch.set_num_threads(case.threads)
    return step


def _run(benchmark, case, kind: str, fetch, step, *, backend: str, engine: str, extra: dict | None = None) -> dict:
    cfg = case.cfg()
    steps, rounds, warmup = case.timing()
    runner = Rounds(fetch, step, steps, case.device)
    benchmark.pedantic(runner, rounds=rounds, warmup_rounds=warmup, iterations=1)
    b = cfg.data.batch_size
    result = runner.summary(warmup, b * steps)
    info = {"case": case.name, "step": KINDS[kind], "backend": backend, "engine": engine,
            "backbone": cfg.model.backbone, "image_size": cfg.data.image_size, "batch_size": b,
            "precision": cfg.deepspeed.precision if kind != "published" else "fp32",
            "channels_last": cfg.model.channels_last if kind != "published" else False,
            "num_classes": cfg.data.synthetic.num_classes, "steps_per_round": steps,
            "torch_threads": torch.get_num_threads(), "data_workers": cfg.pipeline.num_workers,
            "images_counted": "classification images, B per step (contrastive views not counted)",
            "data_stall_definition": "host time blocked on the next batch / round time",
            **result, **(extra or {})}
    if case.notes:
        info["notes"] = list(case.notes)
    benchmark.extra_info.update(info)
    RESULTS.setdefault(case.name, {})[kind] = info
    return info


def test_step_model_only(benchmark, case, case_data, fastlt_step):
    cfg, data = case_data
    batch = synthetic_batch(cfg, data.num_classes, fastlt_step.device)
    out = []

    def step(b):
        out.append(fastlt_step(b))

    _run(benchmark, case, "model_only", lambda: batch, step, backend="none: synthetic tensors on the device",
         engine=fastlt_step.engine_label)
    losses = torch.stack(out).cpu()
    assert torch.isfinite(losses).all(), f"non-finite (loss, ce, scl) in the model-only steps: {losses}"


def test_step_published(benchmark, case, case_data):
    from fastlt.models import build_model
    from published_baseline import PublishedStep, published_loaders

    if not case.published:
        pytest.skip(f"{case.name}: the published step is timed once per model (its b128 eager case)")
    cfg, data = case_data
    m = cfg.method
    if case.device == "cuda":
        torch.cuda.empty_cache()  # the fp32 baseline needs the memory the model-only step cached
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, data.num_classes).to(case.device).train()
    step = PublishedStep(model, data.class_counts, tau=m.tau, temperature=m.temperature, alpha=m.alpha, beta=m.beta,
                         topk=m.topk, omega=m.omega, cutmix_prob=m.cutmix_prob, lr=cfg.optim.lr,
                         momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay, device=case.device,
                         seed=cfg.run.seed)
    workers = cfg.pipeline.num_workers
    background, foreground = published_loaders(data.train, cfg.data.image_size, cfg.data.batch_size, workers,
                                               seed=cfg.run.seed)
    pairs = zip(endless(lambda e: background), endless(lambda e: foreground))
    meters = []
    try:
        _run(benchmark, case, "published", lambda: next(pairs), lambda batch: meters.append(step(*batch)),
             backend=f"published: PIL + torchvision in 2 DataLoaders × {workers} workers, 6 views/sample",
             engine="torch.optim.SGD (fp32)")
    finally:
        del pairs, background, foreground  # stops the persistent workers
        gc.collect()
    assert np.isfinite(meters).all(), f"non-finite (ce, scl) in the published steps: {meters[:5]}"


def test_step_fastlt(benchmark, case, case_data, fastlt_step, capsys):
    cfg, data = case_data
    pipeline = fastlt_pipeline(cfg, data.train)
    batches = endless(pipeline.epoch)
    out = []

    def fetch():
        return next(batches)

    def step(batch):
        out.append(fastlt_step(batch))  # the pipeline delivers on the device, as in the trainer

    try:
        info = _run(benchmark, case, "fastlt", fetch, step,
                    backend=f"{pipeline.backend} ({cfg.pipeline.num_workers} workers)", engine=fastlt_step.engine_label)
    finally:
        batches.close()
        pipeline.close()
    losses = torch.stack(out).cpu()
    assert torch.isfinite(losses).all(), f"non-finite (loss, ce, scl) in the fastlt steps: {losses}"

    results = RESULTS.get(case.name, {})
    ratios = {}
    for other, key in (("model_only", "fastlt_over_model_only"), ("published", "fastlt_over_published")):
        if other in results:
            # Same images per round in all three: the throughput ratio is the inverse time ratio.
            ratios[key] = results[other]["round_min_s"] / info["round_min_s"]
    benchmark.extra_info.update(ratios)
    info.update(ratios)
    write_summary_json(case, results, ratios)
    with capsys.disabled():  # past pytest's capture, so that `make bench` shows it
        print(summary(case, results), flush=True)


_SUMMARY_KEYS = ("step", "backend", "engine", "precision", "channels_last", "batch_size", "image_size", "backbone",
                 "num_classes", "images_per_s", "images_per_s_median", "data_stall", "round_min_s",
                 "round_median_s", "measured_rounds", "steps_per_round")


def write_summary_json(case, results: dict, ratios: dict) -> None:
    """Add the case to the JSON file named by FASTLT_BENCH_STEP_SUMMARY (if set)."""
    path = os.environ.get("FASTLT_BENCH_STEP_SUMMARY")
    if not path:
        return
    SUMMARY[case.name] = {"device": _versions(), "images_counted": "classification images, B per step",
                          "data_stall": "host time blocked on the next batch / round time",
                          "steps": {k: {f: r[f] for f in _SUMMARY_KEYS if f in r} for k, r in results.items()},
                          "ratios": {"fastlt/model_only": ratios.get("fastlt_over_model_only"),
                                     "fastlt/published": ratios.get("fastlt_over_published")}}
    Path(path).write_text(json.dumps(SUMMARY, indent=1))


def _versions() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    out = [device, f"torch {torch.__version__}"]
    for name, module in (("triton", "triton"), ("DALI", "nvidia.dali")):
        try:
            out.append(f"{name} {importlib.import_module(module).__version__}")
        except Exception:  # not installed, or a broken install: either way not used here
            out.append(f"{name} -")
    return ", ".join(out)


def summary(case, results: dict) -> str:
    """The case's table: images/s, data stall, pipeline and engine of each step, and the ratios."""
    lines = [f"\ntrain step {case.name} on {_versions()}",
             "  images/s = classification images (B per step) per second, fastest round; "
             "stall = host time blocked on the next batch / round time"]
    lines.append(f"  {'step':<20} {'img/s':>9} {'median':>9} {'stall':>7}  pipeline / engine")
    for kind, label in KINDS.items():
        r = results.get(kind)
        if r is None:
            lines.append(f"  {label:<20} {'-':>9} {'-':>9} {'-':>7}  not run")
            continue
        lines.append(f"  {label:<20} {r['images_per_s']:>9.1f} {r['images_per_s_median']:>9.1f} "
                     f"{100 * r['data_stall']:>6.1f}%  {r['backend']} / {r['engine']}")
    full = results.get("fastlt", {})
    for key, what in (("fastlt_over_model_only", "(2)/(1)"), ("fastlt_over_published", "(2)/(3)")):
        if key in full:
            lines.append(f"  {what} = {full[key]:.2f}")
    return "\n".join(lines)


def test_published_losses_match_fastlt():
    """The baseline computes the same losses as fastlt's objective, so the two steps differ in
    cost only: BalSCL as published vs BalancedSupConLoss, eager soft CE vs LA-CE on a soft label."""
    import torch.nn.functional as F

    from fastlt.method.losses import BalancedSupConLoss, LogitAdjustedCrossEntropy
    from published_baseline import PublishedBalSCL, published_soft_ce

    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([50, 20, 9, 5, 3, 2, 1])
    c, b, d = counts.numel(), 12, 16
    centers = F.normalize(torch.randn(c, d, generator=g), dim=1)
    features = F.normalize(torch.randn(b, 2, d, generator=g), dim=2)
    labels = torch.randint(0, c, (b,), generator=g)
    torch.testing.assert_close(PublishedBalSCL(counts.tolist(), 0.1)(centers, features, labels),
                               BalancedSupConLoss(counts, 0.1)(centers, features, labels))
    logits = torch.randn(b, c, generator=g)
    target = torch.softmax(torch.randn(b, c, generator=g), dim=1)
    ce = LogitAdjustedCrossEntropy(counts, tau=0.9)
    torch.testing.assert_close(published_soft_ce(logits, target, ce.bias), ce(logits, target))
