"""The fused balanced contrastive loss (fastlt.kernels.balscl) against the spec.

docs/design.md §1 "Losses", L_BalSCL. The spec is ``fastlt.method.losses.reference_balanced_supcon_loss``
(itself checked against the literal loop of tests/spec_formulas.py through the module, here
and in tests/test_losses.py). Forward and gradients with respect to every item, fp32 and bf16
items with their own tolerances, over a grid of shapes chosen to hit the kernels' branches
(each case's comment names them). Also the distributed ("global") form: per-rank losses over
the whole contrast set average to the single-process loss.

Runs the compiled kernels on a GPU, or Triton's interpreter on CPU tensors (CI); the shapes
are small because the interpreter is slow. ``geometry`` (MAX_SPLITS, ANCHOR_GROUP) shrinks the
forward's geometry so that small inputs reach several tiles per split and several anchor
groups.
"""
from fastlt.kernels.testing import prepare_interpreter

prepare_interpreter()  # before anything imports triton (a no-op here: tests/conftest.py called it first)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastlt.kernels import dispatch  # noqa: E402
from fastlt.kernels.testing import (count_launches, describe_mismatch, kernel_device,  # noqa: E402
                                    skip_reason_in_process)
from fastlt.method.losses import BalancedSupConLoss, balanced_supcon_loss, reference_balanced_supcon_loss  # noqa: E402
from spec_formulas import loop_balanced_supcon, spec_balanced_supcon  # noqa: E402

DEVICE = kernel_device()
_SKIP = skip_reason_in_process()
needs_kernels = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
# The interpreter evaluates both sides of tl.where, so masked lanes divide by zero harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

