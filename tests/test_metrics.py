"""fastlt.reports.metrics.shot_accuracy against docs/design.md §1 "Evaluation"."""
import math

import numpy as np
import pytest
import torch

from fastlt.reports.metrics import shot_accuracy


def test_groups_and_per_class_averaging():
    counts = np.array([500, 101, 100, 20, 19, 1])  # many, many, medium, medium, few, few
    labels = np.array([0, 0, 1, 2, 2, 2, 2, 3, 4, 5, 5])
    preds = np.array([0, 1, 1, 2, 2, 0, 0, 3, 0, 5, 0])
    out = shot_accuracy(torch.from_numpy(preds), torch.from_numpy(labels), counts)
    assert out["per_class"] == pytest.approx([50, 100, 50, 100, 0, 50])
    assert out["overall"] == pytest.approx(100 * 6 / 11)
    assert out["many"] == pytest.approx(75)     # classes 0 (50 %) and 1 (100 %)
    assert out["medium"] == pytest.approx(75)   # classes 2 (50 %) and 3 (100 %)
    assert out["few"] == pytest.approx(25)      # classes 4 (0 %) and 5 (50 %)


def test_missing_group_and_class_are_nan():
    out = shot_accuracy([0, 1], [0, 1], [200, 150, 3])
    assert math.isnan(out["medium"]) and math.isnan(out["few"]) and math.isnan(out["per_class"][2])
    assert out["many"] == 100.0


def test_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        shot_accuracy([0, 1], [0], [5, 5])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        shot_accuracy([0, 1], [0, 2], [5, 5])
    with pytest.raises(ValueError, match="class indices"):
        shot_accuracy([0.5], [0], [5, 5])
