"""The ConCutMix + BCL trainer on a DeepSpeed engine (ARCHITECTURE §1 "Losses", §2 recipes,
§3 "Distributed").

Launch::

    python -m fastlt.train --config configs/demo.yaml [--set key=value ...] [--resume auto|PATH]
    deepspeed --num_gpus 8 --module fastlt.train --config configs/imagenet_lt_resnext50_90ep.yaml
    deepspeed --hostfile hosts --module fastlt.train --config ...       # several nodes

Every run, even a single CPU process, goes through ``deepspeed.initialize`` (gloo on CPU with
``DS_ACCELERATOR=cpu``, NCCL on GPUs); precision, ZeRO stage, gradient accumulation and
clipping come from the ``deepspeed`` section of the config.

One step (ARCHITECTURE §1):

1. one forward pass over cat[view 0 (CutMix applied), view 1, view 2] (3B images);
2. L_BalSCL on the normalised z of views 1 and 2, stacked (B, 2, D), with the background
   labels and the normalised class centers;
3. L_cls = logit-adjusted CE on the logits of the first B images, with the area label
   λ·onehot(a) + (1−λ)·onehot(b) while epoch ≤ l_d_warm (the same as λ·CE(a) + (1−λ)·CE(b)),
   and with the rectified ConCutMix label of the mixed samples after that, computed from the
   detached unnormalised z and centers;
4. L = α·L_cls + β·L_BalSCL, backward and SGD step through the engine.

The learning rate is set once per epoch (linear warm-up, then cosine to 0 or ×gamma at
milestones). The host waits for the device only at log intervals, epoch ends, evaluation
and checkpoints: per-step losses are kept in a device buffer and read in one copy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a CPU shared with
# data workers, other ranks or other jobs, spinning threads steal the cores the busy ones need
# (measured here: a ResNet-32 step 4-5× slower in wall time under load). Set it to ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from fastlt.checkpoint import (CheckpointError, CheckpointManager, install_safe_checkpoint_engine, model_signature,
                               save_weights)
from fastlt.config import Config, ConfigError, config_to_dict, load_config, save_config
from fastlt.logger import RunLogger, format_metrics

__all__ = ["DataError", "EpochLR", "NonFiniteLossError", "TrainingInterrupted", "ConCutMixObjective",
           "build_datasets", "deepspeed_config", "main", "train", "train_step"]


class DataError(ValueError):
    """The data the config points at is missing or does not fit the config."""


class NonFiniteLossError(RuntimeError):
    """The loss became nan/inf; training stopped before anything was saved from that state."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C / SIGTERM: a checkpoint of the current position was written and training stopped."""


