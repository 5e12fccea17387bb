"""The fused label kernels (fastlt.kernels.rectify) against the spec, docs/design.md §1 steps 1–5.

Runs the compiled kernels on a GPU, or Triton's interpreter on CPU tensors (CI). Interpreter
mode is slow, so the shapes are a representative grid, not the cartesian product of
B ∈ {1, 7, 64}, C ∈ {3, 10, 100, 1000}, D ∈ {16, 128}, K ∈ {1, 3, 30, C}: each case's
comment names the branch of the kernels it exercises. ``select_block`` forces the row tile
of the selection kernel so that small C still spans several tiles (K larger than a tile,
ties straddling tiles).
"""
from fastlt.kernels.testing import prepare_interpreter

prepare_interpreter()  # before anything imports triton (a no-op here: tests/conftest.py called it first)

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastlt.kernels.testing import (describe_mismatch, kernel_device,  # noqa: E402
                                    skip_reason_in_process)
from fastlt.kernels import rectify_labels_compact, reference_rectify_labels_compact  # noqa: E402
from fastlt.method.labels import rectify_labels, reference_rectify_labels, sum_log_counts  # noqa: E402
from spec_formulas import dense_rectify_labels  # noqa: E402

DEVICE = kernel_device()
_SKIP = skip_reason_in_process()
needs_kernels = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

# Kernel and reference both upcast bf16/fp16 inputs exactly and accumulate in fp32 (tl.dot on
# bf16/fp16 forms exact products), so low-precision inputs differ from the reference only by
# summation order, like fp32; the looser bound leaves room for tensor-core accumulation order.
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=2e-6, rtol=2e-5),
       torch.float16: dict(atol=2e-6, rtol=2e-5)}
OMEGA = 200 / 255
# Against the independent spec (tests/spec_formulas.py: the B×C×D difference, a stable sort,
# explicit one-hots): the distance is rounded differently from the norm expansion (fp32
# relative error of a few 1e-7 on each similarity, carried through the normalisation). Measured
# over every case below with TRITON_INTERPRET=1 (2026-12-03): max |Δ| 6.0e-8, max relative
# 3.6e-7; the bound is ~16x / ~28x that, room for a GPU's accumulation order.
SPEC_TOL = dict(atol=1e-6, rtol=1e-5)


def _check(got, want, what, dtype=torch.float32):
    msg = describe_mismatch(got, want, what=what, **TOL[dtype])
    if msg:
        pytest.fail(msg)


def _well_separated(z, centers, k, rel=4e-6):
    """No row has its K-th and (K+1)-th similarity closer than ``rel`` (relative).

    Random test data must not put a near-tie at the top-K boundary: there the kernel and the
    reference may legitimately disagree by rounding. Exact ties are tested separately.
    """
    if k >= centers.shape[0]:
        return True
    zf, cf = z.double(), centers.double()
    sim = ((zf * zf).sum(1, keepdim=True) + (cf * cf).sum(1) - 2 * zf @ cf.t()).rsqrt()
    top = sim.topk(k + 1, dim=1).values
    return bool(((top[:, k - 1] - top[:, k]) > rel * top[:, k - 1]).all())


def _inputs(b, c, d, k, seed, dtype=torch.float32, lam=None):
    """Gaussian z and centers (seed bumped until the top-K boundary is well separated)."""
    for attempt in range(50):
        g = torch.Generator().manual_seed(seed + 1000 * attempt)
        z = torch.randn(b, d, generator=g)
        centers = torch.randn(c, d, generator=g)
        z, centers = z.to(dtype), centers.to(dtype)
        if _well_separated(z.float(), centers.float(), k):
            break
    else:
        raise RuntimeError("could not draw well-separated test data")
    label_a = torch.randint(0, c, (b,), generator=g)
    label_b = torch.randint(0, c, (b,), generator=g)
    lam_t = torch.rand(b, generator=g) if lam is None else torch.full((b,), float(lam))
    counts = torch.randint(1, 1000, (c,), generator=g)
    return [t.to(DEVICE) for t in (z, centers, label_a, label_b, lam_t, counts)]


def _check_spec(got, args, what, **kw):
    """``got`` against the independent spec dense_rectify_labels (which shares no code with the
    library: not its top-K, its confidence, its area label nor its distance floor)."""
    msg = describe_mismatch(got, dense_rectify_labels(*args, **kw).to(got.device), what=f"{what} vs spec", **SPEC_TOL)
    if msg:
        pytest.fail(msg)


