"""GRES metrics (ReLA's evaluator after commit 884ef17) on hand-worked cases, through saved masks and a model."""
import json

import numpy as np
import pytest
import torch
from grefcoco_files import grefcoco_root

import data
import evaluate
from helpers import files
from sources import grefcoco

# (I, U, no_target, answered_none), worked by hand:
CASES = [(0, 0, True, True),     # no target, answered "no target": IoU 1, adds nothing to I and U
         (0, 5, True, False),    # no target, answered with a 5-pixel mask: IoU 0, U += 5
         (0, 10, False, True),   # a 10-pixel target answered "no target": I = 0, IoU 0, U += 10
         (6, 8, False, False),   # usual: IoU 0.75
         (9, 10, False, False)]  # usual: IoU 0.9


def test_each_rule_on_its_own():
    assert evaluate.gres_task(0, 0, True, True) == (1.0, 0, 0)
    assert evaluate.gres_task(0, 5, True, False) == (0.0, 0, 5)
    assert evaluate.gres_task(0, 10, False, True) == (0.0, 0, 10)
    assert evaluate.gres_task(6, 8, False, False) == (0.75, 6, 8)
    assert evaluate.gres_task(3, 7, False, True) == (0.0, 0, 7)  # whatever I was measured, a "no target" answer has none


def test_summary_of_the_hand_worked_tasks():
    m = evaluate.summarize_gres(CASES)
    assert m["gIoU"] == pytest.approx((1 + 0 + 0 + 0.75 + 0.9) / 5)
    assert m["cIoU"] == pytest.approx((6 + 9) / (5 + 10 + 8 + 10))
    assert m["N_acc"] == pytest.approx(1 / 2) and m["T_acc"] == pytest.approx(2 / 3)
    # over target tasks only (IoU 0, 0.75, 0.9), and ReLA counts IoU >= k
    assert (m["Pr@0.7"], m["Pr@0.8"], m["Pr@0.9"]) == pytest.approx((2 / 3, 1 / 3, 1 / 3))
    only_empty = evaluate.summarize_gres(CASES[:2])
    assert only_empty["T_acc"] is None and only_empty["Pr@0.7"] is None and only_empty["gIoU"] == 0.5
    assert evaluate.summarize_gres([(0, 0, True, True)])["cIoU"] == 0.0  # nothing added at all


def test_gres_keys_appear_only_when_the_data_has_a_no_target_task():
    with_nt = evaluate.add_gres(evaluate.summarize_tasks([(i, u, []) for i, u, *_ in CASES]),
                                [(i, u, [], nt, none) for i, u, nt, none in CASES])
    assert with_nt["gIoU"] == pytest.approx(0.53) and with_nt["mIoU"] == pytest.approx((0.75 + 0.9) / 5)
    plain = [(6, 8, [], False, False), (0, 10, [], False, True)]
    assert "gIoU" not in evaluate.add_gres(evaluate.summarize_tasks([t[:3] for t in plain]), plain)


def test_n_acc_per_kind_where_the_data_names_kinds():
    tasks = [(0, 0, [], True, True), (0, 5, [], True, False), (0, 0, [], True, True), (6, 8, [], False, False),
             (0, 3, [], True, False)]
    kinds = ["shape", "shape", "pair", "", "relation"]  # a target task has no kind
    m = evaluate.add_gres(evaluate.summarize_tasks([t[:3] for t in tasks]), tasks, kinds)
    assert m["N_acc_by_kind"] == {"pair": [1, 1.0], "relation": [1, 0.0], "shape": [2, 0.5]}
    assert m["N_acc"] == pytest.approx(2 / 4)  # the kinds split N_acc, they do not change it
    assert "N_acc by kind: pair 100.00 (n=1)  relation 0.00 (n=1)  shape 50.00 (n=2)" in evaluate.format_table(m)
    assert "N_acc_by_kind" not in evaluate.add_gres(evaluate.summarize_tasks([t[:3] for t in tasks]), tasks)


