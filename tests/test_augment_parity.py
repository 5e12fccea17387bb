"""View-0 augmentations of docs/design.md §1 "Views" against the implementations they reproduce.

- Per op: each of timm's 15 RandAugment ops (timm's own ``AugmentOp``, PIL) and each op of
  the reference's CIFAR10Policy (``cifar_policy.pil_op``, PIL) at fixed magnitudes, signs and
  interpolations, applied to decoded JPEGs, against the DALI graph's ``apply_stages`` fed the
  stages the keyed sources would draw; PIL's GaussianBlur against the DALI blur at several σ.
  The tolerances (max and mean |Δ| in grey levels) are stated per op in ``RANDAUG_TOL`` and
  ``CIFAR_TOL``, with what was measured.
- Frequencies: op choice, apply coin, magnitude N(10, 0.5) clipped, sign and interpolation of
  the DALI sources' draws, and of timm's RandAugment and the torch CIFAR policy as the torch
  backend runs them (seeded per sample), with chi-square tests.
- Wiring: the spec's ``randaugment_*`` reach both backends; the CIFAR recipe stays
  deterministic across worker counts and resumes exactly on both backends.
"""
from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy.stats import chi2, chisquare, norm

from fastlt.data import ArrayDataset, LongTailedList, make_synthetic_lt
from fastlt.pipelines import TrainPipelineSpec, build_train_pipeline, dali_available
from fastlt.pipelines import augment_stages as st
from fastlt.pipelines import cifar_policy as cp
from fastlt.pipelines import randaugment as ra
from fastlt.pipelines.common import keyed_rng, keyed_seed
from fastlt.pipelines.dali_sources import BLUR_SIGMA, pil_blur_taps
from fastlt.pipelines.transforms import train_view_transforms

needs_dali = pytest.mark.skipif(not dali_available()[0],
                                reason="DALI is not installed (pip install nvidia-dali-cuda130)")
MEAN = (0.485, 0.456, 0.406)
FILL = ra.fill_colour(MEAN)  # (124, 116, 104)
P_VALUE = 1e-3

# (max |Δ|, mean |Δ|) allowed per op; measured on these images in brackets.
EXACT = (1, 0.01)  # integer / PIL-float arithmetic reproduced [0, 0]
RANDAUG_TOL = {name: EXACT for name in ra.RANDAUG_OPS}
RANDAUG_TOL["Equalize"] = (1, 0.5)  # PIL's LUT recovered from fn.equalize, one level off at steps [1, 0.33]
BILINEAR_TOL = (1, 0.05)  # float32 vs PIL's double at truncation [1, 0.03]
BICUBIC_TOL = (1, 0.01)   # PIL's a = -1 cubic from 16 NN gathers; 1 where a point sits 0.001 below a tap [0, 0]
CIFAR_TOL = {op: EXACT for op in ("invert", "contrast", "sharpness", "autocontrast", "posterize", "color",
                                  "brightness", "solarize", "translateX", "translateY")}
CIFAR_TOL.update({"equalize": (1, 0.5), "shearX": BICUBIC_TOL, "shearY": BICUBIC_TOL,
                  # nearest: PIL's 16.16 fixed point picks a neighbour now and then, off by one
                  # pixel's difference from its neighbour [8, 0.005 on 2026-12-03; 3x and 4x allowed]
                  "rotate": (24, 0.02)})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Decoded JPEGs: three synthetic long-tail images and a PIL-encoded noisy gradient."""
    syn = make_synthetic_lt(tmp_path_factory.mktemp("aug_photos"), num_classes=3, imb_factor=1.0, n_max=1,
                            image_size=72, seed=4, n_val=1)
    ds = LongTailedList(syn.root, syn.train_list)
    images = [Image.open(ds.full_path(i)).convert("RGB") for i in range(len(ds))]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:72]
    grad = np.stack([xx * 3, yy * 3, (xx + yy) * 2], -1) + rng.normal(0, 12, (72, 72, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return images


def dali_apply(images, stages, *, fill, size):
    """Run ``dali_augment.apply_stages`` (one stage per sample) on uint8 HWC arrays, DALI CPU."""
    from nvidia.dali import fn, pipeline_def

    from fastlt.pipelines.dali_augment import apply_stages

    kinds, interps, params = zip(*(st.stack_stages([s]) for s in stages))

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, enable_conditionals=True)
    def graph():
        img = fn.external_source(source=[list(images)], batch=True, layout="HWC")
        k, i, p = (fn.external_source(source=[list(a)], batch=True) for a in (kinds, interps, params))
        return apply_stages(img, k, i, p, stages=1, fill=fill, size=size)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[j]) for j in range(len(images))]


def check(results, tolerance):
    """results: {op: [(dali, reference), ...]} -> list of 'op: max m > M or mean ...' failures."""
    bad = []
    for op, pairs in results.items():
        most, mean = tolerance[op]
        d = [np.abs(a.astype(int) - b.astype(int)) for a, b in pairs]
        worst, avg = max(x.max() for x in d), max(x.mean() for x in d)
        if worst > most or avg > mean:
            bad.append(f"{op}: max |d| {worst} (allowed {most}), mean |d| {avg:.3f} (allowed {mean})")
    return bad


def timm_op(img, name, magnitude, negate, bicubic, size, monkeypatch):
    """timm's own op at a fixed magnitude, sign and interpolation (its sign coin forced)."""
    from timm.data.auto_augment import AugmentOp

    hparams = {"translate_const": int(size * 0.45), "img_mean": FILL,
               "interpolation": Image.BICUBIC if bicubic else Image.BILINEAR}
    with monkeypatch.context() as m:
        m.setattr(random, "random", lambda: 0.9 if negate else 0.1)  # timm negates when random() > 0.5
        return np.asarray(AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(img))