def _run_both(args, k, normalize="l1", temperature=1.0, select_block=None, omega=OMEGA):
    """The Triton label, the library reference and the Triton compact label; the Triton label
    is also checked against the spec here, so every case that runs both meets it."""
    from fastlt.kernels.rectify import rectify_labels_compact_triton, rectify_labels_triton

    kw = dict(topk=k, omega=omega, normalize=normalize, temperature=temperature)
    got = rectify_labels_triton(*args, **kw, _block_c_select=select_block)
    want = reference_rectify_labels(*args, **kw)
    compact = rectify_labels_compact_triton(*args, **kw, _block_c_select=select_block)
    _check_spec(got, args, f"triton K={k} {normalize}", **kw)
    return got, want, compact


# (B, C, D, K, normalize, dtype, select_block): the branch each case hits.
CASES = [
    (1, 3, 16, 3, "l1", torch.float32, None),        # K = C: "keep all" shortcut; one row; C < tile (padding)
    (7, 10, 16, 1, "softmax", torch.float32, None),  # K = 1; B not a multiple of BLOCK_B (masked rows)
    (7, 10, 16, 30, "l1", torch.float32, None),      # K > C: clipped to C
    (7, 10, 128, 3, "l1", torch.bfloat16, None),     # bf16; D over several BLOCK_D chunks
    (64, 100, 128, 30, "softmax", torch.float16, None),  # fp16; K = 30 (ImageNet); B = BLOCK_B
    (64, 1000, 16, 30, "l1", torch.float32, None),   # C over 8 similarity tiles (ragged last); D < BLOCK_D
    (7, 1000, 16, 3, "softmax", torch.float32, 128),  # selection over 8 row tiles, K inside one tile
    (7, 100, 16, 30, "l1", torch.float32, 16),       # K = 30 > the 16-wide row tile: K spans tiles
    (7, 100, 16, 100, "softmax", torch.float32, 16),  # K = C across tiles
    (2, 8142, 16, 30, "l1", torch.float32, None),    # iNaturalist's C: one 8192-wide row tile in registers
    (2, 9000, 16, 30, "softmax", torch.float32, None),  # C > 8192: default streamed 2048-wide row tiles
]


@needs_kernels
@pytest.mark.parametrize("b,c,d,k,normalize,dtype,select_block", CASES)
def test_matches_reference(triton_backend, b, c, d, k, normalize, dtype, select_block):
    args = _inputs(b, c, d, k, seed=b * 7919 + c * 31 + d + k, dtype=dtype)
    got, want, (idx, w, gamma) = _run_both(args, k, normalize, temperature=0.5, select_block=select_block)
    assert got.dtype == torch.float32 and got.shape == (b, c)
    _check(got, want, f"dense ŷ B={b} C={c} D={d} K={k} {normalize} {dtype}", dtype)
    # The compact form scatters back to the same label.
    kk = min(k, c)
    assert idx.shape == (b, kk) and w.shape == (b, kk) and gamma.shape == (b,)
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "compact indices must be strictly ascending"
    y = torch.zeros(b, c, device=DEVICE)
    y.scatter_add_(1, args[2].view(-1, 1), args[4].view(-1, 1))
    y.scatter_add_(1, args[3].view(-1, 1), (1 - args[4]).view(-1, 1))
    s_hat = torch.zeros(b, c, device=DEVICE).scatter_(1, idx, w)
    _check(gamma[:, None] * s_hat + (1 - gamma[:, None]) * y, want, "compact → dense", dtype)


@needs_kernels
def test_matches_dense_bxcxd_formulation(triton_backend):
    """Against the literal B×C×D spec of tests/spec_formulas.py, not only the library reference."""
    z, centers, a, b, lam, counts = _inputs(7, 100, 128, 30, seed=5)
    kw = dict(topk=30, omega=OMEGA, normalize="l1")
    got = rectify_labels(z, centers, a, b, lam, counts, **kw)
    # The B×C×D difference rounds differently from the norm expansion: a looser tolerance.
    msg = describe_mismatch(got, dense_rectify_labels(z, centers, a, b, lam, counts, **kw), atol=1e-5, rtol=1e-4,
                            what="kernel vs dense formulation")
    assert msg is None, msg


