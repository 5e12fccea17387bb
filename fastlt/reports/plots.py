"""PNG plots of a run, an evaluation and a dataset (matplotlib's Agg canvas: no display, no
pyplot state), and the per-class CSV.

* :func:`plot_per_class` — per-class accuracy against training-image count (log x), the
  many / medium / few-shot bands of docs/design.md §1 "Evaluation" shaded, group means drawn;
* :func:`plot_shot_groups` — overall / many / medium / few accuracy as bars;
* :func:`plot_training_curves` — from a run's ``log.jsonl``: losses, learning rate, training
  and evaluation accuracy, the label diagnostics of ``fastlt.method.label_stats``, throughput;
* :func:`plot_class_histogram` — a dataset's images per class, largest first, log y, bands
  shaded (``fastlt data``);
* :func:`write_run_report` (end of a run) and :func:`write_eval_report` (``fastlt eval``)
  write the set, with ``per_class.csv``.

Every figure is saved at a fixed size in pixels (:data:`SIZES`), so its file is that size.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from fastlt.reports.metrics import DEFAULT_SHOTS, Shots, shot_group, shots_of

__all__ = ["SIZES", "plot_class_histogram", "plot_per_class", "plot_shot_groups", "plot_training_curves",
           "write_eval_report", "write_per_class_csv", "write_run_report"]

DPI = 100
#: File name -> (width, height) in pixels of every PNG written here.
SIZES = {"per_class_accuracy.png": (1200, 700), "shot_groups.png": (800, 560), "training_curves.png": (1500, 900),
         "class_histogram.png": (1200, 650)}
GROUP_COLOURS = {"many": "#4c9a5a", "medium": "#d9a227", "few": "#c8553d"}


def _figure(name: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = SIZES[name]
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=DPI)  # no bbox_inches="tight": the file keeps the size of SIZES
    os.replace(tmp, path)
    return path


def _shade_count_bands(ax, lo: float, hi: float, *, vertical: bool, shots: Shots = DEFAULT_SHOTS) -> None:
    """Shade the few / medium / many ranges of the training-image count on a log axis."""
    edges = {"few": (lo, shots.few - 0.5), "medium": (shots.few - 0.5, shots.many + 0.5), "many": (shots.many + 0.5, hi)}
    for group, (a, b) in edges.items():
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        span = ax.axvspan if vertical else ax.axhspan
        span(a, b, color=GROUP_COLOURS[group], alpha=0.13, lw=0)
        mid = math.sqrt(a * b)
        if vertical:
            ax.text(mid, 1.01, f"{group}-shot", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    color=GROUP_COLOURS[group], fontsize=10, weight="bold")
        else:
            ax.text(1.005, mid, f"{group}", transform=ax.get_yaxis_transform(), ha="left", va="center",
                    color=GROUP_COLOURS[group], fontsize=10, weight="bold")


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2, 5, 10, 20, ... labelled as plain numbers (not 2×10¹)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_per_class(path: str | os.PathLike, per_class, train_counts, *, title: str = "",
                   class_names: list[str] | None = None, shots: Shots = DEFAULT_SHOTS) -> Path:
    """Per-class accuracy (%) against training images per class (log x), bands shaded."""
    acc = np.asarray(per_class, dtype=float)
    counts = np.asarray(train_counts, dtype=float)
    fig = _figure("per_class_accuracy.png")
    ax = fig.add_axes((0.07, 0.19, 0.88, 0.71))  # room below for the legend: inside, it hid points
    lo, hi = max(counts.min() * 0.8, 0.5), counts.max() * 1.25
    _shade_count_bands(ax, lo, hi, vertical=True, shots=shots)
    ok = ~np.isnan(acc)
    colours = [GROUP_COLOURS[shot_group(int(c), shots)] for c in counts[ok]]
    ax.scatter(counts[ok], acc[ok], c=colours, s=28, edgecolors="black", linewidths=0.4, zorder=3)
    for group in ("many", "medium", "few"):
        sel = ok & np.array([shot_group(int(c), shots) == group for c in counts])
        if sel.any():
            a, b = counts[sel].min(), counts[sel].max()
            ax.hlines(acc[sel].mean(), a * 0.9, b * 1.1, colors=GROUP_COLOURS[group], linestyles="--", lw=1.5,
                      zorder=2, label=f"{group}-shot mean {acc[sel].mean():.1f}% ({int(sel.sum())} classes)")
    if class_names is not None and len(counts) <= 30:
        for c, a, name in zip(counts[ok], acc[ok], np.asarray(class_names, dtype=object)[ok]):
            ax.annotate(str(name), (c, a), textcoords="offset points", xytext=(4, 3), fontsize=7, color="#333")
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    _plain_log_ticks(ax.xaxis)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("top-1 accuracy of the class (%)")
    ax.grid(True, which="both", alpha=0.25)
    if ok.any():
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=9, frameon=False)
    missing = int((~ok).sum())
    ax.set_title((title or "Per-class accuracy") + (f"  ({missing} classes not evaluated)" if missing else ""),
                 pad=22)
    return _save(fig, Path(path))


def plot_shot_groups(path: str | os.PathLike, metrics: dict, train_counts, *, title: str = "") -> Path:
    """Bars of overall / many / medium / few-shot accuracy, with the classes in each group."""
    groups = [shot_group(int(c), shots_of(metrics)) for c in train_counts]
    names = ["overall", "many", "medium", "few"]
    shots = shots_of(metrics)
    rule = {"many": f"> {shots.many}", "medium": f"{shots.few}–{shots.many}", "few": f"< {shots.few}"}
    labels = [f"overall\n({len(groups)} classes)"] + [f"{g}-shot ({rule[g]})\n({groups.count(g)} classes)"
                                                       for g in names[1:]]
    vals = [metrics.get(k, math.nan) for k in names]
    fig = _figure("shot_groups.png")
    ax = fig.add_axes((0.1, 0.14, 0.85, 0.74))
    colours = ["#5b7db1"] + [GROUP_COLOURS[g] for g in names[1:]]
    heights = [0.0 if v is None or math.isnan(v) else v for v in vals]
    bars = ax.bar(range(4), heights, color=colours, edgecolor="black", linewidth=0.6)
    for bar, v in zip(bars, vals):
        text = "—" if v is None or math.isnan(v) else f"{v:.2f}"  # an empty group: no class to average
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1.5, text, ha="center", va="bottom",
                fontsize=11)
    ax.set_xticks(range(4), labels)
    ax.set_ylim(0, 110)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or "Accuracy by shot group")
    return _save(fig, Path(path))


def _read_log(log_jsonl: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a log.jsonl, one per global step (a resumed run's later
    record replaces the earlier one of the same step)."""
    train, evals = {}, {}
    for line in log_jsonl.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if rec.get("event") == "train" and "global_step" in rec:
            train[rec["global_step"]] = rec
        elif rec.get("event") == "eval":
            evals[rec.get("global_step", rec.get("epoch"))] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals, key=lambda k: (k is None, k))]


