"""Shared pytest fixtures: the real split lists, fake CIFAR batches, a small synthetic dataset.

Fixtures that build data on disk are session-scoped (built once per run) and must be
treated as read-only by the tests that use them.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

# /work/shared/data/splits: the published ImageNet-LT / Places-LT / iNaturalist18 lists
# (the images themselves are not on this machine).
SPLITS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "splits"


@pytest.fixture(scope="session")
def splits_dir() -> Path:
    """Directory of the real split list files; skips when the shared data is absent."""
    if not (SPLITS_DIR / "Places_LT_train.txt").is_file():
        pytest.skip(f"real split lists not found in {SPLITS_DIR} (needs the shared data checkout)")
    return SPLITS_DIR


@pytest.fixture(scope="session")
def places_train(splits_dir):
    """Places-LT training list (labels and counts only: root points nowhere real)."""
    from fastlt.data import LongTailedList

    return LongTailedList(splits_dir / "no-images", splits_dir / "Places_LT_train.txt")


# Fake CIFAR sizes: per-class train / test images. Small, but in the real on-disk format.
FAKE_CIFAR = {"cifar10": (10, 30, 4), "cifar100": (100, 5, 2)}


def _fake_cifar_arrays(num_classes: int, per_class: int, rng: np.random.Generator):
    """Rows in CIFAR layout (N, 3072: R plane, G plane, B plane) with shuffled labels.

    Pixel (0, 0) encodes the row's global index (R = index // 256, G = index % 256) and
    the B plane is constant 7, so tests can tell which images were kept and check HWC order.
    """
    n = num_classes * per_class
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(n) // 256
    data[:, 1024] = np.arange(n) % 256
    data[:, 2048:] = 7
    return data, labels


def write_fake_cifar(root: Path, seed: int = 0) -> Path:
    """Write CIFAR-10 and CIFAR-100 python batches (real format, few images) under ``root``."""
    rng = np.random.default_rng(seed)
    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    data, labels = _fake_cifar_arrays(*FAKE_CIFAR["cifar10"][:2], rng)
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), 5)):
        batch = {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": labels[rows].tolist(),
                 b"data": data[rows], b"filenames": [b"x.png"] * len(rows)}
        (c10 / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    data, labels = _fake_cifar_arrays(FAKE_CIFAR["cifar10"][0], FAKE_CIFAR["cifar10"][2], rng)
    (c10 / "test_batch").write_bytes(pickle.dumps({b"labels": labels.tolist(), b"data": data}, protocol=2))

    c100 = root / "cifar-100-python"
    c100.mkdir(parents=True)
    for split, per_class in (("train", FAKE_CIFAR["cifar100"][1]), ("test", FAKE_CIFAR["cifar100"][2])):
        data, labels = _fake_cifar_arrays(FAKE_CIFAR["cifar100"][0], per_class, rng)
        batch = {b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": data}
        (c100 / split).write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.fixture(scope="session")
def fake_cifar_root(tmp_path_factory) -> Path:
    """A root holding fake ``cifar-10-batches-py/`` and ``cifar-100-python/`` (see FAKE_CIFAR)."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def synthetic_lt(tmp_path_factory):
    """A small synthetic long-tailed JPEG dataset: 10 classes, 32 px, exp profile 60 → 6."""
    from fastlt.data import make_synthetic_lt

    return make_synthetic_lt(tmp_path_factory.mktemp("synthetic") / "lt10", num_classes=10,
                             imb_factor=0.1, n_max=60, image_size=32, seed=0, n_val=10)
