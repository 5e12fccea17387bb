"""The fused logit-adjusted soft cross-entropy (fastlt.kernels.soft_ce) against the spec.

docs/design.md §1 "Losses": L_cls = −(1/B) Σ_i Σ_j ŷ_ij · log softmax(x_i + τ·log π)_j. The
reference is ``fastlt.method.losses.reference_soft_cross_entropy``; gradients are checked against
autograd through it. Also the compact-label path (``fastlt.kernels.soft_cross_entropy_compact``),
checked against the reference loss on the densified label.

Runs the compiled kernels on a GPU, or Triton's interpreter on CPU tensors (CI); shapes are
a representative grid (interpreter mode is slow), each case's comment names its branch.
"""
from fastlt.kernels.testing import prepare_interpreter

prepare_interpreter()  # before anything imports triton (a no-op here: tests/conftest.py called it first)

import pytest  # noqa: E402
import torch  # noqa: E402

from fastlt.kernels import (CompactLabel, rectify_labels_compact,  # noqa: E402
                            reference_rectify_labels_compact, soft_cross_entropy_compact)
from fastlt.kernels.testing import (describe_mismatch, kernel_device,  # noqa: E402
                                    skip_reason_in_process)
from fastlt.method.labels import reference_rectify_labels  # noqa: E402
from spec_formulas import dense_rectify_labels, spec_soft_cross_entropy  # noqa: E402
from fastlt.method.losses import (LogitAdjustedCrossEntropy, log_prior, reference_soft_cross_entropy,  # noqa: E402
                           soft_cross_entropy)

DEVICE = kernel_device()
_SKIP = skip_reason_in_process()
needs_kernels = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

# The loss is fp32 for every logits dtype (both paths upcast), so its tolerance is fp32's.
# Gradients are returned in the logits' dtype: both paths compute them in fp32 and round
# once, so they may differ by one unit in the last place of that dtype.
LOSS_TOL = dict(atol=1e-6, rtol=1e-5)
GRAD_TOL = {torch.float32: dict(atol=1e-7, rtol=1e-5), torch.bfloat16: dict(atol=1e-6, rtol=8e-3),
            torch.float16: dict(atol=1e-7, rtol=1e-3)}
# With grad_output g ≠ 1 the kernel's gradient is rounded twice (written for g = 1 in the
# logits' dtype, then scaled by g), so low-precision gradients may be two units in the last
# place away (bf16: 2·2^-7 relative at most; fp16: 2·2^-10, and two subnormal steps of 6e-8
# for gradients below 6e-5). Absolute errors scale with |g|.
SCALED_GRAD_TOL = {**GRAD_TOL, torch.bfloat16: dict(atol=1e-6, rtol=1.6e-2),
                   torch.float16: dict(atol=1.2e-7, rtol=2e-3)}


def _grad_tol(dtype, grad_out):
    tol = (GRAD_TOL if grad_out == 1.0 else SCALED_GRAD_TOL)[dtype]
    return dict(tol, atol=tol["atol"] * max(1.0, abs(grad_out)))


def _check(got, want, what, **tol):
    msg = describe_mismatch(got, want, what=what, **tol)
    if msg:
        pytest.fail(msg)


# Against the independent spec (tests/spec_formulas.py: fp64, explicit log-sum-exp, autograd
# for the gradient), measured over every case that checks it (2026-12-03, TRITON_INTERPRET=1).
# The loss: fp32 accumulation vs fp64, max relative 1.2e-7; LOSS_TOL's rtol 1e-5 bounds it.
# The gradient: entries near zero come from a cancellation (softmax·Σt − t) that fp32 cannot
# resolve relative to themselves, so the bound is relative to the largest entry: measured
# max |Δ| / max |∂L| 2.5e-7 (fp32), 6.0e-3 (bf16: the kernel's one rounding to bf16 plus the
# fp32 path's), 6.2e-4 (fp16); the bounds below leave ~8x, ~2.7x and ~3x.
SPEC_GRAD_REL_TO_MAX = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _check_spec(loss, grad, logits, target, bias, grad_out, what):
    """``loss`` and ∂L/∂logits ``grad`` of a kernel call against spec_soft_cross_entropy."""
    x = logits.detach().clone().double().requires_grad_()
    want = spec_soft_cross_entropy(x, target.detach(), None if bias is None else bias.detach())
    want.backward(torch.tensor(float(grad_out), dtype=torch.float64, device=x.device))
    _check(loss.detach().double(), want.detach(), f"{what}: loss vs spec", **LOSS_TOL)
    atol = SPEC_GRAD_REL_TO_MAX[grad.dtype] * float(x.grad.abs().max())
    _check(grad.double(), x.grad, f"{what}: ∂L/∂logits vs spec", atol=atol, rtol=0.0)