@needs_dali
def test_randaugment_ops_match_timm(photos, monkeypatch):
    size = 64
    images = [im.resize((size, size), Image.BILINEAR) for im in photos]
    cases = [(name, mag, neg, bic, im) for name in ra.RANDAUG_OPS for mag in (10.0, 7.3)
             for neg in ((False, True) if name in ra.SIGNED_OPS else (False,))
             for bic in ((False, True) if name in ra.GEOMETRIC_OPS else (False,)) for im in images]
    out = dali_apply([np.asarray(c[4]) for c in cases], [ra.op_stage(n, m, s, b, size) for n, m, s, b, _ in cases],
                     fill=FILL, size=size)
    results, tol = {}, dict(RANDAUG_TOL)
    for (name, mag, neg, bic, im), got in zip(cases, out):
        key = f"{name} {'bicubic' if bic else 'bilinear'}" if name in ra.GEOMETRIC_OPS else name
        tol.setdefault(key, BICUBIC_TOL if bic else BILINEAR_TOL)
        results.setdefault(key, []).append((got, timm_op(im, name, mag, neg, bic, size, monkeypatch)))
    assert len(results) == 20
    bad = check(results, tol)
    assert not bad, "\n".join(bad)


@needs_dali
def test_cifar_policy_ops_match_the_reference(photos):
    size = 32
    images = [im.resize((size, size), Image.BILINEAR) for im in photos]
    ops = sorted({op for sub in cp.CIFAR10_POLICY for op, _, _ in sub} | {"shearX"})
    cases = [(op, idx, neg, im) for op in ops for idx in range(10)
             for neg in ((False, True) if op in cp.SIGNED_OPS else (False,)) for im in images]
    out = dali_apply([np.asarray(c[3]) for c in cases], [cp.op_stage(op, i, n, size) for op, i, n, _ in cases],
                     fill=cp.CIFAR_FILL, size=size)
    results = {}
    for (op, idx, neg, im), got in zip(cases, out):
        results.setdefault(op, []).append((got, np.asarray(cp.pil_op(im, op, idx, neg))))
    assert set(results) == set(CIFAR_TOL)
    bad = check(results, CIFAR_TOL)
    assert not bad, "\n".join(bad)


@needs_dali
def test_blur_is_pils_gaussian_blur(photos):
    from nvidia.dali import fn, pipeline_def

    from fastlt.pipelines.dali_augment import pil_gaussian_blur

    images = [np.asarray(im.resize((32, 32), Image.BILINEAR)) for im in photos]
    sigmas = [0.1, 0.5, 1.0, 1.37, 1.5, 2.0] + [float(s) for s in np.random.default_rng(1).uniform(*BLUR_SIGMA, 6)]
    cases = [(im, s) for im in images for s in sigmas] + [(images[0], 0.0)]

    @pipeline_def(batch_size=len(cases), num_threads=1, device_id=None, enable_conditionals=True)
    def graph():
        img = fn.external_source(source=[[c[0] for c in cases]], batch=True, layout="HWC")
        taps = fn.external_source(source=[[pil_blur_taps(c[1]) for c in cases]], batch=True)
        return pil_gaussian_blur(img, taps)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    for j, (im, sigma) in enumerate(cases):
        ref = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius=sigma))) if sigma else im
        diff = np.abs(np.array(out[j]).astype(int) - ref)
        assert diff.max() == 0, f"sigma {sigma}: {int((diff > 0).sum())} pixels differ, max {diff.max()}"
    assert not np.array_equal(np.array(out[sigmas.index(2.0)]), images[0])  # σ = 2 really blurs