@needs_kernels
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lambda_extremes_and_gamma_formula(triton_backend, lam):
    """λ = 1 (only the background class) and λ = 0 (only the foreground class); γ by hand."""
    from fastlt.kernels.rectify import rectify_labels_compact_triton

    z, centers, a, b, lam_t, counts = _inputs(7, 10, 16, 3, seed=11, lam=lam)
    got, want, _ = _run_both([z, centers, a, b, lam_t, counts], 3)
    _check(got, want, f"λ={lam}")
    _, _, gamma = rectify_labels_compact_triton(z, centers, a, b, lam_t, counts, topk=3, omega=OMEGA)
    kept = a if lam == 1.0 else b
    log_sum = sum(math.log(n) for n in counts.tolist())
    expect = torch.tensor([OMEGA * math.log(counts[j].item()) / log_sum for j in kept.tolist()])
    _check(gamma.cpu(), expect, "γ = ω·log N_kept / Σ log N_i")
    # ŷ at the kept class is at least 1 − γ, and every row sums to 1.
    assert bool((got[torch.arange(7), kept].cpu() >= 1 - expect - 1e-6).all())
    _check(got.sum(1), torch.ones(7, device=DEVICE), "row sums")


# (B, C, K, normalize, select_block): the branch each case hits with Σ log N precomputed.
LOG_SUM_CASES = [
    (7, 100, 30, "l1", None),       # row in registers (one tile)
    (7, 1000, 3, "softmax", 128),   # streamed row tiles
]


@needs_kernels
@pytest.mark.parametrize("b,c,k,normalize,select_block", LOG_SUM_CASES)
def test_precomputed_log_count_sum_gives_the_same_label(triton_backend, b, c, k, normalize, select_block):
    """Σ log N_i computed once (sum_log_counts) and passed in: the same ŷ and compact label as
    when each call computes it, from both entry points and both backends."""
    from fastlt.kernels.rectify import rectify_labels_compact_triton, rectify_labels_triton

    z, centers, a, bb, lam, counts = _inputs(b, c, 16, k, seed=b + c + k)
    log_sum = sum_log_counts(counts)
    assert log_sum.dtype == torch.float64 and log_sum.shape == () and log_sum.device.type == DEVICE
    kw = dict(topk=k, omega=OMEGA, normalize=normalize, temperature=0.5)
    want = reference_rectify_labels(z, centers, a, bb, lam, counts, **kw)
    _check(reference_rectify_labels(z, centers, a, bb, lam, counts, **kw, log_count_sum=log_sum), want,
           "reference, precomputed Σ log N")
    got = rectify_labels_triton(z, centers, a, bb, lam, counts, **kw, log_count_sum=log_sum,
                                _block_c_select=select_block)
    _check(got, want, "triton dense, precomputed Σ log N")
    _check_spec(got, (z, centers, a, bb, lam, counts), "triton dense, precomputed Σ log N", **kw)
    _check(rectify_labels(z, centers, a, bb, lam, counts, **kw, log_count_sum=float(log_sum)), want,
           "public entry point, Σ log N as a float")
    ref_c = reference_rectify_labels_compact(z, centers, a, bb, lam, counts, **kw)
    for label in (rectify_labels_compact(z, centers, a, bb, lam, counts, **kw, log_count_sum=log_sum),
                  reference_rectify_labels_compact(z, centers, a, bb, lam, counts, **kw, log_count_sum=log_sum)):
        assert torch.equal(label.index, ref_c.index)
        _check(label.gamma, ref_c.gamma, "compact γ, precomputed Σ log N")
        _check(label.to_dense(), want, "compact label, precomputed Σ log N")
    _, _, gamma = rectify_labels_compact_triton(z, centers, a, bb, lam, counts, **kw, log_count_sum=log_sum,
                                                _block_c_select=select_block)
    _check(gamma, ref_c.gamma, "triton compact γ, precomputed Σ log N")


@needs_kernels
def test_precomputed_log_count_sum_is_used(triton_backend):
    """The kernel reads the value passed in (here twice the true sum: γ halves), rather than
    recomputing it."""
    from fastlt.kernels.rectify import rectify_labels_compact_triton

    z, centers, a, bb, lam, counts = _inputs(7, 10, 16, 3, seed=29)
    log_sum = sum_log_counts(counts)
    _, _, gamma = rectify_labels_compact_triton(z, centers, a, bb, lam, counts, topk=3, omega=OMEGA)
    _, _, halved = rectify_labels_compact_triton(z, centers, a, bb, lam, counts, topk=3, omega=OMEGA,
                                                 log_count_sum=2 * log_sum)
    _check(halved, gamma / 2, "γ with a doubled Σ log N")


