"""Shared pytest fixtures and helpers: the real split lists, fake CIFAR batches, a small
synthetic dataset, tiny trainer configs and the entry points as subprocesses, and the
independently written expectations the pipeline tests share.

Fixtures that build data on disk are session-scoped (built once per run) and must be
treated as read-only by the tests that use them. Test modules import the helpers with
``from conftest import ...``.
"""
from __future__ import annotations

# First, before any test module imports triton (torchvision and timm do): on a machine without
# a GPU, switch triton to its interpreter for the whole session, so that the kernel parity cases
# run in this process (and in each xdist worker, which loads this file first) and report passed
# or failed; triton fixes its mode at its first import.
from fastlt.kernels.testing import prepare_interpreter

prepare_interpreter()

import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker (and the training processes it starts, through
    OMP_NUM_THREADS) gets its share of the cores: N workers each running torch on every core
    would spin OpenMP threads against each other, many times slower on a small machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


_share_the_cores()

# The end-to-end tier: tests of 10-100 CPU-seconds each (a whole CLI training run in a child
# process, a DALI pipeline built for 1, 2 and 4 ranks, a compiled training step, a wheel
# installed into a new environment). They carry the marker `slow` and run in `make test-slow`
# (and CI), not in `make test`, which is to stay within 6 minutes on a fresh clone, install
# included. The multi-process cluster simulations are marked in their own files.
# Each is listed by its node id; a listed id that names no test fails the collection of its file.
END_TO_END = {
    "tests/test_world_size.py::test_global_batches_do_not_depend_on_the_number_of_ranks[dali-cutmix-per-batch]",
    "tests/test_world_size.py::test_global_batches_do_not_depend_on_the_number_of_ranks[dali-cutmix-per-sample]",
    "tests/test_demo.py::test_two_short_demo_runs_are_identical",
    "tests/test_hot_path.py::test_host_syncs_at_most_once_per_interval_epoch_eval_and_checkpoint",
    "tests/test_recipes.py::test_installed_wheel_lists_recipes_and_runs_the_demo",
    "tests/test_recipes.py::test_a_wheel_installed_without_dali_trains_the_demo_on_the_torch_backend",
    "tests/test_pipelines_cifar_files.py::test_cifar_recipe_trains_on_32px_jpegs[dali]",
    "tests/test_pipelines_cifar_files.py::test_image_folder_gives_the_batches_of_the_equivalent_list[dali]",
    "tests/test_pipelines_cifar_files.py::test_deterministic_across_workers_and_resumes_exactly[dali]",
    "tests/test_pipelines_cifar_files.py::test_bad_files_follow_on_error[dali]",
    "tests/test_objective.py::test_trainer_runs_a_compiled_step",
    "tests/test_objective.py::test_compiled_step_equals_the_eager_step_and_trains",
    "tests/test_reference_parallelism.py::test_a_dp4_run_trains_and_two_ranks_log_its_first_step",
    "tests/test_train.py::test_bf16_zero2_accumulation_and_clipping_run_end_to_end",
    "tests/test_train.py::test_ctrl_c_saves_mid_epoch_and_resume_is_exact",
    "tests/test_train.py::test_demo_command_prints_the_four_accuracies_and_the_run_directory",
    "tests/test_faults.py::test_5_bad_training_image_keeps_the_steps_before_it[dali]",
    "tests/test_faults.py::test_5_bad_training_image_keeps_the_steps_before_it[torch]",
    "tests/test_pipelines_dali.py::test_full_recipe_is_deterministic_and_resumable",
    "tests/test_pipelines_dali.py::test_start_step_resumes_exactly_and_does_not_rebuild_between_epochs",
    "tests/test_distributed_fidelity.py::test_zero_shards_are_not_read_by_another_partitioning",
    "tests/test_faults_runs.py::test_7_a_signal_in_the_final_evaluation_or_the_report_stops_the_run_resumably",
    "tests/test_augment_parity.py::test_cifar_recipe_is_deterministic_and_resumes_exactly[dali]",
    "tests/test_faults.py::test_3_failing_evaluation_keeps_the_epochs_checkpoint_and_resume_evaluates_it",
    "tests/test_faults.py::test_10_replaced_training_images_are_reported_every_epoch[dali]",
    "tests/test_faults.py::test_10_replaced_training_images_are_reported_every_epoch[torch]",
    "tests/test_faults.py::test_5_bad_training_image_stops_the_run_with_one_line[dali]",
    "tests/test_faults.py::test_5_bad_training_image_stops_the_run_with_one_line[torch]",
    "tests/test_faults.py::test_6_disk_full_during_a_checkpoint_write",
    "tests/test_pipelines_dali.py::test_ranks_and_seeds_differ",
    "tests/test_pipelines_dali.py::test_short_dali_fed_training_run_lowers_the_loss",
    "tests/test_pipelines_dali.py::test_cifar_recipe_with_autoaugment_and_blur",
    "tests/test_train.py::test_short_run_loss_falls_and_writes_the_run_directory",
    "tests/test_faults_runs.py::test_1_a_new_run_initialised_from_another_runs_checkpoint_records_its_lineage",
    "tests/test_faults_runs.py::test_6_resume_on_a_changed_training_set",
    "tests/test_hot_path.py::test_the_model_receives_the_pipeline_s_one_image_tensor[torch]",
    "tests/test_profile.py::test_profile_area_phase_into_another_folder",
    "tests/test_examples.py::test_custom_training_loop_trains_both_label_phases_and_evaluates",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marker must be there when it looks
def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        if item.nodeid in END_TO_END:
            item.add_marker(pytest.mark.slow)
            found.add(item.nodeid)
    collected = {item.nodeid.split("::")[0] for item in items}
    whole_files = not any("::" in str(a) for a in config.args)  # a file or folder, not one test
    stale = sorted(n for n in END_TO_END - found if n.split("::")[0] in collected)
    if whole_files and stale and not config.getoption("keyword"):
        raise pytest.UsageError(f"tests/conftest.py END_TO_END names tests that do not exist: {stale}")


# The published ImageNet-LT / Places-LT / iNaturalist18 lists shipped with fastlt, gzip-compressed
# (fastlt.data.published; the images themselves are not on this machine).
SPLITS_DIR = Path(__file__).resolve().parents[1] / "fastlt" / "data" / "splits"


@pytest.fixture(autouse=True)
def _seeded_global_generators():
    """Every test starts from the same global random state (torch, numpy, random), so a test
    that draws unseeded inputs (a model's initial weights, ``torch.randn`` without a
    generator) sees the same values whichever tests ran before it."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def splits_dir() -> Path:
    """Directory of the shipped split lists (``<name>.txt.gz``)."""
    return SPLITS_DIR


@pytest.fixture(scope="session")
def places_train(splits_dir):
    """Places-LT training list (labels and counts only: root points nowhere real)."""
    from fastlt.data import LongTailedList

    return LongTailedList(splits_dir / "no-images", splits_dir / "Places_LT_train.txt.gz")


# Fake CIFAR sizes: per-class train / test images. Small, but in the real on-disk format.
FAKE_CIFAR = {"cifar10": (10, 30, 4), "cifar100": (100, 5, 2)}


@pytest.fixture
def triton_backend(monkeypatch):
    """FASTLT_KERNELS=triton for one test, with the kernel dispatch cache cleared around it."""
    from fastlt.kernels import dispatch  # imported here: a test module decides when triton loads

    monkeypatch.setenv("FASTLT_KERNELS", "triton")
    dispatch._reset_for_tests()
    yield
    dispatch._reset_for_tests()


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


# --------------------------------------------------------------------------------------
# Runs of the trainer: a tiny config, the entry points as subprocesses, reading a run directory
# --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
#: Runs fastlt.train arguments and signals the run from inside a given step (see the script).
#: The deepspeed launcher of this interpreter's environment (multi-rank tests skip without it).
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
#: Variables a parent test process may hold that would make a child think it is a rank of a job.
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", "FASTLT_PIPELINE")
TINY_CLASSES = 6
TINY_STEPS = 6  # per epoch (run.max_steps_per_epoch)


def tiny_config(data_root: Path, out_dir: Path, **sections) -> dict:
    """A ResNet-32 at 16 px on 6 synthetic classes: a few CPU seconds per epoch. ``sections``
    update the named sections key by key (``run={"name": "x"}``)."""
    cfg = {
        "model": {"backbone": "resnet32", "feat_dim": 16, "use_norm": False, "hidden_dim": 32},
        "data": {"kind": "synthetic", "root": str(data_root),
                 "synthetic": {"num_classes": TINY_CLASSES, "imb_factor": 0.2, "n_max": 40, "image_size": 16,
                               "n_val": 4, "seed": 0},
                 "augment_recipe": "imagenet", "image_size": 16, "batch_size": 8, "eval_batch_size": 16,
                 "randaugment": False},
        "method": {"alpha": 1.0, "beta": 0.5, "tau": 1.0, "l_d_warm": 0, "scaling_factor": [20, 255], "topk": 3,
                   "temperature": 0.1},
        "optim": {"epochs": 2, "lr": 0.05, "schedule": "cos", "warmup_epochs": 0},
        "pipeline": {"backend": "torch", "num_workers": 0},
        "run": {"output_dir": str(out_dir), "log_every": 2, "eval_every": 1, "max_steps_per_epoch": TINY_STEPS,
                "keep_last": 2, "progress_bar": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """The synthetic dataset of :func:`tiny_config`, generated once per test session (once per
    xdist worker) for every training run of the suite. Read-only: copy it to change it."""
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets

    root = tmp_path_factory.mktemp("tiny-data") / "tiny"
    build_datasets(config_from_dict(tiny_config(root, tmp_path_factory.mktemp("unused"))))
    return root


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli_in_process(capsys, *args) -> tuple[int, str, str]:
    """``fastlt args...`` in this process: (exit code, stdout, stderr). Argparse refusals,
    ``--help`` and ``--version`` come back as exit codes from ``fastlt.cli.main`` too."""
    from fastlt.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def child_env(**extra: str) -> dict:
    """This process's environment without the launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(extra)
    return env


#: Bounds on a child run: generous (a tiny run takes seconds alone, and a loaded 2-core machine
#: only makes it slower), so that expiring means a hang, said as such.
RUN_TIMEOUT, LAUNCH_TIMEOUT = 600, 900


def _run_bounded(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise AssertionError(f"{' '.join(map(str, cmd[:4]))} ... still ran after {timeout:.0f} s (a tiny run takes "
                             f"seconds): it hangs\n--- stdout so far\n{tail}") from None


def error_line(text: str) -> str:
    """The one line of stderr: ``fastlt: error: ...``, nothing else (no traceback above it)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastlt: error: "), text[-4000:]
    return lines[0]


def interrupt_when_paused(config: Path, point: str, *, sig=signal.SIGINT, timeout: float = 600
                          ) -> tuple[int, str, str]:
    """Train ``config`` in a child process that waits at pause point ``point`` (FASTLT_TEST_PAUSE,
    test-only), send ``sig`` to its whole process group (workers included, as a Ctrl-C does) when it
    gets there, and wait (bounded); returns (exit code, stdout, stderr). The signal lands at a known
    step however fast or slow the machine runs the loop."""
    proc = subprocess.Popen([sys.executable, "-m", "fastlt.train", "--config", str(config)], cwd=REPO,
                            env=child_env(FASTLT_TEST_PAUSE=point), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"fastlt-test: paused at {point}"):
            os.killpg(proc.pid, sig)
            break
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + out, err


def run_fastlt(*args, timeout: float = RUN_TIMEOUT, check_rc: int | None = 0, module: str = "fastlt.train",
               **popen) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` from the repository root; checks the exit code."""
    proc = _run_bounded([sys.executable, "-m", module, *map(str, args)], timeout, cwd=REPO, env=child_env(), **popen)
    if check_rc is not None and proc.returncode != check_rc:
        raise AssertionError(f"exit code {proc.returncode} (expected {check_rc})\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("EADDRINUSE", "address already in use")
PORT_ATTEMPTS = 3


def launch_deepspeed(config: Path, *extra: str, ranks: int = 2,
                     timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --module fastlt.train`` on CPU (one process per rank, gloo).

    The launcher needs its rendezvous port up front, so a free one is picked and released
    before rank 0's store binds it; another process can take it in between. A launch whose
    store found the port taken is retried on a new port (up to PORT_ATTEMPTS launches)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), "--module", "fastlt.train",
               "--config", str(config), *extra]
        proc = _run_bounded(cmd, timeout, cwd=REPO, env=child_env(DS_ACCELERATOR="cpu"))
        if proc.returncode == 0 or not any(m in proc.stdout + proc.stderr for m in PORT_TAKEN):
            break
        if attempt == PORT_ATTEMPTS:
            raise AssertionError(f"deepspeed launcher: the rendezvous port was taken by another process before the "
                                 f"store bound it, {PORT_ATTEMPTS} launches in a row (last port {port})")
    if proc.returncode != 0:
        raise AssertionError(f"deepspeed launcher exit code {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}"
                             f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The records of a run's log.jsonl (of one event kind if given)."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["event"] == kind]


def weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, first: {differ[:3]}"


def tree_digest(path: Path) -> dict:
    """SHA-256 of every file under ``path``: equal digests mean nothing was written there."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------
# Pipelines: expected values written independently of the library
# --------------------------------------------------------------------------------------


def loss_before_and_after_training(pipeline, dataset, epochs: int = 8) -> tuple[float, float]:
    """A tiny training loop fed by ``pipeline`` (not the DeepSpeed trainer, which has its own
    tests): ResNet-32 BCL model, logit-adjusted CE on the area label y = λ·onehot(a) +
    (1 − λ)·onehot(b) (docs/design.md §1). Returns the mean loss on epoch 0's batches before and
    after ``epochs`` epochs: the same images both times, so the comparison does not depend on
    which batches a short noisy run happens to end on. Closes the pipeline.

    Runs torch on one intra-op thread: the pipeline's workers already use both cores, and
    OpenMP workers spinning against them make a step tens of times slower on a 2-core machine.
    """
    import torch
    from fastlt.method.losses import LogitAdjustedCrossEntropy
    from fastlt.models import BCLModel

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    c = dataset.num_classes
    model = BCLModel("resnet32", num_classes=c, feat_dim=32, use_norm=False)
    ce = LogitAdjustedCrossEntropy(dataset.class_counts, tau=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def loss_of(b):
        one_hot = torch.nn.functional.one_hot
        y = b.lam[:, None] * one_hot(b.label_a, c) + (1 - b.lam[:, None]) * one_hot(b.label_b, c)
        return ce(model(b.image).logits, y)

    try:
        first = list(pipeline.epoch(0))
        with torch.no_grad():
            before = float(np.mean([loss_of(b).item() for b in first]))
        for epoch in range(epochs):
            for b in pipeline.epoch(epoch):
                loss = loss_of(b)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            after = float(np.mean([loss_of(b).item() for b in first]))
    finally:
        pipeline.close()
        torch.set_num_threads(threads)
    return before, after


def reference_view(path, size, mean=None, std=None):
    """Augmentation off: decode, bilinear resize to size × size, scale to [0, 1], normalise (PIL)."""
    import torch
    from PIL import Image

    from fastlt.pipelines import IMAGENET_MEAN, IMAGENET_STD

    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


def pasted_box(image, background):
    """Bounding box (y0, x0, y1, x1) of the pixels where ``image`` differs from ``background``."""
    import torch

    diff = (image != background).any(0)
    if not diff.any():
        return None
    ys, xs = torch.nonzero(diff, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def assert_same_batches(a, b):
    """Two lists of TrainBatch hold identical tensors."""
    import torch

    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("image", "view1", "view2", "label_a", "label_b", "lam", "mixed"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def assert_dataset_checks(make, train_ds):
    """What both training pipelines refuse, with what they need: a batch larger than the dataset,
    a dataset with neither decoded arrays nor files under the CIFAR recipe, and arrays under the
    imagenet recipe (which reads encoded files). ``make(ds, **kw)`` builds the pipeline."""
    from types import SimpleNamespace

    from fastlt.data import ArrayDataset

    with pytest.raises(ValueError, match="batch_size"):
        make(train_ds, batch_size=10_000)
    with pytest.raises(ValueError, match="needs either images uint8 \\(N, H, W, 3\\) in memory .* or read_bytes"):
        make(SimpleNamespace(labels=train_ds.labels, images=np.zeros((len(train_ds), 8, 8))), recipe="cifar")
    arrays = ArrayDataset(images=np.zeros((len(train_ds), 8, 8, 3), np.uint8), labels=train_ds.labels,
                          class_counts=train_ds.class_counts, num_classes=train_ds.num_classes)
    with pytest.raises(ValueError, match="recipe 'imagenet' reads encoded files.*use recipe 'cifar'"):
        make(arrays, recipe="imagenet")
