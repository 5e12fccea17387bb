"""One run of a config from start to finish: :func:`train`, what ``fastlt train`` calls.

The failures a :class:`~fastlt.training.trainer.Trainer` cannot see from inside its loop become
their one-line errors here: a collective that failed because another rank died
(``fastlt.training.watchdog``) and a data-loader worker that was killed
(``fastlt.pipelines.common.worker_failure``); the trainer is closed (pipelines, logs, the run
directory's lock) whatever happens.
"""
from __future__ import annotations

from fastlt.training.trainer import Trainer
from fastlt.training.watchdog import rank_lost_error

__all__ = ["train"]


def train(cfg, *, resume: str | None = None) -> dict:
    """Run training for ``cfg``; returns the final metrics (overall/many/medium/few, run_dir, ...)."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    except RuntimeError as e:  # a dead data worker surfaces as torch's RuntimeError or DALI's PipelineError
        from fastlt.pipelines.common import worker_failure

        if (lost := rank_lost_error(getattr(trainer, "watch", None), e)) is not None:  # a failed collective
            raise lost from None

        failure = worker_failure(e, num_workers=cfg.pipeline.num_workers, last_checkpoint=trainer.ckpt.latest())
        if failure is None:
            raise
        raise failure from None
    finally:
        trainer.close()
