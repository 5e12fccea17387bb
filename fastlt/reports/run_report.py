"""What a training run tells its user at the start and leaves in its run directory at the end
(rank 0): the opening lines (model, data, ranks, pipeline, label schedule), ``metrics.json``,
the plots and per-class CSV (``fastlt.reports.plots``) and the closing line, which names the best
epoch and how often the run was evaluated (docs/design.md §1 "Evaluation").
"""
from __future__ import annotations

from pathlib import Path

from fastlt.files import json_text, write_text_atomic
from fastlt.reports.logger import format_metrics

__all__ = ["closing_line", "hparams_of", "opening_lines", "record_launch", "report_skipped_images", "write_final_report", "write_metrics_json",
           "write_plots"]


def record_launch(cfg, ds_config: dict, run_dir: Path, log, global_step: int, *, lineage: dict | None = None,
                  data=None) -> list[str]:
    """Rank 0, at every launch of a run: the resolved ``config.yaml`` (the launch before it kept in
    ``config_history/`` under its launch time when it differed), the generated ``ds_config.json``
    and the config as TensorBoard text; a run initialised from another run's checkpoint heads its
    config.yaml with that ``lineage``; the class map of a dataset with class names (``data``). Returns the changes against the previous launch, which are
    also logged, one warning line each, so that a continued run with another config is seen."""
    import yaml

    from fastlt.config.loader import config_to_dict
    from fastlt.training.resume import write_run_config

    changed = write_run_config(cfg, run_dir, lineage)
    if changed:
        log.event("config_changed", f"warning: config changed since the last launch of this run ({len(changed)} key(s); the earlier "
                             f"config is kept in {run_dir / 'config_history'}):", changed=changed)
        for line in changed:
            log.info(f"  config changed: {line}")
    write_text_atomic(run_dir / "ds_config.json", json_text(ds_config, indent=2))
    if data is not None and data.class_names is not None:
        from fastlt.data.folder import CLASS_MAP_FILE, write_class_map

        write_class_map(run_dir / CLASS_MAP_FILE, data.class_names, data.class_counts)
    log.text("config", yaml.safe_dump(config_to_dict(cfg), sort_keys=False), global_step)
    return changed


def hparams_of(cfg) -> dict:
    """The scalar hyper-parameters of a run, dotted (for TensorBoard's hparams plugin): every
    number, bool and string of the config, lists and mappings left out."""
    from fastlt.config.loader import config_to_dict

    def flat(tree: dict, prefix: str = ""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                yield f"{prefix}{k}", v

    return dict(flat(config_to_dict(cfg)))


def opening_lines(cfg, data, *, world_size: int, device: str, backend: str, steps: int, micro: int, run_dir: Path,
                  first_epoch: int) -> list[str]:
    """The run's description and when its ConCutMix labels switch on."""
    lines = [f"fastlt: {cfg.model.backbone} on {data.num_classes} classes, {len(data.train)} training images, "
             f"{world_size} rank(s) on {device}, {backend} pipeline, {steps} steps/epoch of {micro}/rank, "
             f"precision {cfg.deepspeed.precision}, ZeRO {cfg.deepspeed.zero_stage}; run directory {run_dir}"]
    warm, last = cfg.method.l_d_warm, cfg.optim.epochs - 1
    if warm >= last:
        lines.append(f"area (CutMix) labels throughout: method.l_d_warm={warm} reaches the last epoch ({last}), "
                     "so ConCutMix labels never switch on")
    elif first_epoch <= warm:
        lines.append(f"area (CutMix) labels for epochs {first_epoch}..{min(warm, last)}, ConCutMix labels from "
                     f"epoch {warm + 1} (method.l_d_warm)")
    return lines


def closing_line(cfg, final: dict, best: dict | None, history: list, train_time: float, run_dir: Path) -> str:
    """'final: ... | best epoch E (best of N evaluations, ...) | training time ... | run directory ...'."""
    n = len(history)
    cadence = (f"best of {n} evaluation(s), every {cfg.run.eval_every} epoch(s) and after the last"
               if cfg.run.eval_every > 1 else f"best of {n} evaluations, one per epoch")
    return (f"final: {format_metrics(final)} | best epoch {best['epoch'] if best else '-'} ({cadence}) | "
            f"training time {train_time:.1f} s | run directory {run_dir}")


def write_metrics_json(run_dir: Path, cfg, data, *, history: list, best: dict | None, train_time: float,
                       world_size: int, device: str, digests: list[str], lineage: dict | None = None) -> None:
    """``metrics.json``: final, best and every evaluation, the run's setting, the replicas' digests
    and, for a run initialised from another run's checkpoint, its ``lineage``."""
    out = {"final": history[-1] if history else {}, "best": best, "history": history, "epochs": cfg.optim.epochs,
           "train_time_s": round(train_time, 2), "world_size": world_size, "device": device,
           "num_classes": data.num_classes, "train_class_counts": [int(c) for c in data.class_counts],
           "run_dir": str(run_dir), "eval_every": cfg.run.eval_every,
           "evaluated_epochs": [h["epoch"] for h in history], "replica_digests": digests}
    if lineage:
        out["lineage"] = lineage
    write_text_atomic(run_dir / "metrics.json", json_text(out))


def write_plots(run_dir: Path, last_eval: dict, data, log) -> None:
    """The run's PNG plots and per-class CSV (``fastlt.reports.plots``). A plot that fails is reported, and
    the finished run (weights, metrics.json) stays as it is."""
    from fastlt.reports.plots import write_run_report

    try:
        paths = write_run_report(run_dir, last_eval, data.class_counts, data.class_names)
    except Exception as e:  # noqa: BLE001 - plotting must not turn a finished run into a failed one
        log.event("plots", f"plots not written: {type(e).__name__}: {e}", error=str(e))
        return
    log.event("plots", f"plots: {', '.join(p.name for p in paths)} in {run_dir}", files=[str(p) for p in paths])


def write_final_report(trainer, final: dict, digests: list[str]) -> None:
    """Rank 0, after the last epoch: ``last.pt``, ``metrics.json`` (with the run's lineage and the
    replicas' weight digests), the plots and the TensorBoard hparams of ``trainer``'s run."""
    from fastlt.training.checkpoint import save_weights
    from fastlt.training.signals import pause_point

    t = trainer
    save_weights(t.run_dir / "last.pt", t.engine.module,
                 {"epoch": t.cfg.optim.epochs - 1, "metrics": final, "signature": t.signature})
    pause_point("report", t.stop)
    write_metrics_json(t.run_dir, t.cfg, t.data, history=t.history, best=t.best, train_time=t.train_time,
                       world_size=t.world_size, device=t.device, digests=digests, lineage=t.plan.target.lineage)
    write_plots(t.run_dir, t.last_eval, t.data, t.log)
    t.log.hparams(hparams_of(t.cfg), {"final_overall": final.get("overall"),
                                      "best_overall": (t.best or {}).get("overall")})


def report_skipped_images(log, stats: dict, epoch: int, rank: int) -> None:
    """One event per epoch for the training images ``data.on_error: skip`` replaced (pipeline stats)."""
    if n := stats["skipped_images"]:
        first = stats["skipped_files"][0]
        log.event("skipped_images", f"epoch {epoch}: replaced {n} unreadable training image(s) (rank {rank}) by "
                  f"images of the same class (data.on_error: skip); first: {first}", epoch=epoch, skipped_images=n,
                  first=first)
