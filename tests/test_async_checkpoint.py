"""Asynchronous checkpoints (``run.async_checkpoint``, fastlt.training.async_checkpoint).

* With a stand-in engine and a write held back by the test: while the background write runs,
  ``latest`` still names the previous complete checkpoint and the new one exists only as
  ``<tag>.partial``; what the training changes after ``save`` returns does not reach the file;
  a failed write publishes nothing and says so; an abandoned write (a failure elsewhere)
  publishes nothing.
* End to end (one process, real DeepSpeed, ZeRO-1): an asynchronous run writes the same
  checkpoints as a synchronous one (every tensor equal); stopped by SIGINT while its first
  checkpoint may still be in flight, it leaves both checkpoints complete, and its resume ends
  with the uninterrupted run's weights.
"""
from __future__ import annotations

import collections
import time
import io
import math
import threading
from pathlib import Path

import pytest
import torch

from conftest import (assert_same_weights, events, interrupt_when_paused, run_fastlt as fastlt, tiny_config, weights,
                      write_config)



class _CheckpointEngine:
    """What fastlt's SafeCheckpointEngine offers the manager: a ``writer`` slot."""

    writer = None

    def save(self, state, path):
        if self.writer is not None:
            self.writer.submit(state, path)
        else:
            torch.save(state, path)


class _Engine:
    """Writes what DeepSpeed would (model states and one optimizer shard) through its checkpoint engine."""

    def __init__(self):
        self.fail_after = None  # raise OutputError after this many files, as a full disk would
        self.checkpoint_engine = _CheckpointEngine()
        self.w = torch.arange(4, dtype=torch.float32)
        self.momentum = torch.zeros(4)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        self.checkpoint_engine.save({"module": {"w": self.w}, **client_state}, str(d / "mp_rank_00_model_states.pt"))
        if self.fail_after == 1:  # the model file is queued, the shard is refused
            from fastlt.errors import OutputError

            raise OutputError(f"cannot write {d}/zero_pp_rank_0_mp_rank_00_optim_states.pt: No space left on device")
        self.checkpoint_engine.save({"optimizer_state_dict": {"m": self.momentum}},
                                    str(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


@pytest.fixture
def held_writes(monkeypatch):
    """The background writer's torch.save waits until the test opens the gate; ``fail`` makes it raise."""
    import fastlt.training.async_checkpoint as ac
    from fastlt.errors import OutputError

    gate, real = threading.Event(), ac.torch_save_atomic
    state = {"fail": False}

    def write(obj, path):
        assert gate.wait(60), "the test never opened the gate"
        if state["fail"]:
            raise OutputError(f"cannot write {path}: No space left on device")
        real(obj, path)

    monkeypatch.setattr(ac, "torch_save_atomic", write)
    return gate, state


Pair = collections.namedtuple("Pair", "x y")  # module level: torch.save pickles it by name


def test_snapshot_is_a_host_copy_that_keeps_shared_storages():
    """What the background writer saves: later in-place updates do not reach it; views of one
    flat buffer (DeepSpeed's ZeRO parameters) still share one storage, so torch.save writes the
    same bytes as from the live state; containers keep their types."""
    from fastlt.training.async_checkpoint import snapshot

    flat = torch.arange(10.0)
    state = collections.OrderedDict(a=flat[:4].view(2, 2), b=flat[4:], c=[1, Pair(flat[4:], "n")],
                                    d=torch.ones(3, dtype=torch.bfloat16), e={"step": 3})
    copied = snapshot(state)
    live, saved = io.BytesIO(), io.BytesIO()
    torch.save(state, live)
    torch.save(copied, saved)
    flat.add_(100.0)
    state["e"]["step"] = 4
    assert type(copied) is collections.OrderedDict and type(copied["c"][1]) is Pair
    assert torch.equal(copied["a"], torch.arange(4.0).view(2, 2)) and torch.equal(copied["b"], torch.arange(4.0, 10.0))
    assert copied["a"].untyped_storage().data_ptr() == copied["c"][1].x.untyped_storage().data_ptr()
    assert copied["d"].dtype == torch.bfloat16 and copied["e"] == {"step": 3}
    assert len(saved.getvalue()) == len(live.getvalue())


def _meta():
    return {"signature": {}, "zero_stage": 1}


def test_latest_moves_only_after_the_background_write_and_the_file_holds_the_state_at_save(tmp_path, held_writes):
    from fastlt.files import safe_load
    from fastlt.training.checkpoint import CheckpointManager

    gate, _ = held_writes
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=2, async_save=True)
    engine, saved = _Engine(), []

    def note(path, epoch, step):
        saved.append(path)

    gate.set()
    first = mgr.save(engine, 1, 0, {"fastlt": {"epoch": 1}}, _meta(), on_saved=note)
    assert mgr.wait(note) == first and saved == [first]
    gate.clear()

    path = mgr.save(engine, 2, 0, {"fastlt": {"epoch": 2}}, _meta(), on_saved=note)
    # The write is held: the checkpoint is not complete, latest is still the first one.
    assert not path.exists() and path.with_name(path.name + ".partial").is_dir()
    assert mgr.latest() == first and [p.name for p in mgr.complete()] == [first.name] and saved == [first]
    assert mgr.pending and mgr.writing()  # what the trainer asks at each log interval
    engine.w.add_(100.0)  # the next training steps, while the write runs
    engine.momentum.fill_(7.0)
    gate.set()
    deadline = time.monotonic() + 120  # generous: the write of a few tensors takes milliseconds
    while mgr.writing() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mgr.pending and not mgr.writing()  # written, not yet published: the trainer publishes now
    assert mgr.wait(note) == path and saved == [first, path]
    assert mgr.latest() == path and not path.with_name(path.name + ".partial").exists()
    assert torch.equal(safe_load(path / "mp_rank_00_model_states.pt")["module"]["w"], torch.arange(4.0))
    assert torch.equal(safe_load(path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]["m"],
                       torch.zeros(4))
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "mp_rank_00_model_states.pt", "rng_rank00000.pt",
                                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert mgr.wait() is None  # nothing in flight


def test_a_stop_during_the_wait_leaves_the_save_pending_so_close_lets_the_write_end(tmp_path, held_writes):
    """The probe's case: SIGTERM while the run waited for a write before an evaluation aborted
    the process (the writer thread killed inside torch.save, a half-written file left): wait()
    had forgotten the save before blocking, so close() -> abandon() did not wait for it."""
    from fastlt.errors import TrainingInterrupted
    from fastlt.training.checkpoint import CheckpointManager

    gate, _ = held_writes
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=2, async_save=True)
    gate.clear()
    path = mgr.save(_Engine(), 1, 0, {"fastlt": {"epoch": 1}}, _meta())
    real_wait = mgr._writer.wait

    def interrupted():
        raise TrainingInterrupted("stopped by SIGTERM", "SIGTERM")  # as the stop handler raises it

    mgr._writer.wait = interrupted
    with pytest.raises(TrainingInterrupted):
        mgr.wait()
    mgr._writer.wait = real_wait
    assert mgr.pending  # not forgotten
    gate.set()
    mgr.abandon()  # close(): the write ends, nothing is published
    partial = path.with_name(path.name + ".partial")
    assert not mgr.pending and mgr.latest() is None and not mgr.writing()
    assert not [p for p in partial.iterdir() if ".tmp" in p.name]  # no half-written file


