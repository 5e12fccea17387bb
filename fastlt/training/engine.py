"""The ``deepspeed`` section of the config and the DeepSpeed engine built from it
(docs/design.md §3 "Engine"): precision, ZeRO stage, gradient accumulation and clipping.

* :class:`DeepSpeedSection` — the section, with the precision names;
* :func:`deepspeed_config` — DeepSpeed's config dict, the only place DeepSpeed settings come from;
* :func:`precision_of` — the one mapping precision → weight dtype / autocast dtype / input
  dtype, used by the training step, the trainer's evaluation and ``fastlt eval`` alike;
* :func:`build_engine` — SGD + ``deepspeed.initialize`` + safe checkpoint I/O + memory format,
  as the trainer and the train-step benchmark use it;
* :class:`PlainEngine` — the engine calls ``fastlt.method.objective.train_step`` makes, on a plain
  ``torch.optim`` optimizer (your own loop, or a machine without DeepSpeed);
* :func:`deepspeed_extra_warning` — the ``deepspeed.extra`` keys DeepSpeed's config never reads.

Importing this module does not import torch or DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastlt.errors import ConfigError
from fastlt.config.typed import one_of, positive

if TYPE_CHECKING:
    import torch

__all__ = ["DeepSpeedSection", "OWN_KEYS", "OWN_SECTIONS", "PRECISIONS", "PlainEngine", "Precision", "ZERO_STAGES",
           "build_engine", "check_batch_memory", "deepspeed_config", "deepspeed_extra_warning", "flat_parameters",
           "precision_of"]

#: ``deepspeed.precision``: fp32, or bf16 / fp16 (autocast or DeepSpeed's low-precision weights).
PRECISIONS = ("fp32", "bf16", "fp16")
#: ZeRO stages fastlt supports (optimizer state / gradient partitioning).
ZERO_STAGES = (0, 1, 2)
#: DeepSpeed settings fastlt derives from its own keys; in ``deepspeed.extra`` they could only
#: contradict them (DeepSpeed would stop at start-up with a bare assertion).
OWN_KEYS = {"train_batch_size": "data.batch_size", "train_micro_batch_size_per_gpu": "data.batch_size",
            "gradient_accumulation_steps": "deepspeed.grad_accum_steps", "gradient_clipping": "deepspeed.grad_clip"}
#: DeepSpeed config sections fastlt writes or replaces itself (refused in ``deepspeed.extra``
#: unless ``{"enabled": false}``), with the fastlt keys to set instead.
OWN_SECTIONS = {"bf16": "deepspeed.precision / deepspeed.autocast", "fp16": "deepspeed.precision / deepspeed.autocast",
                "torch_autocast": "deepspeed.precision / deepspeed.autocast",
                "amp": "deepspeed.precision / deepspeed.autocast",
                "optimizer": "optim.lr, optim.momentum and optim.weight_decay (fastlt's SGD)",
                "scheduler": "optim.schedule, optim.warmup_epochs and optim.milestones"}


@dataclass(kw_only=True)
class DeepSpeedSection:
    """DeepSpeed engine settings; turned into DeepSpeed's config dict by :func:`deepspeed_config`."""

    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    autocast: bool = True
    """With bf16/fp16: true = torch autocast with fp32 weights (BatchNorm stays fp32; DeepSpeed's
    torch_autocast); false = DeepSpeed's bf16/fp16 mode (low-precision weights, fp32 master copy)."""
    zero_stage: int = 0
    """ZeRO stage 0, 1 or 2 (optimizer state / gradient partitioning)."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = no clipping."""
    loss_scale_power: int = 16
    """fp16 without autocast: initial dynamic loss scale 2**loss_scale_power."""
    extra: dict = field(default_factory=dict)
    """Merged last into DeepSpeed's config dict (expert use; e.g. {"zero_optimization": {"overlap_comm": true}})."""

    def __post_init__(self):
        one_of("deepspeed.precision", self.precision, PRECISIONS)
        one_of("deepspeed.zero_stage", self.zero_stage, ZERO_STAGES)
        positive("deepspeed.grad_accum_steps", self.grad_accum_steps)
        positive("deepspeed.grad_clip", self.grad_clip, allow_zero=True)
        positive("deepspeed.loss_scale_power", self.loss_scale_power, allow_zero=True)
        own = {f"deepspeed.extra.{k}": v for k, v in OWN_KEYS.items() if k in self.extra}
        if isinstance(self.extra.get("zero_optimization"), dict) and "stage" in self.extra["zero_optimization"]:
            own["deepspeed.extra.zero_optimization.stage"] = "deepspeed.zero_stage"
        # An enabled precision section would put the weights in bf16/fp16 behind fastlt's back (the
        # images stay fp32: the first convolution fails with a dtype traceback); a DeepSpeed
        # optimizer or scheduler would be ignored in favour of fastlt's SGD and per-epoch lr.
        for k, use in OWN_SECTIONS.items():
            v = self.extra.get(k)
            if k in self.extra and not (isinstance(v, dict) and v.get("enabled") is False):
                own[f"deepspeed.extra.{k}"] = use
        if own:
            key, use = next(iter(own.items()))
            why = (" (the global batch is data.batch_size × deepspeed.grad_accum_steps, split over the ranks)"
                   if "batch" in key or "accumulation" in key else "")
            raise ConfigError(f"{key}: fastlt sets this DeepSpeed setting from {use}{why}; remove it from "
                              f"deepspeed.extra (or the --deepspeed_config file) and set {use} instead")

    @property
    def low_precision_weights(self) -> bool:
        """DeepSpeed's bf16/fp16 mode: the module itself holds bf16/fp16 weights and buffers."""
        return self.precision != "fp32" and not self.autocast


