"""``fastlt profile``: training steps of a run under ``torch.profiler``, and what they cost.

The run is built by the trainer itself (:meth:`fastlt.training.trainer.Trainer.setup`: the same process
group, model, DeepSpeed engine, objective and training pipeline as ``fastlt train``, in the run
directory ``<run.output_dir>/<run.name>-profile``). ``warmup`` steps run first, unrecorded
(cuDNN autotuning, compilation, the pipeline's first batches); then ``steps`` steps of
:func:`fastlt.method.objective.train_step` are recorded, each fetching its batch from the real pipeline
(range ``fastlt::data``) and training on it (range ``fastlt::train_step``, inside which the step
names its parts ``fastlt::forward`` / ``objective`` / ``backward`` / ``optimizer_step``), in one
label phase: ``rectified`` (the ConCutMix label, epochs after ``method.l_d_warm``; the default) or
``area`` (the CutMix warm-up).

Written into the output folder (default ``<run dir>/profile``): ``trace.json`` (Chrome /
Perfetto trace), the same trace as ``fastlt.<time>.pt.trace.json`` for TensorBoard's profiler
plugin (``tensorboard --logdir <folder>``; a new profile replaces the previous one there) and
``summary.json``. The launches and host syncs per step come from
:func:`fastlt.kernels.testing.analyse_events` (CUDA kernel events on a GPU, the operator proxy on
CPU); on a GPU the recorded steps also run under ``torch.cuda.set_sync_debug_mode("warn")``, and
the synchronising calls it reports are counted.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import warnings
from pathlib import Path

from fastlt.errors import ConfigError

__all__ = ["PHASES", "default_run_dir", "format_report", "phase_epochs", "profile_run", "quiet_kineto"]

#: Label phases a profile can record.
PHASES = ("area", "rectified")
TRACE_FILE, SUMMARY_FILE, TB_WORKER = "trace.json", "summary.json", "fastlt"
DATA_RANGE, STEP_RANGE = "fastlt::data", "fastlt::train_step"
STEP_PARTS = ("forward", "objective", "backward", "optimizer_step")
#: libkineto's log threshold for a profile: above all its severities. Its highest, USDT, marks
#: every profiler start and stop with a "USDT:... SyncActivityProfilerHandler.cpp] profiler_start"
#: line on stderr even at the ERROR threshold (5); its ERROR lines ("gpuGetDeviceCount failed"
#: on a machine without a GPU) are not fastlt's to show either: a CUDA run that recorded nothing
#: is reported by the summary.
KINETO_QUIET_LEVEL = "99"


def quiet_kineto() -> None:
    """Silence libkineto's console lines (see KINETO_QUIET_LEVEL), unless KINETO_LOG_LEVEL is set.

    libkineto reads the variable when the profiler first starts, so this works after torch is
    imported too; ``fastlt profile`` calls it before torch loads all the same."""
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET_LEVEL)


def phase_epochs(cfg, phase: str) -> range:
    """The epochs of ``cfg`` that train in ``phase``; a ConfigError when there are none."""
    if phase not in PHASES:
        raise ConfigError(f"--phase: must be one of {', '.join(PHASES)}; got {phase!r}")
    warm, epochs = cfg.method.l_d_warm, cfg.optim.epochs
    if phase == "rectified":
        found = range(warm + 1, epochs)
        if not found:
            raise ConfigError(f"--phase rectified: this run never reaches ConCutMix labels (method.l_d_warm={warm} "
                              f"keeps area labels through the last epoch, {epochs - 1}); profile --phase area, or "
                              f"--set method.l_d_warm=N with N < {epochs - 1}")
    else:
        found = range(0, min(warm + 1, epochs))
        if not found:
            raise ConfigError(f"--phase area: method.l_d_warm={warm} rectifies from the first epoch, so no epoch "
                              "trains on area labels; profile --phase rectified")
    return found


def default_run_dir(cfg) -> Path:
    """``<run.output_dir>/<run.name>-profile``: a profile never writes into the training run's folder."""
    return Path(cfg.run.output_dir) / f"{cfg.run.name}-profile"