def _series(recs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["global_step"], r[key]) for r in recs if r.get(key) is not None]
    return (np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float))


def plot_training_curves(path: str | os.PathLike, log_jsonl: str | os.PathLike, *, title: str = "") -> Path:
    """Six panels from a run's log.jsonl, against the global step (see the module docstring)."""
    train, evals = _read_log(Path(log_jsonl))
    # An eval record without global_step (older logs) sits at the last step of its epoch.
    last_step = {}
    for r in train:
        last_step[r["epoch"]] = r["global_step"]
    for r in evals:
        r.setdefault("global_step", last_step.get(r.get("epoch")))
    evals = [r for r in evals if r.get("global_step") is not None]
    fig = _figure("training_curves.png")
    axes = fig.subplots(2, 3)
    fig.subplots_adjust(left=0.06, right=0.94, top=0.9, bottom=0.08, wspace=0.3, hspace=0.32)
    fig.suptitle(title or f"Training curves ({Path(log_jsonl).parent.name})")

    ax = axes[0, 0]
    for key, colour in (("loss", "black"), ("ce", "#c8553d"), ("scl", "#5b7db1")):
        ax.plot(*_series(train, key), label=key, color=colour, lw=1.2)
    ax.set_title("losses")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(*_series(train, "lr"), color="#6b4c9a")
    ax.set_title("learning rate")
    ax = axes[0, 2]
    ax.plot(*_series(train, "train_acc"), color="#999999", lw=1, label="train (classification view)")
    for key, colour in (("overall", "black"), ("many", GROUP_COLOURS["many"]), ("medium", GROUP_COLOURS["medium"]),
                        ("few", GROUP_COLOURS["few"])):
        ax.plot(*_series(evals, key), marker="o", ms=4, color=colour, label=f"eval {key}")
    ax.set_title("accuracy (%)")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    rectified = [r for r in train if r.get("gamma") is not None]
    if rectified:
        ax.plot(*_series(rectified, "gamma"), marker=".", color="#c8553d", label="mean γ")
        ax.plot(*_series(rectified, "label_l1"), marker=".", color="#5b7db1", label="mean ‖ŷ − y‖₁")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "area labels throughout\n(no rectified interval)", ha="center", va="center",
                transform=ax.transAxes, color="#666")
    ax.set_title("rectified label: confidence and shift")
    ax = axes[1, 1]
    if rectified:
        xs, ys = _series(rectified, "argmax_changed")
        ax.plot(xs, 100 * ys, marker=".", color="black", label="arg-max label changed")
        xs, ys = _series(rectified, "topk_outside")
        ax.plot(xs, 100 * ys, marker=".", color="#6b4c9a", label="top-K mass outside {a, b}")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no rectified interval", ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_title("rectified label: mixed samples (%)")
    ax = axes[1, 2]
    ax.plot(*_series(train, "img_per_s"), color="#4c9a5a", label="img/s")
    ax.set_ylabel("img/s", fontsize=8, color="#4c9a5a")
    ax.set_title("throughput (img/s) and data wait")
    twin = ax.twinx()
    xs, ys = _series(train, "data_wait")
    twin.plot(xs, 100 * ys, color="#d9a227", lw=1, label="data wait (%)")
    twin.set_ylim(0, 100)
    twin.set_ylabel("data wait (%)", fontsize=8, color="#d9a227")
    steps = [r["global_step"] for r in train]
    for a in axes.flat:
        a.set_xlabel("global step", fontsize=8)
        a.grid(True, alpha=0.25)
        if steps:
            a.set_xlim(0, max(steps) * 1.02)
    return _save(fig, Path(path))


