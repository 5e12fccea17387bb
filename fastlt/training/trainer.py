"""The ConCutMix + BCL trainer on a DeepSpeed engine (docs/design.md §2 recipes, §3 "Engine").

:class:`Trainer` runs one :class:`~fastlt.config.loader.Config`:

1. ``fastlt.training.preflight.preflight``, once, before any process group exists: every set-up
   check, in order; a refused run stops with one message and leaves its run directory as it was;
2. the process group, the model, the DeepSpeed engine (``fastlt.training.engine``), the objective
   (``fastlt.method.objective``), the per-epoch LR (``fastlt.training.schedule``) and the pipelines;
3. epochs of :func:`~fastlt.method.objective.train_step`, a resumable checkpoint every
   ``run.checkpoint_every`` epochs (``fastlt.training.checkpoint``; never of a non-finite state), then
   evaluation every ``run.eval_every`` epochs (after the checkpoint: a failing evaluation
   never costs the epoch, and a resume from that checkpoint evaluates first).

The host waits for the device only at log intervals, epoch ends, evaluation and checkpoints.
SIGINT/SIGTERM (``fastlt.training.signals``) are honoured in every phase (130/143, resumable); in
the steps, and for an unreadable training image in a one-process run, at a step boundary after a
checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from fastlt.training import distributed as dist
from fastlt.training.checkpoint import model_signature, nonfinite_state, save_weights, tag_for
from fastlt.training.eval_record import pending_evaluation, record_evaluation
from fastlt.config.loader import Config
from fastlt.errors import BadImageError, NonFiniteLossError, TrainingInterrupted
from fastlt.method.label_stats import interval_fields
from fastlt.reports.logger import RunLogger, format_metrics
from fastlt.reports.run_report import (closing_line, opening_lines, record_launch, report_skipped_images,
                                      write_final_report)
from fastlt.training.preflight import preflight
from fastlt.training.resume import resume_hint
from fastlt.training.sample_log import SampleLog
from fastlt.training.signals import StopFlag, pause_point
from fastlt.training.watchdog import RankWatch

__all__ = ["Trainer"]

_SETUP_AFTER = ("nothing was trained in this launch and the run directory holds only complete files; start it again "
                "the same way (with --resume auto once it has a checkpoint)")


class Trainer:
    """One training run of a :class:`Config` (see the module docstring)."""

    def __init__(self, cfg: Config, *, resume: str | None = None, run_dir: str | os.PathLike | None = None,
                 command: str = "fastlt train"):
        self.cfg = cfg
        self.resume = resume
        # From here to close(), SIGINT/SIGTERM stop the run in whatever phase it is (fastlt.training.signals).
        self.stop = StopFlag(phase="setup", after=_SETUP_AFTER, stepwise=False).__enter__()
        try:
            run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run.output_dir) / cfg.run.name
            self.plan = plan = preflight(cfg, resume=resume, run_dir=run_dir, proc=dist.process_info(),
                                         command=command, stop=self.stop)
        except BaseException:
            self.stop.__exit__(None, None, None)
            raise
        self.device, self.proc, self.run_dir, self.ckpt = plan.device, plan.proc, plan.run_dir, plan.ckpt
        self.rank, self.world_size = self.proc.rank, self.proc.world_size
        self.resume_from, self.data, self.steps_per_epoch = plan.target.path, plan.data, plan.steps_per_epoch
        self.precision, self.resume_notes = plan.precision, plan.notes

    # -- setup -----------------------------------------------------------------------

    def setup(self) -> None:
        """Step 2 of the module docstring: process group, model, engine, objective, schedule and
        pipelines (``fit`` calls it; ``fastlt.reports.profiling`` builds its run with it too)."""
        from fastlt.training.engine import build_engine, deepspeed_extra_warning
        from fastlt.models import build_model
        from fastlt.method.objective import ConCutMixObjective, compile_step
        from fastlt.pipelines import build_train_pipeline, build_val_pipeline, select_backend, train_spec, val_spec
        from fastlt.training.schedule import EpochLR

        cfg = self.cfg
        dist.prepare_process_env(self.device)
        dist.init_distributed(self.device, self.proc, cfg.run.collective_timeout_s)
        self.watch = RankWatch(self.rank, self.world_size, cfg.run.collective_timeout_s,
                               latest=self.ckpt.latest).start()
        if cfg.run.deterministic:
            if self.device == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.log = RunLogger(self.run_dir, self.rank, progress_bar=cfg.run.progress_bar,
                             tensorboard=cfg.run.tensorboard)
        if cfg.data.kind == "synthetic":
            self.log.info(f"synthetic dataset in {cfg.data.root} (generated on first use, then reused from there)")

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DeepSpeed also broadcasts)
        model = build_model(cfg, self.data.num_classes)
        if cfg.model.pretrained:
            from fastlt.models.pretrained import load_pretrained

            self.log.info(load_pretrained(model, cfg.model.pretrained, cfg.model.pretrained_scope))
        self.signature = model_signature(model, cfg)
        self.engine, self.ds_config = build_engine(cfg, model, self.world_size)
        if (warning := deepspeed_extra_warning(self.ds_config, cfg.deepspeed.extra)) is not None:
            self.log.event("warning", warning)
        self.dev = torch.device(self.device, self.proc.local_rank) if self.device == "cuda" else torch.device("cpu")
        self.objective = ConCutMixObjective(cfg.method, self.data.class_counts).to(self.dev)
        compile_step(self.engine, self.objective, cfg.run.compile, cfg.run.compile_backend)
        self.schedule = EpochLR(cfg.optim)
        self.backend = select_backend(cfg.pipeline.backend)
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.pipeline = build_train_pipeline(train_spec(cfg, self.data.train, batch_size=micro, rank=self.rank,
                                                        world_size=self.world_size, device=self.device), self.backend)
        self.val_pipeline = build_val_pipeline(val_spec(cfg, self.data.val, rank=self.rank, world_size=self.world_size,
                                                        device=self.device), self.backend)
        self.samples = SampleLog(self.run_dir, self.pipeline, rank=self.rank, world_size=self.world_size,
                                 batch_size=micro) if cfg.run.sample_log else None

    def _save(self, epoch: int, step: int, *, eval_pending: bool = False, wait: bool = False) -> Path:
        # eval_pending: this epoch's evaluation runs after the save; a resume from here runs it first.
        client = {"fastlt": {"epoch": epoch, "step": step, "global_step": int(self.engine.global_steps),
                             "scheduler": self.schedule.state_dict(), "best": self.best, "history": self.history,
                             "train_time_s": self.train_time, "eval_pending": eval_pending}}
        meta = {"signature": self.signature, "backbone": self.cfg.model.backbone, "num_classes": self.data.num_classes,
                "batch_size": self.cfg.data.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "zero_stage": self.cfg.deepspeed.zero_stage}
        meta.update(dataset=self.plan.dataset, lineage=self.plan.target.lineage)
        path = self.ckpt.save(self.engine, epoch, step, client, meta, on_saved=self._saved)
        return (self.ckpt.wait(self._saved) or path) if wait else path  # wait: complete even when asynchronous

    def _saved(self, path: Path, epoch: int, step: int) -> None:  # complete, and `latest` points at it
        self.log.event("checkpoint", f"checkpoint saved: {path} (resumes at epoch {epoch} step {step})",
                       path=str(path), epoch=epoch, step=step)

    def _load(self, path: Path) -> tuple[int, int]:
        state, meta = self.ckpt.load(self.engine, path, self.signature, zero_stage=self.cfg.deepspeed.zero_stage,
                                     log=self.log.info)
        self.schedule.load_state_dict(state["scheduler"])
        self.best = state["best"]
        self.history = list(state["history"])
        self.train_time = float(state.get("train_time_s", 0.0))
        self.eval_pending, self.resumed_ckpt = bool(state.get("eval_pending", False)), path
        target = self.plan.target
        if target.foreign:  # a new run: its best is what it evaluates itself (into its own best.pt)
            self.best = None
        new = (f"; a new run initialised from a checkpoint of run {target.lineage['source_run']} (lineage in "
               "config.yaml, metrics.json and its checkpoints)") if target.foreign else ""
        self.log.event("resume", f"resumed from {path}: epoch {state['epoch']} step {state['step']} (global step "
                       f"{state['global_step']}){new}", path=str(path), epoch=state["epoch"], step=state["step"],
                       lineage=target.lineage)
        return int(state["epoch"]), int(state["step"])

    def evaluate(self, epoch: int, checkpoint: Path | None = None) -> dict:
        """Evaluate; ``checkpoint``: the one saved before this evaluation (its resume then takes the result)."""
        from fastlt.training.evaluate import evaluate_model

        self.ckpt.wait(self._saved)  # first: a stop during the evaluation (or the final report) resumes it
        with self.stop.during(f"the evaluation of epoch {epoch}", resume_hint(self.ckpt, epoch)):
            pause_point(f"eval:{epoch}", self.stop)
            metrics = evaluate_model(self.engine.module, self.val_pipeline, self.data.class_counts, device=self.dev,
                                     precision=self.precision, channels_last=self.cfg.model.channels_last,
                                     shots=(self.cfg.run.many_shot, self.cfg.run.few_shot))
        summary = {k: metrics[k] for k in ("overall", "many", "medium", "few")}
        self.last_eval = metrics
        self.history = [h for h in self.history if h["epoch"] != epoch] + [{"epoch": epoch, **summary}]
        improved = self.best is None or summary["overall"] > self.best["overall"]
        if improved:
            self.best = {"epoch": epoch, **summary}
            if self.rank == 0:
                save_weights(self.run_dir / "best.pt", self.engine.module,
                             {"epoch": epoch, "metrics": summary, "signature": self.signature})
        self.log.event("eval", f"eval epoch {epoch}: {format_metrics(summary)}" + ("  (best)" if improved else ""),
                       epoch=epoch, global_step=int(self.engine.global_steps), **summary)
        record_evaluation(self, epoch, metrics, checkpoint)
        return metrics

    # -- training --------------------------------------------------------------------

    def _end_interval(self, buf: Tensor, n: int, epoch: int, step: int, t_start: float, wait: float,
                      samples: int) -> bool:
        """End of a log interval, the one host<->device sync of the interval: log it, publish an
        asynchronous checkpoint every rank has finished writing, and return True when any rank saw a
        non-finite loss or received a stop request (all ranks then stop at the same step)."""
        # The global batch's values (the mean of the ranks' equal shares), then the one host sync:
        # the per-step (loss, ce, scl) and label diagnostics of the whole interval in one copy.
        stats = dist.mean_over_ranks(buf[:n]).cpu()
        vals = stats[:, :3]
        finite = torch.isfinite(vals).all(dim=1)
        local_bad = not bool(finite.all())
        if local_bad:
            first = int((~finite).nonzero()[0, 0])
            self.nonfinite = (epoch, step - n + 1 + first, vals[first].tolist())
        else:
            elapsed = max(time.perf_counter() - t_start, 1e-9)
            mean = vals.mean(dim=0).tolist()
            self.log.train({"epoch": epoch, "epochs": self.cfg.optim.epochs, "step": step + 1,
                            "steps": self.steps_per_epoch, "global_step": int(self.engine.global_steps),
                            "loss": mean[0], "ce": mean[1], "scl": mean[2], "lr": float(self.engine.get_lr()[0]),
                            "img_per_s": samples * self.world_size / elapsed, "data_wait": wait / elapsed,
                            "skipped_images": self.pipeline.stats()["skipped_images"],
                            **interval_fields(stats[:, 3:])})
        bad, stop, writing = dist.any_rank([local_bad, self.stop.requested, self.ckpt.writing()], self.dev)
        if self.ckpt.pending and not writing:  # every rank's background write has ended: publish it now
            self.ckpt.wait(self._saved)
        if bad and self.nonfinite is None:  # another rank saw it first
            self.nonfinite = (epoch, step, None)
        self.stop.requested = stop
        return bad or stop

    def _raise_nonfinite(self, tensors: int = 0) -> None:
        self.ckpt.wait(self._saved)  # all ranks are here: the checkpoint before the divergence completes
        epoch, step, vals = self.nonfinite
        # Every checkpoint passed the finiteness check before it was written, so the latest is good.
        raise NonFiniteLossError.at(epoch, step, self.steps_per_epoch, losses=vals, tensors=tensors,
                                    last_checkpoint=self.ckpt.latest(), lr=self.cfg.optim.lr)

    def _train_epoch(self, epoch: int, start_step: int) -> int:
        """Train one epoch from start_step; returns the step reached (== steps_per_epoch if complete)."""
        from fastlt.method.objective import STEP_COLUMNS, train_step

        cfg = self.cfg
        rectify = epoch > cfg.method.l_d_warm
        lr = self.schedule.apply(self.engine.optimizer, epoch)
        if rectify and (epoch == cfg.method.l_d_warm + 1 or epoch == self.first_epoch):
            self.log.event("label_switch",
                           f"ConCutMix labels ON from epoch {epoch}: mixed samples now train on the rectified label "
                           f"(epoch > method.l_d_warm={cfg.method.l_d_warm}; top-K {cfg.method.topk}, "
                           f"ω {cfg.method.omega:.4g}, {cfg.method.label_normalize})", epoch=epoch)
        self.log.event("epoch", f"epoch {epoch}/{cfg.optim.epochs}: lr {lr:.4e}, "
                       f"{'rectified' if rectify else 'area'} labels", epoch=epoch, lr=lr, rectify=rectify)
        self.engine.train()
        log_every = cfg.run.log_every
        buf = torch.zeros(log_every, len(STEP_COLUMNS), device=self.dev)
        n, wait, samples = 0, 0.0, 0
        t_start = time.perf_counter()
        step = start_step - 1
        self.log.start_bar(self.steps_per_epoch, start_step, f"epoch {epoch}")
        batches = self.pipeline.epoch(epoch, start_step)
        t0 = time.perf_counter()
        try:
            for step in range(start_step, self.steps_per_epoch):
                try:
                    batch = next(batches)  # on the device already: the pipelines deliver there
                except StopIteration:
                    raise RuntimeError(f"the {self.backend} pipeline ended epoch {epoch} after {step} steps; "
                                       f"expected {self.steps_per_epoch}") from None
                except BadImageError as e:
                    if self.world_size > 1:  # the other ranks are inside this step's all-reduce: no save possible
                        raise self._bad_image_error(e, epoch, step, None) from None
                    self.bad_image = e  # fit() checks and saves the steps before this one, then raises
                    if n:  # their losses are checked (and logged) like at any interval's end
                        self._end_interval(buf, n, epoch, step - 1, t_start, wait, samples)
                    return step
                wait += time.perf_counter() - t0
                pause_point(f"step:{epoch}:{step}", self.stop)
                last = step == self.steps_per_epoch - 1
                # The label diagnostics only on the step that ends the interval, where they are logged.
                buf[n] = train_step(self.engine, self.objective, batch, rectify=rectify,
                                    stats=n == log_every - 1 or last)
                if self.samples is not None:
                    self.samples.step(epoch, step)
                n += 1
                samples += len(batch)
                self.log.advance_bar()
                # A single process checks its own stop flag every step for free; several ranks
                # agree on it at log intervals, where the host syncs anyway.
                if n == log_every or last or (self.world_size == 1 and self.stop.requested):
                    if self._end_interval(buf, n, epoch, step, t_start, wait, samples):
                        return step + 1
                    n, wait, samples = 0, 0.0, 0
                    t_start = time.perf_counter()
                t0 = time.perf_counter()
        finally:
            self.log.close_bar()
            with contextlib.suppress(Exception):
                batches.close()
        return step + 1

    def fit(self) -> dict:
        """Train to the end (or to a stop request); returns the final metrics."""
        cfg = self.cfg
        self.setup()
        self.best, self.history, self.train_time = None, [], 0.0
        self.nonfinite, self.eval_pending, self.bad_image = None, False, None
        epoch, step = 0, 0
        if self.resume_from is not None:
            epoch, step = self._load(self.resume_from)
        elif self.resume is not None:
            self.log.info(f"--resume {self.resume}: no checkpoint in {self.run_dir}, starting from scratch")
        if self.rank == 0:  # only now: a refused resume leaves the run's config.yaml as it was
            record_launch(cfg, self.ds_config, self.run_dir, self.log, int(self.engine.global_steps),
                          lineage=self.plan.target.lineage, data=self.data)
        for note in self.resume_notes:
            self.log.event("warning", note)
        self.first_epoch = epoch
        for line in opening_lines(cfg, self.data, world_size=self.world_size, device=self.device, backend=self.backend,
                                  steps=self.steps_per_epoch, micro=self.ds_config["train_micro_batch_size_per_gpu"],
                                  run_dir=self.run_dir, first_epoch=epoch):
            self.log.info(line)
        from fastlt.pipelines import choose_backend  # the reason of the choice select_backend made above

        for line in (*self.data.notes, f"data pipeline: {self.backend} ({choose_backend(cfg.pipeline.backend)[1]})"):
            self.log.info(line)
        last_eval_epoch = None
        self.stop.phase, self.stop.after = "training", "checkpoints already written are complete: --resume auto"
        if self.eval_pending and step == 0 and epoch > 0:  # saved before its evaluation
            pending_evaluation(self, epoch - 1)
            last_eval_epoch = epoch - 1
        while epoch < cfg.optim.epochs:
            # Steps: a signal is noted and the run stops at the next step boundary, after a checkpoint.
            with self.stop.during(f"epoch {epoch}", "", stepwise=True):
                t_epoch = time.perf_counter()
                reached = self._train_epoch(epoch, step)
                self.train_time += time.perf_counter() - t_epoch
                if self.nonfinite:
                    self._raise_nonfinite()
                (stopping,) = dist.any_rank([self.stop.requested], self.dev)
                if cfg.method.reference_parallelism == "none":  # dp4: every rank already holds group 0's
                    dist.average_buffers(self.engine.module)     # statistics, identical; averaging adds rounding
                self._check_state(epoch, reached)
                if self.bad_image is not None:
                    raise self._bad_image_error(self.bad_image, epoch, reached, self._save_unless_saved(epoch, reached))
                if reached < self.steps_per_epoch:  # stopped inside the epoch
                    path = self._save(epoch, reached, wait=True)
                    raise TrainingInterrupted(f"stopped by {self.stop.signal_name or 'a signal'} at epoch {epoch} "
                                              f"step {reached}; checkpoint {path}. Continue with --resume auto",
                                              self.stop.signal_name)
                done = epoch + 1
                due = done % cfg.run.eval_every == 0 or done == cfg.optim.epochs
                path = None
                if done % cfg.run.checkpoint_every == 0 or done == cfg.optim.epochs or stopping:
                    path = self._save(done, 0, eval_pending=due)
                (late,) = dist.any_rank([self.stop.requested], self.dev)  # e.g. during the checkpoint write
                if stopping or late:  # the pending evaluation runs when the run is resumed
                    path = self.ckpt.wait(self._saved) or path or self._save(done, 0, eval_pending=due, wait=True)
                    raise TrainingInterrupted(f"stopped by {self.stop.signal_name or 'a signal'} after epoch "
                                              f"{epoch}; checkpoint {path}. Continue with --resume auto",
                                              self.stop.signal_name)
            if due:
                self.evaluate(epoch, path)
                last_eval_epoch = epoch
            epoch, step = done, 0
        if last_eval_epoch is None and not any(h["epoch"] == cfg.optim.epochs - 1 for h in self.history):
            self.evaluate(cfg.optim.epochs - 1)  # resumed after the last epoch, from a run that never evaluated it
        return self._finish()

    def _save_unless_saved(self, epoch: int, step: int) -> Path | None:
        """The checkpoint of position (epoch, step): the latest one if it is already there, None at
        the very start of a run (nothing trained yet), else a new one."""
        latest = self.ckpt.wait(self._saved) or self.ckpt.latest()  # a write in flight completes first
        if latest is not None and latest.name == tag_for(epoch, step):
            return latest
        return None if (epoch, step) == (0, 0) else self._save(epoch, step, wait=True)

    def _bad_image_error(self, err: BadImageError, epoch: int, step: int, saved: Path | None) -> BadImageError:
        return BadImageError.in_training(err, epoch, step, self.steps_per_epoch, saved=saved, rank=self.rank,
                                         world_size=self.world_size, last_checkpoint=self.ckpt.latest())

    def _check_state(self, epoch: int, reached: int) -> None:
        """Before anything is saved from this state: weights and optimizer state must be finite (the loss
        check cannot see an update that diverged on an epoch's last step); replaced images are reported."""
        bad = nonfinite_state(self.engine)
        if dist.any_rank([bad > 0], self.dev)[0]:
            self.nonfinite = (epoch, reached - 1, None)
            self._raise_nonfinite(tensors=bad or 1)
        report_skipped_images(self.log, self.pipeline.stats(), epoch, self.rank)

    def _finish(self) -> dict:
        done = f"the training is complete in checkpoint {self.ckpt.latest()}: --resume auto writes the report"
        self.stop.phase, self.stop.after = "the final report (last.pt, metrics.json, plots)", done
        final = self.history[-1] if self.history else {}
        digests = dist.replica_digests(self.engine.module)
        if self.rank == 0:
            write_final_report(self, final, digests)
        self.log.event("done", closing_line(self.cfg, final, self.best, self.history, self.train_time, self.run_dir),
                       evaluated_epochs=[h["epoch"] for h in self.history],
                       **{k: final.get(k) for k in ("overall", "many", "medium", "few")})
        self.watch.stop("done")  # from here a rank may exit before the others: not a lost rank
        dist.barrier()
        return {**final, "train_time_s": self.train_time, "run_dir": str(self.run_dir), "best": self.best}

    def close(self) -> None:
        if hasattr(self, "watch"):
            self.watch.stop("failed")  # a no-op after a finished run's "done"
        self.ckpt.abandon()  # a failure during a background write: latest stays at the last complete one
        for name in ("pipeline", "val_pipeline", "samples"):
            with contextlib.suppress(Exception):
                getattr(self, name).close()
        if hasattr(self, "log"):
            self.log.close()
        if self.plan.lock is not None:
            self.plan.lock.release()
        self.stop.__exit__(None, None, None)