def test_a_failed_or_abandoned_background_write_publishes_nothing(tmp_path, held_writes):
    from fastlt.errors import OutputError
    from fastlt.training.checkpoint import CheckpointManager

    gate, state = held_writes
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=2, async_save=True)
    engine = _Engine()
    gate.set()
    first = mgr.save(engine, 1, 0, {"fastlt": {"epoch": 1}}, _meta())
    mgr.wait()

    state["fail"] = True
    path = mgr.save(engine, 2, 0, {"fastlt": {"epoch": 2}}, _meta())
    with pytest.raises(OutputError, match=r"No space left on device\. Checkpoint epoch0002_step000000 was not written "
                                          r".* the last complete checkpoint .*epoch0001_step000000 is untouched"):
        mgr.wait()
    assert mgr.latest() == first and not path.exists() and not path.with_name(path.name + ".partial").exists()

    # DeepSpeed's own write fails after a file was queued: nothing is left behind, nor a stale error.
    state["fail"], engine.fail_after = False, 1
    with pytest.raises(OutputError, match="Checkpoint epoch0002_step000000 was not written"):
        mgr.save(engine, 2, 0, {"fastlt": {"epoch": 2}}, _meta())
    assert mgr.latest() == first and not path.with_name(path.name + ".partial").exists() and mgr.wait() is None
    engine.fail_after = None

    # A failure elsewhere (the trainer's close) while a write is in flight: it ends, nothing is published.
    gate.clear()
    path = mgr.save(engine, 3, 0, {"fastlt": {"epoch": 3}}, _meta())
    gate.set()
    mgr.abandon()
    assert mgr.latest() == first and not path.exists() and mgr.wait() is None
    # The next run's save clears the left-over partial folder and completes.
    again = mgr.save(engine, 3, 0, {"fastlt": {"epoch": 3}}, _meta())
    assert mgr.wait() == again and mgr.latest() == again


