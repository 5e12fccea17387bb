"""fastlt.kernels.testing.count_launches, the launch counter the kernel benchmarks record, and
analyse_events, the same count over several windows of one profile (``fastlt profile``).

On CPU it counts the outermost PyTorch operators that do work (views, allocations and
metadata queries launch nothing on a GPU) plus fastlt's Triton launches; scalar reads are
counted as host syncs. The Triton side is checked in the kernel test modules, which run the
interpreter.
"""
import pytest
import torch

from fastlt.kernels.testing import analyse_events, count_launches, event_windows


def test_counts_each_working_operator_once():
    x = torch.randn(4, 5)
    got = count_launches(lambda: (x + 1) * 2, "cpu")
    assert got["launches"] == 2 and got["torch_ops"] == 2 and got["triton"] == 0 and got["host_syncs"] == 0
    assert got["ops"] == {"aten::add": 1, "aten::mul": 1}


def test_views_and_allocations_are_not_launches():
    x = torch.randn(4, 5)
    assert count_launches(lambda: (x.view(-1), x.t(), x[1:], torch.empty(3), x.unsqueeze(0)), "cpu")["launches"] == 0
    # A view made contiguous copies: one launch (the copy), however many ops it nests.
    assert count_launches(lambda: x.t().contiguous(), "cpu")["launches"] == 1


def test_scalar_reads_are_host_syncs_not_launches():
    x = torch.randn(4, 5)
    got = count_launches(lambda: x.sum().item(), "cpu")
    assert got["launches"] == 1 and got["host_syncs"] == 1


def test_every_kind_of_host_read_is_one_sync():
    """bool(t) (a read inside aten::is_nonzero), int(t), and boolean indexing (nonzero inside
    aten::index: the output size is read) are one sync each."""
    x = torch.randn(4, 5)
    got = count_launches(lambda: (bool(x.sum() > 0), int(x.max()), x[x > 0]), "cpu")
    assert got["host_syncs"] == got["scalar_reads"] == 3, got
    assert got["sync_sites"] == {"fastlt::count_launches > aten::item": 2,
                                 "fastlt::count_launches > aten::nonzero": 1}, got


def test_analyse_events_counts_each_window_of_one_profile():
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(4, 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("w"):
            x + 1
        x * 3  # between the windows: not counted
        with record_function("w"):
            (x - 1).sum().item()
    events = prof.events()
    windows = event_windows(events, "w")
    first, second = analyse_events(events, windows, cuda=False)
    assert first["ops"] == {"aten::add": 1} and first["host_syncs"] == 0
    assert second["ops"] == {"aten::sub": 1, "aten::sum": 1} and second["host_syncs"] == 1
    assert analyse_events(events, [], cuda=False) == []


def test_backward_ops_are_counted():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)

    def step():
        w.grad = None
        (x @ w).sum().backward()

    step()
    got = count_launches(step, "cpu")
    # forward: matmul, sum; backward: the seed gradient (ones_like), sum's gradient (a view,
    # expand), and one mm for w's gradient (x needs none).
    assert got["ops"] == {"aten::matmul": 1, "aten::sum": 1, "aten::ones_like": 1, "aten::mm": 1}, got


def test_unknown_device_type_is_refused():
    with pytest.raises(ValueError, match="must be a cpu or cuda device; got meta"):
        count_launches(lambda: None, "meta")