# --------------------------------------------------------------------------------------
# Environment: device, DeepSpeed accelerator, process group
# --------------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    """run.device -> "cpu" or "cuda" (auto: CUDA when available)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' was requested but no CUDA device is available; "
                          "use run.device=cpu (or auto)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_process_env(device: str) -> None:
    """Set what DeepSpeed reads from the environment before it is imported."""
    if device == "cpu":
        if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
            raise ConfigError(f"run.device is cpu but DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}; "
                              "unset DS_ACCELERATOR or set run.device to match")
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    # A plain `python -m fastlt.train` is a world of one; the deepspeed launcher sets these.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _local_world_size() -> int:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def _init_distributed(device: str) -> tuple[int, int, int]:
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute, once
    # per machine); gloo does the same job for fastlt's CPU runs, which are for development
    # and CI. FASTLT_DS_SHM_COMM=1 keeps DeepSpeed's op.
    if device == "cpu" and os.environ.get("FASTLT_DS_SHM_COMM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)  # before NCCL comes up, so each rank binds its own GPU
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; without this each would spawn one thread per core.
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // _local_world_size()))
    return rank, world, local_rank


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class Datasets:
    train: object
    val: object
    test: object | None
    num_classes: int
    class_counts: np.ndarray


def _check_num_classes(cfg: Config, found: int, source: str) -> None:
    if cfg.data.num_classes and cfg.data.num_classes != found:
        raise DataError(f"data.num_classes is {cfg.data.num_classes}, but {source} has {found} classes; "
                        f"set data.num_classes={found} (or 0 to take it from the dataset)")


def _list_dataset(cfg: Config, key: str, *, train: bool):
    from fastlt.data import LongTailedList

    path = cfg.data.path(key)
    if not path.is_file():
        raise DataError(f"data.{key}: list file {path} does not exist (data.root={cfg.data.root!r}); "
                        f"point data.root at the dataset folder and data.{key} at its list file")
    try:
        return LongTailedList(cfg.data.root, path, cfg.data.num_classes, require_all_classes=train)
    except ValueError as e:
        raise DataError(f"data.{key}: {e}") from None


def build_datasets(cfg: Config, *, rank: int = 0, local_rank: int = 0, need_train: bool = True) -> Datasets:
    """The train/val(/test) datasets of the config, with errors that name the config key."""
    d = cfg.data
    root = Path(d.root)
    if d.kind == "synthetic":
        from fastlt.data import LongTailedList, make_synthetic_lt

        s = d.synthetic
        args = dict(num_classes=s.num_classes, imb_factor=s.imb_factor, n_max=s.n_max, image_size=s.image_size,
                    seed=s.seed, n_val=s.n_val)
        # Generated once per machine (local rank 0) and cached; the others wait, then reuse it.
        if local_rank == 0:
            made = make_synthetic_lt(root, **args)
        _barrier()
        if local_rank != 0:
            made = make_synthetic_lt(root, **args)
        _check_num_classes(cfg, made.num_classes, f"the synthetic dataset (data.synthetic.num_classes)")
        train = LongTailedList(made.root, made.train_list, made.num_classes)
        val = LongTailedList(made.root, made.val_list, made.num_classes, require_all_classes=False)
        return Datasets(train, val, None, made.num_classes, np.asarray(train.class_counts))
    if d.kind == "cifar":
        from fastlt.data import cifar_lt

        if not root.is_dir():
            raise DataError(f"data.root: {root} does not exist; it must hold the extracted "
                            f"{'cifar-10-batches-py' if d.cifar == 'cifar10' else 'cifar-100-python'} folder")
        try:
            train = cifar_lt(root, d.cifar, d.imb_factor, d.imb_type, train=True, seed=cfg.run.seed)
            val = cifar_lt(root, d.cifar, d.imb_factor, d.imb_type, train=False, seed=cfg.run.seed)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data ({d.cifar}): {e}") from None
        _check_num_classes(cfg, train.num_classes, d.cifar)
        return Datasets(train, val, None, train.num_classes, np.asarray(train.class_counts))
    # kind == "list"
    if not root.is_dir():
        raise DataError(f"data.root: {root} does not exist; point it at the folder the paths in "
                        f"{d.train_list} are relative to (e.g. --set data.root=/datasets/ImageNet)")
    train = _list_dataset(cfg, "train_list", train=True) if need_train else None
    val = _list_dataset(cfg, "val_list", train=False)
    test = _list_dataset(cfg, "test_list", train=False) if d.test_list else None
    if train is None:
        return Datasets(None, val, test, d.num_classes, np.zeros(d.num_classes, dtype=np.int64))
    return Datasets(train, val, test, train.num_classes, np.asarray(train.class_counts))


def normalization(cfg: Config) -> tuple[tuple, tuple]:
    from fastlt.pipelines.batch import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD

    return {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inat": (INAT_MEAN, INAT_STD),
            "cifar": (CIFAR_MEAN, CIFAR_STD)}[cfg.data.normalization]


def val_spec(cfg: Config, dataset, *, rank: int, world_size: int, device: str):
    from fastlt.pipelines import ValPipelineSpec

    mean, std = normalization(cfg)
    return ValPipelineSpec(dataset=dataset, recipe=cfg.data.augment_recipe, image_size=cfg.data.image_size,
                           batch_size=cfg.data.eval_batch_size, rank=rank, world_size=world_size, mean=mean,
                           std=std, num_workers=cfg.pipeline.num_workers, device=device, on_error=cfg.data.on_error)


# --------------------------------------------------------------------------------------
# Model, DeepSpeed config, schedule, objective
# --------------------------------------------------------------------------------------


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    from fastlt.models import BCLModel

    return BCLModel(cfg.model.backbone, num_classes, feat_dim=cfg.model.feat_dim, use_norm=cfg.model.use_norm,
                    hidden_dim=cfg.model.hidden_dim, **cfg.model.backbone_kwargs)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's config dict, built from ours (the only place DeepSpeed settings come from)."""
    ds = cfg.deepspeed
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the number of ranks "
                          f"({world_size}); it is the global batch per micro-step")
    micro = cfg.data.batch_size // world_size
    out: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": micro * ds.grad_accum_steps * world_size,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        # SGD is a client optimizer; ZeRO supports it, DeepSpeed only wants it acknowledged.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # fastlt logs itself
        "wall_clock_breakdown": False,
    }
    if ds.precision != "fp32":
        dtype = "bfloat16" if ds.precision == "bf16" else "float16"
        if ds.autocast:
            out["torch_autocast"] = {"enabled": True, "dtype": dtype}
        elif ds.precision == "bf16":
            out["bf16"] = {"enabled": True}
        else:
            out["fp16"] = {"enabled": True, "initial_scale_power": ds.loss_scale_power, "loss_scale": 0}
        if not ds.autocast:
            # The whole model in low precision, BatchNorm statistics included: DeepSpeed would
            # otherwise leave buffers fp32, which BatchNorm's CPU kernels refuse next to bf16 inputs.
            out["data_types"] = {"buffer_dtype": "bf16" if ds.precision == "bf16" else "fp16"}
    _merge(out, ds.extra)
    return out


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


