"""evaluate.py: the official metric definitions on hand-worked cases, subsets, safe mask files,
mapping back to the original size, a two-process torchrun run equal to one process, and the CLI's
mistakes (bad outputs, devices, data paths) reported before any work, without a traceback."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tooling import save_model_checkpoint

import evaluate as ev
import evaluate as metrics
from helpers import (
    eval_files,
    figures,
    files,
    model_files,
)
from sources import (
    phrasecut,
    synthetic,
)

ROOT = Path(__file__).resolve().parents[1]


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
    assert metrics.task_iou(pred, gt) == (0, 4)
    m = metrics.summarize([0], [4])
    assert m["mIoU"] == 0.0 and m["oIoU"] == 0.0 and m["prec@0.5"] == 0.0 and m["n"] == 1


def test_empty_ground_truth_and_both_empty():
    pred, gt = masks((4, 2), [(0, 0), (3, 1), (2, 0)], [])
    assert metrics.task_iou(pred, gt) == (0, 3)
    empty = np.zeros((4, 2), bool)
    assert metrics.task_iou(empty, empty) == (0, 0)
    assert metrics.iou(0, 0) == 0.0  # official: I == 0 -> IoU 0, never 0/0
    assert metrics.summarize([0, 0], [3, 0])["oIoU"] == 0.0


def test_disjoint_masks_have_zero_iou():
    pred, gt = masks((6, 6), [(0, 0), (0, 1)], [(5, 5), (4, 5), (5, 4)])
    assert metrics.task_iou(pred, gt) == (0, 5)
    assert metrics.iou(0, 5) == 0.0


def test_iou_exactly_half_is_not_a_hit_at_half():
    pred, gt = masks((2, 3), [(0, 0), (0, 1)], [(0, 0)])
    inter, union = metrics.task_iou(pred, gt)
    assert (inter, union) == (1, 2) and metrics.iou(inter, union) == 0.5
    m = metrics.summarize([inter], [union])
    assert m["mIoU"] == 0.5 and m["prec@0.5"] == 0.0  # strictly greater


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(0)
    pred, gt = rng.random((7, 11)) > 0.5, rng.random((7, 11)) > 0.6
    assert metrics.task_iou(torch.from_numpy(pred), torch.from_numpy(gt)) == metrics.task_iou(pred, gt)
    with pytest.raises(ValueError, match="shape"):
        metrics.task_iou(pred, gt.T)


def test_mean_and_cumulative_iou_differ():
    # IoUs 1/2, 9/10, 0/5: mean (0.5 + 0.9 + 0) / 3, cumulative (1 + 9 + 0) / (2 + 10 + 5)
    inter, union = [1, 9, 0], [2, 10, 5]
    m = metrics.summarize(inter, union)
    assert math.isclose(m["mIoU"], 1.4 / 3)
    assert m["oIoU"] == 10 / 17
    assert m["prec@0.5"] == 1 / 3   # only 0.9
    assert m["prec@0.8"] == 1 / 3
    assert m["prec@0.9"] == 0.0     # 9/10 == 0.9 is not > 0.9
    assert m["n"] == 3
    assert set(m) == set(metrics.METRIC_KEYS)


def test_empty_set_has_null_metrics():
    m = metrics.summarize([], [])
    assert m["n"] == 0 and all(m[k] is None for k in metrics.METRIC_KEYS if k != "n")


def structure(name="cup", attributes=(), relation_descriptions=(), relation_ids=(), kind="name"):
    """A phrase_structure as PhraseCut's refer_*.json holds it."""
    return {"name": name, "attributes": list(attributes), "relation_ids": list(relation_ids),
            "relation_descriptions": [list(d) for d in relation_descriptions], "type": kind}


def subsets(ps=None, instances=1, area=0.1, coco=False, ranks=None, group=None):
    """The task's subsets, only those of one group (prefixes) when `group` is given."""
    names = phrasecut.phrasecut_subsets(ps or structure(), instances, area, coco, ranks)
    return [n for n in names if n.startswith(group)] if group else names


@pytest.mark.parametrize("instances, expected", [(0, []), (1, ["i_single"]), (2, ["i_multi"]), (4, ["i_multi"]),
                                                 (5, ["i_many"]), (12, ["i_many"])])
