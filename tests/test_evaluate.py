"""evaluate.py: the official metric definitions on hand-worked cases, subsets, safe mask files,
mapping back to the original size, and a two-process torchrun run equal to one process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate as ev  # noqa: E402


def masks(shape, pred_pixels, gt_pixels):
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    for y, x in pred_pixels:
        pred[y, x] = True
    for y, x in gt_pixels:
        gt[y, x] = True
    return pred, gt


# --------------------------------------------------------------------------- metrics

def test_empty_prediction_scores_zero():
    pred, gt = masks((3, 5), [], [(0, 0), (1, 1), (2, 4), (0, 4)])
    assert ev.task_iou(pred, gt) == (0, 4)
    m = ev.summarize([0], [4])
    assert m["mIoU"] == 0.0 and m["oIoU"] == 0.0 and m["prec@0.5"] == 0.0 and m["n"] == 1


def test_empty_ground_truth_and_both_empty():
    pred, gt = masks((4, 2), [(0, 0), (3, 1), (2, 0)], [])
    assert ev.task_iou(pred, gt) == (0, 3)
    empty = np.zeros((4, 2), bool)
    assert ev.task_iou(empty, empty) == (0, 0)
    assert ev.iou(0, 0) == 0.0  # official: I == 0 -> IoU 0, never 0/0
    assert ev.summarize([0, 0], [3, 0])["oIoU"] == 0.0


def test_disjoint_masks_have_zero_iou():
    pred, gt = masks((6, 6), [(0, 0), (0, 1)], [(5, 5), (4, 5), (5, 4)])
    assert ev.task_iou(pred, gt) == (0, 5)
    assert ev.iou(0, 5) == 0.0


def test_iou_exactly_half_is_not_a_hit_at_half():
    pred, gt = masks((2, 3), [(0, 0), (0, 1)], [(0, 0)])
    inter, union = ev.task_iou(pred, gt)
    assert (inter, union) == (1, 2) and ev.iou(inter, union) == 0.5
    m = ev.summarize([inter], [union])
    assert m["mIoU"] == 0.5 and m["prec@0.5"] == 0.0  # strictly greater


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(0)
    pred, gt = rng.random((7, 11)) > 0.5, rng.random((7, 11)) > 0.6
    assert ev.task_iou(torch.from_numpy(pred), torch.from_numpy(gt)) == ev.task_iou(pred, gt)
    with pytest.raises(ValueError, match="shape"):
        ev.task_iou(pred, gt.T)


def test_mean_and_cumulative_iou_differ():
    # IoUs 1/2, 9/10, 0/5: mean (0.5 + 0.9 + 0) / 3, cumulative (1 + 9 + 0) / (2 + 10 + 5)
    inter, union = [1, 9, 0], [2, 10, 5]
    m = ev.summarize(inter, union)
    assert math.isclose(m["mIoU"], 1.4 / 3)
    assert m["oIoU"] == 10 / 17
    assert m["prec@0.5"] == 1 / 3   # only 0.9
    assert m["prec@0.8"] == 1 / 3
    assert m["prec@0.9"] == 0.0     # 9/10 == 0.9 is not > 0.9
    assert m["n"] == 3
    assert set(m) == set(ev.METRIC_KEYS)


def test_empty_set_has_null_metrics():
    m = ev.summarize([], [])
    assert m["n"] == 0 and all(m[k] is None for k in ev.METRIC_KEYS if k != "n")


def test_phrasecut_subsets_follow_the_official_code():
    s = ev.phrasecut_subsets
    assert s(1, "name", False, False, 0.1) == ["i_single", "p_name", "s_mid"]
    assert s(4, "attribute", True, False, 0.01) == ["i_multi", "p_att", "p_att+", "s_small"]
    assert s(5, "relation", False, True, 0.5) == ["i_multi", "i_many", "p_rel", "p_rel+", "s_large"]
    assert s(2, "verbose", True, True, 0.02) == ["i_multi", "p_att", "p_rel", "p_verbose", "s_mid"]
    assert "s_mid" in s(1, "name", False, False, 0.2)  # both boundaries are mid


def test_summarize_tasks_layout():
    tasks = [(1, 2, ["i_single", "p_name", "s_small"]), (9, 10, ["i_multi", "p_att", "s_small"])]
    r = ev.summarize_tasks(tasks)
    assert r["n"] == 2 and list(r["subsets"]) == list(ev.SUBSETS)
    assert r["subsets"]["s_small"] == ev.summarize([1, 9], [2, 10])
    assert r["subsets"]["i_single"]["mIoU"] == 0.5
    assert r["subsets"]["s_large"]["n"] == 0 and r["subsets"]["s_large"]["mIoU"] is None
    json.dumps(r)
    assert "i_single" in ev.format_table(r)


# --------------------------------------------------------------------------- mask files

@pytest.mark.parametrize("bad", ["../x", "a/b", "/etc/passwd", "a\\b", "a\x00b", "..", ".", "", ".hidden",
                                 "x..y", "C:evil", 7])
def test_unsafe_task_ids_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="task id"):
        ev.mask_path(tmp_path, bad)


def test_mask_round_trip_non_square(tmp_path):
    mask = np.zeros((5, 9), bool)
    mask[1:3, 2:8] = True
    path = ev.save_mask(mask, tmp_path, "2412359__1373393")
    assert path == tmp_path / "2412359__1373393.png"
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (9, 5) and im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
    assert np.array_equal(ev.load_mask(path), mask)
