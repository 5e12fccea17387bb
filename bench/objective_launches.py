"""Kernel launches of one step of the objective — label, LA-CE, BalSCL, backward — with and
without the label diagnostics (``fastlt.method.label_stats.step_stats``), counted by
``fastlt.kernels.testing.count_launches`` (on CPU: the outermost working aten operators plus
fastlt's Triton launches, the proxy for GPU kernel launches; on CUDA: the kernels themselves).

The trainer computes the diagnostics only on the step that ends a log interval
(``train_step(stats=...)``); the other steps cost the "without" count.

    python bench/objective_launches.py                                    # torch path, CPU
    TRITON_INTERPRET=1 FASTLT_KERNELS=triton python bench/objective_launches.py   # Triton path

Prints one JSON line per configuration.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

B, C, D = 32, 1000, 128


def main() -> None:
    from fastlt.kernels.testing import count_launches
    from fastlt.method.config import MethodConfig
    from fastlt.method.objective import ConCutMixObjective
    from fastlt.models.bcl import BCLOutput
    from fastlt.pipelines import TrainBatch

    g = torch.Generator().manual_seed(0)
    counts = torch.randint(5, 500, (C,), generator=g)
    objective = ConCutMixObjective(MethodConfig(), counts.numpy())
    mixed = torch.rand(B, generator=g) < 0.5
    label_a = torch.randint(0, C, (B,), generator=g)
    batch = TrainBatch(images=torch.zeros(3 * B, 3, 2, 2), label_a=label_a,
                       label_b=torch.where(mixed, torch.randint(0, C, (B,), generator=g), label_a),
                       lam=torch.where(mixed, torch.rand(B, generator=g), torch.ones(B)), mixed=mixed)
    z_raw, centers_raw = torch.randn(3 * B, D, generator=g), torch.randn(C, D, generator=g)
    # Leaves: the count is of the objective and its backward, not of the model's normalisation.
    out = BCLOutput(*(t.requires_grad_() for t in (torch.randn(3 * B, C, generator=g), F.normalize(z_raw, dim=1),
                                                    z_raw, F.normalize(centers_raw, dim=1), centers_raw)))

    def step(stats: bool):
        loss, ce, scl, diagnostics = objective(out, batch, rectify=True, stats=stats)
        loss.backward()
        return diagnostics

    backend = os.environ.get("FASTLT_KERNELS", "auto")
    for stats in (True, False):
        step(stats)  # warm: dispatch decision, caches
        got = count_launches(lambda: step(stats), "cpu")
        print(json.dumps({"backend": backend, "shape": f"B{B}-C{C}-D{D}", "diagnostics": stats, **got}), flush=True)


if __name__ == "__main__":
    main()