def test_bad_log_count_sum_raises():
    z, centers, a, bb, lam, counts = _inputs(7, 10, 16, 3, seed=31)
    with pytest.raises(ValueError, match=r"log_count_sum must be one floating-point value.*shape \(10,\)"):
        rectify_labels(z, centers, a, bb, lam, counts, topk=3, omega=OMEGA, log_count_sum=torch.log(counts.double()))
    with pytest.raises(ValueError, match="log_count_sum must be a tensor or a number"):
        rectify_labels_compact(z, centers, a, bb, lam, counts, topk=3, omega=OMEGA, log_count_sum="5.0")


@needs_kernels
def test_same_background_and_foreground_class(triton_backend):
    z, centers, a, _, lam, counts = _inputs(7, 10, 16, 3, seed=13)
    got, want, _ = _run_both([z, centers, a, a, lam, counts], 3)
    _check(got, want, "a == b")


def _integer_inputs(b, c, d, seed, duplicates=()):
    """Small-integer z and centers: every dot product, norm and squared distance is exact in
    fp32 whatever the summation order, so equal distances give bit-identical similarities in
    both implementations and the tie rule itself is what is tested. Integer distances in a
    narrow range make ties common, at the K boundary too."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randint(-2, 3, (c, d), generator=g).float()
    for src, dst in duplicates:
        centers[dst] = centers[src]
    z = torch.randint(-2, 3, (b, d), generator=g).float()
    a = torch.randint(0, c, (b,), generator=g)
    bb = torch.randint(0, c, (b,), generator=g)
    lam = torch.rand(b, generator=g)
    counts = torch.randint(1, 1000, (c,), generator=g)
    return [t.to(DEVICE) for t in (z, centers, a, bb, lam, counts)]


# (B, C, D, K, select_block): ties everywhere (integer data), across tiles and at the boundary.
TIE_CASES = [
    (7, 100, 16, 30, 16),   # ties straddling 16-wide row tiles and the K boundary
    (7, 1000, 16, 30, None),   # default tiling (one 1024-wide row tile), many tied rows
    (7, 10, 16, 3, None),   # every center identical: classes 0, 1, 2 must win
]


@needs_kernels
@pytest.mark.parametrize("b,c,d,k,select_block", TIE_CASES)
def test_ties_go_to_the_lower_class_index(triton_backend, b, c, d, k, select_block):
    args = _integer_inputs(b, c, d, seed=c + k)
    if c == 10:
        args[1] = args[1][:1].repeat(c, 1)
    got, want, (idx, _, _) = _run_both(args, k, select_block=select_block)
    _check(got, want, f"ties B={b} C={c} K={k}")
    # The kept set is exactly the reference's: the K first entries of a stable descending sort.
    zf, cf = args[0].double(), args[1].double()
    sq = ((zf * zf).sum(1, keepdim=True) + (cf * cf).sum(1) - 2 * zf @ cf.t())  # exact integers
    order = torch.sort(-sq, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(idx.cpu(), order.sort(1).values.cpu()), "kept classes differ from the lower-index rule"
    n_tied = int(((sq == sq.gather(1, order[:, -1:])).sum(1) > 1).sum())
    assert n_tied > 0, "the test data should put ties at the K boundary"
    if c == 10:
        assert torch.equal(idx.cpu(), torch.arange(k).repeat(b, 1))


@needs_kernels
def test_strided_mixed_dtype_and_fp64_inputs(triton_backend):
    """Non-contiguous z and centers (strides passed to the kernel), bf16 z with fp32 centers
    (exact upcast), and fp64 inputs (computed in fp32, as the reference does)."""
    z, centers, a, b, lam, counts = _inputs(7, 100, 32, 3, seed=17)
    wide = torch.zeros(7, 64, device=DEVICE)
    wide[:, ::2] = z
    z_strided = wide[:, ::2]
    centers_t = centers.t().contiguous().t()  # strides (1, C)
    got, want, _ = _run_both([z_strided, centers_t, a, b, lam, counts], 3)
    _check(got, want, "strided")
    z16 = z.to(torch.bfloat16)
    got = rectify_labels(z16, centers, a, b, lam, counts, topk=3, omega=OMEGA)
    _check(got, reference_rectify_labels(z16, centers, a, b, lam, counts, topk=3, omega=OMEGA), "bf16 z, fp32 c",
           torch.bfloat16)
    _check_spec(got, (z16, centers, a, b, lam, counts), "bf16 z, fp32 c", topk=3, omega=OMEGA)
    got = rectify_labels(z.double(), centers.double(), a, b, lam, counts, topk=3, omega=OMEGA)
    _check(got, reference_rectify_labels(z.double(), centers.double(), a, b, lam, counts, topk=3, omega=OMEGA),
           "fp64")
    _check_spec(got, (z.double(), centers.double(), a, b, lam, counts), "fp64", topk=3, omega=OMEGA)


@needs_kernels
def test_bad_inputs_raise(triton_backend):
    z, centers, a, b, lam, counts = _inputs(7, 10, 16, 3, seed=19)
    with pytest.raises(ValueError, match="D=16 but centers have D=8"):
        rectify_labels(z, centers[:, :8], a, b, lam, counts, topk=3, omega=OMEGA)
    with pytest.raises(ValueError, match="normalize must be one of"):
        rectify_labels(z, centers, a, b, lam, counts, topk=3, omega=OMEGA, normalize="l2")
    with pytest.raises(ValueError, match="topk must be a positive int"):
        rectify_labels(z, centers, a, b, lam, counts, topk=0, omega=OMEGA)
    bad = a.clone()
    bad[3] = 10
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"label_a has values in \[.*10\], outside the 10 classes"):
            rectify_labels(z, centers, bad, b, lam, counts, topk=3, omega=OMEGA)
    else:  # no host sync on CUDA: the bad row becomes NaN, the others are untouched
        got = rectify_labels(z, centers, bad, b, lam, counts, topk=3, omega=OMEGA)
        want = reference_rectify_labels(z, centers, a, b, lam, counts, topk=3, omega=OMEGA)
        assert bool(got[3].isnan().all())
        keep = torch.arange(7, device=DEVICE) != 3
        _check(got[keep], want[keep], "rows with valid labels")


@needs_kernels
def test_custom_op_is_registered_for_torch_compile(triton_backend):
    """Schema, fake (meta) implementation and dispatch of the custom ops (torch.library.opcheck),
    and the public function compiled with fullgraph=True."""
    from fastlt.kernels import rectify  # noqa: F401  (registers the fastlt:: ops)

    z, centers, a, b, lam, counts = _inputs(7, 10, 16, 3, seed=23)
    log_sum = sum_log_counts(counts).reshape(1)
    torch.library.opcheck(torch.ops.fastlt.rectify_labels_compact.default,
                          (z, centers, a, b, lam, counts, None, 3, OMEGA, True, 0.5, 0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastlt.rectify_labels.default,
                          (z, centers, a, b, lam, counts, log_sum, 3, OMEGA, False, 1.0, 0),
                          test_utils=("test_schema", "test_faketensor"))
    # The public entry point, as a training step would call it, in one graph.
    out = torch.compile(lambda *t: rectify_labels(*t[:6], topk=3, omega=OMEGA, log_count_sum=t[6]),
                        backend="aot_eager", fullgraph=True)(z, centers, a, b, lam, counts, log_sum[0])
    _check(out, reference_rectify_labels(z, centers, a, b, lam, counts, topk=3, omega=OMEGA), "compiled")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the parity tests compile the kernels for real")
def test_every_kernel_compiles_for_sm90():
    """All kernels, in the launch configurations used at the benchmark shapes, go through the
    whole Triton pipeline to an sm_90 cubin — no GPU needed, catching kernels that only work
    in the interpreter."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLT_KERNELS")}
    proc = subprocess.run([sys.executable, "-m", "fastlt.kernels.aot", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(proc.stdout)
    kernels = {r["kernel"].split()[0] for r in records}
    assert kernels == {"similarity", "select", "soft_ce", "balscl"}, kernels
    assert all(r["cubin_bytes"] > 0 and r["arch"] == 90 for r in records)
    # Spilled registers (local-memory stack) would be a performance regression of a config.
    spills = [(r["kernel"], r["stack_bytes"]) for r in records if r.get("stack_bytes")]
    assert not spills, f"kernels spilling registers on sm_90: {spills}"
