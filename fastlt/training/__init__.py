"""The training machinery: from a :class:`~fastlt.config.Config` to a finished run directory.

* :mod:`~fastlt.training.preflight` — every check that runs before DeepSpeed starts or anything
  is written (device, run directory, resume target, datasets, epoch length, images);
* :mod:`~fastlt.training.trainer` — :class:`Trainer`: epochs, steps, evaluation and checkpoint
  cadence, stop handling;
* :mod:`~fastlt.training.engine` — the ``deepspeed`` section, the generated DeepSpeed config,
  precision, the engine (and :class:`PlainEngine` for plain optimizers);
* :mod:`~fastlt.training.schedule` — the ``optim`` section, SGD and the per-epoch learning rate;
* :mod:`~fastlt.training.checkpoint` — **the checkpoint format**: resumable checkpoints
  (atomic publish, verification, compatibility) and weights files;
* :mod:`~fastlt.training.distributed` — device, process group and collectives;
* :mod:`~fastlt.training.signals` — Ctrl-C / SIGTERM become a stop at a step boundary;
* :mod:`~fastlt.training.evaluate` — evaluation of a model or a checkpoint.
"""
from fastlt._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "Trainer": "trainer", "train": "trainer",
    "PlainEngine": "engine", "build_engine": "engine", "deepspeed_config": "engine", "precision_of": "engine",
    "EpochLR": "schedule", "OptimConfig": "schedule", "build_optimizer": "schedule",
    "CheckpointManager": "checkpoint", "load_weights": "checkpoint", "save_weights": "checkpoint",
    "StopFlag": "signals",
    "evaluate_model": "evaluate", "run_eval": "evaluate",
})