def test_instance_subsets_are_disjoint(instances, expected):
    assert subsets(instances=instances, group="i_") == expected  # official since October 2019: 5+ is not i_multi


@pytest.mark.parametrize("area, expected", [
    (0.0, "s_small"), (0.0199, "s_small"), (np.nextafter(0.02, 0), "s_small"), (0.02, "s_mid"),
    (np.nextafter(0.02, 1), "s_mid"), (0.2, "s_mid"), (np.nextafter(0.2, 1), "s_large"), (0.2001, "s_large"),
    (1.0, "s_large")])
def test_size_subsets_at_their_boundaries(area, expected):
    assert subsets(area=float(area), group="s_") == [expected]


def test_phrase_subsets_count_relation_descriptions_not_ids():
    p = lambda ps: subsets(ps, group="p_")  # noqa: E731
    assert p(structure()) == ["p_name"]
    assert p(structure(relation_ids=[17, 18], kind="verbose")) == ["p_verbose"]  # ids alone: not p_rel
    assert p(structure(attributes=["red"], kind="attribute")) == ["p_att", "p_att+"]
    assert p(structure(attributes=["red", "big"], kind="attribute")) == ["p_att", "p_att+", "p_attm"]
    assert p(structure(relation_descriptions=[("on", "table")], relation_ids=[3], kind="relation")) == \
        ["p_rel", "p_rel+"]
    assert p(structure(relation_descriptions=[("on", "table"), ("near", "door")], kind="relation")) == \
        ["p_rel", "p_rel+", "p_relm"]
    assert p(structure(attributes=["red"], relation_descriptions=[("on", "table")], kind="verbose")) == \
        ["p_att", "p_rel", "p_verbose", "p_att_rel"]
    # the type alone decides p_name / p_att+ / p_rel+: a "name" phrase may still carry an attribute
    assert p(structure(attributes=["red"], kind="name")) == ["p_name", "p_att"]


def ranks_for_test():
    """name_att_rel_count.json with 600 names n0..n599 and 300 attributes a0..a299, most frequent first."""
    return phrasecut.frequency_ranks({"cat": [[f"n{i}", 10_000 - i] for i in range(600)],
                               "att": [[f"a{i}", 10_000 - i] for i in range(300)],
                               "rel": [["on", 5]]})


@pytest.mark.parametrize("name, expected", [
    ("n0", ["c20", "c100", "c500"]), ("n19", ["c20", "c100", "c500"]), ("n20", ["c100", "c500", "c21-100"]),
    ("n99", ["c100", "c500", "c21-100"]), ("n100", ["c500", "c101-500"]), ("n499", ["c500", "c101-500"]),
    ("n500", ["c500+"]), ("n599", ["c500+"]), ("not in the file", ["c500+"])])  # absent: rank 501
def test_name_rank_subsets(name, expected):
    assert subsets(structure(name=name), ranks=ranks_for_test(), group="c") == expected


@pytest.mark.parametrize("attributes, expected", [
    ([], ["a200+"]),  # no attribute: rank 201
    (["a0"], ["a20", "a100", "a200"]), (["a19"], ["a20", "a100", "a200"]), (["a20"], ["a100", "a200", "a21-100"]),
    (["a99"], ["a100", "a200", "a21-100"]), (["a100"], ["a200", "a101-200"]), (["a199"], ["a200", "a101-200"]),
    (["a200"], ["a200+"]), (["a250"], ["a200+"]), (["unknown"], ["a200+"]),
    (["a150", "unknown", "a42", "a120"], ["a100", "a200", "a21-100"])])  # the best rank of its attributes
def test_attribute_rank_subsets(attributes, expected):
    ps = structure(attributes=attributes, kind="attribute")
    assert [n for n in subsets(ps, ranks=ranks_for_test()) if n[0] == "a" and n[1].isdigit()] == expected


