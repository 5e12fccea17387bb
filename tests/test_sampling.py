"""fastlt.sampling (ARCHITECTURE §1 "Samplers") on the real Places-LT training labels:
class frequencies by chi-square tests, exact uniform coverage across ranks, determinism."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fastlt.sampling import SAMPLER_KINDS, make_sampler

P_MIN = 1e-3  # fixed seeds: these p-values are deterministic, not flaky


@pytest.fixture(scope="module")
def places_labels(places_train):
    return places_train.labels


def spec_class_probs(kind, counts):
    """Class probabilities of ARCHITECTURE §1: uniform, ∝ 1/N_j, ∝ √N_j."""
    counts = np.asarray(counts, dtype=float)
    w = {"balanced": np.ones_like(counts), "reverse": 1.0 / counts, "sqrt": np.sqrt(counts)}[kind]
    return w / w.sum()


def draws(sampler, n_epochs, world_size=1):
    return np.concatenate([sampler.epoch_indices(e, r, world_size)
                           for e in range(n_epochs) for r in range(world_size)])


@pytest.mark.parametrize("kind, n_epochs, world_size", [("balanced", 4, 1), ("sqrt", 4, 4), ("reverse", 16, 2)])
def test_class_frequencies_chi_square(places_labels, places_train, kind, n_epochs, world_size):
    # ≥ 250k draws, pooled over epochs and ranks (1M for reverse, so that every expected
    # count is ≥ 5: the largest Places-LT class has frequency (1/4980)/Σ_j(1/N_j)).
    s = make_sampler(kind, places_labels, seed=0)
    idx = draws(s, n_epochs, world_size)
    assert idx.size >= 250_000 and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < places_labels.size
    observed = np.bincount(places_labels[idx], minlength=365)
    expected = spec_class_probs(kind, places_train.class_counts) * idx.size
    assert expected.min() >= 5
    p = stats.chisquare(observed, expected).pvalue
    assert p > P_MIN, f"{kind}: chi-square p = {p:.2e}"
    # And the tails really differ from instance sampling: the head class is not favoured.
    head, tail = np.argmax(places_train.class_counts), np.argmin(places_train.class_counts)
    if kind in ("balanced", "reverse"):
        assert observed[tail] >= 0.5 * observed[head]


def test_within_class_draws_are_uniform():
    labels = np.repeat(np.arange(3), [1000, 50, 5])
    labels = np.random.default_rng(1).permutation(labels)
    s = make_sampler("balanced", labels, seed=7)
    idx = np.concatenate([s.epoch_indices(e) for e in range(300)])  # 316,500 draws
    big = idx[labels[idx] == 0]
    members = np.flatnonzero(labels == 0)
    observed = np.bincount(np.searchsorted(members, big), minlength=members.size)
    assert np.array_equal(members[np.searchsorted(members, big)], big)
    assert stats.chisquare(observed).pvalue > P_MIN
    assert set(idx[labels[idx] == 2].tolist()) == set(np.flatnonzero(labels == 2).tolist())


def test_empty_class_never_drawn():
    labels = np.array([0, 0, 0, 2, 2, 4])  # classes 1 and 3 have no image
    for kind in ("balanced", "reverse", "sqrt"):
        s = make_sampler(kind, labels, seed=0)
        idx = np.concatenate([s.epoch_indices(e) for e in range(2000)])
        got = np.bincount(labels[idx], minlength=5)
        assert got[1] == 0 and got[3] == 0 and got[0] > 0 and got[2] > 0 and got[4] > 0


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_uniform_exact_coverage(places_labels, world_size):
    n = places_labels.size
    s = make_sampler("uniform", places_labels, seed=3)
    per_rank = -(-n // world_size)
    shards = [s.epoch_indices(5, r, world_size) for r in range(world_size)]
    assert all(x.shape == (per_rank,) and x.dtype == np.int64 for x in shards)
    assert s.num_samples(world_size) == per_rank
    # Reassemble the global order: rank r holds positions r, r+W, r+2W, ...
    order = np.empty(per_rank * world_size, dtype=np.int64)
    for r, x in enumerate(shards):
        order[r::world_size] = x
    pad = order.size - n
    assert 0 <= pad <= world_size - 1
    assert np.array_equal(np.sort(order[:n]), np.arange(n))  # exactly once, unpadded positions
    assert np.array_equal(order[n:], order[:pad])  # padding wraps around
    # The permutation is shared: it does not depend on the world size.
    assert np.array_equal(order[:n], s.epoch_indices(5, 0, 1))
    # Ranks overlap only through the padding duplicates.
    seen = np.bincount(np.concatenate(shards), minlength=n)
    assert seen.min() == 1 and (seen > 1).sum() == pad and seen.max() <= 2
    if world_size == 8:
        assert pad == 4  # 62,500 = 8 · 7,812 + 4


def test_uniform_epochs_and_seeds_shuffle_differently(places_labels):
    a = make_sampler("uniform", places_labels, seed=0)
    b = make_sampler("uniform", places_labels, seed=1)
    e0, e1 = a.epoch_indices(0), a.epoch_indices(1)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, b.epoch_indices(0))
    assert not np.array_equal(e0, np.arange(places_labels.size))
    assert np.array_equal(e0, make_sampler("uniform", places_labels, seed=0).epoch_indices(0))


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_determinism_lengths_and_rank_difference(places_labels, kind):
    s = make_sampler(kind, places_labels, seed=11)
    again = make_sampler(kind, places_labels.copy(), seed=11)
    for w in (1, 3, 8):
        assert s.num_samples(w) == -(-places_labels.size // w)
        for r in range(w):
            x = s.epoch_indices(2, r, w)
            assert x.shape == (s.num_samples(w),)
            assert np.array_equal(x, again.epoch_indices(2, r, w))
    r0, r1 = s.epoch_indices(4, 0, 2), s.epoch_indices(4, 1, 2)
    assert not np.array_equal(r0, r1)
    assert not np.array_equal(s.epoch_indices(4, 0, 2), s.epoch_indices(5, 0, 2))
    assert not np.array_equal(r0, make_sampler(kind, places_labels, seed=12).epoch_indices(4, 0, 2))


def test_all_kinds_pair_up_one_to_one(places_labels):
    lengths = {k: make_sampler(k, places_labels, 0).epoch_indices(0, 1, 4).size for k in SAMPLER_KINDS}
    assert len(set(lengths.values())) == 1, lengths


def test_inaturalist_sized_epoch():
    # 437,513 images over 8,142 classes (iNaturalist 2018 train), long-tailed, synthesized.
    rng = np.random.default_rng(0)
    c = 8142
    profile = np.exp(-np.arange(c) / 1200.0)
    counts = 2 + np.floor(profile * (437_513 - 2 * c) / profile.sum()).astype(np.int64)
    counts[0] += 437_513 - counts.sum()  # the floors' remainder
    labels = rng.permutation(np.repeat(np.arange(c), counts))
    assert labels.size == 437_513
    for kind in SAMPLER_KINDS:
        x = make_sampler(kind, labels, seed=0).epoch_indices(0, 3, 4)
        assert x.size == 109_379 and x.min() >= 0 and x.max() < labels.size
    bal = make_sampler("balanced", labels, seed=0).epoch_indices(0)
    # Balanced: the head class gets about 1/8142 of the draws, not its share of the images.
    assert counts[0] / labels.size > 20.0 / c and np.mean(labels[bal] == 0) < 5.0 / c


@pytest.mark.parametrize(
    "labels, match",
    [([], "empty"), ([0, 1, -2], "labels must be >= 0, got -2"), ([0.0, 1.0], "integers"),
     ([[0, 1], [1, 0]], "1-D")],
)
def test_bad_labels(labels, match):
    for kind in SAMPLER_KINDS:
        with pytest.raises(ValueError, match=match):
            make_sampler(kind, np.array(labels), seed=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid kinds: uniform, balanced, reverse, sqrt") as e:
        make_sampler("square-root", [0, 1], seed=0)
    assert "'square-root'" in str(e.value)
    with pytest.raises(ValueError, match="seed"):
        make_sampler("uniform", [0, 1], seed=-1)
    for kind in SAMPLER_KINDS:
        s = make_sampler(kind, [0, 1, 1, 2], seed=0)
        with pytest.raises(ValueError, match="world_size"):
            s.epoch_indices(0, 0, 0)
        with pytest.raises(ValueError, match="world_size"):
            s.num_samples(0)
        with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\), got 2"):
            s.epoch_indices(0, 2, 2)
        with pytest.raises(ValueError, match="rank"):
            s.epoch_indices(0, -1, 2)
        with pytest.raises(ValueError, match="epoch"):
            s.epoch_indices(-1)
