"""The sample sequence is a function of the global step and the global sample position, never
of the rank or the number of ranks (docs/design.md §3 "Distributed = one big GPU"): with the same
seed and global batch, the union over ranks of a step's batches — indices, CutMix coins and
boxes, λ, and every augmentation parameter (checked through the pixels they produce) — is the
same for 1, 2 and 4 ranks, on both pipeline backends.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastlt.data import LongTailedList, make_synthetic_lt
from fastlt.pipelines import TrainPipelineSpec, build_train_pipeline, dali_available

GLOBAL_BATCH = 8
STEPS = 3
FIELDS = ("image", "view1", "view2", "foreground", "label_a", "label_b", "lam", "mixed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    made = make_synthetic_lt(tmp_path_factory.mktemp("ws") / "lt", num_classes=5, imb_factor=0.2, n_max=20,
                             image_size=40, seed=1, n_val=2)
    return LongTailedList(made.root, made.train_list)


def _global_steps(dataset, backend: str, world_size: int, *, per_sample: bool, epoch: int = 1):
    """The first STEPS global batches as the union (in rank order) of every rank's batches, and
    the global background/foreground index sequences."""
    per_rank = []
    indices = []
    for rank in range(world_size):
        spec = TrainPipelineSpec(dataset=dataset, image_size=24, batch_size=GLOBAL_BATCH // world_size, seed=5,
                                 rank=rank, world_size=world_size, cutmix_prob=0.5, cutmix_per_sample=per_sample,
                                 randaugment=True, num_workers=0 if backend == "torch" else 1,
                                 extra={"with_foreground": True})
        p = build_train_pipeline(spec, backend)
        try:
            it = p.epoch(epoch)
            per_rank.append([next(it) for _ in range(STEPS)])
            it.close()
            bg, fg = p.indices(epoch)
            b = spec.batch_size
            indices.append((bg.reshape(-1, b)[:STEPS], fg.reshape(-1, b)[:STEPS]))
        finally:
            p.close()
    steps = [{f: torch.cat([per_rank[r][s].__getattribute__(f) for r in range(world_size)]) for f in FIELDS}
             for s in range(STEPS)]
    bg = np.concatenate([i[0] for i in indices], axis=1)
    fg = np.concatenate([i[1] for i in indices], axis=1)
    return steps, bg, fg


@pytest.mark.parametrize("per_sample", [False, True], ids=["cutmix-per-batch", "cutmix-per-sample"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available()[0], reason="nvidia.dali does not import"))])
def test_global_batches_do_not_depend_on_the_number_of_ranks(dataset, backend, per_sample):
    one, bg1, fg1 = _global_steps(dataset, backend, 1, per_sample=per_sample)
    mixed_seen = any(bool(s["mixed"].any()) for s in one)
    assert mixed_seen, "no step was mixed: the test would not see CutMix"
    for world_size in (2, 4):
        many, bg, fg = _global_steps(dataset, backend, world_size, per_sample=per_sample)
        np.testing.assert_array_equal(bg, bg1)
        np.testing.assert_array_equal(fg, fg1)
        for s in range(STEPS):
            for f in FIELDS:
                assert torch.equal(many[s][f], one[s][f]), f"{backend} W={world_size} step {s}: {f} differs"
    if not per_sample:  # one coin and one box per global step, on every rank
        for s in one:
            assert s["mixed"].all() or not s["mixed"].any()
            assert torch.unique(s["lam"]).numel() == 1
