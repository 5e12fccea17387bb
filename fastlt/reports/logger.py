"""Run logging for the trainer: rank 0 only, for people and for machines.

* one fixed-field line per log interval — epoch, step, CE, SCL, loss, lr, img/s (training
  samples per second over all ranks; each sample is three views through the model) and the
  share of the interval's wall time spent waiting for the next batch — printed and appended
  to ``train.log``;
  followed, when the trainer measured them, by the training accuracy on the classification view
  and the label diagnostics of ``fastlt.method.label_stats`` (γ, ‖ŷ − y‖₁, arg-max changes, top-K
  mass outside {a, b}; only while rectified labels are in use);
* the same record as one JSON object per line in ``log.jsonl`` (``"event": "train"``),
  next to the other events (``eval``, ``checkpoint``, ``info``, ...);
* TensorBoard event files in the run directory (``tensorboard=True``, the default): the
  scalars of every train record and of every ``eval`` event, under the tags of
  :data:`TB_TAGS`, stepped by the global step;
* a tqdm progress bar only when stdout is a terminal (never in CI logs or files).

Other ranks get a logger whose methods do nothing, so call sites need no rank checks.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO

__all__ = ["RunLogger", "TB_TAGS", "format_train_line", "format_metrics"]

TRAIN_FIELDS = ("epoch", "step", "ce", "scl", "loss", "lr", "img_per_s", "data_wait")
#: Record field -> TensorBoard tag, for train records and eval events.
TB_TAGS = {
    "train": {"loss": "train/loss", "ce": "train/ce", "scl": "train/scl", "lr": "train/lr",
              "train_acc": "train/accuracy", "img_per_s": "perf/img_per_s", "data_wait": "perf/data_wait",
              "gamma": "label/gamma", "label_l1": "label/l1_shift", "argmax_changed": "label/argmax_changed",
              "topk_outside": "label/topk_outside", "rectified_share": "label/rectified_share"},
    "eval": {"overall": "eval/overall", "many": "eval/many", "medium": "eval/medium", "few": "eval/few"},
}


def _num(x) -> float | None:
    """JSON has no nan/inf: non-finite values become null (and stay visible in the text line)."""
    x = float(x)
    return x if math.isfinite(x) else None


def format_train_line(rec: dict) -> str:
    """The fixed-field text form of a train record (same fields, same order, every time)."""
    ep_w = len(str(rec["epochs"]))
    st_w = len(str(rec["steps"]))
    return (f"epoch {rec['epoch']:>{ep_w}}/{rec['epochs']} step {rec['step']:>{st_w}}/{rec['steps']} | "
            f"ce {rec['ce']:.4f} | scl {rec['scl']:.4f} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
            f"{rec['img_per_s']:8.1f} img/s | data wait {100.0 * rec['data_wait']:5.1f}%" + _extra_fields(rec))


def _extra_fields(rec: dict) -> str:
    """The optional tail of a train line: training accuracy, then the label diagnostics."""
    out = ""
    if rec.get("train_acc") is not None:
        out += f" | acc {rec['train_acc']:5.1f}%"
    if rec.get("gamma") is not None:
        out += (f" | γ {rec['gamma']:.2e} ‖ŷ−y‖₁ {rec['label_l1']:.2e} argmax changed "
                f"{100.0 * rec['argmax_changed']:.1f}% top-K outside {{a,b}} {100.0 * rec['topk_outside']:.1f}%")
    return out


def format_metrics(m: dict) -> str:
    """'overall 61.20 | many 80.00 | medium 59.10 | few 40.00' ('—' for a group with no class)."""
    def value(v) -> str:
        return "—" if v is None or math.isnan(v) else f"{v:.2f}"

    return " | ".join(f"{k} {value(m[k])}" for k in ("overall", "many", "medium", "few"))


class RunLogger:
    """Rank-0 logger of one run. ``run_dir`` None logs to stdout only."""

    def __init__(self, run_dir: str | Path | None, rank: int = 0, *, progress_bar: bool = True,
                 stream: IO[str] | None = None, tensorboard: bool = False):
        self.enabled = rank == 0
        self.stream = stream or sys.stdout
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._jsonl = self._text = None
        self._bar = None
        self._want_bar = progress_bar and self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        if self.enabled and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Line-buffered appends: a resumed run continues the same files, and a crash loses
            # at most the line being written.
            self._jsonl = open(self.run_dir / "log.jsonl", "a", buffering=1, encoding="utf-8")
            self._text = open(self.run_dir / "train.log", "a", buffering=1, encoding="utf-8")
        self._tb = None
        self._want_tb = tensorboard and self.enabled and self.run_dir is not None

    # -- output ----------------------------------------------------------------------

    def _emit(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
        if self._text is not None:
            self._text.write(line + "\n")

    def _writer(self, step: int):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # Opened at the launch's first record: a resumed run replays the steps after its checkpoint,
            # and purge_step hides what an earlier launch of this run wrote from that step on.
            self._tb = SummaryWriter(log_dir=str(self.run_dir), flush_secs=30, purge_step=step)
        return self._tb

    def _scalars(self, kind: str, fields: dict) -> None:
        if not self._want_tb or "global_step" not in fields:
            return
        step = int(fields["global_step"])
        tb = self._writer(step)
        for key, tag in TB_TAGS[kind].items():
            v = fields.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                tb.add_scalar(tag, float(v), step)
                if kind == "eval" and isinstance(fields.get("epoch"), int):  # the same figure against epoch
                    tb.add_scalar(tag.replace("eval/", "eval_by_epoch/"), float(v), fields["epoch"])
        if kind == "eval":
            tb.flush()

    def text(self, tag: str, text: str, global_step: int) -> None:
        """A block of text in TensorBoard's Text tab (e.g. the resolved config), shown verbatim."""
        if self._want_tb:
            block = "\n".join("    " + line for line in text.splitlines())  # markdown code block: kept as is
            self._writer(global_step).add_text(tag, block, global_step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's hyper-parameters and final figures for TensorBoard's HParams tab, which
        compares runs side by side (``tensorboard --logdir runs``)."""
        if not self._want_tb:
            return
        values = {f"hparam/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        if values:
            self._writer(0).add_hparams(hparams, values, run_name="hparams")
            self._tb.flush()

    def _record(self, event: str, fields: dict) -> None:
        if self._jsonl is None:
            return
        rec = {"event": event, "time": round(time.time(), 3)}
        for k, v in fields.items():
            rec[k] = _num(v) if isinstance(v, float) else v
        self._jsonl.write(json.dumps(rec) + "\n")

    def info(self, msg: str, **fields) -> None:
        """A plain message (also recorded as an ``info`` event with any extra fields)."""
        if not self.enabled:
            return
        self._emit(msg)
        self._record("info", {"msg": msg, **fields})

    def event(self, event: str, msg: str, **fields) -> None:
        """A named event: printed as ``msg`` and recorded with ``fields`` under ``event``."""
        if not self.enabled:
            return
        self._emit(msg)
        self._record(event, {"msg": msg, **fields})
        if event == "eval":
            self._scalars("eval", fields)

    def train(self, rec: dict) -> None:
        """One log interval: keys epoch, epochs, step, steps, ce, scl, loss, lr, img_per_s, data_wait;
        optionally global_step (TensorBoard's step), train_acc and the label fields of
        ``fastlt.method.label_stats.interval_fields``."""
        if not self.enabled:
            return
        self._emit(format_train_line(rec))
        self._record("train", rec)
        self._scalars("train", rec)

    # -- progress bar ------------------------------------------------------------------

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if not self._want_bar:
            return
        from tqdm import tqdm

        self.close_bar()
        self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, leave=False,
                         dynamic_ncols=True)

    def advance_bar(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        for f in (self._jsonl, self._text, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._text = self._tb = None
        self._want_tb = False
