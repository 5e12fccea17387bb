"""``python -m fastlt.train`` and ``deepspeed --module fastlt.train``: the training entry point
(the same as ``fastlt train``; arguments in ``fastlt.cli``, the trainer in ``fastlt.training.trainer``).

    python -m fastlt.train --config configs/demo.yaml [--set key=value ...] [--resume auto|PATH]
    deepspeed --num_gpus 8 --module fastlt.train --config configs/imagenet_lt_resnext50_90ep.yaml
    deepspeed --hostfile hosts --module fastlt.train --config ...       # several nodes
"""
import sys

from fastlt.cli import train_main  # first: it sets the OpenMP wait policy before torch loads

if __name__ == "__main__":
    sys.exit(train_main())