@dataclass(frozen=True)
class Precision:
    """How a :class:`DeepSpeedSection` precision runs the model."""

    name: str
    """fp32, bf16 or fp16."""
    weight_dtype: "torch.dtype"
    """dtype of the module's parameters and buffers."""
    autocast_dtype: "torch.dtype | None"
    """dtype of ``torch.autocast`` around the forward pass, None for no autocast."""
    input_dtype: "torch.dtype | None"
    """dtype the images must have for the first layer; None = as delivered (fp32)."""

    def autocast(self, device_type: str):
        """The autocast context of the forward pass (a no-op context without autocast)."""
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


def precision_of(ds: DeepSpeedSection) -> Precision:
    """The weight / autocast / input dtypes of a precision setting (see :class:`Precision`)."""
    import torch

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ds.precision)
    if low is None:
        return Precision("fp32", torch.float32, None, None)
    if ds.autocast:  # fp32 weights, low-precision matmuls/convolutions, fp32 inputs
        return Precision(ds.precision, torch.float32, low, None)
    return Precision(ds.precision, low, None, low)  # DeepSpeed's mode: everything in low precision


#: DeepSpeed's default ZeRO gradient bucket, in elements.
DEEPSPEED_REDUCE_BUCKET = 500_000_000


def deepspeed_config(cfg, world_size: int, num_params: int | None = None) -> dict:
    """DeepSpeed's config dict, built from a :class:`fastlt.config.loader.Config`.

    With ZeRO and ``num_params`` (the model's parameter count), the gradient bucket is cut to
    the model's size: DeepSpeed's 5e8-element default holds 2 GB per bucket (4 GB with
    ``overlap_comm``) that a vision model never fills, and re-allocates it every micro-step,
    which on the CPU costs more than the step. The whole model still fits one bucket, so the
    reduction, and every result, is the same. ``deepspeed.extra`` overrides it."""
    ds = cfg.deepspeed
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the number of ranks "
                          f"({world_size}); it is the global batch per micro-step")
    micro = cfg.data.batch_size // world_size
    check_batch_memory(cfg, world_size)
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
        # DeepSpeed's throughput timer (on by default, whatever wall_clock_breakdown says) calls
        # the accelerator's synchronize() in every forward and step: the host would wait for
        # the GPU every step. fastlt measures throughput at its log intervals instead.
        "timers": {"throughput": {"enabled": False}},
    }
    if ds.zero_stage > 0 and num_params is not None:
        out["zero_optimization"]["reduce_bucket_size"] = max(1, min(DEEPSPEED_REDUCE_BUCKET, int(num_params)))
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


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where it cannot be asked."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