def _target(kind, b, c, g):
    if kind == "softmax":
        return torch.softmax(torch.randn(b, c, generator=g) * 2, 1)
    if kind == "onehot":
        return torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=g), c).float()
    if kind == "unnormalised":  # rows do not sum to 1: Σ_j t_ij must be kept, not assumed
        return torch.rand(b, c, generator=g) * 3
    if kind == "rectified":  # the label ConCutMix actually feeds the loss
        z, centers = torch.randn(b, 16, generator=g), torch.randn(c, 16, generator=g)
        a, bb = torch.randint(0, c, (b,), generator=g), torch.randint(0, c, (b,), generator=g)
        counts = torch.randint(1, 500, (c,), generator=g)
        return reference_rectify_labels(z, centers, a, bb, torch.rand(b, generator=g), counts,
                                        topk=min(30, c), omega=200 / 255)
    raise ValueError(kind)


# (B, C, logits dtype, bias?, target kind, logits scale, grads to target/bias?, grad_output): branch hit.
# The gradient is written by the forward launch for grad_output = 1 and scaled by the
# backward: grad_output ≠ 1 (β of the recipes, a negative value) checks the scaling.
CASES = [
    (1, 3, torch.float32, True, "softmax", 1.0, True, 1.0),       # C < tile (padding); one row; ∂L/∂t, ∂L/∂bias
    (7, 10, torch.bfloat16, True, "rectified", 1.0, False, 0.35),  # bf16 logits; the real ConCutMix target
    (64, 1000, torch.float16, True, "onehot", 1.0, False, -2.5),   # fp16; one 1024-wide tile; hard label as soft
    (7, 8142, torch.float32, True, "softmax", 1.0, False, 0.35),   # iNaturalist C: two 4096-wide tiles, ragged
    (7, 100, torch.float32, False, "unnormalised", 1.0, True, -2.5),  # no bias; Σ t ≠ 1; ∂L/∂t scaled
    (7, 5000, torch.bfloat16, True, "softmax", 50.0, False, 1.0),  # large logits: online max rescaled across tiles
]


@needs_kernels
@pytest.mark.parametrize("b,c,dtype,with_bias,kind,scale,other_grads,grad_out", CASES)
def test_forward_and_gradients_match_autograd_on_reference(triton_backend, b, c, dtype, with_bias, kind, scale,
                                                           other_grads, grad_out):
    g = torch.Generator().manual_seed(b * 31 + c)
    logits = (torch.randn(b, c, generator=g) * scale).to(dtype).to(DEVICE)
    target = _target(kind, b, c, g).to(DEVICE)
    bias = log_prior(torch.randint(1, 1000, (c,), generator=g), tau=0.99).to(DEVICE) if with_bias else None

    def leaves():
        x = logits.clone().requires_grad_()
        t = target.clone().requires_grad_(other_grads)
        bb = bias.clone().requires_grad_(other_grads) if bias is not None else None
        return x, t, bb

    g_out = torch.tensor(grad_out, device=DEVICE)
    x, t, bb = leaves()
    loss = soft_cross_entropy(x, t, bb)
    loss.backward(g_out)
    xr, tr, bbr = leaves()
    want = reference_soft_cross_entropy(xr, tr, bbr)
    want.backward(g_out)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _check(loss, want, f"loss B={b} C={c} {dtype} {kind}", **LOSS_TOL)
    assert x.grad.dtype == dtype
    _check(x.grad, xr.grad, f"∂L/∂logits B={b} C={c} {dtype} {kind}", **_grad_tol(dtype, grad_out))
    _check_spec(loss, x.grad, logits, target, bias, grad_out, f"B={b} C={c} {dtype} {kind}")
    if other_grads:
        _check(t.grad, tr.grad, "∂L/∂target", **GRAD_TOL[torch.float32])
        if bb is not None:
            _check(bb.grad, bbr.grad, "∂L/∂bias", atol=1e-6, rtol=1e-5)