# The loss is fp32 for every items dtype. bf16 items: products are exact in fp32 on both
# paths, so the loss differs by summation order only; fp32 items go through 3xTF32 on a GPU
# (about 2^-22 relative per product). Gradients come back in the items' dtype; for bf16 the
# kernel also rounds G to bf16 for the gradient product (as flash attention does), so its
# error is a few bf16 units relative to the largest gradient entry.
LOSS_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}
GRAD_TOL = {torch.float32: dict(atol=2e-6, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
# Against the independent spec (tests/spec_formulas.py's spec_balanced_supcon: fp64, one anchor
# at a time, autograd for the gradient), measured over every case that checks it (2026-12-03,
# TRITON_INTERPRET=1): loss max relative 1.1e-7 (bound 1e-6, ~9x); gradient max |Δ| / max |∂L|
# 4.8e-6 for fp32 and fp64 items (the T = 0.01 case; 4e-7 at most otherwise; bound 2e-5, ~4x)
# and 7.4e-3 for bf16 (the gradient's rounding to bf16; bound 2e-2, ~2.7x).
SPEC_LOSS_RTOL = 1e-6
SPEC_GRAD_REL_TO_MAX = {torch.float32: 2e-5, torch.float64: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def geometry(monkeypatch):
    """Set (MAX_SPLITS, ANCHOR_GROUP) of the forward for one test."""
    from fastlt.kernels import balscl

    def set_geometry(value):
        monkeypatch.setattr(balscl, "_TEST_GEOMETRY", value)
    return set_geometry


def _check(got, want, what, atol, rtol, relative_to_max=False):
    if relative_to_max:  # absolute tolerance as a fraction of the largest expected entry
        atol = atol * float(want.detach().abs().max())
    msg = describe_mismatch(got.float(), want.float(), what=what, atol=atol, rtol=rtol)
    if msg:
        pytest.fail(msg)


def _contrast_set(num_views, c, d, seed, dtype=torch.float32, labels_of_views=None):
    """items = num_views L2-normalised views then the c normalised centers; their labels."""
    g = torch.Generator().manual_seed(seed)
    views = F.normalize(torch.randn(num_views, d, generator=g), dim=1)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=1)
    y = torch.randint(0, c, (num_views,), generator=g) if labels_of_views is None else labels_of_views
    items = torch.cat([views, centers]).to(dtype).to(DEVICE)
    return items, torch.cat([y, torch.arange(c)]).to(DEVICE)


def _loss_and_grad(fn, items, labels, c, temperature, start, m, grad_out):
    x = items.clone().requires_grad_()
    loss = fn(x, labels, c, temperature, start, m)
    loss.backward(torch.tensor(grad_out, device=DEVICE))
    return loss.detach(), x.grad


def _check_spec(loss, grad, items, labels, c, temperature, start, m, grad_out, what):
    """A kernel call's loss and ∂L/∂items against spec_balanced_supcon (shares no code with the
    library's reference)."""
    x = items.detach().double().clone().requires_grad_()
    want = spec_balanced_supcon(x, labels, c, temperature, start, m)
    want.backward(torch.tensor(float(grad_out), dtype=torch.float64, device=x.device))
    rel = float((loss.double() - want).abs() / want.abs())
    gmax = float(x.grad.abs().max())
    _check(loss.double(), want.detach(), f"{what}: loss vs spec", atol=0.0, rtol=SPEC_LOSS_RTOL)
    _check(grad.double(), x.grad, f"{what}: ∂L/∂items vs spec", atol=SPEC_GRAD_REL_TO_MAX[grad.dtype] * gmax, rtol=0.0)


# (views, C, D, anchor_start, anchors, dtype, T, grad_output, geometry): the branch each case hits.
CASES = [
    (2, 3, 16, 0, 2, torch.float32, 0.1, 1.0, None),     # N = 5 < one item tile; 2 anchors in a 16-row block
    (12, 4, 8, 0, 12, torch.float32, 0.07, 0.35, None),  # D = 8 < BLOCK_D (padded chunk); classes repeat
    (80, 30, 32, 15, 20, torch.float32, 0.1, -2.0, None),  # global form: anchor rows 15..34 straddle
    #                                                     backward row blocks (one anchor in the first);
    #                                                     2 item tiles in 2 splits
    (100, 60, 40, 0, 100, torch.float32, 0.1, 1.0, (2, 32)),  # 3 tiles in 2 splits (2 per split, one
    #                                                     past the end); 4 anchor groups of 2 blocks
    (30, 10, 160, 30, 0, torch.float32, 0.1, 1.0, None),  # D = 160: 5 logit chunks, 2 gradient column
    #                                                     blocks (ragged); anchors = the centers' rows
    (64, 40, 64, 16, 16, torch.bfloat16, 0.07, 0.35, None),  # bf16 items, the per-GPU form (16 of 64 views)
    (40, 20, 32, 0, 40, torch.bfloat16, 0.1, 1.0, (1, 16)),  # bf16; one split of 1 tile; 3 anchor groups
    (24, 6, 16, 0, 24, torch.float32, 0.01, 1.0, None),  # T = 0.01: logits up to 100, online max rescaling
]


@needs_kernels
@pytest.mark.parametrize("views,c,d,start,m,dtype,temperature,grad_out,geom", CASES)
def test_forward_and_gradients_match_reference(triton_backend, geometry, views, c, d, start, m, dtype,
                                               temperature, grad_out, geom):
    geometry(geom)
    if m == 0:  # the rows of the centers as anchors (the function accepts any row range)
        m = c
    items, labels = _contrast_set(views, c, d, seed=views + c + d, dtype=dtype)
    args = (items, labels, c, temperature, start, m, grad_out)
    loss, grad = _loss_and_grad(balanced_supcon_loss, *args)
    want_loss, want_grad = _loss_and_grad(reference_balanced_supcon_loss, *args)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == items.shape
    what = f"N={views + c} C={c} D={d} anchors [{start}, {start + m}) {dtype}"
    _check(loss, want_loss, f"loss {what}", **LOSS_TOL[dtype])
    _check(grad, want_grad, f"∂L/∂items {what}", **GRAD_TOL[dtype], relative_to_max=dtype != torch.float32)
    _check_spec(loss, grad, items, labels, c, temperature, start, m, grad_out, what)
    # Items that are neither anchors nor positives of any anchor still get gradient through
    # the denominators: the whole contrast set is differentiated.
    assert bool((grad.float().abs().sum(1) > 0).all())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_uses_the_kernel_and_matches_the_loop_formula(triton_backend, dtype):
    """BalancedSupConLoss(centers, features, labels) dispatches to the kernel; result and
    gradients equal BCL's loop over anchors (tests/spec_formulas.py)."""
    from fastlt.kernels import balscl

    calls = []
    original = balscl.balanced_supcon_loss_triton
    g = torch.Generator().manual_seed(4)
    b, c, d = 6, 5, 16
    centers = F.normalize(torch.randn(c, d, generator=g), dim=1).to(dtype).to(DEVICE).requires_grad_()
    feats = F.normalize(torch.randn(b, 2, d, generator=g), dim=2).to(dtype).to(DEVICE).requires_grad_()
    labels = torch.tensor([0, 0, 1, 3, 3, 3], device=DEVICE)
    try:
        balscl.balanced_supcon_loss_triton = lambda *a: calls.append(1) or original(*a)
        loss = BalancedSupConLoss(torch.ones(c), 0.1).to(DEVICE)(centers, feats, labels)
    finally:
        balscl.balanced_supcon_loss_triton = original
    assert calls == [1], "BalancedSupConLoss did not dispatch to the Triton kernel"
    g_c, g_f = torch.autograd.grad(loss, (centers, feats))
    cr, fr = (t.detach().double().requires_grad_() for t in (centers, feats))
    want = loop_balanced_supcon(cr, fr, labels, 0.1)
    w_c, w_f = torch.autograd.grad(want, (cr, fr))
    _check(loss, want, "module loss vs loop", **LOSS_TOL[dtype])
    _check(g_c, w_c, "∂L/∂centers vs loop", **GRAD_TOL[dtype], relative_to_max=dtype != torch.float32)
    _check(g_f, w_f, "∂L/∂features vs loop", **GRAD_TOL[dtype], relative_to_max=dtype != torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_rank_losses_average_to_the_single_process_loss(monkeypatch, backend):
    """The global form: W ranks, each with B samples, gather all 2·B·W views (rank-major) and
    the centers; rank r's anchors are its own 2B views. The mean of the W losses, and the sum
    of their gradients, equal the single-process loss over the whole batch."""
    if backend == "triton" and _SKIP is not None:
        pytest.skip(_SKIP)
    monkeypatch.setenv("FASTLT_KERNELS", backend)
    dispatch._reset_for_tests()
    world, b, c, d = 3, 4, 7, 16
    g = torch.Generator().manual_seed(11)
    feats = F.normalize(torch.randn(world * b, 2, d, generator=g), dim=2).to(DEVICE)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=1).to(DEVICE)
    labels = torch.randint(0, c, (world * b,), generator=g).to(DEVICE)
    # Single process: BalancedSupConLoss over the global batch.
    f1, c1 = feats.clone().requires_grad_(), centers.clone().requires_grad_()
    single = BalancedSupConLoss(torch.ones(c), 0.1).to(DEVICE)(c1, f1, labels)
    single.backward()
    # W ranks: rank r holds samples r·B..(r+1)·B, its 2B views [view 1s, view 2s] in the gathered set.
    f2, c2 = feats.clone().requires_grad_(), centers.clone().requires_grad_()
    per_rank = [f2[r * b:(r + 1) * b].transpose(0, 1).reshape(2 * b, d) for r in range(world)]
    rank_labels = [labels[r * b:(r + 1) * b].repeat(2) for r in range(world)]
    items = torch.cat(per_rank + [c2])
    item_labels = torch.cat(rank_labels + [torch.arange(c, device=DEVICE)])
    losses = [balanced_supcon_loss(items, item_labels, c, 0.1, anchor_start=2 * b * r, num_anchors=2 * b)
              for r in range(world)]
    torch.stack(losses).mean().backward()
    dispatch._reset_for_tests()
    _check(torch.stack(losses).mean(), single, "mean of per-rank losses", **LOSS_TOL[torch.float32])
    _check(f2.grad, f1.grad, "∂/∂features", **GRAD_TOL[torch.float32])
    _check(c2.grad, c1.grad, "∂/∂centers", **GRAD_TOL[torch.float32])


@needs_kernels
def test_three_launches_and_no_host_sync(triton_backend):
    """Forward + backward: the forward and combine kernels, then the backward kernel; no host
    read (the label range check runs on CPU tensors only and is not part of the launches)."""
    items, labels = _contrast_set(40, 10, 16, seed=5)
    x = items.clone().requires_grad_()
    grad_out = torch.tensor(0.35, device=DEVICE)

    def step():
        x.grad = None
        balanced_supcon_loss(x, labels, 10, 0.1).backward(grad_out)

    step()
    got = count_launches(step, DEVICE)
    assert got["triton"] == 3, got
    if DEVICE == "cpu":
        host_reads_of_the_range_check = 2  # int() of aminmax's two values; skipped on CUDA
        assert got["host_syncs"] == host_reads_of_the_range_check, got
        assert set(got["ops"]) == {"aten::aminmax", "triton::_balscl_fwd_kernel", "triton::_balscl_combine_kernel",
                                   "triton::_balscl_bwd_kernel"}, got
    else:
        assert got["host_syncs"] == 0, got


@needs_kernels
def test_custom_ops_are_registered_for_torch_compile(triton_backend):
    """Schema, fake implementations, autograd registration (opcheck), and the module compiled
    with fullgraph=True, forward and backward."""
    from fastlt.kernels import balscl  # noqa: F401  (registers the fastlt:: ops)

    items, labels = _contrast_set(12, 4, 16, seed=6)
    x = items.clone().requires_grad_()
    torch.library.opcheck(torch.ops.fastlt.balscl_forward.default, (x, labels, 4, 0.1, 2, 8),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    fn = torch.compile(lambda t: balanced_supcon_loss(t, labels, 4, 0.1, 2, 8), backend="aot_eager", fullgraph=True)
    loss = fn(x)
    loss.backward()
    want, want_grad = _loss_and_grad(reference_balanced_supcon_loss, items, labels, 4, 0.1, 2, 8, 1.0)
    _check(loss, want, "compiled loss", **LOSS_TOL[torch.float32])
    _check(x.grad, want_grad, "compiled ∂L/∂items", **GRAD_TOL[torch.float32])
    _check_spec(loss.detach(), x.grad, items, labels, 4, 0.1, 2, 8, 1.0, "compiled")


@needs_kernels
def test_fp64_and_strided_items(triton_backend):
    """fp64 items are computed in fp32 (gradient cast back); items with any strides (here
    column-major) are read through their strides."""
    items, labels = _contrast_set(12, 4, 16, seed=7, dtype=torch.float64)
    loss, grad = _loss_and_grad(balanced_supcon_loss, items, labels, 4, 0.1, 0, None, 1.0)
    want, want_grad = _loss_and_grad(reference_balanced_supcon_loss, items, labels, 4, 0.1, 0, None, 1.0)
    assert grad.dtype == torch.float64
    _check(loss, want, "fp64 loss", **LOSS_TOL[torch.float32])
    _check(grad, want_grad, "fp64 ∂L/∂items", **GRAD_TOL[torch.float32])
    _check_spec(loss, grad, items, labels, 4, 0.1, 0, None, 1.0, "fp64")
    column_major = items.float().t().contiguous().t()
    assert column_major.stride() == (1, items.shape[0])
    loss, grad = _loss_and_grad(balanced_supcon_loss, column_major, labels, 4, 0.1, 3, 6, 1.0)
    want, want_grad = _loss_and_grad(reference_balanced_supcon_loss, column_major, labels, 4, 0.1, 3, 6, 1.0)
    _check(loss, want, "strided loss", **LOSS_TOL[torch.float32])
    _check(grad, want_grad, "strided ∂L/∂items", **GRAD_TOL[torch.float32])
    _check_spec(loss, grad, column_major, labels, 4, 0.1, 3, 6, 1.0, "strided")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(monkeypatch, backend):
    if backend == "triton" and _SKIP is not None:
        pytest.skip(_SKIP)
    monkeypatch.setenv("FASTLT_KERNELS", backend)
    dispatch._reset_for_tests()
    items, labels = _contrast_set(6, 3, 8, seed=8)
    cases = [
        ((items[0], labels, 3, 0.1), r"items must be a floating-point \(N, D\) tensor"),
        ((items, labels.float(), 3, 0.1), r"item_labels must be an integer tensor of shape \(9,\)"),
        ((items, labels[:5], 3, 0.1), r"item_labels must be an integer tensor of shape \(9,\)"),
        ((items, labels, 0, 0.1), "num_classes must be a positive int"),
        ((items, labels, 3, 0.0), "temperature must be > 0"),
        ((items, labels, 3, 0.1, -1), "anchor_start must be an int >= 0"),
        ((items, labels, 3, 0.1, 4, 6), r"anchors items\[4:10\] run past the 9 items"),
        ((items, labels, 9, 0.1), "with num_anchors=None the anchors are rows anchor_start=0 up to the 9 center"),
        ((items, labels, 3, 0.1, 0, 0), "num_anchors must be a positive int"),
    ]
    out_of_range = torch.cat([labels[:-1], labels.new_tensor([3])])
    if DEVICE == "cpu":  # checking the range costs a host sync on CUDA: CPU tensors only
        cases.append(((items, out_of_range, 3, 0.1), r"item_labels has values in \[0, 3\], outside the 3 classes"))
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            balanced_supcon_loss(*args)
    if backend == "triton":  # no check on CUDA: the kernel poisons the loss instead (here past the check)
        from fastlt.kernels.balscl import _forward

        loss, *_ = _forward(items, out_of_range, 3, 0.1, 0, 6)
        assert bool(loss.isnan())
    dispatch._reset_for_tests()
