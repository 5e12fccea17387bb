"""fastlt.method.sampling (docs/design.md §1 "Samplers", §3 "Distributed") on the real Places-LT training
labels: class frequencies by chi-square tests, exact uniform coverage, determinism, and the
step-major sharding that makes a global step the same samples for any number of ranks."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fastlt.method.sampling import SAMPLER_KINDS, global_position, make_sampler, shard_step_major, steps_per_epoch

P_MIN = 1e-3  # fixed seeds: these p-values are deterministic, not flaky


@pytest.fixture(scope="module")
def places_labels(places_train):
    return places_train.labels


def spec_class_probs(kind, counts):
    """Class probabilities of docs/design.md §1: uniform, ∝ 1/N_j, ∝ √N_j."""
    counts = np.asarray(counts, dtype=float)
    w = {"balanced": np.ones_like(counts), "reverse": 1.0 / counts, "sqrt": np.sqrt(counts)}[kind]
    return w / w.sum()


def draws(sampler, n_epochs):
    return np.concatenate([sampler.epoch_indices(e) for e in range(n_epochs)])


@pytest.mark.parametrize("kind, n_epochs", [("balanced", 4), ("sqrt", 4), ("reverse", 16)])
def test_class_frequencies_chi_square(places_labels, places_train, kind, n_epochs):
    # ≥ 250k draws, pooled over epochs (1M for reverse, so that every expected count is ≥ 5:
    # the largest Places-LT class has frequency (1/4980)/Σ_j(1/N_j)).
    s = make_sampler(kind, places_labels, seed=0)
    idx = draws(s, n_epochs)
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


def test_uniform_exact_coverage(places_labels):
    s = make_sampler("uniform", places_labels, seed=3)
    x = s.epoch_indices(5)
    assert x.shape == (places_labels.size,) and x.dtype == np.int64
    assert np.array_equal(np.sort(x), np.arange(places_labels.size))  # every image exactly once


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_step_major_shards_reassemble_the_one_process_sequence(places_labels, kind, world_size):
    """Rank r of W takes samples r·B … r·B + B − 1 of every global step of G = B·W: the union
    over ranks of a global step is the single process's step of batch G, in order."""
    g = 64
    b = g // world_size
    seq = make_sampler(kind, places_labels, seed=3).epoch_indices(2)
    steps = steps_per_epoch(seq.size, b, world_size)
    assert steps == seq.size // g == steps_per_epoch(seq.size, g, 1)
    one = shard_step_major(seq, g).reshape(steps, g)
    shards = [shard_step_major(seq, b, r, world_size).reshape(steps, b) for r in range(world_size)]
    assert np.array_equal(np.concatenate(shards, axis=1), one)
    for r in range(world_size):  # global positions of a rank's samples index the sequence
        step, i = 7, b - 1
        assert shards[r][step, i] == seq[global_position(step, i, b, r, world_size)]
    if kind == "uniform":  # no overlap between ranks: one permutation, disjoint slices
        assert np.unique(np.concatenate(shards).ravel()).size == steps * g


def test_uniform_epochs_and_seeds_shuffle_differently(places_labels):
    a = make_sampler("uniform", places_labels, seed=0)
    b = make_sampler("uniform", places_labels, seed=1)
    e0, e1 = a.epoch_indices(0), a.epoch_indices(1)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, b.epoch_indices(0))
    assert not np.array_equal(e0, np.arange(places_labels.size))
    assert np.array_equal(e0, make_sampler("uniform", places_labels, seed=0).epoch_indices(0))


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_determinism_lengths_and_independence(places_labels, kind):
    s = make_sampler(kind, places_labels, seed=11)
    again = make_sampler(kind, places_labels.copy(), seed=11)
    x = s.epoch_indices(2)
    assert x.shape == (len(s),) == (places_labels.size,)
    assert np.array_equal(x, again.epoch_indices(2))
    assert not np.array_equal(x, s.epoch_indices(3))
    assert not np.array_equal(x, make_sampler(kind, places_labels, seed=12).epoch_indices(2))


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
        x = shard_step_major(make_sampler(kind, labels, seed=0).epoch_indices(0), 32, 3, 8)
        assert x.size == 437_513 // 256 * 32 and x.min() >= 0 and x.max() < labels.size
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
        with pytest.raises(ValueError, match="epoch"):
            s.epoch_indices(-1)
    seq = np.arange(16)
    with pytest.raises(ValueError, match="world_size"):
        shard_step_major(seq, 2, 0, 0)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\), got 2"):
        shard_step_major(seq, 2, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(16, 0)