def check_batch_memory(cfg, world_size: int = 1) -> None:
    """ConfigError when one rank's input batch alone — the training batch of three views
    (3 × micro-batch × 3 × image_size² float32) or an evaluation batch — is larger than this
    machine's memory: it could never be allocated, and would fail after setup (or overflow)."""
    size, micro = cfg.data.image_size, max(1, cfg.data.batch_size // max(world_size, 1))
    need = {"data.batch_size": 3 * micro * 3 * size * size * 4,
            "data.eval_batch_size": cfg.data.eval_batch_size * 3 * size * size * 4}
    have = _memory_bytes()
    if have is None:
        return
    for key, n in need.items():
        if n > have:
            batch = (f"one training batch of {micro} images per rank ({world_size} rank(s)) in 3 views"
                     if key == "data.batch_size" else f"one evaluation batch of {cfg.data.eval_batch_size} images")
            raise ConfigError(f"data.image_size={size}: {batch} of 3 × {size} × {size} float32 needs {_size(n)}, more "
                              f"than this machine's {_size(have)} of memory; lower data.image_size or {key}")


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def build_engine(cfg, model, world_size: int):
    """(engine, ds_config): ``model`` wrapped by ``deepspeed.initialize`` with SGD (``optim``),
    checkpoint reads and writes made safe and atomic, and channels-last where asked.

    The process group must already be up (``fastlt.training.distributed.init_distributed``).
    """
    import deepspeed
    import torch

    from fastlt.files import install_safe_checkpoint_engine
    from fastlt.training.schedule import build_optimizer

    ds_config = deepspeed_config(cfg, world_size, num_params=sum(p.numel() for p in model.parameters()))
    optimizer = build_optimizer(cfg.optim, model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    install_safe_checkpoint_engine(engine)
    if cfg.model.channels_last and not flat_parameters(cfg.deepspeed):
        # After initialize: DeepSpeed broadcasts parameters as byte views, which needs them
        # contiguous. Parameters keep their identity (only .data changes), so the optimizer
        # still holds them.
        engine.module.to(memory_format=torch.channels_last)
    return engine, ds_config


class PlainEngine:
    """What ``fastlt.method.objective.train_step`` calls on a DeepSpeed engine (``engine(x)``,
    ``backward``, ``step``), on a plain ``torch.optim`` optimizer. Mixed precision is autocast
    around the forward (``autocast_dtype``, e.g. ``precision_of(ds).autocast_dtype``), as
    DeepSpeed's ``torch_autocast`` does; ``step`` leaves the gradients None."""

    def __init__(self, module, optimizer, autocast_dtype=None):
        self.module = module
        self.optimizer = optimizer
        self.autocast_dtype = autocast_dtype
        self.device_type = next(module.parameters()).device.type

    def __call__(self, x):
        import torch

        with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.module(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self):
        self.module.train()


def flat_parameters(ds: DeepSpeedSection) -> bool:
    """Whether DeepSpeed keeps the parameters as views into flat contiguous buffers (ZeRO, or its
    bf16/fp16 mode). Such parameters cannot be channels-last: with ``model.channels_last`` the
    images and every activation still are (the pipelines deliver channels-last inputs and
    convolutions keep their input's format), and cuDNN reads the NCHW weights as they are."""
    return ds.zero_stage > 0 or ds.low_precision_weights


class _ReadKeys(dict):
    """A config dict that notes the top-level keys looked up in it (copy.copy shares the record)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.looked_up: set = set()

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.looked_up.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self):  # `KEY in d.keys()` is how DeepSpeed asks for several sections
        return _ReadKeysView(self)


class _ReadKeysView:
    def __init__(self, owner: _ReadKeys):
        self.owner = owner

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self):
        return len(self.owner)


def deepspeed_extra_warning(ds_config: dict, extra: dict) -> str | None:
    """One warning line naming the ``deepspeed.extra`` keys that DeepSpeed's config parser never
    reads (a misspelt section is otherwise ignored without a word), or None.

    DeepSpeed has no list of its keys; its parser looks each one up, so the keys it asks for are
    recorded while it parses a copy of the config (after the process group is up)."""
    import difflib

    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _ReadKeys(ds_config)
    try:
        DeepSpeedConfig(probe)
    except Exception:  # DeepSpeed's own validation already ran in deepspeed.initialize
        return None
    unread = [k for k in extra if k not in probe.looked_up]
    if not unread:
        return None
    hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, probe.looked_up, 1))
             else repr(k) for k in unread]
    return (f"warning: deepspeed.extra: DeepSpeed's config does not know {', '.join(hints)}; "
            "it has no effect: fix or remove it")