def profile_run(cfg, *, steps: int = 5, warmup: int = 3, phase: str = "rectified", out=None,
                top: int = 15) -> dict:
    """Profile ``steps`` training steps of ``cfg`` after ``warmup`` unrecorded ones (see the module
    docstring); writes the trace files and ``summary.json``, returns the summary."""
    for name, value, least in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--top", top, 1)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{name}: must be an integer >= {least}; got {value!r}")
    epochs = phase_epochs(cfg, phase)
    quiet_kineto()
    from fastlt.training import distributed as dist

    world = dist.process_info().world_size
    if world > 1:
        raise ConfigError(f"fastlt profile records one process; this one is a rank of a world of {world} "
                          "(run it without a launcher)")
    from fastlt.training.trainer import Trainer

    run_dir = default_run_dir(cfg)
    trainer = Trainer(cfg, run_dir=run_dir, command="fastlt profile")
    try:
        trainer.setup()
        return _profile(trainer, epochs, steps, warmup, phase, Path(out) if out else run_dir / "profile", top)
    finally:
        trainer.close()


def _batches(trainer, epochs: range):
    """(epoch, batch) from the trainer's pipeline, epoch after epoch of the phase (from its first
    again after its last), at each epoch's learning rate."""
    for epoch in itertools.cycle(epochs):
        trainer.schedule.apply(trainer.engine.optimizer, epoch)
        it = trainer.pipeline.epoch(epoch, 0)
        n = 0
        try:
            for _, batch in zip(range(trainer.steps_per_epoch), it):
                n += 1
                yield epoch, batch
        finally:
            it.close()
        if n == 0:
            raise RuntimeError(f"the {trainer.backend} pipeline yielded no batch for epoch {epoch}")


def _is_sync_warning(w) -> bool:
    return "synchroniz" in str(w.message)