def _states_equal(a, b, where="") -> list[str]:
    """Paths at which two loaded checkpoint states differ (timings excluded: they are measured)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a if k not in ("train_time_s", "time") for d in _states_equal(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _states_equal(x, y, f"{where}[{i}]")]
    if type(a) is type(b) and hasattr(a, "__dict__"):  # DeepSpeed's bookkeeping objects (its loss scaler)
        return _states_equal(vars(a), vars(b), where)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []  # the accuracy of an empty shot group (no many-shot class in the tiny set)
    return [] if a == b else [where]


def _assert_same_checkpoint(a: Path, s: Path, *, rng: bool = True) -> None:
    from fastlt.files import safe_load

    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in s.iterdir())
    for f in (p for p in s.iterdir() if p.suffix == ".pt" and (rng or not p.name.startswith("rng_rank"))):
        x, y = safe_load(f), safe_load(a / f.name)
        if f.name.startswith("rng_rank"):  # numpy's and python's global generators are never seeded
            x, y = x["torch"], y["torch"]  # (fresh in each process); torch's is run.seed's
        differ = _states_equal(x, y)
        assert not differ, f"{a.name}/{f.name} differs at {differ[:3]}"


def test_async_run_writes_the_synchronous_checkpoints_stops_and_resumes_exactly(tmp_path, tiny_data_root):
    """ZeRO-1, evaluation every 2 epochs, so the first checkpoint is written while epoch 1 trains.
    The asynchronous run is stopped by SIGINT during epoch 1 (its first checkpoint possibly still
    being written), then resumed; the synchronous run goes through in one go."""
    def config(name, flag):
        cfg = tiny_config(tiny_data_root, tmp_path, deepspeed={"zero_stage": 1},
                          run={"name": name, "log_every": 1, "eval_every": 2, "deterministic": True,
                               "async_checkpoint": flag})
        return write_config(tmp_path / f"{name}.yaml", cfg)

    fastlt("--config", config("sync", False))
    sync, path = tmp_path / "sync" / "checkpoints", config("async", True)
    code, out, err = interrupt_when_paused(path, "step:1:2")
    assert code == 130, out + err
    ckpts = tmp_path / "async" / "checkpoints"
    assert "checkpoint " + str(ckpts / "epoch0001_step000003") + ". Continue with --resume auto" in err
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["epoch0001_step000000", "epoch0001_step000003"]
    assert (ckpts / "latest").read_text() == "epoch0001_step000003"
    _assert_same_checkpoint(ckpts / "epoch0001_step000000", sync / "epoch0001_step000000")

    fastlt("--config", path, "--resume", "auto")
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["epoch0001_step000003", "epoch0002_step000000"]
    assert [e["path"] for e in events(tmp_path / "async", "checkpoint")] == [
        str(ckpts / t) for t in ("epoch0001_step000000", "epoch0001_step000003", "epoch0002_step000000")]
    # rng=False: the resumed process created one more data-loader iterator (for the rest of epoch 1),
    # which draws its base seed from torch's global generator; batches come from their own seeds.
    _assert_same_checkpoint(ckpts / "epoch0002_step000000", sync / "epoch0002_step000000", rng=False)
    assert_same_weights(weights(tmp_path / "sync" / "last.pt"), weights(tmp_path / "async" / "last.pt"))


@pytest.mark.slow
def test_two_ranks_write_the_synchronous_checkpoints_in_the_background(tmp_path, tiny_data_root):
    """``deepspeed --num_gpus 2``, ZeRO-1: each rank writes its own shard and RNG file in the
    background; every file equals the synchronous run's, and each checkpoint passes the check a
    resume at 2 ranks makes (every shard and RNG file present and intact)."""
    from conftest import launch_deepspeed
    from fastlt.training.checkpoint import CheckpointManager

    for name, flag in (("sync2", False), ("async2", True)):
        cfg = tiny_config(tiny_data_root, tmp_path, deepspeed={"zero_stage": 1},
                          run={"name": name, "log_every": 1, "eval_every": 2, "deterministic": True,
                               "async_checkpoint": flag})
        launch_deepspeed(write_config(tmp_path / f"{name}.yaml", cfg), ranks=2)
    ckpts, sync = tmp_path / "async2" / "checkpoints", tmp_path / "sync2" / "checkpoints"
    tags = ["epoch0001_step000000", "epoch0002_step000000"]
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == tags and (ckpts / "latest").read_text() == tags[1]
    for tag in tags:
        meta, missing_rng = CheckpointManager(ckpts, world_size=2).verify(ckpts / tag, world_size=2)
        assert meta["world_size"] == 2 and missing_rng == []
        assert len(list((ckpts / tag).glob("zero_pp_rank_*_optim_states.pt"))) == 2
        _assert_same_checkpoint(ckpts / tag, sync / tag)
    assert_same_weights(weights(tmp_path / "sync2" / "last.pt"), weights(tmp_path / "async2" / "last.pt"))
