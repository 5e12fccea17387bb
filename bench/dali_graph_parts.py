"""Where the DALI training graph's operator time goes on the CPU, each part alone.

``bench/dali_source_ceiling.py`` measures the Python sources, decode and the whole graph; this
script measures the image operators between decode and normalisation, one part per small DALI
pipeline over the same images (the 640 JPEGs of ``bench/bench_pipeline.py``, decoded and cropped
to 224 × 224 once beforehand, fed from memory): the crop-resize from the decoded 400 × 350 image,
each colour-jitter step (the graph's own ``dali_ops.jitter`` with every sample drawing that step,
so that the conditional's split and merge are included), the grayscale, each RandAugment stage
kind (``dali_ops.keyed_augment`` with every sample drawing that stage), decode and the
normalisation. Two DALI CPU threads, batch 32, as the benchmark.

Rates are CPU microseconds per image (this process's CPU time, DALI's threads included, minus the
same pipeline with no operator: the feeding), the cheapest of 3 epochs, so that the other jobs of
a shared machine enter as little as they can. Then, from the recipe's draw probabilities, how
many of each part one training sample runs on average (a sample = background views 0-2 and, with
probability ``cutmix_prob``, a foreground view 0), and so each part's share of a sample.

    .venv/bin/python bench/dali_graph_parts.py

Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BATCH, SIZE, ROUNDS, THREADS = 32, 224, 3, 2


def _images(n: int):
    """(encoded bytes, decoded HWC uint8, 224² centre-area crops) of the benchmark's images."""
    from PIL import Image

    from fastlt.data import LongTailedList, make_synthetic_lt

    syn = make_synthetic_lt(ROOT / "data_cache" / "bench-pipeline-400x350", num_classes=10, imb_factor=0.1,
                            n_max=160, image_size=(350, 400), seed=0, n_val=1)
    ds = LongTailedList(syn.root, syn.train_list)
    files = [np.frombuffer(ds.read_bytes(i), np.uint8) for i in range(n)]
    import io

    decoded = [np.asarray(Image.open(io.BytesIO(f.tobytes())).convert("RGB")) for f in files]
    crops = [np.ascontiguousarray(np.asarray(Image.fromarray(d).resize((SIZE, SIZE), Image.BILINEAR)))
             for d in decoded]
    return files, decoded, crops


def _constant(value: np.ndarray):
    """A per-sample source that gives every sample ``value``."""
    return lambda info: value