@needs_kernels
def test_forward_writes_the_gradient_and_backward_only_scales_it(triton_backend):
    """One Triton launch per forward + backward (the gradient is written by the forward), the
    scaling by grad_output is a device op, no host read; no gradient pass without grad."""
    from fastlt.kernels.testing import count_launches

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(7, 100, generator=g).to(DEVICE).requires_grad_()
    target = _target("softmax", 7, 100, g).to(DEVICE)
    bias = torch.randn(100, generator=g).to(DEVICE)
    beta = torch.tensor(0.35, device=DEVICE)

    def step():
        logits.grad = None
        (beta * soft_cross_entropy(logits, target, bias)).backward()

    step()
    got = count_launches(step, DEVICE)
    assert got["triton"] == 1 and got["host_syncs"] == 0, got
    if DEVICE == "cpu":
        assert got["ops"].get("aten::mul_", 0) == 1, got  # the backward scales the stored gradient in place
    xr = logits.detach().clone().requires_grad_()
    (beta * reference_soft_cross_entropy(xr, target, bias)).backward()
    _check(logits.grad, xr.grad, "β·L gradient", **GRAD_TOL[torch.float32])
    _check_spec(reference_soft_cross_entropy(xr, target, bias), logits.grad, logits, target, bias, 0.35, "β·L")
    with torch.no_grad():
        assert count_launches(lambda: soft_cross_entropy(logits, target, bias), DEVICE)["triton"] == 1


