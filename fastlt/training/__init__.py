"""The training machinery: from a :class:`~fastlt.config.Config` to a finished run directory.

* :mod:`~fastlt.training.preflight` — :func:`preflight`: every check that runs before DeepSpeed
  starts or anything is written, in order (device, run directory and lock, output folders,
  resume target, datasets, epoch length, the checkpoint, validation images);
* :mod:`~fastlt.training.resume` — what ``--resume`` may name (a finished run is never
  overwritten; another run's checkpoint starts a new run with its lineage) and the training
  set's identity recorded in every checkpoint;
* :mod:`~fastlt.training.runlock` — :class:`RunLock`: one process per run directory;
* :mod:`~fastlt.training.trainer` — :class:`Trainer`: epochs, steps, evaluation and checkpoint
  cadence, stop handling; :mod:`~fastlt.training.run` — :func:`train`, a run start to finish;
* :mod:`~fastlt.training.engine` — the ``deepspeed`` section, the generated DeepSpeed config,
  precision, the engine (and :class:`PlainEngine` for plain optimizers);
* :mod:`~fastlt.training.schedule` — the ``optim`` section, SGD and the per-epoch learning rate;
* :mod:`~fastlt.training.checkpoint` — **the checkpoint format**: resumable checkpoints
  (atomic publish, compatibility) and weights files; :mod:`~fastlt.training.checkpoint_format`
  checks a checkpoint's files and contents and the ``latest`` pointer before anything is loaded;
* :mod:`~fastlt.training.distributed` — device, process group and collectives;
* :mod:`~fastlt.training.signals` — Ctrl-C / SIGTERM honoured in every phase (a stop at a step
  boundary inside the steps, at once elsewhere);
* :mod:`~fastlt.training.evaluate` — evaluation of a model or a checkpoint;
  :mod:`~fastlt.training.eval_record` — finished evaluations, so that a resume never runs one again.
"""
from fastlt._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "Trainer": "trainer", "train": "run",
    "PlainEngine": "engine", "build_engine": "engine", "deepspeed_config": "engine", "precision_of": "engine",
    "EpochLR": "schedule", "OptimConfig": "schedule", "build_optimizer": "schedule",
    "CheckpointManager": "checkpoint", "load_weights": "checkpoint", "save_weights": "checkpoint",
    "StopFlag": "signals", "Plan": "preflight", "preflight": "preflight", "RunLock": "runlock",
    "evaluate_model": "evaluate", "run_eval": "evaluate",
})