def magnitude_bins(mags) -> np.ndarray:
    """Counts in [0, 9), [9, 9.5), [9.5, 10), {10} (the clip at 10 holds half the mass)."""
    mags = np.asarray(mags)
    return np.array([(mags < 9).sum(), ((mags >= 9) & (mags < 9.5)).sum(), ((mags >= 9.5) & (mags < 10)).sum(),
                     (mags == 10).sum()])


MAG_PROBS = np.array([norm.cdf(-2), norm.cdf(-1) - norm.cdf(-2), 0.5 - norm.cdf(-1), 0.5])


def test_dali_randaugment_draws_have_timms_frequencies():
    draw = ra.RandAugmentDraw(224, n=2, m=10, mstd=0.5)
    stages = [c for k in range(5000) for c in draw.choices(keyed_rng(3, k))]
    ops, applied, mags, neg, bic = (np.array(v) for v in zip(*stages))
    n = len(stages)
    assert chisquare(np.bincount(ops, minlength=15)).pvalue > P_VALUE
    for flags in (applied, neg, bic):
        assert chisquare([flags.sum(), n - flags.sum()]).pvalue > P_VALUE
    assert mags.min() >= 0 and mags.max() == 10
    assert chisquare(magnitude_bins(mags), MAG_PROBS * n).pvalue > P_VALUE
    # The same key draws the same stages; another key other stages.
    assert draw.choices(keyed_rng(3, 0)) == draw.choices(keyed_rng(3, 0)) != draw.choices(keyed_rng(3, 1))


def _record_timm_ops(transform, monkeypatch):
    """Replace each timm op's PIL call by a recorder of (name, level args); returns the log."""
    log = []
    for op in transform.ops:
        monkeypatch.setattr(op, "aug_fn", lambda img, *args, _name=op.name, **kw: log.append((_name, args)) or img)
    return log


def test_torch_randaugment_is_timms_and_keyed(photos):
    from timm.data.auto_augment import _RAND_TRANSFORMS, RandAugment

    view0, _ = train_view_transforms("imagenet", 64, MEAN, (0.2, 0.2, 0.2))
    (keyed,) = [t for t in view0.transforms if isinstance(t, ra.KeyedGlobalRandom)]
    timm_ra = keyed.transform
    assert isinstance(timm_ra, RandAugment) and timm_ra.num_layers == 2 and timm_ra.choice_weights is None
    assert tuple(op.name for op in timm_ra.ops) == ra.RANDAUG_OPS == tuple(_RAND_TRANSFORMS)
    for op in timm_ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 10, 0.5)
        assert op.kwargs["fillcolor"] == FILL and op.hparams["translate_const"] == int(64 * 0.45)
        assert tuple(op.kwargs["resample"]) == (Image.BILINEAR, Image.BICUBIC)
    # Deterministic per torch seed, and the caller's random / numpy states are left alone.
    img = photos[3].resize((64, 64))
    random.seed(5)
    np.random.seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy())
    outs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        outs.append(np.asarray(keyed(img)))
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_torch_randaugment_draws_have_timms_frequencies(monkeypatch):
    keyed = ra.torch_randaugment(64, MEAN)
    log = _record_timm_ops(keyed.transform, monkeypatch)
    img = Image.new("RGB", (8, 8))
    per_image = []
    for k in range(4000):
        torch.manual_seed(keyed_seed(9, k))
        start = len(log)
        keyed(img)
        per_image.append(len(log) - start)
    n = len(per_image)
    # Each of the 2 layers runs with p = 0.5: applied ops per image ~ Binomial(2, 0.5).
    assert chisquare(np.bincount(per_image, minlength=3), np.array([0.25, 0.5, 0.25]) * n).pvalue > P_VALUE
    names = Counter(name for name, _ in log)
    assert chisquare([names[op] for op in ra.RANDAUG_OPS]).pvalue > P_VALUE
    scale = {"Rotate": 3.0, "ShearX": 0.03, "ShearY": 0.03, "TranslateXRel": 0.045, "TranslateYRel": 0.045}
    mags = [abs(args[0]) / scale[name] for name, args in log if name in scale]
    mags += [(args[0] - 0.1) / 0.18 for name, args in log if name in ("Color", "Contrast", "Brightness", "Sharpness")]
    mags = np.minimum(np.round(mags, 9), 10.0)
    assert chisquare(magnitude_bins(mags), MAG_PROBS * len(mags)).pvalue > P_VALUE
    negative = sum(args[0] < 0 for name, args in log if name in scale)
    assert chisquare([negative, sum(name in scale for name, _ in log) - negative]).pvalue > P_VALUE