class EpochLR:
    """The per-epoch learning rate of ARCHITECTURE §2 (the BCL reference's adjust_learning_rate):
    epoch e < warmup: lr·(e+1)/warmup; then cos: lr·½(1 + cos(π(e − warmup + 1)/(epochs − warmup + 1)));
    step: lr·gamma^(number of milestones ≤ e)."""

    def __init__(self, optim_cfg):
        self.cfg = optim_cfg
        self.last_epoch = -1

    def lr_at(self, epoch: int) -> float:
        c = self.cfg
        if epoch < c.warmup_epochs:
            return c.lr * (epoch + 1) / c.warmup_epochs
        if c.schedule == "cos":
            return c.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - c.warmup_epochs + 1) /
                                                (c.epochs - c.warmup_epochs + 1)))
        return c.lr * c.gamma ** sum(1 for m in c.milestones if epoch >= m)

    def apply(self, optimizer, epoch: int) -> float:
        lr = self.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_epoch = epoch
        return lr

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lr": self.cfg.lr, "schedule": self.cfg.schedule}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])


class ConCutMixObjective(nn.Module):
    """L = α·LA-CE(logits of view 0, label) + β·BalSCL(views 1, 2) (ARCHITECTURE §1)."""

    def __init__(self, cfg: Config, class_counts):
        super().__init__()
        from fastlt.losses import BalancedSupConLoss, LogitAdjustedCrossEntropy

        m = cfg.method
        self.method = m
        self.ce = LogitAdjustedCrossEntropy(class_counts, m.tau)
        self.scl = BalancedSupConLoss(class_counts, m.temperature)
        self.register_buffer("class_counts", torch.as_tensor(np.asarray(class_counts), dtype=torch.float64),
                             persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    def forward(self, out, batch, *, rectify: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, ce, scl) for a model output over cat[image, view1, view2] and its TrainBatch."""
        from fastlt.labels import area_label, rectify_labels

        m = self.method
        b = batch.label_a.shape[0]
        logits = out.logits[:b]
        features = torch.stack([out.z[b:2 * b], out.z[2 * b:]], dim=1).float()
        scl = self.scl(out.centers.float(), features, batch.label_a)
        target = area_label(batch.label_a, batch.label_b, batch.lam, self.num_classes)
        if rectify:
            rect = rectify_labels(out.z_raw[:b].detach(), out.centers_raw.detach(), batch.label_a, batch.label_b,
                                  batch.lam, self.class_counts, topk=m.topk, omega=m.omega,
                                  normalize=m.label_normalize, temperature=m.label_temperature)
            # Only mixed samples get the ConCutMix label; an unmixed one keeps its one-hot label
            # (torch.where, not boolean indexing: no host sync).
            target = torch.where(batch.mixed[:, None], rect, target)
        ce = self.ce(logits, target)
        loss = m.alpha * ce + m.beta * scl
        return loss, ce, scl


def train_step(engine, objective: ConCutMixObjective, batch, *, rectify: bool, channels_last: bool = False,
               input_dtype: torch.dtype | None = None) -> Tensor:
    """One training step (steps 1–4 of the module docstring) on a TrainBatch already on the device.

    ``engine`` is the DeepSpeed engine, or anything with its three calls (``engine(x)``,
    ``engine.backward(loss)``, ``engine.step()``: bench/bench_train_step.py runs the step on a
    plain optimizer where DeepSpeed is not installed). Returns the detached (loss, ce, scl) as a
    float32 (3,) tensor on the device; nothing here waits for the device.
    """
    x = torch.cat([batch.image, batch.view1, batch.view2])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if input_dtype is not None:
        x = x.to(input_dtype)
    out = engine(x)
    loss, ce, scl = objective(out, batch, rectify=rectify)
    engine.backward(loss)
    engine.step()
    return torch.stack([loss.detach(), ce.detach(), scl.detach()]).float()


# --------------------------------------------------------------------------------------
# Stop requests (Ctrl-C / SIGTERM)
# --------------------------------------------------------------------------------------


class StopFlag:
    """First SIGINT/SIGTERM: finish the current step (or the checkpoint being written), save,
    exit. A second SIGINT aborts at once; files already saved are complete either way."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A forked data-loader worker inherits this handler. A terminal's Ctrl-C reaches the
            # whole process group, and the deepspeed launcher terminates process trees: workers
            # ignore both and keep serving until the main process has saved and shuts them down.
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\nfastlt: {self.signal_name} received: stopping after the current step and saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test helper thread)
                pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        return False


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


