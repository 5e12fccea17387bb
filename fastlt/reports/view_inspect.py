"""``fastlt inspect --views --backend dali|torch``: the training views of the first samples of an
epoch as one backend makes them, written as PNG images and an ``.npz``, and — given the other
backend's ``.npz`` — how far the two backends' views are apart.

Both backends draw every parameter of a view from one keyed draw (``fastlt.pipelines.view_draw``),
so for the same config, seed and global position the DALI view and the torch view of a sample
are the same image up to the resampling tolerances of the README ("Fidelity to the reference").
This command lets a user check that on their own data: run it once per backend and compare.

The views are taken from the real training pipeline of the config (its recipe, samplers, CutMix
and augmentation settings) on one process (rank 0 of 1, the config's global batch), delivered
as float32 and turned back into the uint8 pixels the pipeline normalised (exactly: the
normalisation's float error is far below half a grey level).

Written to the output folder:

* ``views_<backend>.npz`` — ``views`` uint8 (N, 3, H, W, 3) (view 0 after CutMix, views 1 and
  2), ``label_a``, ``label_b``, ``lam``, ``mixed``, and the config's recipe, seed and epoch;
* ``views_<backend>/sample<k>_view<v>.png`` — the same images;
* with ``--compare OTHER.npz``: ``parity.json`` — mean and max |Δ| in grey levels per view over
  the samples, and whether labels and λ agree.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fastlt.errors import DataError

__all__ = ["compare_views", "collect_views", "inspect_views"]


def collect_views(cfg, backend: str, *, samples: int, epoch: int = 0) -> dict:
    """The first ``samples`` samples of ``epoch`` of ``cfg``'s training pipeline on ``backend``
    ("dali" or "torch", CPU), as uint8 views and their labels (see the module docstring)."""
    import torch

    from fastlt.data.build import build_datasets
    from fastlt.pipelines import build_train_pipeline, normalization, select_backend, train_spec

    if samples < 1:
        raise DataError(f"--samples must be >= 1; got {samples}")
    data = build_datasets(cfg)
    spec = train_spec(cfg, data.train, batch_size=cfg.data.batch_size, device="cpu")
    spec.dtype, spec.memory_format = "float32", "contiguous"
    pipeline = build_train_pipeline(spec, select_backend(backend))
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in normalization(cfg.data.normalization))
    views, fields = [], {"label_a": [], "label_b": [], "lam": [], "mixed": []}
    batches = pipeline.epoch(epoch, 0)
    try:
        for batch in batches:
            b = len(batch)
            x = batch.images.double() * std + mean  # back to the 0–255 pixels the pipeline normalised
            u8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            views.append(np.stack([u8[k * b:(k + 1) * b] for k in range(3)], axis=1))
            for k in fields:
                fields[k].append(getattr(batch, k).cpu().numpy())
            if sum(len(v) for v in views) >= samples:
                break
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        pipeline.close()
    if not views:
        raise DataError(f"the training pipeline of {cfg.run.name} yields no batch (data.batch_size "
                        f"{cfg.data.batch_size} is larger than the training set?)")
    out = {"views": np.concatenate(views)[:samples]}
    out.update({k: np.concatenate(v)[:samples] for k, v in fields.items()})
    out.update(backend=np.array(backend), recipe=np.array(cfg.data.augment_recipe), seed=np.array(cfg.run.seed),
               epoch=np.array(epoch))
    return out


def compare_views(a: dict, b: dict) -> dict:
    """Mean and max |Δ| (grey levels) per view between two :func:`collect_views` results of the
    same config, and whether their labels, λ and CutMix flags agree."""
    va, vb = np.asarray(a["views"]), np.asarray(b["views"])
    if va.shape != vb.shape:
        raise DataError(f"the two view sets differ in shape ({va.shape} vs {vb.shape}): compare runs of the same "
                        f"config with the same --samples")
    for key in ("recipe", "seed", "epoch"):
        if str(a[key]) != str(b[key]):
            raise DataError(f"the two view sets come from different runs ({key} {a[key]} vs {b[key]})")
    d = np.abs(va.astype(np.int16) - vb.astype(np.int16))
    per_view = [{"view": v, "mean_abs_diff": float(d[:, v].mean()), "max_abs_diff": int(d[:, v].max()),
                 "per_sample_mean": [float(x) for x in d[:, v].reshape(len(d), -1).mean(1)]}
                for v in range(va.shape[1])]
    same = {k: bool(np.array_equal(a[k], b[k])) for k in ("label_a", "label_b", "mixed")}
    same["lam"] = bool(np.allclose(a["lam"], b["lam"], rtol=0, atol=1e-6))
    return {"backends": [str(a["backend"]), str(b["backend"])], "samples": int(len(va)), "views": per_view,
            "same": same}


def inspect_views(cfg, backend: str, out_dir: str | os.PathLike, *, samples: int = 8, epoch: int = 0,
                  compare: str | os.PathLike | None = None) -> tuple[list[Path], dict | None]:
    """Write ``views_<backend>.npz`` and the PNGs (and ``parity.json`` with ``compare``); returns
    (paths, the comparison or None)."""
    from PIL import Image

    from fastlt.files import check_output_file

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from fastlt.errors import OutputError

        raise OutputError(f"--out {out}: cannot create the folder ({e.strerror}); choose a writable folder") from None
    npz = out / f"views_{backend}.npz"
    check_output_file(npz, "--out")
    other = None
    if compare is not None:
        try:
            with np.load(compare) as f:
                other = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise DataError(f"--compare {compare}: cannot read it as a views .npz ({e}); give the file that "
                            f"`fastlt inspect --views` wrote for the other backend") from None
    result = collect_views(cfg, backend, samples=samples, epoch=epoch)
    png_dir = out / f"views_{backend}"
    png_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(npz, **result)
    paths = [npz]
    for k, sample in enumerate(result["views"]):
        for v, image in enumerate(sample):
            Image.fromarray(image).save(png_dir / f"sample{k:03d}_view{v}.png")
    paths.append(png_dir)
    report = None
    if other is not None:
        report = compare_views(result, other)
        (out / "parity.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        paths.append(out / "parity.json")
    return paths, report