@needs_kernels
def test_second_backward_through_the_same_graph_is_refused(triton_backend):
    """The forward's gradient is scaled in place by the first backward: a second one through
    a retained graph must fail loudly rather than scale it twice."""
    logits = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    target = torch.softmax(torch.randn(4, 10, device=DEVICE), 1)
    loss = soft_cross_entropy(logits, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run only once per forward"):
        loss.backward()


@needs_kernels
def test_logit_adjusted_module_uses_the_kernel_for_soft_targets(triton_backend, monkeypatch):
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(1, 1000, (10,), generator=g)
    module = LogitAdjustedCrossEntropy(counts, tau=0.99).to(DEVICE)
    logits = torch.randn(7, 10, generator=g).to(DEVICE).requires_grad_()
    target = _target("softmax", 7, 10, g).to(DEVICE)
    calls = []
    from fastlt.kernels import soft_ce

    original = soft_ce.soft_cross_entropy_triton
    monkeypatch.setattr(soft_ce, "soft_cross_entropy_triton", lambda *a: calls.append(1) or original(*a))
    loss = module(logits, target)
    assert calls == [1], "LogitAdjustedCrossEntropy did not dispatch to the Triton kernel"
    _check(loss, reference_soft_cross_entropy(logits, target, log_prior(counts, 0.99).to(DEVICE)), "module loss",
           **LOSS_TOL)


@needs_kernels
def test_bad_inputs_raise(triton_backend):
    logits = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"target must have the logits' shape \(4, 10\); got \(4, 9\)"):
        soft_cross_entropy(logits, torch.rand(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="target must be a float soft label"):
        soft_cross_entropy(logits, torch.ones(4, 10, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must be \(10,\)"):
        soft_cross_entropy(logits, torch.rand(4, 10, device=DEVICE), torch.zeros(9, device=DEVICE))
    with pytest.raises(ValueError, match=r"logits must be \(B, C\)"):
        soft_cross_entropy(logits[0], torch.rand(10, device=DEVICE))


@needs_kernels
def test_custom_ops_are_registered_for_torch_compile(triton_backend):
    """Schema, fake implementations and autograd registration (torch.library.opcheck), and a
    full graph under torch.compile."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 10, generator=g).to(DEVICE).requires_grad_()
    target = _target("softmax", 7, 10, g).to(DEVICE)
    bias = torch.randn(10, generator=g).to(DEVICE)
    from fastlt.kernels import soft_ce, soft_ce_compact  # noqa: F401  (registers the fastlt:: ops)

    torch.library.opcheck(torch.ops.fastlt.soft_ce.default, (logits, target, bias, True, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    label = reference_rectify_labels_compact(*_compact_inputs(7, 10, 3, seed=7), topk=3, omega=1.0)
    torch.library.opcheck(torch.ops.fastlt.soft_ce_compact.default,
                          (logits, bias, label.index, label.weight, label.gamma, label.label_a, label.label_b,
                           label.lam, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    # Forward compiled as one graph (AOTAutograd builds the backward from the registration).
    loss = torch.compile(soft_cross_entropy, backend="aot_eager", fullgraph=True)(logits, target, bias)
    loss.backward(torch.tensor(-1.5))
    x = logits.detach().clone().requires_grad_()
    want_loss = reference_soft_cross_entropy(x, target, bias)
    want_loss.backward(torch.tensor(-1.5))
    _check(loss, want_loss, "compiled loss", **LOSS_TOL)
    _check(logits.grad, x.grad, "compiled ∂L/∂logits", **GRAD_TOL[torch.float32])
    _check_spec(loss, logits.grad, logits, target, bias, -1.5, "compiled")

    # The compact path too: label and loss in one graph.
    z, centers, a, bb, lam, counts = _compact_inputs(7, 10, 3, seed=6)

    def label_and_loss(x):
        label = rectify_labels_compact(z, centers, a, bb, lam, counts, topk=3, omega=1.0)
        return soft_cross_entropy_compact(x, label, bias)

    x = logits.detach().clone().requires_grad_()
    loss = torch.compile(label_and_loss, backend="aot_eager", fullgraph=True)(x)
    loss.backward()
    xr = logits.detach().clone().requires_grad_()
    dense = reference_rectify_labels(z, centers, a, bb, lam, counts, topk=3, omega=1.0)
    want = reference_soft_cross_entropy(xr, dense, bias)
    want.backward()
    _check(loss, want, "compiled compact loss", **LOSS_TOL)
    _check(x.grad, xr.grad, "compiled compact ∂L/∂logits", **GRAD_TOL[torch.float32])


# ------------------------------------------------------------------------------ compact label

def _compact_inputs(b, c, k, seed, lam=None, same_classes=False):
    g = torch.Generator().manual_seed(seed)
    z, centers = torch.randn(b, 16, generator=g), torch.randn(c, 16, generator=g)
    a = torch.randint(0, c, (b,), generator=g)
    bb = a.clone() if same_classes else torch.randint(0, c, (b,), generator=g)
    lam_t = torch.rand(b, generator=g) if lam is None else torch.full((b,), float(lam))
    counts = torch.randint(1, 1000, (c,), generator=g)
    return [t.to(DEVICE) for t in (z, centers, a, bb, lam_t, counts)]


# (B, C, K, logits dtype, label from, λ, a == b, grad_output): branch hit.
COMPACT_CASES = [
    (7, 10, 3, torch.float32, "kernel", None, False, 1.0),     # label straight from the rectification kernel
    (64, 1000, 30, torch.bfloat16, "kernel", None, False, 0.35),  # ImageNet-LT C and K; bf16 logits
    (7, 3000, 1, torch.float32, "torch", 1.0, False, -2.5),    # K = 1; λ = 1; C over one 4096 tile, ragged
    (7, 3000, 3000, torch.float32, "torch", 0.0, False, 1.0),  # K = C: 3 chunks of the 1024-wide K loop; λ = 0
    (7, 100, 30, torch.float16, "torch", None, True, 0.35),    # a == b; label from the PyTorch path
    (7, 9000, 30, torch.float32, "torch", None, False, 2.0),   # C > 4096: three streamed tiles in both passes
]


@needs_kernels
@pytest.mark.parametrize("b,c,k,dtype,source,lam,same,grad_out", COMPACT_CASES)
def test_compact_label_loss_matches_dense_reference(triton_backend, b, c, k, dtype, source, lam, same, grad_out):
    z, centers, a, bb, lam_t, counts = _compact_inputs(b, c, k, seed=c + k, lam=lam, same_classes=same)
    kw = dict(topk=k, omega=1628 / 255)
    if source == "kernel":
        label = rectify_labels_compact(z, centers, a, bb, lam_t, counts, **kw)
    else:
        label = reference_rectify_labels_compact(z, centers, a, bb, lam_t, counts, **kw)
    dense = reference_rectify_labels(z, centers, a, bb, lam_t, counts, **kw)
    _check(label.to_dense(), dense, "compact label densified", atol=1e-6, rtol=1e-5)
    # int64 indices + fp32 weights per kept class; γ, λ (fp32) and a, b (int64) per row.
    assert label.nbytes() == b * (min(k, c) * 12 + 24)
    bias = log_prior(counts.cpu(), 0.99).to(DEVICE)
    logits = torch.randn(b, c, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEVICE)
    g_out = torch.tensor(grad_out, device=DEVICE)
    x = logits.clone().requires_grad_()
    loss = soft_cross_entropy_compact(x, label, bias)
    loss.backward(g_out)
    xr = logits.clone().requires_grad_()
    want = reference_soft_cross_entropy(xr, dense, bias)
    want.backward(g_out)
    _check(loss, want, f"compact loss B={b} C={c} K={k}", **LOSS_TOL)
    _check(x.grad, xr.grad, f"compact ∂L/∂logits B={b} C={c} K={k}", **_grad_tol(dtype, grad_out))
    # The spec's label (B×C×D, stable sort, one-hots) through the spec's loss.
    spec_label = dense_rectify_labels(z, centers, a, bb, lam_t, counts, **kw)
    _check_spec(loss, x.grad, logits, spec_label, bias, grad_out, f"compact B={b} C={c} K={k}")


@needs_kernels
def test_compact_reference_reproduces_the_dense_spec():
    """The PyTorch compact path (no FASTLT_KERNELS override: CPU → torch) equals the dense
    reference and the independent spec (tests/spec_formulas.py's B×C×D formulation, whose
    distance rounds differently: the tolerance of tests/test_kernels_rectify.py's SPEC_TOL)."""
    z, centers, a, bb, lam, counts = _compact_inputs(7, 100, 30, seed=1)
    for normalize in ("l1", "softmax"):
        kw = dict(topk=30, omega=200 / 255, normalize=normalize, temperature=0.3)
        label = reference_rectify_labels_compact(z, centers, a, bb, lam, counts, **kw)
        _check(label.to_dense(), reference_rectify_labels(z, centers, a, bb, lam, counts, **kw), normalize,
               atol=1e-7, rtol=1e-6)
        _check(label.to_dense(), dense_rectify_labels(z, centers, a, bb, lam, counts, **kw), f"{normalize} vs spec",
               atol=1e-6, rtol=1e-5)


@needs_kernels
def test_compact_bad_inputs_raise(triton_backend):
    z, centers, a, bb, lam, counts = _compact_inputs(4, 10, 3, seed=2)
    label = rectify_labels_compact(z, centers, a, bb, lam, counts, topk=3, omega=1.0)
    logits = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"logits must be \(B, 10\)"):
        soft_cross_entropy_compact(logits[:, :9], label)
    with pytest.raises(ValueError, match="label must be a CompactLabel"):
        soft_cross_entropy_compact(logits, tuple(label))
    with pytest.raises(ValueError, match=r"gamma must be \(4,\)"):
        soft_cross_entropy_compact(logits, label._replace(gamma=label.gamma[:3]))
    weight = label.weight.clone().requires_grad_()
    x = logits.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="gradients flow to the logits only"):
        soft_cross_entropy_compact(x, label._replace(weight=weight)).backward()
    bad = label.index.clone()
    bad[1, 0] = 12
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"index has values in \[.*12\], outside the 10 classes"):
            soft_cross_entropy_compact(logits, label._replace(index=bad))
    else:  # no host sync on CUDA: the loss becomes NaN instead of reading out of bounds
        assert bool(soft_cross_entropy_compact(logits, label._replace(index=bad)).isnan())
    assert isinstance(label, CompactLabel)