# The reference's CIFAR10Policy as its SubPolicy(p1, op1, m1, p2, op2, m2) calls read (utils.py).
REFERENCE_POLICY = """
0.1 invert 7 0.2 contrast 6 | 0.7 rotate 2 0.3 translateX 9 | 0.8 sharpness 1 0.9 sharpness 3
0.5 shearY 8 0.7 translateY 9 | 0.5 autocontrast 8 0.9 equalize 2 | 0.2 shearY 7 0.3 posterize 7
0.4 color 3 0.6 brightness 7 | 0.3 sharpness 9 0.7 brightness 9 | 0.6 equalize 5 0.5 equalize 1
0.6 contrast 7 0.6 sharpness 5 | 0.7 color 7 0.5 translateX 8 | 0.3 equalize 7 0.4 autocontrast 8
0.4 translateY 3 0.2 sharpness 6 | 0.9 brightness 6 0.2 color 8 | 0.5 solarize 2 0.0 invert 3
0.2 equalize 0 0.6 autocontrast 0 | 0.2 equalize 8 0.6 equalize 4 | 0.9 color 9 0.6 equalize 6
0.8 autocontrast 4 0.2 solarize 8 | 0.1 brightness 3 0.7 color 0 | 0.4 solarize 5 0.9 autocontrast 3
0.9 translateY 9 0.7 translateY 9 | 0.9 autocontrast 2 0.8 solarize 3 | 0.8 equalize 8 0.1 invert 3
0.7 translateY 9 0.9 autocontrast 1"""