def grefcoco_val(tmp_path):
    out = tmp_path / "val.lmdb"
    grefcoco.build_grefcoco(grefcoco_root(tmp_path), "val", out, progress=False)
    return data.PhraseCutLMDB(out, input_size=32, train=False)


def test_saved_masks_are_scored_by_the_gres_rules(tmp_path):
    ds = grefcoco_val(tmp_path)  # 504, 505: targets; 506, 507: no target
    preds = tmp_path / "preds"
    preds.mkdir()
    sizes = {}
    for i in range(len(ds)):
        task_id, gt, _, _ = ds.targets(i)
        pred = np.zeros_like(gt)
        if task_id == "504":
            pred = gt  # exact
        if task_id == "507":
            pred[:2, :2] = 1  # a 4-pixel mask for a phrase that names nothing
        sizes[task_id] = int(gt.sum())
        files.save_mask(pred, files.mask_path(preds, task_id))
    evaluate.main(["--data", ds.path, "--pred-masks", str(preds), "--json", str(tmp_path / "m.json"), "--no-progress"])
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 4 and m["gIoU"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert m["cIoU"] == pytest.approx(sizes["504"] / (sizes["504"] + sizes["505"] + 4))
    assert (m["N_acc"], m["T_acc"], m["Pr@0.7"], m["Pr@0.9"]) == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert m["mIoU"] == pytest.approx(0.25)  # the usual figures stay as they were: IoU 0 on an empty ground truth
    assert "ReLA" in m["definitions"]["Pr@k"] and "gIoU" in m["definitions"]


class Constant(torch.nn.Module):
    """A stand-in model whose logits are one value everywhere: every mask full, or every mask empty."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(value)))

    def forward(self, image, tokens):
        return self.value.expand(image.shape[0], 1, image.shape[-2] // 4, image.shape[-1] // 4)


def test_a_model_that_answers_nothing_or_everything(tmp_path):
    ds = grefcoco_val(tmp_path)
    none = evaluate.evaluate(Constant(-20), ds, progress=False)
    assert (none["N_acc"], none["T_acc"], none["gIoU"], none["cIoU"]) == (1.0, 0.0, 0.5, 0.0)
    full = evaluate.evaluate(Constant(20), ds, progress=False)
    area = 32 * 32  # the no-target image (id 3) is 32 x 32; its two phrases each add the full mask to U
    inter = [int(ds.targets(i)[1].sum()) for i in range(2)]  # the target tasks: I = |G|, U = the image
    assert (full["N_acc"], full["T_acc"]) == (0.0, 1.0)
    assert full["cIoU"] == pytest.approx(sum(inter) / (2 * 36 * 24 + 2 * area))
    assert full["gIoU"] == pytest.approx(sum(i / (36 * 24) for i in inter) / 4)


def test_ckpt_and_its_saved_masks_give_the_same_gres_figures(tmp_path):
    from tooling import save_model_checkpoint

    import model
    ds = grefcoco_val(tmp_path)
    torch.manual_seed(0)
    net = model.build_model("smoke", no_target_head=True)
    with torch.no_grad():
        net.no_target.mlp[-1].bias.fill_(1e3)  # answers "no target" for every phrase
    save_model_checkpoint(net, tmp_path / "gres.pth")
    evaluate.main(["--ckpt", str(tmp_path / "gres.pth"), "--data", ds.path, "--json", str(tmp_path / "a.json"),
                   "--save-masks", str(tmp_path / "masks"), "--no-progress"])
    evaluate.main(["--data", ds.path, "--pred-masks", str(tmp_path / "masks"), "--json", str(tmp_path / "b.json"),
                   "--no-progress"])
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert (a["N_acc"], a["T_acc"], a["gIoU"], a["cIoU"], a["n"]) == (1.0, 0.0, 0.5, 0.0, 4)
    assert {k: a[k] for k in ("gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "mIoU")} == \
        {k: b[k] for k in ("gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "mIoU")}
