"""Run ``python -m fastlt.train`` arguments in this process with probes on the training step:

* every ``synchronize()`` of DeepSpeed's accelerator and of ``torch.cuda`` is counted;
* for every step, the images the pipeline delivered (``batch.images``) and the tensor the
  model's forward received are compared by storage pointer, strides and dtype.

Prints one JSON line ``PROBE {...}`` at the end. Used by tests/test_hot_path.py.
"""
import json
import sys

import torch


def main(argv):
    from deepspeed.accelerator import get_accelerator

    import fastlt.method.objective as objective
    from fastlt.cli import train_main
    from fastlt.models.bcl import BCLModel

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
        return train_step(engine, obj, batch, **kw)

    def probed_forward(self, x):
        if self.training:
            forwards.append({"ptr": x.data_ptr(), "stride": list(x.stride()), "dtype": str(x.dtype),
                             "channels_last": x.is_contiguous(memory_format=torch.channels_last)})
        return forward(self, x)

    objective.train_step, BCLModel.forward = probed_step, probed_forward
    rc = train_main(argv)
    print("PROBE " + json.dumps({"rc": rc, "syncs": counts, "steps": steps, "forwards": forwards}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