def test_rank_subsets_are_left_out_without_the_count_file_and_coco_decides_d():
    names = subsets(structure(name="n3", attributes=["a3"], kind="attribute"))  # ranks=None
    assert not set(names) & set(phrasecut.RANK_SUBSETS)
    assert names == ["i_single", "p_att", "p_att+", "s_mid", "d_notcocotv"]
    assert subsets(coco=True, group="d_") == ["d_cocotv"]
    ranks = phrasecut.frequency_ranks({"cat": [["cup", 9], ["mug", 9], ["cup", 1]], "att": []})
    assert ranks["cat"] == {"cup": 0, "mug": 1}  # a word's first position, as list.index gives


def test_summarize_tasks_layout():
    tasks = [(1, 2, ["i_single", "p_name", "s_small"]), (9, 10, ["i_multi", "p_att", "s_small"])]
    r = metrics.summarize_tasks(tasks, phrasecut.subset_names())
    assert r["n"] == 2 and list(r["subsets"]) == list(phrasecut.SUBSETS) and "note" not in r
    assert r["subsets"]["s_small"] == metrics.summarize([1, 9], [2, 10])
    assert r["subsets"]["i_single"]["mIoU"] == 0.5
    assert r["subsets"]["s_large"]["n"] == 0 and r["subsets"]["s_large"]["mIoU"] is None
    json.dumps(r)
    assert "i_single" in metrics.format_table(r)
    assert list(metrics.summarize_tasks(tasks)["subsets"]) == ["i_single", "p_name", "s_small", "i_multi", "p_att"]
    unranked = metrics.summarize_tasks(tasks, phrasecut.subset_names(ranked=False), phrasecut.NO_RANKS_NOTE)
    assert list(unranked["subsets"]) == [n for n in phrasecut.SUBSETS if n not in phrasecut.RANK_SUBSETS]
    assert "name_att_rel_count.json" in unranked["note"] and unranked["note"] in metrics.format_table(unranked)


# --------------------------------------------------------------------------- mask files

@pytest.mark.parametrize("bad", ["../x", "a/b", "/etc/passwd", "a\\b", "a\x00b", "..", ".", "", ".hidden",
                                 "x..y", "C:evil", 7])
def test_unsafe_task_ids_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="task id"):
        files.mask_path(tmp_path, bad)


def test_mask_round_trip_non_square(tmp_path):
    mask = np.zeros((5, 9), bool)
    mask[1:3, 2:8] = True
    path = files.mask_path(tmp_path, "2412359__1373393")
    assert path == tmp_path / "2412359__1373393.png"
    files.save_mask(mask, path)
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (9, 5) and im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
    assert np.array_equal(files.load_mask(path), mask)