def plot_class_histogram(path: str | os.PathLike, counts, *, title: str = "",
                         class_names: list[str] | None = None, shots: Shots = DEFAULT_SHOTS) -> Path:
    """Images per class, classes sorted largest first, log y, many / medium / few bands shaded."""
    counts = np.asarray(counts, dtype=float)
    order = np.argsort(-counts, kind="stable")
    sorted_counts = counts[order]
    fig = _figure("class_histogram.png")
    ax = fig.add_axes((0.08, 0.11, 0.84, 0.78))
    lo, hi = max(sorted_counts.min() * 0.7, 0.7), sorted_counts.max() * 1.5
    _shade_count_bands(ax, lo, hi, vertical=False, shots=shots)
    colours = [GROUP_COLOURS[shot_group(int(c), shots)] for c in sorted_counts]
    ax.bar(np.arange(counts.size), sorted_counts, width=0.85 if counts.size <= 100 else 1.0, color=colours,
           linewidth=0)
    if counts.size <= 40:  # few enough to name every bar
        names = [class_names[i] if class_names is not None else str(i) for i in order]
        ax.set_xticks(np.arange(counts.size), names, rotation=45 if counts.size > 12 else 0, ha="right"
                      if counts.size > 12 else "center", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    _plain_log_ticks(ax.yaxis)
    ax.set_xlim(-0.5, counts.size - 0.5)
    ax.set_xlabel("classes, sorted by training images (largest first)" + (" — index" if class_names is None and
                                                                            counts.size <= 40 else ""))
    ax.set_ylabel("training images (log scale)")
    ax.grid(True, axis="y", which="both", alpha=0.25)
    ax.set_title(title or "Images per class")
    return _save(fig, Path(path))


def write_per_class_csv(path: str | os.PathLike, metrics: dict, train_counts,
                        class_names: list[str] | None = None) -> Path:
    """index, name, train_images, group, eval_images, accuracy (%, empty when not evaluated)."""
    path = Path(path)
    evaluated = metrics.get("per_class_n") or [""] * len(train_counts)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "train_images", "group", "eval_images", "accuracy"])
        for i, (count, acc) in enumerate(zip(train_counts, metrics["per_class"])):
            name = class_names[i] if class_names is not None else ""
            w.writerow([i, name, int(count), shot_group(int(count), shots_of(metrics)), evaluated[i],
                        "" if acc is None or math.isnan(acc) else f"{acc:.4f}"])
    os.replace(tmp, path)
    return path


def _report(out_dir: Path, metrics: dict, train_counts, class_names, title: str, log_jsonl: Path | None) -> list[Path]:
    paths = [
        plot_per_class(out_dir / "per_class_accuracy.png", metrics["per_class"], train_counts, title=title,
                       class_names=class_names, shots=shots_of(metrics)),
        plot_shot_groups(out_dir / "shot_groups.png", metrics, train_counts, title=title),
    ]
    if log_jsonl is not None and log_jsonl.is_file():
        paths.append(plot_training_curves(out_dir / "training_curves.png", log_jsonl))
    paths.append(write_per_class_csv(out_dir / "per_class.csv", metrics, train_counts, class_names))
    return paths


def write_run_report(run_dir: str | os.PathLike, metrics: dict, train_counts,
                     class_names: list[str] | None = None) -> list[Path]:
    """The end-of-run set in the run directory: per-class and shot-group plots of the last
    evaluation, the training curves, per_class.csv. Returns the paths written."""
    run_dir = Path(run_dir)
    title = f"{run_dir.name}: overall {metrics['overall']:.2f}% on {metrics.get('n', '?')} images"
    return _report(run_dir, metrics, train_counts, class_names, title, run_dir / "log.jsonl")


def write_eval_report(out_dir: str | os.PathLike, metrics: dict,
                      log_jsonl: str | os.PathLike | None = None) -> list[Path]:
    """``fastlt eval``'s set in ``out_dir`` from a :func:`fastlt.training.evaluate.run_eval` result (which
    carries the training class counts and names); the training curves too when ``log_jsonl``
    exists. Returns the paths written."""
    out_dir = Path(out_dir)
    title = (f"{Path(metrics.get('checkpoint', '')).name} on {metrics.get('split', 'val')}: "
             f"overall {metrics['overall']:.2f}% on {metrics.get('n', '?')} images")
    return _report(out_dir, metrics, metrics["train_class_counts"], metrics.get("class_names"), title,
                   Path(log_jsonl) if log_jsonl is not None else None)