@contextlib.contextmanager
def _sync_debug(cuda: bool):
    """On CUDA: ``set_sync_debug_mode("warn")`` for the block; yields the list the warnings are
    recorded in as they come (the others are shown as usual afterwards)."""
    import torch

    if not cuda:
        yield []
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if not _is_sync_warning(w):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _profile(trainer, epochs: range, steps: int, warmup: int, phase: str, out: Path, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    from fastlt.kernels.testing import analyse_events, event_windows
    from fastlt.method.objective import train_step

    cuda = trainer.dev.type == "cuda"
    rectify = phase == "rectified"
    batches = _batches(trainer, epochs)
    used: list[int] = []

    def fetch():
        with record_function(DATA_RANGE):
            epoch, batch = next(batches)
        if epoch not in used:
            used.append(epoch)
        return batch

    def step(batch):
        with record_function(STEP_RANGE):
            return train_step(trainer.engine, trainer.objective, batch, rectify=rectify)

    trainer.engine.train()
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(fetch())
        if cuda:
            torch.cuda.synchronize(trainer.dev)
        warm_s = time.perf_counter() - t0
        results, warned = [], {"data_fetch": [], "step": []}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the warm-up steps ran above, outside the profiler
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            steps_only = schedule(wait=0, warmup=0, active=steps)
        with profile(activities=activities, schedule=steps_only) as prof:
            with _sync_debug(cuda) as caught:
                for i in range(steps):
                    if i:
                        prof.step()
                    before = len(caught)
                    batch = fetch()
                    warned["data_fetch"].append(sum(map(_is_sync_warning, caught[before:])))
                    before = len(caught)
                    results.append(step(batch))
                    warned["step"].append(sum(map(_is_sync_warning, caught[before:])))
            if cuda:
                torch.cuda.synchronize(trainer.dev)  # outside the step ranges: not counted as the step's
        wall_s = time.perf_counter() - t0
    finally:
        batches.close()
    warned["where"] = list(dict.fromkeys(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                         if _is_sync_warning(w)))[:10]
    events = prof.events()
    step_windows, data_windows = event_windows(events, STEP_RANGE), event_windows(events, DATA_RANGE)
    if len(step_windows) != steps or len(data_windows) != steps:
        raise RuntimeError(f"profile: expected {steps} {STEP_RANGE} and {DATA_RANGE} ranges, found "
                           f"{len(step_windows)} and {len(data_windows)}")
    per_step = analyse_events(events, step_windows, cuda=cuda)
    per_fetch = analyse_events(events, data_windows, cuda=cuda) if cuda else None
    files = _write_traces(prof, out)
    if cuda and not any(e.device_type == torch.autograd.DeviceType.CUDA for e in events):
        warnings.warn("fastlt profile: no CUDA event was recorded (is CUPTI available to this process? "
                      "KINETO_LOG_LEVEL=0 shows the profiler's own messages)", RuntimeWarning, stacklevel=2)
    values = torch.stack(results).float().cpu()
    averages = prof.key_averages()
    summary = {
        "run_dir": str(trainer.run_dir), "device": str(trainer.dev),
        "gpu": torch.cuda.get_device_name(trainer.dev) if cuda else None, "backend": trainer.backend,
        "backbone": trainer.cfg.model.backbone, "batch_per_rank": trainer.ds_config["train_micro_batch_size_per_gpu"],
        "precision": trainer.cfg.deepspeed.precision, "phase": phase, "epochs": used, "steps": steps, "warmup": warmup,
        "warmup_ms_per_step": round(1e3 * warm_s / warmup, 3) if warmup else None,
        "profiled_ms_per_step": round(1e3 * wall_s / steps, 3),
        "loss_mean": dict(zip(("loss", "ce", "scl"), values[:, :3].mean(dim=0).tolist())),
        "launches": _launches(per_step, cuda),
        "host_syncs": _syncs(per_step, per_fetch, warned, cuda),
        "phases_host_ms_per_step": _range_times(events, steps),
        "top": _top(averages, steps, top, device=cuda),
        "top_cpu": _top(averages, steps, top, device=False) if cuda else None,
        "files": {k: str(v) for k, v in files.items()},
    }
    from fastlt.files import write_text_atomic

    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def _launches(per_step: list[dict], cuda: bool) -> dict:
    counts = [s["launches"] for s in per_step]
    out = {"method": per_step[0]["method"], "per_step": counts, "mean": sum(counts) / len(counts),
           "triton_per_step": [s["triton"] for s in per_step],
           "measured": "CUDA kernel events launched in the step" if cuda else
           "CPU proxy: outermost working aten operators + fastlt Triton launches (not a GPU measurement)"}
    if cuda:
        out["memory_ops_per_step"] = [s["memory_ops"] for s in per_step]
        out["unlinked_kernels_per_step"] = [s["unlinked_kernels"] for s in per_step]
    return out


def _syncs(per_step: list[dict], per_fetch: list[dict] | None, warned: dict, cuda: bool) -> dict:
    import collections

    out = {"per_step": [s["host_syncs"] for s in per_step],
           "scalar_reads_per_step": [s["scalar_reads"] for s in per_step]}
    out["total"] = sum(out["per_step"])
    out["sites"] = dict(sum((collections.Counter(s["sync_sites"]) for s in per_step), collections.Counter()))
    if cuda:
        out["measured"] = ("cudaStreamSynchronize / cudaDeviceSynchronize calls in the step (any thread) + scalar "
                           "reads that made none")
        out["sync_calls_per_step"] = [s["sync_calls"] for s in per_step]
        out["data_fetch_per_step"] = [s["host_syncs"] for s in per_fetch]
        out["sync_debug_warnings"] = {"step": warned["step"], "data_fetch": warned["data_fetch"],
                                      "total": sum(warned["step"]) + sum(warned["data_fetch"]),
                                      "where": warned["where"]}
    else:
        out["measured"] = ("CPU proxy: scalar reads (.item(), int(), bool(), value-sized operators) in the step; "
                           "each is a sync on a GPU where the code reads there too (some checks read CPU tensors only)")
    return out


def _range_times(events, steps: int) -> dict:
    """Host time per step of fastlt's ranges (wall time of the range on the CPU)."""
    from torch.autograd import DeviceType

    names = [DATA_RANGE, STEP_RANGE] + [f"fastlt::{p}" for p in STEP_PARTS]
    total = dict.fromkeys(names, 0.0)
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in total:
            total[e.name] += e.time_range.elapsed_us()
    return {name.split("::", 1)[1]: round(us / 1e3 / steps, 3) for name, us in total.items()}


def _top(averages, steps: int, rows: int, *, device: bool) -> list[dict]:
    """The ``rows`` operators (CPU) or kernels (``device``: CUDA) with the most self time."""
    from torch.autograd import DeviceType

    if device:
        entries = [a for a in averages if a.device_type == DeviceType.CUDA and not a.is_user_annotation]
        self_us = [a.self_device_time_total for a in entries]
    else:
        entries = [a for a in averages if a.device_type == DeviceType.CPU and not a.key.startswith("ProfilerStep#")]
        self_us = [a.self_cpu_time_total for a in entries]
    total = sum(self_us) or 1.0
    ranked = sorted(zip(self_us, entries), key=lambda p: -p[0])[:rows]
    return [{"name": a.key, "self_ms_per_step": round(us / 1e3 / steps, 4), "self_pct": round(100 * us / total, 2),
             "calls_per_step": round(a.count / steps, 2)} for us, a in ranked]


def _write_traces(prof, out: Path) -> dict:
    """trace.json and the TensorBoard plugin's file (one trace under two names: a hard link where
    the file system allows, else a copy), replacing an older profile's."""
    import os
    import shutil

    from torch.profiler import tensorboard_trace_handler

    out.mkdir(parents=True, exist_ok=True)
    trace = out / TRACE_FILE
    for old in [*out.glob(f"{TB_WORKER}.*.pt.trace.json"), trace]:
        old.unlink(missing_ok=True)
    tensorboard_trace_handler(str(out), worker_name=TB_WORKER)(prof)
    written = sorted(out.glob(f"{TB_WORKER}.*.pt.trace.json"))
    if len(written) != 1:
        raise RuntimeError(f"profile: expected one TensorBoard trace in {out}, found {len(written)}")
    try:
        os.link(written[0], trace)
    except OSError:
        shutil.copyfile(written[0], trace)
    return {"trace": trace, "tensorboard": written[0], "summary": out / SUMMARY_FILE}


def _table(rows: list[dict], what: str) -> list[str]:
    lines = [f"top {len(rows)} {what} (per profiled step)", f"  {'self ms':>10} {'self %':>7} {'calls':>7}  name"]
    for r in rows:
        lines.append(f"  {r['self_ms_per_step']:>10.3f} {r['self_pct']:>6.1f}% {r['calls_per_step']:>7.1f}  "
                     f"{r['name']}")
    return lines


def format_report(s: dict) -> str:
    """What ``fastlt profile`` prints: the run, the top table(s), phases, launches and syncs per step."""
    cuda = s["gpu"] is not None
    lines = [f"fastlt profile: {s['backbone']} on {s['gpu'] or s['device']}, {s['backend']} pipeline, "
             f"batch {s['batch_per_rank']}, {s['precision']}; {s['phase']} labels (epoch "
             f"{', '.join(map(str, s['epochs']))}); {s['warmup']} warm-up + {s['steps']} profiled steps, "
             f"{s['profiled_ms_per_step']:.1f} ms/step under the profiler"
             + (f" ({s['warmup_ms_per_step']:.1f} ms/step in the warm-up)" if s["warmup_ms_per_step"] else ""), ""]
    lines += _table(s["top"], "CUDA kernels and memory copies by CUDA self time" if cuda else
                    "operators by CPU self time, data fetch included")
    if cuda:
        lines += [""] + _table(s["top_cpu"], "operators by CPU self time (host side)")
    p = s["phases_host_ms_per_step"]
    lines += ["", f"host ms per step: data {p['data']:.2f} | train_step {p['train_step']:.2f} = "
              + " + ".join(f"{k} {p[k]:.2f}" for k in STEP_PARTS) + " (+ the rest)"]
    la, hs = s["launches"], s["host_syncs"]
    spread = f"min {min(la['per_step'])}, max {max(la['per_step'])}"
    lines.append(f"kernel launches per step: {la['mean']:.0f} ({spread}; fastlt Triton launches "
                 f"{max(la['triton_per_step'])}) — {la['measured']}")
    if cuda and any(la["unlinked_kernels_per_step"]):
        lines.append("  plus kernels with no PyTorch launch site per step (e.g. DALI's): "
                     f"{la['unlinked_kernels_per_step']}")
    lines.append(f"host-device syncs in the step: {hs['total']} over {s['steps']} steps {hs['per_step']} — "
                 f"{hs['measured']}")
    if hs["sites"]:
        lines.append("  where: " + "; ".join(f"{site} ×{n}" for site, n in hs["sites"].items()))
    if cuda:
        sd = hs["sync_debug_warnings"]
        lines.append(f"  sync calls in the data fetch per step: {hs['data_fetch_per_step']}; "
                     f"set_sync_debug_mode('warn') warnings: {sum(sd['step'])} in the steps, "
                     f"{sum(sd['data_fetch'])} in the data fetch"
                     + (f" (at {', '.join(sd['where'])})" if sd["where"] else ""))
    f = s["files"]
    lines += ["", f"trace (Chrome / Perfetto: ui.perfetto.dev): {f['trace']}",
              f"TensorBoard profile: {f['tensorboard']} (tensorboard --logdir {Path(f['trace']).parent.parent})",
              f"summary: {f['summary']}"]
    return "\n".join(lines)