def test_cifar_policy_table_and_magnitudes_are_the_references():
    rows = [r.split() for r in REFERENCE_POLICY.replace("\n", " | ").split("|") if r.strip()]
    expect = tuple(((a, float(p), int(m)), (b, float(q), int(n))) for p, a, m, q, b, n in rows)
    assert cp.CIFAR10_POLICY == expect
    assert [cp.magnitude("posterize", i) for i in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert cp.magnitude("rotate", 9) == 30.0 and cp.magnitude("translateX", 9) == pytest.approx(150 / 331)
    assert cp.magnitude("solarize", 0) == 256.0 and cp.magnitude("color", 9) == pytest.approx(0.9)
    assert "rotate" not in cp.SIGNED_OPS  # the reference never negates its rotation


def _policy_expectations():
    """Expected applications per image of each op name, and P(0, 1, 2 ops applied)."""
    per_op, counts = Counter(), np.zeros(3)
    for (op1, p1, _), (op2, p2, _) in cp.CIFAR10_POLICY:
        per_op[op1] += p1 / 25
        per_op[op2] += p2 / 25
        counts += np.array([(1 - p1) * (1 - p2), p1 * (1 - p2) + p2 * (1 - p1), p1 * p2]) / 25
    return per_op, counts


def test_dali_cifar_policy_draws_have_the_references_frequencies():
    draw = cp.CIFAR10PolicyDraw(32)
    rows, runs, negs = [], [], []
    for k in range(10000):
        row, flags = draw.choices(keyed_rng(4, k))
        rows.append(row)
        runs.append([f[0] for f in flags])
        negs.extend(f[1] for f in flags)
    rows, runs = np.array(rows), np.array(runs)
    assert chisquare(np.bincount(rows, minlength=25)).pvalue > P_VALUE
    # Apply coins per (sub-policy, stage) against the policy's probabilities, pooled.
    stat, dof = 0.0, 0
    for r, sub in enumerate(cp.CIFAR10_POLICY):
        n = (rows == r).sum()
        for s, (_, p, _) in enumerate(sub):
            hits = runs[rows == r, s].sum()
            if p == 0.0:
                assert hits == 0
                continue
            stat += (hits - n * p) ** 2 / (n * p * (1 - p)) if p < 1 else 0.0
            dof += 1
    assert chi2.sf(stat, dof) > P_VALUE
    assert chisquare([sum(negs), len(negs) - sum(negs)]).pvalue > P_VALUE


def test_torch_cifar_policy_draws_have_the_references_frequencies(monkeypatch):
    log = []
    monkeypatch.setattr(cp, "pil_op", lambda img, op, idx, negate: log.append((op, idx, negate)) or img)
    policy, img = cp.TorchCIFAR10Policy(), Image.new("RGB", (32, 32))

    def applied(seed):
        torch.manual_seed(seed)
        start = len(log)
        policy(img)
        return log[start:]

    n = 6000
    per_image = [len(applied(keyed_seed(8, k))) for k in range(n)]
    per_op, counts = _policy_expectations()
    assert chisquare(np.bincount(per_image, minlength=3), counts * n).pvalue > P_VALUE
    names = Counter(op for op, _, _ in log)
    total = sum(per_op.values())
    assert chisquare([names[o] for o in sorted(per_op)], [per_op[o] / total * len(log) for o in sorted(per_op)]
                     ).pvalue > P_VALUE
    signed = [neg for op, _, neg in log if op in cp.SIGNED_OPS]
    assert chisquare([sum(signed), len(signed) - sum(signed)]).pvalue > P_VALUE
    # A pure function of torch's generator state.
    assert applied(3) == applied(3) and len({tuple(applied(s)) for s in range(30)}) > 5


def test_randaugment_settings_are_checked_and_reach_both_backends(tmp_path):
    with pytest.raises(ValueError, match="randaugment_m must be an integer magnitude on timm's 0-10 scale"):
        TrainPipelineSpec(dataset=None, randaugment_m=30)
    with pytest.raises(ValueError, match="randaugment_n"):
        TrainPipelineSpec(dataset=None, randaugment_n=-1)
    with pytest.raises(ValueError, match="randaugment_mstd"):
        TrainPipelineSpec(dataset=None, randaugment_mstd=-0.5)
    # The torch backend's tables (the keyed draw both backends consume) carry the settings.
    from fastlt.pipelines.torch_loader import _StepDataset

    syn = make_synthetic_lt(tmp_path / "ra", num_classes=2, imb_factor=1.0, n_max=2, image_size=40, seed=1, n_val=1)
    spec = TrainPipelineSpec(dataset=LongTailedList(syn.root, syn.train_list), image_size=32, batch_size=2,
                             randaugment_n=3, randaugment_m=7, randaugment_mstd=0.0)
    tables = _StepDataset(spec, build_train_pipeline(spec, "torch").plan, 0).tables
    assert tables.stages == 3
    assert {(mag, applied) for k in range(50) for _, applied, mag, _, _ in tables.choices(keyed_rng(k))} == \
        {(7.0, True), (7.0, False)}
    if dali_available()[0]:
        from fastlt.pipelines.dali_ops import augment_tables

        tables, graph = augment_tables("imagenet", 32, True, n=3, m=7, mstd=0.0, mean=MEAN)
        assert graph.stages == 3 and graph.fill == FILL
        # m = 7 with no noise: every applied Rotate turns by exactly 21 degrees.
        angles = {round(abs(np.degrees(np.arctan2(params[1], params[0]))), 6)
                  for k in range(300) for kind, params in zip(*tables.draw(keyed_rng(k))[::2])
                  if kind == st.KIND_AFFINE and params[1] != 0 and params[3] != 0}
        assert angles == {21.0}


def _cifar_arrays():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), [12, 8, 6, 6]).astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    return ArrayDataset(images=images, labels=labels, class_counts=np.bincount(labels), num_classes=4)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b)
                                    for f in ("image", "view1", "view2", "label_a", "label_b", "lam", "mixed"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_cifar_recipe_is_deterministic_and_resumes_exactly(backend):
    ds = _cifar_arrays()
    spec = dict(dataset=ds, recipe="cifar", image_size=32, batch_size=8, seed=5, cutmix_prob=0.5,
                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    a = build_train_pipeline(TrainPipelineSpec(num_workers=1, **spec), backend)
    b = build_train_pipeline(TrainPipelineSpec(num_workers=2, extra={"py_num_workers": 2} if backend == "dali"
                                               else {}, **spec), backend)
    try:
        full = list(a.epoch(1))
        assert _same(full, list(b.epoch(1)))
        assert _same(full[2:], list(b.epoch(1, start_step=2)))
        assert not torch.equal(full[0].view1, full[0].view2)
    finally:
        a.close()
        b.close()
