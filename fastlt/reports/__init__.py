"""What fastlt tells people about a run, a dataset or a label.

* :mod:`~fastlt.reports.logger` — rank-0 logs: the fixed-field text line, ``log.jsonl`` and
  TensorBoard;
* :mod:`~fastlt.reports.metrics` — top-1 and many / medium / few-shot accuracy;
* :mod:`~fastlt.reports.plots` — **the PNG plots** (loss and accuracy curves, per-class accuracy,
  shot groups, class histogram) and ``per_class.csv``;
* :mod:`~fastlt.reports.run_report` — a run's opening lines, final line and ``metrics.json``;
* :mod:`~fastlt.reports.dataset_report` — ``fastlt data``;
* :mod:`~fastlt.reports.label_inspect` — ``fastlt inspect``;
* :mod:`~fastlt.reports.profiling` — ``fastlt profile``.
"""
from fastlt._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "RunLogger": "logger", "shot_accuracy": "metrics",
    "plot_per_class": "plots", "plot_shot_groups": "plots", "plot_training_curves": "plots",
    "plot_class_histogram": "plots", "write_per_class_csv": "plots",
    "inspect_labels": "label_inspect", "profile_run": "profiling",
})
