"""Shared benchmark setup: the spec formulations of tests/ are importable here (baselines are
imported, never rewritten), and every result records the machine and versions."""
import os
import platform
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def environment_info() -> dict:
    import torch

    info = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    return info


@pytest.fixture(autouse=True)
def _record_environment(request):
    bench = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    yield
    if bench is not None:
        bench.extra_info.update(environment_info())
