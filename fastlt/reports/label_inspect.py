"""``fastlt inspect --config C --checkpoint P``: the ConCutMix label step on real batches, for
a person to look at (the paper's Figure 1 for the user's own data and model).

Batches come from the real training pipeline of the config (same samplers, CutMix boxes and
views as training, at the checkpoint's epoch unless another is asked for). The model of the
checkpoint runs the training forward pass over cat[view 0, view 1, view 2] (train mode, as
the training step does, under ``no_grad``), and for each mixed sample the area label
y = λ·onehot(a) + (1−λ)·onehot(b) and the rectified label ŷ (``fastlt.method.labels.rectify_labels``
with the config's ω, K and normalisation) are computed, with γ, ‖ŷ − y‖₁, whether the
arg-max changed and the top-K mass outside {a, b} (``fastlt.method.label_stats``).

Written to the output folder:

* ``labels.png`` — a grid of the mixed samples, :data:`CELL` pixels per sample, each with its
  background / foreground classes, λ, the area label and the rectified top-K label;
* ``labels.html`` — the same as one self-contained page (images inlined as data URIs);
* ``labels.json`` — the numbers of every sample shown.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from fastlt.errors import DataError

__all__ = ["CELL", "COLUMNS", "collect_samples", "inspect_labels", "render_grid", "render_html",
           "spread_across_steps"]

#: (width, height) in pixels of one sample in labels.png; the grid has COLUMNS columns under a
#: HEADER-pixel title: labels.png is COLUMNS·CELL[0] × (HEADER + rows·CELL[1]) pixels.
CELL = (400, 440)
COLUMNS = 4
HEADER = 60


def _name(names, i: int) -> str:
    from fastlt.data.folder import class_label

    return class_label(names, int(i))


def spread_across_steps(per_step: list[list[dict]], samples: int) -> list[dict]:
    """Up to ``samples`` rows taken round-robin over the steps: the first row of every step, then
    the second of every step, and so on, in step order. With one CutMix box per batch
    (``method.cutmix_per_sample: false``) samples of one step share their box, so a grid spread
    over steps shows as many different boxes (and λ) as there are steps."""
    picked: list[dict] = []
    for rank in range(max((len(rows) for rows in per_step), default=0)):
        picked += [rows[rank] for rows in per_step if rank < len(rows)]
    return sorted(picked[:samples], key=lambda r: (r["step"], r["index_in_batch"]))


@torch.no_grad()
def collect_samples(model, pipeline, epoch: int, cfg, class_counts, *, samples: int, show_topk: int,
                    max_batches: int, device, precision=None, mean, std) -> list[dict]:
    """Up to ``samples`` mixed samples of ``pipeline``'s epoch with their labels (see the module
    docstring), spread over the steps (:func:`spread_across_steps`): the first ``max_batches``
    steps are read until ``samples`` of them held a mixed sample, one forward pass each."""
    from fastlt.kernels import rectify_labels_compact
    from fastlt.method.label_stats import per_sample_stats
    from fastlt.method.labels import area_label

    m = cfg.method
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64, device=device)
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    amp = precision.autocast(torch.device(device).type) if precision is not None else None
    model.train()  # the training forward: BatchNorm on the batch statistics, as in train_step
    per_step: list[list[dict]] = []
    batches = pipeline.epoch(epoch, 0)
    try:
        for step, batch in enumerate(batches):
            if step >= max_batches or len(per_step) >= samples:
                break
            if not bool(batch.mixed.any()):
                continue
            x = batch.images  # in the model's layout and dtype already (the training pipeline's spec)
            if amp is not None:
                with amp:
                    out = model(x)
            else:
                out = model(x)
            b = len(batch)
            label = rectify_labels_compact(out.z_raw[:b].float(), out.centers_raw.float(), batch.label_a,
                                           batch.label_b, batch.lam, counts, topk=m.topk, omega=m.omega,
                                           normalize=m.label_normalize, temperature=m.label_temperature)
            st = per_sample_stats(label)
            # The page shows whole label rows, so here (B, C) labels are built, for display only.
            y, y_hat = area_label(batch.label_a, batch.label_b, batch.lam, counts.numel()), label.to_dense()
            pred = out.logits[:b].float().argmax(1)
            top_v, top_i = y_hat.topk(min(show_topk, y_hat.shape[1]), dim=1)
            rows = []
            for k in torch.nonzero(batch.mixed).flatten().tolist()[:samples]:
                img = (batch.image[k].float().cpu() * std_t + mean_t).clamp(0, 1)
                rows.append({
                    "step": step, "index_in_batch": k,
                    "image": (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                    "a": int(batch.label_a[k]), "b": int(batch.label_b[k]), "lam": float(batch.lam[k]),
                    "gamma": float(st["gamma"][k]), "label_l1": float(st["label_l1"][k]),
                    "argmax_changed": bool(st["argmax_changed"][k]), "topk_outside": float(st["topk_outside"][k]),
                    "area_argmax": int(y[k].argmax()), "rectified_argmax": int(y_hat[k].argmax()),
                    "rectified_a": float(y_hat[k, batch.label_a[k]]), "rectified_b": float(y_hat[k, batch.label_b[k]]),
                    "top": [(int(i), float(v)) for i, v in zip(top_i[k].tolist(), top_v[k].tolist())],
                    "pred": int(pred[k]),
                })
            # A row the round-robin leaves out now stays out (later steps only add rows ahead of
            # it), so only the chosen ones are kept: at most 2·samples images, whatever the batch.
            per_step.append(rows)
            chosen = {id(r) for r in spread_across_steps(per_step, samples)}
            per_step = [[r for r in rows if id(r) in chosen] for rows in per_step]
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return spread_across_steps(per_step, samples)


def _cell_lines(r: dict, names) -> list[str]:
    lam = r["lam"]
    lines = [f"background a: {_name(names, r['a'])}   λ {lam:.3f}",
             f"foreground b: {_name(names, r['b'])}   1−λ {1 - lam:.3f}"]
    if r["a"] == r["b"]:  # a patch of the same class: the area label is onehot(a)
        lines += ["area label:   a = b 1.0000", f"rectified:    a = b {r['rectified_a']:.4f}"]
    else:
        lines += [f"area label:   a {lam:.4f} | b {1 - lam:.4f}",
                  f"rectified:    a {r['rectified_a']:.4f} | b {r['rectified_b']:.4f}"]
    lines += [
             f"γ {r['gamma']:.2e}   ‖ŷ−y‖₁ {r['label_l1']:.2e}   "
             f"argmax {'CHANGED' if r['argmax_changed'] else 'same'}",
             "rectified top-K:"]
    lines += [f"  {_name(names, i)}  {v:.4f}" for i, v in r["top"]]
    lines.append(f"model predicts: {_name(names, r['pred'])}")
    return lines


def render_grid(path: str | os.PathLike, rows: list[dict], names, *, title: str) -> Path:
    """labels.png: COLUMNS samples per row, CELL pixels each (image on top, the labels below),
    under a HEADER-pixel title (``title``; a '|' starts its second line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows = max(1, math.ceil(len(rows) / COLUMNS))
    w, h = CELL[0] * COLUMNS, HEADER + CELL[1] * n_rows
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 8 / h, title.replace(" | ", "\n"), fontsize=10, ha="center", va="top")

    def box(x, y, bw, bh):  # pixels from the top-left corner -> figure fractions
        return (x / w, 1 - (y + bh) / h, bw / w, bh / h)

    for j, r in enumerate(rows):
        x0, y0 = (j % COLUMNS) * CELL[0], HEADER + (j // COLUMNS) * CELL[1]
        ax = fig.add_axes(box(x0 + 100, y0 + 22, 200, 200))
        ax.imshow(r["image"], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"sample {j + 1} (step {r['step']}, #{r['index_in_batch']})", fontsize=9)
        text = "\n".join(_cell_lines(r, names))
        fig.text((x0 + 18) / w, 1 - (y0 + 232) / h, text, fontsize=8, family="monospace", va="top", ha="left",
                 color="#8b0000" if r["argmax_changed"] else "black")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _png_data_uri(image: np.ndarray, scale: int) -> str:
    from PIL import Image

    im = Image.fromarray(image)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(path: str | os.PathLike, rows: list[dict], names, *, title: str, notes: list[str]) -> Path:
    """labels.html: one self-contained page (no external files) with a card per sample."""
    e = html.escape
    cards = []
    for j, r in enumerate(rows):
        scale = max(1, 160 // max(r["image"].shape[:2]))
        lab = {r["b"]: ("b (foreground)", 1 - r["lam"]), r["a"]: ("a (background)", r["lam"])}
        if r["a"] == r["b"]:
            lab = {r["a"]: ("a = b", 1.0)}
        trs = []
        for i, v in r["top"]:
            role, area = lab.get(i, ("", 0.0))
            trs.append(f"<tr><td>{e(_name(names, i))}</td><td>{e(role)}</td><td>{area:.4f}</td><td>{v:.4f}</td>"
                       f"<td>{v - area:+.1e}</td></tr>")
        changed = "<b class=chg>arg-max changed</b>" if r["argmax_changed"] else "arg-max unchanged"
        cards.append(
            f"<div class=card><img src='{_png_data_uri(r['image'], scale)}' alt='mixed sample {j + 1}'>"
            f"<p>sample {j + 1} (step {r['step']}, #{r['index_in_batch']})<br>"
            f"background <b>{e(_name(names, r['a']))}</b>, foreground <b>{e(_name(names, r['b']))}</b>, "
            f"λ = {r['lam']:.3f}<br>γ = {r['gamma']:.3e}, ‖ŷ − y‖₁ = {r['label_l1']:.3e}, "
            f"top-K mass outside {{a, b}} = {100 * r['topk_outside']:.1f}%, {changed}<br>"
            f"model predicts <b>{e(_name(names, r['pred']))}</b></p>"
            "<table><tr><th>class (top-K of ŷ)</th><th>role</th><th>area y</th><th>rectified ŷ</th>"
            "<th>ŷ − y</th></tr>"
            + "".join(trs) + "</table></div>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + e(title) + "</title><style>"
            "body{font-family:sans-serif;margin:1.5em;color:#222}.grid{display:flex;flex-wrap:wrap;gap:14px}"
            ".card{border:1px solid #ccc;border-radius:6px;padding:10px;width:400px;font-size:13px}"
            ".card img{image-rendering:pixelated;display:block;margin:0 auto}table{border-collapse:collapse;"
            "width:100%}td,th{border-bottom:1px solid #eee;padding:2px 4px;text-align:left}.chg{color:#b00}"
            "</style></head><body><h1>" + e(title) + "</h1><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes)
            + "</ul><div class=grid>" + "".join(cards) + "</div></body></html>")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def inspect_labels(cfg, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, samples: int = 16,
                   epoch: int | None = None, show_topk: int = 3,
                   max_batches: int = 50) -> tuple[list[Path], list[dict]]:
    """``fastlt inspect``: write labels.png, labels.html and labels.json; returns (paths, samples)."""
    from fastlt.data.build import build_datasets
    from fastlt.data.folder import read_class_map
    from fastlt.training.distributed import resolve_device
    from fastlt.training.engine import precision_of
    from fastlt.training.evaluate import checkpoint_run_dir, load_checkpoint_model
    from fastlt.pipelines import build_train_pipeline, normalization, select_backend, train_spec

    if samples < 1:
        raise DataError(f"--samples must be >= 1; got {samples}")
    device = resolve_device(cfg.run.device)
    if device == "cpu":  # the safe loader imports DeepSpeed's checkpoint classes; no accelerator probing
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    data = build_datasets(cfg)
    model, meta = load_checkpoint_model(cfg, checkpoint, data.num_classes)
    precision = precision_of(cfg.deepspeed)
    model.to(torch.device(device), dtype=precision.weight_dtype)
    names = data.class_names or read_class_map(checkpoint_run_dir(checkpoint))
    if epoch is None:
        epoch = int(meta.get("epoch", 0))
    mean, std = normalization(cfg.data.normalization)
    pipeline = build_train_pipeline(train_spec(cfg, data.train, batch_size=cfg.data.batch_size, device=device),
                                    select_backend(cfg.pipeline.backend))
    try:
        rows = collect_samples(model, pipeline, epoch, cfg, data.class_counts, samples=samples, show_topk=show_topk,
                               max_batches=max_batches, device=device, precision=precision, mean=mean, std=std)
    finally:
        pipeline.close()
    if not rows:
        raise DataError(f"no mixed sample in the first {max_batches} batches of epoch {epoch} "
                        f"(method.cutmix_prob={cfg.method.cutmix_prob}); raise method.cutmix_prob to inspect labels")
    m = cfg.method
    used = "rectified" if epoch > m.l_d_warm else "area (epoch <= method.l_d_warm, so training uses the area label)"
    title = f"ConCutMix labels: {Path(checkpoint).name}, epoch {epoch}, {len(rows)} mixed samples"
    notes = [f"config {cfg.run.name}; checkpoint {checkpoint}; label trained on at this epoch: {used}",
             f"ω = {m.omega:.4g}, K = {m.topk}, normalisation {m.label_normalize}; "
             "γ = ω·log(Σ N_j y_j) / Σ_i log N_i, ŷ = γ·ŝ + (1 − γ)·y",
             f"mean γ over these samples {np.mean([r['gamma'] for r in rows]):.3e}; arg-max changed in "
             f"{sum(r['argmax_changed'] for r in rows)} of {len(rows)}"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [render_grid(out / "labels.png", rows, names, title=title + " | " + notes[1]),
             render_html(out / "labels.html", rows, names, title=title, notes=notes)]
    numbers = [{k: v for k, v in r.items() if k != "image"} | {"a_name": _name(names, r["a"]),
                                                               "b_name": _name(names, r["b"])} for r in rows]
    (out / "labels.json").write_text(json.dumps({"notes": notes, "samples": numbers}, indent=1), encoding="utf-8")
    paths.append(out / "labels.json")
    return paths, rows
