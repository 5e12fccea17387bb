"""``fastlt demo``: ConCutMix on the cached synthetic long-tailed set of the ``demo`` recipe
(``configs/demo.yaml``, shipped with the package: ``fastlt.config.recipes``), ending with one summary
of overall / many / medium / few-shot accuracy against chance. The README's "What you should see"
gives the figures to expect and their spread over seeds.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fastlt.reports.logger import format_metrics

__all__ = ["DEMO_CONFIG", "demo_method", "demo_summary", "run_demo"]

#: The demo's recipe, by name (``fastlt.config.recipes.resolve_config``): found in an installed package too.
DEMO_CONFIG = "demo"


def demo_method(cfg) -> str:
    """What a demo run trains, for its banner: ConCutMix when some epoch trains on the rectified
    label (epoch > method.l_d_warm), CutMix only when ``l_d_warm`` keeps the area label to the end
    (the baseline arm, ``--set method.l_d_warm=<epochs>``)."""
    warm, last = cfg.method.l_d_warm, cfg.optim.epochs - 1
    if warm < last:
        return "ConCutMix"
    return f"CutMix only (area labels throughout: method.l_d_warm={warm} >= the last epoch, {last})"


def demo_summary(result: dict, metrics: dict, wall: float, method: str = "ConCutMix") -> str:
    """The closing block of the demo: what it trained (:func:`demo_method`), the four accuracies,
    chance level and where the run is."""
    counts = metrics["train_class_counts"]
    groups = {"many": sum(c > 100 for c in counts), "medium": sum(20 <= c <= 100 for c in counts),
              "few": sum(c < 20 for c in counts)}
    chance = 100.0 / len(counts)
    few = (f"  few-shot vs chance {'ABOVE' if result['few'] > chance else 'NOT above'} "
           f"({result['few']:.2f} vs {chance:.2f})" if not math.isnan(result["few"]) else "  few-shot: no few-shot class")
    return "\n".join([
        "",
        "=" * 72,
        f"fastlt demo: {method} on the synthetic long-tailed set ({len(counts)} classes: "
        f"{groups['many']} many-shot, {groups['medium']} medium-shot, {groups['few']} few-shot)",
        f"  accuracy (%)      {format_metrics(result)}",
        f"  chance level      {chance:.2f}",
        few,
        f"  training time     {result['train_time_s']:.1f} s   (wall time {wall:.1f} s, data generation included)",
        f"  run directory     {result['run_dir']}",
        "=" * 72,
    ])


def run_demo(cfg, *, name_given: bool) -> str:
    """Train ``cfg`` (in a fresh timestamped run directory unless run.name was given); the summary."""
    from fastlt.training.run import train

    if not name_given:
        cfg.run.name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    return demo_summary(result, metrics, wall, demo_method(cfg))