def _cpu_us_per_image(graph, inputs: list, params: list, n: int) -> float:
    """CPU µs per image of ``graph(img, *params)`` over ``inputs`` (cheapest of ROUNDS epochs)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=BATCH, num_threads=THREADS, device_id=None, enable_conditionals=True,
                  prefetch_queue_depth=1)
    def pipe():
        img = fn.external_source(source=lambda info: inputs[info.idx_in_epoch % n], batch=False)
        args = [fn.external_source(source=_constant(v), batch=False) for v in params]
        return graph(img, *args)

    p = pipe()
    p.build()
    p.run()
    best = float("inf")
    for _ in range(ROUNDS):
        t = time.process_time()
        for _ in range(n // BATCH):
            p.run()
        best = min(best, time.process_time() - t)
    del p
    return 1e6 * best / n


def main() -> None:
    from fastlt.pipelines import augment_stages as st
    from fastlt.pipelines import dali_ops as ops
    from fastlt.pipelines.view_draw import JITTER_NONE

    n = 640
    files, decoded, crops = _images(n)
    _, graph = ops.augment_tables("imagenet", SIZE, True)
    parts: dict[str, float] = {}
    base = _cpu_us_per_image(lambda img: img, crops, [], n)  # feeding 224² images from Python
    base_dec = _cpu_us_per_image(lambda img: img, decoded, [], n)
    base_files = _cpu_us_per_image(lambda img: img, files, [], n)

    def jitter_row(step: int) -> np.ndarray:
        # jitter_array: steps (4), brightness, contrast, saturation factors, hue shift, grey flag.
        return np.array([step, JITTER_NONE, JITTER_NONE, JITTER_NONE, 1.3, 0.7, 1.2, 20, 0.0], np.float64)

    parts["decode_400x350"] = _cpu_us_per_image(lambda d: ops.decode(d, False, "cpu"), files, [], n) - base_files
    window = np.array([20, 30, 300, 330], np.float32)  # (y0, x0, y1, x1): a 280 × 300 window
    parts["crop_resize_to_224"] = _cpu_us_per_image(lambda img, w: ops.crop_resize(img, w, SIZE), decoded, [window],
                                                    n) - base_dec
    for name, step in (("brightness", 0), ("contrast", 1), ("saturation", 2), ("hue", 3)):
        parts[f"jitter_{name}"] = _cpu_us_per_image(ops.jitter, crops, [jitter_row(step)], n) - base
    grey = jitter_row(JITTER_NONE)
    grey[8] = 1.0
    parts["grayscale"] = _cpu_us_per_image(ops.jitter, crops, [grey], n) - base
    parts["jitter_none"] = _cpu_us_per_image(ops.jitter, crops, [jitter_row(JITTER_NONE)], n) - base
    rot = st.rotate(14.0, SIZE, SIZE, st.INTERP_BILINEAR)[2]
    stages = {"affine_nearest": st.rotate(14.0, SIZE, SIZE, st.INTERP_NEAREST),
              "affine_bilinear": (st.KIND_AFFINE, st.INTERP_BILINEAR, rot),
              "affine_bicubic": (st.KIND_AFFINE, st.INTERP_BICUBIC, rot),
              "point_solarize": st.solarize(128), "enhance_brightness": st.enhance("Brightness", 1.3),
              "enhance_color": st.enhance("Color", 1.3), "enhance_contrast": st.enhance("Contrast", 1.3),
              "enhance_sharpness": st.enhance("Sharpness", 1.3), "autocontrast": st.autocontrast(),
              "equalize": st.equalize()}
    one = type(graph)(1, graph.fill, SIZE)
    for name, stage in stages.items():
        kinds, interps, params = st.stack_stages([stage])
        parts[f"stage_{name}"] = _cpu_us_per_image(
            lambda img, k, i, p: ops.keyed_augment(img, one, k, i, p), crops, [kinds, interps, params], n) - base
    parts["normalize"] = _cpu_us_per_image(
        lambda img: ops.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), crops, [], n) - base

    # Per training sample, from the recipe (pipelines/view_draw.py, randaugment.py): decode 1 + p;
    # crop-resize 3 + p; view 0 (and the foreground's): brightness, contrast, saturation once each
    # (no hue); sim views: each step with p 0.8, the hue included, grayscale p 0.2; RandAugment:
    # n = 2 stages with timm's apply probability 0.5, 15 ops drawn uniformly, of which 5 affine
    # (rotate, shear x/y, translate x/y) with bilinear or bicubic drawn evenly.
    p_fg = 0.5
    v0 = 1 + p_fg
    per_sample = {"decode_400x350": 1 + p_fg, "crop_resize_to_224": 3 + p_fg,
                  "jitter_brightness": v0 + 2 * 0.8, "jitter_contrast": v0 + 2 * 0.8,
                  "jitter_saturation": v0 + 2 * 0.8, "jitter_hue": 2 * 0.8, "grayscale": 2 * 0.2,
                  "normalize": 3}
    stage_rate = v0 * 2 * 0.5 / 15  # stages of one RandAugment op per sample
    for op, count in (("affine_bilinear", 2.5), ("affine_bicubic", 2.5), ("point_solarize", 4),
                      ("enhance_brightness", 1), ("enhance_color", 1), ("enhance_contrast", 1),
                      ("enhance_sharpness", 1), ("autocontrast", 1), ("equalize", 1)):
        per_sample[f"stage_{op}"] = stage_rate * count  # point: invert, posterize, solarize, solarize_add
    share = {k: round(parts[k] * c) for k, c in per_sample.items()}
    out = {"cpu_us_per_image": {k: round(v) for k, v in parts.items()}, "feeding_us_per_image": round(base),
           "per_sample_count": {k: round(v, 3) for k, v in per_sample.items()},
           "cpu_us_per_sample": share, "cpu_us_per_sample_total": sum(share.values()),
           "threads": THREADS, "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
