"""Run ``python -m fastlt.train`` arguments in this process with probes on the training step:

* every ``synchronize()`` of DeepSpeed's accelerator and of ``torch.cuda`` is counted;
* every host read of a tensor's values (``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``,
  ``bool()``, ``int()``, ``float()``, ``operator.index()``: each a device-to-host wait on a GPU)
  made during a training step (``fastlt.method.objective.train_step``) or at the end of a log
  interval (``Trainer._end_interval``) is recorded with its call site (file:function of the
  caller, relative to the repository). On CPU these methods are wrapped on ``torch.Tensor``
  for those calls only, so the pipeline's and the evaluation's reads are not counted;
* for every step, the images the pipeline delivered (``batch.images``) and the tensor the
  model's forward received are compared by storage pointer, strides and dtype.

Prints one JSON line ``PROBE {...}`` at the end. Used by tests/test_hot_path.py.
``--plant-item`` (test-only) makes the step read its loss with ``.item()``, the read the
counter must catch.
"""
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
READ_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostReads:
    """Wraps ``torch.Tensor``'s value-reading methods; records a read only while ``where`` is set."""

    def __init__(self):
        self.where = None  # ("step", i) or ("interval_end", i) while recording
        self.reads = []  # {"in": "step"|"interval_end", "step": i, "method": ..., "site": "file:function"}
        for name in READ_METHODS:
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        def read(tensor, *a, **k):
            if self.where is not None:
                frame = sys._getframe(1)
                while frame.f_code.co_name.startswith("<") and frame.f_back is not None:  # genexpr, listcomp
                    frame = frame.f_back
                path = Path(frame.f_code.co_filename)
                site = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{frame.f_code.co_name}"
                self.reads.append({"in": self.where[0], "step": self.where[1], "method": name, "site": site})
            return original(tensor, *a, **k)
        return read

    def recording(self, kind, index, fn, *a, **k):
        outer, self.where = self.where, (kind, index)
        try:
            return fn(*a, **k)
        finally:
            self.where = outer


def main(argv):
    from deepspeed.accelerator import get_accelerator

    import fastlt.method.objective as objective
    from fastlt.cli import train_main
    from fastlt.models.bcl import BCLModel
    from fastlt.training.trainer import Trainer

    plant = "--plant-item" in argv
    argv = [a for a in argv if a != "--plant-item"]
    reads = HostReads()

    counts = {"accelerator": 0, "torch.cuda": 0}
    acc = get_accelerator()
    acc_sync, cuda_sync = acc.synchronize, torch.cuda.synchronize

    def counted_acc(*a, **k):
        counts["accelerator"] += 1
        return acc_sync(*a, **k)

    def counted_cuda(*a, **k):
        counts["torch.cuda"] += 1
        return cuda_sync(*a, **k)

    acc.synchronize, torch.cuda.synchronize = counted_acc, counted_cuda

    steps, forwards = [], []
    train_step, forward = objective.train_step, BCLModel.forward

    def probed_step(engine, obj, batch, **kw):
        t = batch.images
        steps.append({"ptr": t.data_ptr(), "shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype),
                      "views_share_storage": all(v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                                                 for v in (batch.image, batch.view1, batch.view2))})
        if plant:
            def planted(out, batch, **k):
                loss, *rest = obj(out, batch, **k)
                loss.item()  # the per-step host read the counter must catch
                return (loss, *rest)
            return reads.recording("step", len(steps) - 1, train_step, engine, planted, batch, **kw)
        return reads.recording("step", len(steps) - 1, train_step, engine, obj, batch, **kw)

    end_interval = Trainer._end_interval

    def probed_end_interval(self, *a, **k):
        return reads.recording("interval_end", len(steps) - 1, end_interval, self, *a, **k)

    def probed_forward(self, x):
        if self.training:
            forwards.append({"ptr": x.data_ptr(), "stride": list(x.stride()), "dtype": str(x.dtype),
                             "channels_last": x.is_contiguous(memory_format=torch.channels_last)})
        return forward(self, x)

    objective.train_step, BCLModel.forward = probed_step, probed_forward
    Trainer._end_interval = probed_end_interval
    rc = train_main(argv)
    print("PROBE " + json.dumps({"rc": rc, "syncs": counts, "steps": steps, "forwards": forwards,
                                 "host_reads": reads.reads}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