def test_a_failed_mask_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from PIL import Image
    old = np.eye(4, dtype=bool)
    files.save_mask(old, tmp_path / "t.png")

    def killed_midway(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")
    monkeypatch.setattr(Image.Image, "save", killed_midway)
    with pytest.raises(OSError, match="No space"):
        files.save_mask(~old, tmp_path / "t.png")
    monkeypatch.undo()
    assert np.array_equal(files.load_mask(tmp_path / "t.png"), old)
    assert [p.name for p in tmp_path.iterdir()] == ["t.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="t.txt: not an image file name"):
        files.save_mask(old, tmp_path / "t.txt")


# --------------------------------------------------------------------------- on a tiny synthetic LMDB

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train.py leaves it: test.lmdb (the tasks of 8 non-square synthetic
    images) and a smoke-preset checkpoint with random weights whose data_dir points here."""
    import model
    out = tmp_path_factory.mktemp("run")
    root = synthetic.synthesize(out / "raw", num_images=8, seed=1, size=80)
    phrasecut.build_lmdb(root, "train", out / "test.lmdb", progress=False)
    torch.manual_seed(0)
    net = model.build_model("smoke")
    save_model_checkpoint(net, out / "best.pth", data_dir=str(out))
    return out


def raw_task_count(run_dir):
    """Tasks in the PhraseCut JSON the test LMDB was built from (counted independently)."""
    return len(json.loads((run_dir / "raw" / "refer_train.json").read_text()))


@pytest.fixture(scope="module")
def smoke(run_dir):
    import data
    net, _ = model_files.load_checkpoint(run_dir / "best.pth")
    cfg = net.config
    return net, data.PhraseCutLMDB(run_dir / "test.lmdb", input_size=cfg.input_size, word_len=cfg.word_len,
                                   train=False)


class Oracle(torch.nn.Module):
    """Returns, batch after batch, logits made from each task's letterboxed ground truth:
    scoring them checks that predictions land on the right pixels of the original image."""

    def __init__(self, dataset):
        super().__init__()
        masks = torch.stack([dataset[i]["mask"] for i in range(len(dataset))])  # (N, 1, S, S)
        self.logits = 20 * (torch.nn.functional.avg_pool2d(masks, 4) - 0.5)  # (N, 1, S/4, S/4)
        self.seen = 0

    def forward(self, image, tokens):
        out = self.logits[self.seen:self.seen + len(image)]
        self.seen += len(image)
        return out


def test_predictions_map_back_onto_non_square_originals(run_dir):
    import data
    dataset = data.PhraseCutLMDB(run_dir / "test.lmdb", input_size=416, word_len=10, train=False)
    shapes = {tuple(dataset[i]["gt_mask"].shape) for i in range(len(dataset))}
    assert (60, 80) in shapes and (80, 60) in shapes  # landscape and portrait
    result = ev.evaluate(Oracle(dataset), dataset, batch_size=3, device="cpu", progress=False)
    assert result["n"] == len(dataset) == raw_task_count(run_dir)
    assert result["mIoU"] > 0.97 and result["prec@0.9"] == 1.0  # a shifted or stretched mask fails this


def test_evaluate_restores_train_mode_and_saved_masks_score_the_same(smoke, run_dir, tmp_path):
    net, dataset = smoke
    net.train()
    result = ev.evaluate(net, dataset, batch_size=4, save_masks=tmp_path, progress=False)
    assert net.training
    assert result["n"] == raw_task_count(run_dir) and 0 < result["mIoU"] < 1 and result["oIoU"] != result["mIoU"]
    # PhraseCut's own evaluator reads these files: read them back and score them the same way
    tasks = []
    for i in range(len(dataset)):
        item = dataset[i]
        pred = files.load_mask(tmp_path / f"{item['task_id']}.png")
        gt = item["gt_mask"].numpy().astype(bool)
        assert pred.shape == gt.shape
        inter, union = metrics.task_iou(pred, gt)
        tasks.append((inter, union, item["subsets"]))
    assert metrics.summarize_tasks(tasks, dataset.subset_names, dataset.subset_note) == result
    assert len(list(tmp_path.glob("*.png"))) == raw_task_count(run_dir)


@pytest.mark.slow
def test_cli_one_process_and_torchrun_agree(run_dir, smoke, tmp_path):
    net, dataset = smoke
    expected = ev.evaluate(net, dataset, batch_size=1, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --data defaults to the checkpoint's data_dir/test.lmdb
    one = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(run_dir / "best.pth"), "--batch-size", "1",
                          "--json", str(tmp_path / "one.json"), "--vis", str(tmp_path / "vis"), "--num", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert "mIoU" in one.stdout and "i_single" in one.stdout
    assert len(list((tmp_path / "vis").glob("*.png"))) == 2
    # batch 1: each task's forward pass is then the same float arithmetic on every shard
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "evaluate.py", "--ckpt", str(run_dir / "best.pth"), "--data", str(run_dir / "test.lmdb"),
                          "--batch-size", "1", "--json", str(tmp_path / "two.json"), "--no-progress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout
    one_json = json.loads((tmp_path / "one.json").read_text())
    assert one_json == json.loads((tmp_path / "two.json").read_text())
    assert one_json.pop("definitions") == metrics.DEFINITIONS  # the file says which metric is which
    assert one_json.pop("units") == metrics.UNITS  # and that its scores are fractions
    assert one_json == json.loads(json.dumps(expected))
    # every subset, each with n and its metrics; an empty one (no COCO image here) has null metrics
    assert list(one_json["subsets"]) == list(phrasecut.SUBSETS) and "note" not in one_json
    assert all(set(m) == set(metrics.METRIC_KEYS) for m in one_json["subsets"].values())
    assert one_json["subsets"]["d_cocotv"] == {**{k: None for k in metrics.METRIC_KEYS}, "n": 0}
    assert one_json["subsets"]["d_notcocotv"]["n"] == one_json["n"]
    instances = [one_json["subsets"][k]["n"] for k in ("i_single", "i_multi", "i_many")]
    assert sum(instances) == one_json["n"]  # disjoint and complete


def test_without_the_count_file_rank_subsets_are_left_out_with_a_note(run_dir, tmp_path):
    import shutil

    import data
    root = Path(shutil.copytree(run_dir / "raw", tmp_path / "raw"))
    (root / "name_att_rel_count.json").unlink()
    phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    dataset = data.PhraseCutLMDB(tmp_path / "t.lmdb", input_size=64, word_len=10, train=False)
    assert dataset.header["name_att_rel_count"] is None and dataset.ranks is None
    result = ev.evaluate(Oracle(dataset), dataset, batch_size=4, device="cpu", progress=False)
    assert list(result["subsets"]) == [n for n in phrasecut.SUBSETS if n not in phrasecut.RANK_SUBSETS]
    assert result["note"] == phrasecut.NO_RANKS_NOTE and "c20" not in metrics.format_table(result)


def test_cli_errors_are_clean(run_dir, tmp_path, capsys):
    ckpt = torch.load(run_dir / "best.pth", weights_only=True)
    ckpt["data_dir"] = ""
    torch.save(ckpt, tmp_path / "no_data.pth")
    with pytest.raises(SystemExit, match="pass --data"):
        ev.main(["--ckpt", str(tmp_path / "no_data.pth")])
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(["--ckpt", str(run_dir / "best.pth"), "--data", str(tmp_path / "missing.lmdb")])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="evaluate.py: error: .*junk.pth"):
        ev.main(["--ckpt", str(tmp_path / "junk.pth")])
    with pytest.raises(SystemExit, match=r"evaluate.py: error: --data .*is a directory; pass the LMDB file itself"):
        ev.main(["--ckpt", str(run_dir / "best.pth"), "--data", str(run_dir)])
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--threshold", "1.5", "--ckpt", "x"])
    assert exit_info.value.code == 2  # argparse


def test_bad_outputs_and_devices_are_refused_before_any_work(run_dir, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the mistake was reported")
    monkeypatch.setattr(eval_files, "read_model_file", fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "a_file").write_text("keep")
    ckpt = tmp_path / "best.pth"
    ckpt.write_bytes((run_dir / "best.pth").read_bytes())
    cases = {("--save-masks", "a_file"): "--save-masks {} is an existing file, not a directory",
             ("--vis", "a_file"): "--vis {} is an existing file, not a directory",
             ("--json", "."): "--json {} is a directory; name a file",
             ("--json", "a_file/m.json"): "--json's folder {} is an existing file",
             ("--json", "best.pth"): "--json {} is the --ckpt file",
             ("--device", "banana"): "argument --device: 'banana' is not a device",
             ("--device", "cuda"): "argument --device: cuda: this machine has no usable CUDA GPU",
             ("--workers", "-1"): "--workers must be at least 0"}
    for (flag, name), message in cases.items():
        value = name if flag in ("--device", "--workers") else str(tmp_path / name)
        with pytest.raises(SystemExit) as exit_info:
            ev.main(["--ckpt", str(ckpt), "--no-progress", flag, value])
        err = capsys.readouterr().err
        shown = str(tmp_path / "a_file") if "folder" in message else value
        assert exit_info.value.code == 2 and f"evaluate.py: error: {message.format(shown)}" in err, err
    assert (tmp_path / "a_file").read_text() == "keep" and ckpt.read_bytes() == (run_dir / "best.pth").read_bytes()


def test_cli_mistake_prints_no_traceback(run_dir, tmp_path):
    run = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(run_dir / "best.pth"),
                          "--json", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"evaluate.py: error: --json {tmp_path} is a directory" in run.stderr


def test_decoder_grid_ceiling_falls_as_the_grid_coarsens(run_dir):
    import data
    dataset = data.PhraseCutLMDB(run_dir / "test.lmdb", input_size=128, word_len=10, train=False)
    # stride 4 is the logits' own resolution: only that is lost
    fine, mid, coarse = (ev.decoder_grid_ceiling(dataset, stride=s) for s in (4, 8, 16))
    assert fine["n"] == mid["n"] == coarse["n"] == len(dataset)
    assert fine["mIoU"] > 0.9
    assert fine["mIoU"] > mid["mIoU"] > coarse["mIoU"]


def test_cli_prints_the_ceiling(run_dir, capsys):
    ev.main(["--ckpt", str(run_dir / "best.pth"), "--no-progress", "--ceiling"])
    out = capsys.readouterr().out
    assert "ceiling: a perfect 4x4 decoder map (stride 16 at 64 px)" in out


def test_per_task_ious_make_the_summary_and_the_grid_shows_median_and_worst(smoke, run_dir, tmp_path):
    """evaluate's per_task list is the tasks the summary was made from, in dataset order; the grid
    takes each kind's median task and the worst ones, and draws them into one PNG."""
    from PIL import Image
    net, dataset = smoke
    result = ev.evaluate(net, dataset, batch_size=4, progress=False, per_task=True)
    per_task = result.pop("per_task")
    assert [t["index"] for t in per_task] == list(range(len(dataset)))
    assert result == ev.evaluate(net, dataset, batch_size=4, progress=False)
    # the ceiling made in the same pass is decoder_grid_ceiling's, and changes nothing else
    with_ceiling = ev.evaluate(net, dataset, batch_size=3, progress=False, ceiling=True)
    assert with_ceiling.pop("ceiling") == ev.decoder_grid_ceiling(dataset)
    assert with_ceiling == result
    assert sum(t["iou"] for t in per_task) / len(per_task) == pytest.approx(result["mIoU"])
    # a hand-made per_task: kind p_name has IoUs .1 .5 .9 (median .5: index 1), the rest fail
    fake = [{"index": 0, "iou": 0.1, "subsets": ["p_name"]}, {"index": 1, "iou": 0.5, "subsets": ["p_name"]},
            {"index": 2, "iou": 0.9, "subsets": ["p_name"]}, {"index": 3, "iou": 0.0, "subsets": ["p_att+"]},
            {"index": 4, "iou": 0.05, "subsets": []}, {"index": 5, "iou": 0.3, "subsets": []}]
    chosen = figures.prediction_grid(net, dataset, fake, tmp_path / "grid.png", failures=2)
    assert [(label.split(",")[0], index) for label, index, _ in chosen] == [
        ("name", 1), ("attribute", 3), ("failure 1", 4), ("failure 2", 0)]
    for _, index, score in chosen:  # the drawn IoU is the task's own
        assert score == pytest.approx(per_task[index]["iou"])
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.width > im.height > 100
    assert not list(tmp_path.glob(".*"))  # no temporary left


class PlainForward(torch.nn.Module):
    """A SegVLM seen as any (image, tokens) model: evaluate gives it one image per phrase."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image, tokens):
        return self.net(image, tokens)


def test_phrases_of_one_image_share_its_encoder_pass_and_score_the_same(smoke):
    """A SegVLM is evaluated with each batch's distinct images encoded once (image_index): fewer
    image-encoder passes than tasks, and every task's IoU that of one image per phrase."""
    net, dataset = smoke
    passes = []
    hook = net.backbone.visual.conv1.register_forward_hook(lambda m, args, out: passes.append(len(args[0])))
    grouped = ev.evaluate(net, dataset, batch_size=8, progress=False, per_task=True)
    hook.remove()
    plain = ev.evaluate(PlainForward(net), dataset, batch_size=8, progress=False, per_task=True)
    n_images = len({dataset[i]["image_id"] for i in range(len(dataset))})
    assert n_images <= sum(passes) < grouped["n"] == plain["n"]
    assert [t["index"] for t in grouped["per_task"]] == [t["index"] for t in plain["per_task"]]
    assert [t["iou"] for t in grouped["per_task"]] == pytest.approx([t["iou"] for t in plain["per_task"]], abs=1e-3)
    assert grouped["mIoU"] == pytest.approx(plain["mIoU"], abs=1e-3)


# --------------------------------------------------------------------------- saved masks read by value (issue 33)

def test_load_mask_reads_values_not_colours(tmp_path):
    """Hand-worked 1x4 masks: the expected foreground is written beside each, by the documented rule."""
    from PIL import Image
    black = [0] * 768  # every palette entry black: a palette image must be read by its index
    p = Image.fromarray(np.array([[0, 1, 0, 2]], np.uint8), "P")
    p.putpalette(black)
    p.save(tmp_path / "palette.png")
    Image.fromarray(np.array([[[0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]]], np.uint8), "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.array([[0, 1, 0, 300]], np.uint16)).save(tmp_path / "i16.png")  # 16-bit grey: by value
    Image.fromarray(np.array([[0, 1, 255, 0]], np.uint8), "L").save(tmp_path / "l.png")
    # alpha: a fully transparent pixel is background whatever its colour; the others by their colour
    Image.fromarray(np.array([[[255, 255, 255, 0], [0, 0, 0, 255], [0, 0, 1, 255], [9, 9, 9, 1]]], np.uint8),
                    "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.array([[[255, 0], [0, 255], [1, 255], [7, 3]]], np.uint8), "LA").save(tmp_path / "la.png")
    expected = {"palette.png": [0, 1, 0, 1], "rgb.png": [1, 0, 1, 0], "i16.png": [0, 1, 0, 1], "l.png": [0, 1, 1, 0],
                "rgba.png": [0, 0, 1, 1], "la.png": [0, 0, 1, 1]}
    for name, row in expected.items():
        assert files.load_mask(tmp_path / name).tolist() == [[bool(v) for v in row]], name


def test_load_mask_refuses_lossy_data_by_content(tmp_path):
    from PIL import Image
    mask = Image.fromarray(np.full((8, 8), 255, np.uint8), "L")
    mask.save(tmp_path / "named.png", format="JPEG")  # JPEG data under a .png name
    with pytest.raises(ValueError, match="named.png holds JPEG data, a lossy format"):
        files.load_mask(tmp_path / "named.png")
    mask.convert("RGB").save(tmp_path / "t.tif", compression="jpeg")
    with pytest.raises(ValueError, match=r"t.tif holds TIFF data \(JPEG-compressed\)"):
        files.load_mask(tmp_path / "t.tif")
    mask.save(tmp_path / "ok.tif")  # TIFF without JPEG compression is lossless
    assert files.load_mask(tmp_path / "ok.tif").all()


def test_pred_masks_score_palette_masks_by_index_and_name_a_symlink(tmp_path):
    from coco_files import voc_labels, voc_root
    from PIL import Image

    from data import PhraseCutLMDB
    from sources import voc
    root = voc_root(tmp_path)
    voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    labels = voc_labels()
    preds = tmp_path / "preds"
    preds.mkdir()
    for c in (11, 15):
        p = Image.fromarray((labels == c).astype(np.uint8), "P")
        p.putpalette([0] * 768)  # index 1 drawn black
        p.save(preds / f"2007_000032_{c}.png")
    argv = ["--data", str(tmp_path / "v.lmdb"), "--pred-masks", str(preds), "--no-progress"]
    ev.main(argv)
    assert ev.evaluate_masks(PhraseCutLMDB(tmp_path / "v.lmdb", train=False), preds, progress=False)["mIoU"] == 1.0
    outside = tmp_path / "elsewhere.png"
    os.replace(preds / "2007_000032_15.png", outside)
    os.symlink(outside, preds / "2007_000032_15.png")
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    message = str(exit_info.value.code)
    assert "2007_000032_15.png is a symbolic link to" in message and "task id" not in message


def test_pred_masks_names_the_model_flags_as_they_were_given(tmp_path, capsys):
    for flags, said in ((["--precision", "bf16"], "--precision bf16 needs a model"), (["--amp"], "--amp needs a model"),
                        (["--vis", "v", "--precision", "bf16"], "--vis, --precision bf16 need a model")):
        with pytest.raises(SystemExit):
            ev.main(["--data", str(tmp_path / "x.lmdb"), "--pred-masks", str(tmp_path), *flags])
        error = capsys.readouterr().err.splitlines()[-1]
        assert error == f"evaluate.py: error: {said} (--ckpt); --pred-masks only scores saved masks"
    with pytest.raises(SystemExit):  # fp32 is the default, and no model is needed to score masks in it
        ev.main(["--data", str(tmp_path / "x.lmdb"), "--pred-masks", str(tmp_path), "--precision", "fp32"])
    assert "need" not in capsys.readouterr().err
