"""Kernel benchmarks (issue 4): the fused Triton label and loss kernels against the PyTorch
paths they replace, at the shapes of ARCHITECTURE §1's recipes.

Shapes (B, C, D): (256, 1000, 1024) and (512, 1000, 1024) — ImageNet-LT at batch 256/512 —
and (128, 8142, 1024) — iNaturalist 2018. Override with
``FASTLT_BENCH_KERNEL_SHAPES="64x1000x1024,..."`` for quick checks.

Groups, one per shape (all inputs fp32, as the label step receives them):

* ``rectify_*`` — the ConCutMix label (§1 steps 1–5):
  ``dense`` (baseline: the B×C×D formulation of the published code, imported from
  tests/spec_formulas.py), ``eager`` (``fastlt.labels.reference_rectify_labels``),
  ``compiled`` (``torch.compile`` of the same function), ``triton`` (dense (B, C) output) and
  ``triton_compact`` (indices/weights/γ only);
* ``soft_ce_*`` — logit-adjusted soft cross-entropy, forward + backward:
  ``eager`` (``fastlt.losses.reference_soft_cross_entropy``), ``compiled``, ``triton`` (dense
  label) and ``triton_compact`` (the compact label of the rectification kernel);
* ``label_loss_*`` — the label step and the loss together: ``eager`` (reference label, then
  reference loss), ``triton`` (dense label through both kernels), ``triton_compact`` (no B×C
  label at all).

Every result records in ``extra_info`` the device and versions (bench/conftest.py), the shape,
and on CUDA the peak memory the call allocated beyond its inputs (``peak_extra_bytes``, from
``torch.cuda.max_memory_allocated``) next to the issue's bound 2·B·C·4. On CPU only the
PyTorch paths run; the Triton cases skip (the interpreter is a correctness tool, not a speed
one). The last test prints the ratios against the baselines of the same run and, if
``FASTLT_BENCH_SUMMARY`` names a file, writes them there as JSON (bench/gpu_check.sh does).

On a CPU shared with other jobs, run with ``OMP_NUM_THREADS=1``: with more intra-op threads
than idle cores, each OpenMP region can stall for a scheduler quantum (tens of ms) waiting
for a descheduled peer thread, which swamps sub-millisecond operations.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import pytest
import torch

from fastlt.kernels import reference_rectify_labels_compact
from fastlt.labels import reference_rectify_labels
from fastlt.losses import log_prior, reference_soft_cross_entropy
from spec_formulas import dense_rectify_labels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOPK, OMEGA, TAU = 30, 200 / 255, 0.99


def _shapes() -> list[tuple[int, int, int]]:
    spec = os.environ.get("FASTLT_BENCH_KERNEL_SHAPES", "256x1000x1024,512x1000x1024,128x8142x1024")
    try:
        return [tuple(int(v) for v in item.split("x")) for item in spec.split(",") if item.strip()]
    except ValueError as exc:
        raise ValueError(f"FASTLT_BENCH_KERNEL_SHAPES={spec!r}: expected comma-separated BxCxD, "
                         "e.g. 256x1000x1024") from exc


SHAPES = _shapes()
SHAPE_IDS = [f"B{b}-C{c}-D{d}" for b, c, d in SHAPES]
# (rounds, iterations) per case. The dense baseline materialises B×C×D floats (up to 4.3 GB
# at the iNaturalist shape), so it gets few rounds on a CPU; the others get many, because on a
# shared CPU only the fastest rounds escape preemption (the summary compares minima).
ROUNDS = dict(cuda=dict(fast=(30, 5), dense=(10, 1)), cpu=dict(fast=(30, 1), dense=(3, 1)))[DEVICE]
NO_TRITON = ("Triton kernels are benchmarked on CUDA only; on CPU the PyTorch paths run (the Triton "
             "interpreter is for correctness, not speed)")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason=NO_TRITON)

RESULTS: dict[str, dict] = {}  # "<group>/<variant>" -> timings and memory, for the summary


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_extra_bytes(fn) -> int | None:
    """Peak bytes allocated by one call beyond what was allocated before it (CUDA only)."""
    if DEVICE != "cuda":
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def _measure(benchmark, group: str, variant: str, fn, shape, kind="fast", **info):
    """Time ``fn`` (synchronised), record memory and shape, remember the result for the summary."""
    b, c, d = shape
    peak = _peak_extra_bytes(fn)

    def timed():
        out = fn()
        _sync()
        return out

    rounds, iterations = ROUNDS[kind]
    benchmark.group = group
    out = benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1)
    benchmark.extra_info.update(dict(shape=dict(B=b, C=c, D=d), variant=variant, peak_extra_bytes=peak,
                                     memory_bound_bytes=2 * b * c * 4, command=_command(), **_environment(),
                                     **info))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        RESULTS[f"{group}/{variant}"] = dict(min_s=stats.stats.min, median_s=stats.stats.median, peak_extra_bytes=peak,
                                             memory_bound_bytes=2 * b * c * 4, shape=[b, c, d])
    return out


@functools.lru_cache(maxsize=1)
def _environment() -> dict:
    info = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else f"cpu ({os.cpu_count()} cores)",
                torch=torch.__version__, cuda=torch.version.cuda, torch_threads=torch.get_num_threads(),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _command() -> str:
    return "python -m pytest " + " ".join(sys.argv[1:])


def _group(name: str, shape) -> str:
    b, c, d = shape
    return f"{name}_{DEVICE}_B{b}_C{c}_D{d}"


@pytest.fixture(scope="module", params=SHAPES, ids=SHAPE_IDS)
def shape(request):
    return request.param


@pytest.fixture(scope="module")
def label_inputs(shape):
    b, c, d = shape
    g = torch.Generator().manual_seed(b + c + d)
    inputs = dict(z=torch.randn(b, d, generator=g), centers=torch.randn(c, d, generator=g),
                  label_a=torch.randint(0, c, (b,), generator=g), label_b=torch.randint(0, c, (b,), generator=g),
                  lam=torch.rand(b, generator=g), class_counts=torch.randint(5, 1280, (c,), generator=g))
    return {k: v.to(DEVICE) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def loss_inputs(shape, label_inputs):
    b, c, _ = shape
    g = torch.Generator().manual_seed(c)
    logits = torch.randn(b, c, generator=g).to(DEVICE).requires_grad_()
    bias = log_prior(label_inputs["class_counts"].cpu(), TAU).to(DEVICE)
    target = reference_rectify_labels(**label_inputs, topk=TOPK, omega=OMEGA)
    compact = reference_rectify_labels_compact(**label_inputs, topk=TOPK, omega=OMEGA)
    return dict(logits=logits, bias=bias, target=target, compact=compact)


# ----------------------------------------------------------------------------- rectification

def _rectify(fn):
    return lambda inputs: fn(**inputs, topk=TOPK, omega=OMEGA)


def test_rectify_dense(benchmark, shape, label_inputs):
    out = _measure(benchmark, _group("rectify", shape), "dense", lambda: _rectify(dense_rectify_labels)(label_inputs),
                   shape, kind="dense")
    assert out.shape == shape[:2]


def test_rectify_eager(benchmark, shape, label_inputs):
    out = _measure(benchmark, _group("rectify", shape), "eager",
                   lambda: _rectify(reference_rectify_labels)(label_inputs), shape)
    torch.testing.assert_close(out.sum(1), torch.ones(shape[0], device=DEVICE), atol=1e-5, rtol=0)


def test_rectify_compiled(benchmark, shape, label_inputs):
    compiled = torch.compile(reference_rectify_labels, dynamic=False)
    want = _rectify(reference_rectify_labels)(label_inputs)
    torch.testing.assert_close(_rectify(compiled)(label_inputs), want, atol=1e-6, rtol=1e-5)  # also compiles
    _measure(benchmark, _group("rectify", shape), "compiled", lambda: _rectify(compiled)(label_inputs), shape)


@needs_cuda
def test_rectify_triton(benchmark, shape, label_inputs):
    from fastlt.kernels.rectify import rectify_labels_triton

    want = _rectify(reference_rectify_labels)(label_inputs)
    torch.testing.assert_close(_rectify(rectify_labels_triton)(label_inputs), want, atol=1e-5, rtol=1e-4)
    _measure(benchmark, _group("rectify", shape), "triton", lambda: _rectify(rectify_labels_triton)(label_inputs),
             shape)


@needs_cuda
def test_rectify_triton_compact(benchmark, shape, label_inputs):
    from fastlt.kernels.rectify import rectify_labels_compact_triton

    _measure(benchmark, _group("rectify", shape), "triton_compact",
             lambda: _rectify(rectify_labels_compact_triton)(label_inputs), shape)


# ------------------------------------------------------------------------- soft CE fwd + bwd

def _fwd_bwd(loss_fn, logits):
    def step():
        logits.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()
    return step


def test_soft_ce_eager(benchmark, shape, loss_inputs):
    li = loss_inputs
    _measure(benchmark, _group("soft_ce", shape), "eager",
             _fwd_bwd(lambda: reference_soft_cross_entropy(li["logits"], li["target"], li["bias"]), li["logits"]),
             shape)


def test_soft_ce_compiled(benchmark, shape, loss_inputs):
    li = loss_inputs
    compiled = torch.compile(reference_soft_cross_entropy, dynamic=False)
    step = _fwd_bwd(lambda: compiled(li["logits"], li["target"], li["bias"]), li["logits"])
    step()  # compiles forward and backward outside the timing
    _measure(benchmark, _group("soft_ce", shape), "compiled", step, shape)


@needs_cuda
def test_soft_ce_triton(benchmark, shape, loss_inputs):
    from fastlt.kernels.soft_ce import soft_cross_entropy_triton

    li = loss_inputs
    _measure(benchmark, _group("soft_ce", shape), "triton",
             _fwd_bwd(lambda: soft_cross_entropy_triton(li["logits"], li["target"], li["bias"]), li["logits"]),
             shape)


@needs_cuda
def test_soft_ce_triton_compact(benchmark, shape, loss_inputs):
    from fastlt.kernels import soft_cross_entropy_compact

    li = loss_inputs
    _measure(benchmark, _group("soft_ce", shape), "triton_compact",
             _fwd_bwd(lambda: soft_cross_entropy_compact(li["logits"], li["compact"], li["bias"]), li["logits"]),
             shape)


# ------------------------------------------------------------------ label and loss together

def _label_bytes(shape) -> dict:
    """Bytes of the label handed from the label step to the loss: dense (B, C) fp32, or the
    compact tensors (int64 indices + fp32 weights per kept class; γ, λ fp32, a, b int64)."""
    b, c, _ = shape
    return dict(label_bytes_dense=b * c * 4, label_bytes_compact=b * (min(TOPK, c) * 12 + 24))


def test_label_loss_eager(benchmark, shape, label_inputs, loss_inputs):
    li = loss_inputs
    step = _fwd_bwd(lambda: reference_soft_cross_entropy(
        li["logits"], _rectify(reference_rectify_labels)(label_inputs), li["bias"]), li["logits"])
    _measure(benchmark, _group("label_loss", shape), "eager", step, shape, **_label_bytes(shape))


@needs_cuda
def test_label_loss_triton(benchmark, shape, label_inputs, loss_inputs):
    from fastlt.kernels.rectify import rectify_labels_triton
    from fastlt.kernels.soft_ce import soft_cross_entropy_triton

    li = loss_inputs
    step = _fwd_bwd(lambda: soft_cross_entropy_triton(
        li["logits"], _rectify(rectify_labels_triton)(label_inputs), li["bias"]), li["logits"])
    _measure(benchmark, _group("label_loss", shape), "triton", step, shape, **_label_bytes(shape))


@needs_cuda
def test_label_loss_triton_compact(benchmark, shape, label_inputs, loss_inputs):
    from fastlt.kernels import rectify_labels_compact, soft_cross_entropy_compact

    li = loss_inputs
    step = _fwd_bwd(lambda: soft_cross_entropy_compact(
        li["logits"], _rectify(rectify_labels_compact)(label_inputs), li["bias"]), li["logits"])
    _measure(benchmark, _group("label_loss", shape), "triton_compact", step, shape, **_label_bytes(shape))


# -------------------------------------------------------------------------------- summary

# (group, candidate, baseline, the target ratio baseline/candidate or None)
RATIOS = [
    ("rectify", "eager", "dense", None),
    ("rectify", "compiled", "eager", None),
    ("rectify", "triton", "eager", 2.0),
    ("rectify", "triton", "compiled", None),
    ("rectify", "triton", "dense", 50.0),
    ("rectify", "triton_compact", "eager", None),
    ("soft_ce", "compiled", "eager", None),
    ("soft_ce", "triton", "eager", 1.5),
    ("soft_ce", "triton", "compiled", None),
    ("soft_ce", "triton_compact", "eager", None),
    ("label_loss", "triton", "eager", None),
    ("label_loss", "triton_compact", "eager", None),
]




def test_summary():
    """Ratios of the fastest rounds against the baselines of this run (no assertion: speed is
    reported, not tested); written to $FASTLT_BENCH_SUMMARY as JSON when set."""
    if not RESULTS:
        pytest.skip("no benchmark results in this run (--benchmark-disable, or every case skipped)")
    rows = []
    for b, c, d in SHAPES:
        for group, cand, base, target in RATIOS:
            key = f"{group}_{DEVICE}_B{b}_C{c}_D{d}"
            rc, rb = RESULTS.get(f"{key}/{cand}"), RESULTS.get(f"{key}/{base}")
            if rc is None or rb is None:
                continue
            rows.append(dict(group=key, candidate=cand, baseline=base, ratio=rb["min_s"] / rc["min_s"], target=target,
                             candidate_min_s=rc["min_s"], baseline_min_s=rb["min_s"]))
    memory = [dict(case=k, peak_extra_bytes=v["peak_extra_bytes"], bound_bytes=v["memory_bound_bytes"],
                   within_bound=v["peak_extra_bytes"] <= v["memory_bound_bytes"])
              for k, v in RESULTS.items() if v["peak_extra_bytes"] is not None]
    summary = dict(environment=_environment(), command=_command(), ratios=rows, memory=memory,
                   results=RESULTS)
    lines = [f"{'group':<36} {'candidate':<15} {'baseline':<9} {'ratio':>8} {'target':>7}"]
    for r in rows:
        target = f"{r['target']:.1f}" if r["target"] else "-"
        lines.append(f"{r['group']:<36} {r['candidate']:<15} {r['baseline']:<9} {r['ratio']:>8.2f} {target:>7}")
    for m in memory:
        lines.append(f"peak extra {m['case']:<52} {m['peak_extra_bytes'] / 2**20:9.1f} MiB "
                     f"(bound 2·B·C·4 = {m['bound_bytes'] / 2**20:.1f} MiB)")
    print("\n" + "\n".join(lines))
    path = os.environ.get("FASTLT_BENCH_SUMMARY")
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
