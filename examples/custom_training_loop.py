"""Your own training loop around fastlt's pieces: its data pipeline, its BCL model, its ConCutMix
objective and its evaluation, with a plain ``torch.optim`` optimizer instead of ``fastlt train``.

    python examples/custom_training_loop.py                    # 4 epochs on a small synthetic set
    python examples/custom_training_loop.py --epochs 1 --steps 2

What each piece does:

* ``fastlt.data.make_synthetic_lt`` writes a small long-tailed JPEG dataset in the list format
  (once; later runs reuse it) and ``fastlt.data.LongTailedList`` reads it — the same class reads
  ImageNet-LT / iNaturalist / Places-LT list files;
* ``fastlt.pipelines.build_train_pipeline`` yields ``TrainBatch`` objects: three views per image
  (view 0 with CutMix pasted in, two contrastive views), the background / foreground labels and λ;
* ``fastlt.method.objective.ConCutMixObjective`` is the loss (logit-adjusted CE on the area label,
  or on the rectified ConCutMix label after ``method.l_d_warm``, plus the balanced contrastive
  loss) and ``train_step`` one step of it on anything with ``engine(x)`` / ``backward`` / ``step``
  (``PlainEngine`` gives them to a torch optimizer);
* ``fastlt.training.evaluate.evaluate_model`` gives overall / many / medium / few-shot accuracy.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from fastlt.config.loader import config_from_dict
from fastlt.data import LongTailedList, make_synthetic_lt
from fastlt.method.objective import ConCutMixObjective, train_step
from fastlt.models import BCLModel
from fastlt.pipelines import build_train_pipeline, build_val_pipeline, train_spec, val_spec
from fastlt.reports.logger import format_metrics
from fastlt.training.engine import PlainEngine
from fastlt.training.evaluate import evaluate_model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data_cache/synthetic-example", help="where the synthetic dataset is cached")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    # 10 classes from 120 down to 12 training images, 16 validation images each, 32 px.
    made = make_synthetic_lt(args.data, num_classes=10, imb_factor=0.1, n_max=120, image_size=32, n_val=16, seed=0)
    train = LongTailedList(made.root, made.train_list)
    val = LongTailedList(made.root, made.val_list, num_classes=train.num_classes)

    # The config sections the pipelines and the objective read (the rest keeps its defaults).
    # l_d_warm=0: area labels in epoch 0, the rectified ConCutMix label from epoch 1 on.
    cfg = config_from_dict({
        "data": {"kind": "synthetic", "root": str(made.root), "augment_recipe": "cifar", "image_size": 32,
                 "normalization": "cifar", "batch_size": 32, "eval_batch_size": 80},
        "method": {"alpha": 2.0, "beta": 0.6, "l_d_warm": 0, "topk": 3, "temperature": 0.1},
        "pipeline": {"backend": "torch", "num_workers": 0},
        "run": {"seed": args.seed},
    })

    model = BCLModel("resnet32", train.num_classes, feat_dim=64, use_norm=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    engine = PlainEngine(model, optimizer)
    objective = ConCutMixObjective(cfg.method, train.class_counts)
    pipeline = build_train_pipeline(train_spec(cfg, train, batch_size=cfg.data.batch_size), "torch")
    try:
        for epoch in range(args.epochs):
            rectify = epoch > cfg.method.l_d_warm  # ConCutMix labels after the warm-up
            engine.train()
            batches = pipeline.epoch(epoch)
            step, loss, ce, scl = -1, float("nan"), float("nan"), float("nan")
            try:
                for step, batch in enumerate(itertools.islice(batches, args.steps)):
                    loss, ce, scl = train_step(engine, objective, batch, rectify=rectify)[:3].tolist()
            finally:
                batches.close()
            print(f"epoch {epoch} ({'rectified' if rectify else 'area'} labels): {step + 1} steps, "
                  f"last loss {loss:.4f} (ce {ce:.4f}, scl {scl:.4f})", flush=True)
    finally:
        pipeline.close()

    metrics = evaluate_model(model, build_val_pipeline(val_spec(cfg, val), "torch"), train.class_counts,
                             device="cpu")
    print(f"validation accuracy (%): {format_metrics(metrics)}  ({metrics['n']} images)")
    return metrics


if __name__ == "__main__":
    main()
