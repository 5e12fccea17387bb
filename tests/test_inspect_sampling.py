"""``fastlt inspect`` spreads its samples over the steps of the epoch
(``fastlt.reports.label_inspect.spread_across_steps``): with one CutMix box per batch, samples of
one step share a box, so a grid drawn from step 0 alone showed one box sixteen times."""
from __future__ import annotations

from fastlt.reports.label_inspect import spread_across_steps


def _rows(step: int, n: int) -> list[dict]:
    return [{"step": step, "index_in_batch": k} for k in range(n)]


def _picked(per_step, samples):
    return [(r["step"], r["index_in_batch"]) for r in spread_across_steps(per_step, samples)]


def test_one_sample_per_step_while_there_are_steps_enough():
    per_step = [_rows(s, 8) for s in (0, 2, 3, 7)]  # steps 1, 4-6: no mixed sample
    assert _picked(per_step, 3) == [(0, 0), (2, 0), (3, 0)]
    assert _picked(per_step, 4) == [(0, 0), (2, 0), (3, 0), (7, 0)]


def test_more_samples_than_steps_take_the_next_rank_of_every_step_in_turn():
    per_step = [_rows(0, 8), _rows(1, 1), _rows(5, 8)]
    # rank 0 of the three steps, then rank 1 of those that have one (step 1 has a single row)
    assert _picked(per_step, 5) == [(0, 0), (0, 1), (1, 0), (5, 0), (5, 1)]
    assert _picked(per_step, 6) == [(0, 0), (0, 1), (0, 2), (1, 0), (5, 0), (5, 1)]
    assert len(spread_across_steps(per_step, 100)) == 17  # everything there is, and no more
    assert spread_across_steps([], 4) == []