def _all_reduce_max(flags: list[bool], device: str) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (a no-op for a single process)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]  # host sync (epoch ends and log intervals only)


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in new:
        if isinstance(new[k], dict) and isinstance(old.get(k), dict):
            out += _config_diff(old[k], new[k], f"{prefix}{k}.")
        elif old.get(k) != new[k]:
            out.append(f"{prefix}{k}: {old.get(k)!r} -> {new[k]!r}")
    return out


class Trainer:
    """One training run of a :class:`Config` (see the module docstring)."""

    def __init__(self, cfg: Config, *, resume: str | None = None, run_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self.resume = resume
        self.device = resolve_device(cfg.run.device)
        _prepare_process_env(self.device)
        self.rank, self.world_size, self.local_rank = _init_distributed(self.device)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run.output_dir) / cfg.run.name
        self.stop = StopFlag()

    # -- setup -----------------------------------------------------------------------

    def _setup(self) -> None:
        import deepspeed

        cfg = self.cfg
        if cfg.run.deterministic:
            if self.device == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device == "cuda":
            torch.backends.cudnn.benchmark = True
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.run.keep_last, rank=self.rank,
                                      local_rank=self.local_rank, world_size=self.world_size)
        self.resume_from = self._resolve_resume()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        self.log = RunLogger(self.run_dir, self.rank, progress_bar=cfg.run.progress_bar)
        self._save_resolved_config()

        if cfg.data.kind == "synthetic":
            self.log.info(f"synthetic dataset in {cfg.data.root} (generated on first use, then reused from there)")
        self.data = build_datasets(cfg, rank=self.rank, local_rank=self.local_rank)
        num_classes = self.data.num_classes
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DeepSpeed also broadcasts)
        model = build_model(cfg, num_classes)
        self.signature = model_signature(model, cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                    weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
        self.ds_config = deepspeed_config(cfg, self.world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        install_safe_checkpoint_engine(self.engine)
        if cfg.model.channels_last:
            # After initialize: DeepSpeed broadcasts parameters as byte views, which needs them
            # contiguous. Parameters keep their identity (only .data changes), so the optimizer
            # still holds them; the config allows this only without ZeRO / DeepSpeed bf16-fp16 mode,
            # whose flat buffers must stay contiguous.
            self.engine.module.to(memory_format=torch.channels_last)
        self.dev = torch.device(self.device, self.local_rank) if self.device == "cuda" else torch.device("cpu")
        # DeepSpeed's bf16/fp16 modes hold low-precision weights, so inputs must match; autocast and
        # fp32 take fp32 inputs.
        ds = cfg.deepspeed
        self.input_dtype = None
        if ds.precision != "fp32" and not ds.autocast:
            self.input_dtype = torch.bfloat16 if ds.precision == "bf16" else torch.float16
        self.eval_autocast = ((torch.bfloat16 if ds.precision == "bf16" else torch.float16)
                              if ds.precision != "fp32" and ds.autocast else None)
        self.objective = ConCutMixObjective(cfg, self.data.class_counts).to(self.dev)
        self.schedule = EpochLR(cfg.optim)

        from fastlt.pipelines import TrainPipelineSpec, build_train_pipeline, select_backend

        mean, std = normalization(cfg)
        self.backend = select_backend(cfg.pipeline.backend)
        spec = TrainPipelineSpec(
            dataset=self.data.train, recipe=cfg.data.augment_recipe, image_size=cfg.data.image_size,
            batch_size=self.ds_config["train_micro_batch_size_per_gpu"],
            background_sampler=cfg.data.background_sampler, foreground_sampler=cfg.data.foreground_sampler,
            seed=cfg.run.seed, rank=self.rank, world_size=self.world_size, cutmix_prob=cfg.method.cutmix_prob,
            cutmix_per_sample=cfg.method.cutmix_per_sample, cutmix_alpha=cfg.method.cutmix_alpha,
            randaugment=cfg.data.randaugment, mean=mean, std=std, num_workers=cfg.pipeline.num_workers,
            device=self.device, on_error=cfg.data.on_error, extra=dict(cfg.pipeline.extra))
        self.pipeline = build_train_pipeline(spec, self.backend)
        steps = self.pipeline.steps_per_epoch
        if cfg.run.max_steps_per_epoch:
            steps = min(steps, cfg.run.max_steps_per_epoch)
        # Whole optimizer steps only: a partial accumulation at the end of an epoch would carry
        # gradients into the next epoch (and into no checkpoint).
        steps -= steps % ds.grad_accum_steps
        if steps <= 0:
            raise DataError(f"an epoch has no complete step: {len(self.data.train)} training images over "
                            f"{self.world_size} rank(s) at data.batch_size={cfg.data.batch_size} "
                            f"(× deepspeed.grad_accum_steps={ds.grad_accum_steps}); lower data.batch_size")
        self.steps_per_epoch = steps
        self.val_pipeline = self._build_val(self.data.val)

    def _resolve_resume(self) -> Path | None:
        existing = self.ckpt.complete() if self.ckpt.dir.is_dir() else []
        if self.resume is None:
            if existing:
                raise CheckpointError(f"run directory {self.run_dir} already holds checkpoints "
                                      f"(newest: {existing[-1].name}); pass --resume auto to continue that run, "
                                      "or choose a new run.name / run.output_dir")
            return None
        return CheckpointManager.resolve(self.resume, self.run_dir)

    def _save_resolved_config(self) -> None:
        if self.rank != 0:
            return
        path = self.run_dir / "config.yaml"
        new = config_to_dict(self.cfg)
        if path.is_file():
            import yaml

            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            changed = _config_diff(old, new)
            if changed:
                self.log.info("config changed since the last launch of this run: " + "; ".join(changed))
        save_config(self.cfg, path)

    def _build_val(self, dataset):
        from fastlt.pipelines import build_val_pipeline

        return build_val_pipeline(val_spec(self.cfg, dataset, rank=self.rank, world_size=self.world_size,
                                           device=self.device), self.backend)

    # -- state -----------------------------------------------------------------------

    def _client_state(self, epoch: int, step: int) -> dict:
        return {"fastlt": {"epoch": epoch, "step": step, "global_step": int(self.engine.global_steps),
                           "scheduler": self.schedule.state_dict(), "best": self.best, "history": self.history,
                           "train_time_s": self.train_time}}

    def _save(self, epoch: int, step: int) -> Path:
        meta = {"signature": self.signature, "backbone": self.cfg.model.backbone, "num_classes": self.data.num_classes}
        path = self.ckpt.save(self.engine, epoch, step, self._client_state(epoch, step), meta)
        self.log.event("checkpoint", f"checkpoint saved: {path} (resumes at epoch {epoch} step {step})",
                       path=str(path), epoch=epoch, step=step)
        return path

    def _load(self, path: Path) -> tuple[int, int]:
        state, meta = self.ckpt.load(self.engine, path, self.signature, zero_stage=self.cfg.deepspeed.zero_stage)
        self.schedule.load_state_dict(state["scheduler"])
        self.best = state["best"]
        self.history = list(state["history"])
        self.train_time = float(state.get("train_time_s", 0.0))
        self.log.event("resume", f"resumed from {path}: epoch {state['epoch']} step {state['step']} "
                       f"(global step {state['global_step']})", path=str(path), epoch=state["epoch"],
                       step=state["step"])
        return int(state["epoch"]), int(state["step"])

    # -- evaluation ------------------------------------------------------------------

    def evaluate(self, epoch: int) -> dict:
        from fastlt.evaluate import evaluate_model

        metrics = evaluate_model(self.engine.module, self.val_pipeline, self.data.class_counts, device=self.dev,
                                 autocast_dtype=self.eval_autocast, input_dtype=self.input_dtype,
                                 channels_last=self.cfg.model.channels_last)
        summary = {k: metrics[k] for k in ("overall", "many", "medium", "few")}
        self.history.append({"epoch": epoch, **summary})
        improved = self.best is None or summary["overall"] > self.best["overall"]
        if improved:
            self.best = {"epoch": epoch, **summary}
            if self.rank == 0:
                save_weights(self.run_dir / "best.pt", self.engine.module,
                             {"epoch": epoch, "metrics": summary, "signature": self.signature})
        self.log.event("eval", f"eval epoch {epoch}: {format_metrics(summary)}" + ("  (best)" if improved else ""),
                       epoch=epoch, **summary)
        return metrics

    # -- training --------------------------------------------------------------------

    def _end_interval(self, buf: Tensor, n: int, epoch: int, step: int, t_start: float, wait: float,
                      samples: int) -> bool:
        """End of a log interval: log it and agree across ranks on whether to leave the epoch now.

        This is the one host<->device sync of the interval. Returns True when any rank saw a
        non-finite loss or received a stop request (all ranks then stop at the same step).
        """
        vals = buf[:n].cpu()  # host sync: the per-step (loss, ce, scl) of the whole interval in one copy
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
                            "img_per_s": samples * self.world_size / elapsed, "data_wait": wait / elapsed})
        bad, stop = _all_reduce_max([local_bad, self.stop.requested], self.device)
        if bad and self.nonfinite is None:  # another rank saw it first
            self.nonfinite = (epoch, step, None)
        self.stop.requested = stop
        return bad or stop

    def _raise_nonfinite(self) -> None:
        epoch, step, vals = self.nonfinite
        what = (f"loss {vals[0]}, ce {vals[1]}, scl {vals[2]}" if vals is not None
                else "reported by another rank, at or before this step")
        last = self.ckpt.latest()
        where = (f"The last good checkpoint is {last}; it is untouched (resume with --resume auto)."
                 if last is not None else "No checkpoint had been written yet.")
        raise NonFiniteLossError(
            f"the loss became non-finite at epoch {epoch}, step {step + 1}/{self.steps_per_epoch} ({what}); "
            f"training stopped and nothing was saved from this state. {where} Common causes: a learning rate "
            f"too high for the batch size (optim.lr={self.cfg.optim.lr}), or fp16 overflow (try deepspeed.precision=bf16).")

    def _train_epoch(self, epoch: int, start_step: int) -> int:
        """Train one epoch from start_step; returns the step reached (== steps_per_epoch if complete)."""
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
        buf = torch.zeros(log_every, 3, device=self.dev)
        n, wait, samples = 0, 0.0, 0
        t_start = time.perf_counter()
        step = start_step - 1
        self.log.start_bar(self.steps_per_epoch, start_step, f"epoch {epoch}")
        batches = self.pipeline.epoch(epoch, start_step)
        t0 = time.perf_counter()
        try:
            for step in range(start_step, self.steps_per_epoch):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the {self.backend} pipeline ended epoch {epoch} after {step} steps; "
                                       f"expected {self.steps_per_epoch}") from None
                wait += time.perf_counter() - t0
                batch = batch.to(self.dev)
                buf[n] = train_step(self.engine, self.objective, batch, rectify=rectify,
                                    channels_last=cfg.model.channels_last, input_dtype=self.input_dtype)
                n += 1
                samples += len(batch)
                self.log.advance_bar()
                last = step == self.steps_per_epoch - 1
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
        self._setup()
        self.best, self.history, self.train_time = None, [], 0.0
        self.nonfinite = None
        epoch, step = 0, 0
        if self.resume_from is not None:
            epoch, step = self._load(self.resume_from)
        elif self.resume is not None:
            self.log.info(f"--resume {self.resume}: no checkpoint in {self.run_dir}, starting from scratch")
        self.first_epoch = epoch
        self.log.info(f"fastlt: {cfg.model.backbone} on {self.data.num_classes} classes, "
                      f"{len(self.data.train)} training images, {self.world_size} rank(s) on {self.device}, "
                      f"{self.backend} pipeline, {self.steps_per_epoch} steps/epoch of "
                      f"{self.ds_config['train_micro_batch_size_per_gpu']}/rank, precision {cfg.deepspeed.precision}, "
                      f"ZeRO {cfg.deepspeed.zero_stage}; run directory {self.run_dir}")
        if cfg.method.l_d_warm >= cfg.optim.epochs - 1:
            self.log.info(f"area (CutMix) labels throughout: method.l_d_warm={cfg.method.l_d_warm} reaches the last "
                          f"epoch ({cfg.optim.epochs - 1}), so ConCutMix labels never switch on")
        elif epoch <= cfg.method.l_d_warm:
            self.log.info(f"area (CutMix) labels for epochs {epoch}..{min(cfg.method.l_d_warm, cfg.optim.epochs - 1)}, "
                          f"ConCutMix labels from epoch {cfg.method.l_d_warm + 1} (method.l_d_warm)")
        last_eval_epoch = None
        with self.stop:
            while epoch < cfg.optim.epochs:
                t_epoch = time.perf_counter()
                reached = self._train_epoch(epoch, step)
                self.train_time += time.perf_counter() - t_epoch
                if self.nonfinite:
                    self._raise_nonfinite()
                (stopping,) = _all_reduce_max([self.stop.requested], self.device)
                self._sync_buffers()
                if reached < self.steps_per_epoch:  # stopped inside the epoch
                    path = self._save(epoch, reached)
                    raise TrainingInterrupted(f"stopped by {self.stop.signal_name or 'a signal'} at epoch {epoch} "
                                              f"step {reached}; checkpoint {path}. Continue with --resume auto")
                done = epoch + 1
                if done % cfg.run.eval_every == 0 or done == cfg.optim.epochs:
                    self.evaluate(epoch)
                    last_eval_epoch = epoch
                if done % cfg.run.checkpoint_every == 0 or done == cfg.optim.epochs or stopping:
                    path = self._save(done, 0)
                    if stopping:
                        raise TrainingInterrupted(f"stopped by {self.stop.signal_name or 'a signal'} after epoch "
                                                  f"{epoch}; checkpoint {path}. Continue with --resume auto")
                epoch, step = done, 0
        if last_eval_epoch is None:  # resumed after the last epoch was already done
            self.evaluate(cfg.optim.epochs - 1)
        return self._finish()

    def _sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over the ranks.

        DeepSpeed all-reduces gradients, so parameters stay identical, but each rank updates
        its running statistics from its own batches. Averaging them before evaluation and
        checkpoints (as timm's distribute_bn does) gives every replica the same model.
        """
        if self.world_size == 1:
            return
        for buf in self.engine.module.buffers():
            if buf.is_floating_point():
                torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
                buf.div_(self.world_size)

    def _replica_digests(self) -> list[str]:
        """Every rank's weights digest; data parallelism must leave all replicas identical."""
        from fastlt.checkpoint import weights_digest

        mine = weights_digest(self.engine.module)
        if self.world_size == 1:
            return [mine]
        digests: list = [None] * self.world_size
        torch.distributed.all_gather_object(digests, mine)
        if len(set(digests)) != 1:
            raise RuntimeError(f"the {self.world_size} ranks finished with different weights (digests {digests}); "
                               "data-parallel replicas diverged — please report this with the config")
        return digests

    def _finish(self) -> dict:
        final = self.history[-1] if self.history else {}
        digests = self._replica_digests()
        if self.rank == 0:
            save_weights(self.run_dir / "last.pt", self.engine.module,
                         {"epoch": self.cfg.optim.epochs - 1, "metrics": final, "signature": self.signature})
            out = {"final": final, "best": self.best, "history": self.history, "epochs": self.cfg.optim.epochs,
                   "train_time_s": round(self.train_time, 2), "world_size": self.world_size,
                   "device": self.device, "num_classes": self.data.num_classes,
                   "train_class_counts": [int(c) for c in self.data.class_counts], "run_dir": str(self.run_dir),
                   "replica_digests": digests}
            from fastlt.checkpoint import write_text_atomic

            write_text_atomic(self.run_dir / "metrics.json", json.dumps(out, indent=1, allow_nan=True))
        self.log.event("done", f"final: {format_metrics(final)} | best epoch {self.best['epoch'] if self.best else '-'}"
                       f" | training time {self.train_time:.1f} s | run directory {self.run_dir}",
                       **{k: final.get(k) for k in ("overall", "many", "medium", "few")})
        _barrier()
        return {**final, "train_time_s": self.train_time, "run_dir": str(self.run_dir), "best": self.best}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pipeline.close()
        if hasattr(self, "log"):
            self.log.close()


def train(cfg: Config, *, resume: str | None = None) -> dict:
    """Run training for ``cfg``; returns the final metrics (overall/many/medium/few, run_dir, ...)."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 method.l_d_warm=10 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlt.train", description="Train ConCutMix + BCL (DeepSpeed).")
    add_common_args(p)
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the run directory's latest checkpoint; PATH: a checkpoint directory")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def flatten_overrides(groups: Sequence[Sequence[str]]) -> list[str]:
    return [item for group in groups for item in group]


def run_cli(fn, *, rank_env: str = "RANK") -> int:
    """Run fn() and turn the expected failures into one clear message and an exit code."""
    is_rank0 = os.environ.get(rank_env, "0") == "0"

    def say(msg: str) -> None:
        if is_rank0:
            print(f"fastlt: error: {msg}", file=sys.stderr, flush=True)

    try:
        fn()
        return 0
    except (ConfigError, DataError, CheckpointError) as e:
        say(str(e))
        return 2
    except NonFiniteLossError as e:
        say(str(e))
        return 3
    except TrainingInterrupted as e:
        if is_rank0:
            print(f"fastlt: {e}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        say("aborted by a second Ctrl-C; checkpoints already written are complete (resume with --resume auto)")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        cfg = load_config(args.config, flatten_overrides(args.overrides))
        train(cfg, resume=args.resume)

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
