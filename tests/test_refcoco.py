"""RefCOCO, RefCOCO+ and RefCOCOg from the refer API's layout: splits, tasks, masks, the pickle, bad input."""
import json
import os
import pickle
import re

import numpy as np
import pytest
from coco_files import GOOGLE, UMD, UNC, file_name, refer_root
from pycocotools.coco import COCO

import data
import data as datasets
import evaluate
from helpers import files
from sources import refcoco


def build(root, tmp_path, dataset="refcoco", split_by="unc", split="train", **kw):
    out = tmp_path / "out" / f"{dataset}_{split_by}_{split}.lmdb"
    refcoco.build_refcoco(root, dataset, split_by, split, out, progress=False, **kw)
    return datasets.PhraseCutLMDB(out, input_size=32, train=False)


# the hand-worked counts: getRefIds' rule picks the refs, each sentence a task (coco_files' refs)
EXPECTED = {("refcoco", "unc"): {"train": 3, "val": 1, "testA": 2 + 1, "testB": 1 + 1},  # testAB in both
            ("refcoco+", "unc"): {"train": 3, "val": 1, "testA": 3, "testB": 2},
            ("refcoco", "google"): {"train": 2, "val": 2},
            ("refcocog", "google"): {"train": 2, "val": 2},
            ("refcocog", "umd"): {"train": 1, "val": 1, "test": 1 + 2}}


def test_task_counts_per_split_follow_get_ref_ids(tmp_path):
    root = refer_root(tmp_path)
    for (dataset, split_by), counts in EXPECTED.items():
        assert set(counts) == set(refcoco.SPLITS[dataset, split_by])
        for split, n in counts.items():
            ds = build(root, tmp_path, dataset, split_by, split)
            assert len(ds) == n, (dataset, split_by, split)
    assert [r["ref_id"] for r in refcoco.select_refs(UNC, "testA")] == [3, 5]
    assert [r["ref_id"] for r in refcoco.select_refs(UMD, "test")] == [11, 12]


def test_every_mask_equals_pycocotools_and_the_ids_are_kept(tmp_path):
    root = refer_root(tmp_path)
    api = COCO(str(root / "refcoco" / "instances.json"))  # the reference decoder
    sentences = {s["sent_id"]: (r, s) for r in UNC for s in r["sentences"]}
    seen = set()
    for split in ("train", "val", "testA", "testB"):
        ds = build(root, tmp_path, split=split)
        for i in range(len(ds)):
            item = ds[i]
            ref, sent = sentences[int(item["task_id"])]
            ann = api.anns[ref["ann_id"]]
            expected = api.annToMask(ann)
            assert item["phrase"] == sent["sent"] and item["image_id"] == str(ref["image_id"])
            assert item["gt_mask"].shape == expected.shape  # instances.json's size
            assert np.array_equal(item["gt_mask"].numpy(), expected), ann["id"]
            task, _ = ds._read(i, image=False)
            assert (task["ref_id"], task["sent_id"], task["ann_id"], task["bbox"]) == \
                (ref["ref_id"], sent["sent_id"], ann["id"], ann["bbox"])
            seen.add(ann["id"])
    assert seen == {11, 12, 13, 14, 15}  # two parts, overlapping parts, crowd RLE, compressed RLE, polygon
    assert api.annToMask(api.anns[12]).sum() < sum(api.annToMask({**api.anns[12], "segmentation": [p]}).sum()
                                                   for p in api.anns[12]["segmentation"])  # the parts do overlap


def test_image_folders_of_refer_cris_and_a_flag(tmp_path):
    cris = refer_root(tmp_path / "a", image_dir="images/train2014")
    assert len(build(cris, tmp_path, split="val")) == 1
    other = refer_root(tmp_path / "b", image_dir="elsewhere")
    with pytest.raises(FileNotFoundError, match="no COCO train2014 folder.*pass --images"):
        build(other, tmp_path, split="val")
    assert len(build(other, tmp_path, split="val", images=other / "elsewhere")) == 1


def test_json_refs_are_accepted(tmp_path):
    root = refer_root(tmp_path)
    (root / "refcoco" / "refs(unc).p").unlink()
    (root / "refcoco" / "refs(unc).json").write_text(json.dumps(UNC))
    assert len(build(root, tmp_path, split="testB")) == 2


def test_unknown_names_are_refused_with_the_valid_ones(tmp_path):
    root = refer_root(tmp_path)
    for args, message in ((("refcocoz", "unc", "val"), "refcoco, refcoco\\+, refcocog"),
                          (("refcoco+", "google", "val"), "refcoco\\+ comes split by unc"),
                          (("refcocog", "umd", "testA"), "has the splits train, val, test"),
                          (("refcocog", "google", "test"), "has the splits train, val$")):
        with pytest.raises(ValueError, match=message):
            refcoco.build_refcoco(root, *args, tmp_path / "x.lmdb", progress=False)


class Payload:
    """Unpickling this would run os.system (or eval) with a command that creates a file."""

    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_a_pickle_naming_a_global_is_refused_and_never_runs(tmp_path, kind):
    root = refer_root(tmp_path)
    victim = tmp_path / "pwned"
    call, arg = ((os.system, f"touch {victim}") if kind == "system" else
                 (eval, f"open({str(victim)!r}, 'w').close()"))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": Payload(call, arg)}], protocol=2))
    name = "posix.system" if kind == "system" else "__builtin__.eval"  # protocol 2 names builtins so
    with pytest.raises(ValueError, match=rf"refs\(unc\).p: .*names the global {name}.*nothing in it was run"):
        refcoco.build_refcoco(root, "refcoco", "unc", "val", tmp_path / "x.lmdb", progress=False)
    assert not victim.exists() and not (tmp_path / "x.lmdb").exists()


def test_python2_byte_strings_read_as_text(tmp_path):
    # protocol 2 as Python 2 wrote [{'sent': 'caf\xc3\xa9'}]: a SHORT_BINSTRING of UTF-8 bytes
    raw = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x05caf\xc3\xa9q\x03sa."
    path = tmp_path / "refs.p"
    path.write_bytes(raw)
    with open(path, "rb") as f:
        assert refcoco.PlainUnpickler(f, encoding="utf-8", errors="replace").load() == [{"sent": "café"}]


def test_bad_input_names_the_file_and_the_record(tmp_path, capsys):
    root = refer_root(tmp_path)
    refs = [dict(r) for r in GOOGLE]
    refs[2]["ann_id"] = 999
    (root / "refcoco" / "refs(google).p").write_bytes(pickle.dumps(refs, protocol=2))
    out = tmp_path / "out" / "val.lmdb"
    with pytest.raises(ValueError, match=r"refs\(google\).p: ref 8: ann_id 999 is not in instances.json"):
        refcoco.build_refcoco(root, "refcoco", "google", "val", out, progress=False)
    missing = root / "images" / "mscoco" / "images" / "train2014" / file_name(2)
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing \\(image id 2"):
        refcoco.build_refcoco(root, "refcoco", "unc", "testA", out, progress=False)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing half-written
    stats = refcoco.build_refcoco(root, "refcoco", "unc", "testA", out, skip_missing=True, progress=False)
    assert (stats["skipped_images"], stats["skipped_tasks"], stats["num_tasks"]) == (1, 2, 1)
    for target in (root / "refcoco" / "instances.json", root / "refcoco" / "refs(unc).p",
                   root / "images" / "mscoco" / "images" / "train2014" / "new.lmdb"):
        with pytest.raises(ValueError, match="is one of --root's inputs"):
            refcoco.build_refcoco(root, "refcoco", "unc", "val", target, progress=False)
    build = ["build", "--source", "refcoco", "--root", str(root), "--dataset", "refcoco", "--split-by", "unc",
             "--split", "val", "--out", str(tmp_path / "v.lmdb")]
    data.main(build)
    assert "v.lmdb: 1 tasks, 1 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data.main(build + ["--template", "a {}"])
    assert "does not take --template" in capsys.readouterr().err


def test_evaluate_scores_saved_masks_against_the_lmdb(tmp_path, capsys):
    root = refer_root(tmp_path)
    ds = build(root, tmp_path, split="train")
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(len(ds)):
        task_id, gt, _, _ = ds.targets(i)
        files.save_mask(gt if i else np.zeros_like(gt), files.mask_path(preds, task_id))  # the first all wrong
    result = evaluate.main(["--data", ds.path, "--pred-masks", str(preds), "--json", str(tmp_path / "m.json"),
                            "--no-progress"]) or json.loads((tmp_path / "m.json").read_text())
    assert result["n"] == 3 and result["mIoU"] == pytest.approx(2 / 3) and result["prec@0.9"] == pytest.approx(2 / 3)
    gt_sizes = [int(ds.targets(i)[1].sum()) for i in range(3)]
    assert result["oIoU"] == pytest.approx(sum(gt_sizes[1:]) / sum(gt_sizes))
    assert "mean over tasks" in result["definitions"]["mIoU"] and "LAVT" in result["definitions"]["oIoU"]
    assert result["units"] == evaluate.UNITS and result["units"].startswith("fractions")  # 2 / 3 above, not 66.7
    (preds / "101.png").unlink()
    (preds / "102.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--data", ds.path, "--pred-masks", str(preds), "--no-progress"])
    assert "2 of 3 masks are missing, e.g. 101.png, 102.png" in str(exit_info.value.code)


def test_cris_recipes_are_presets():
    from helpers import train_config
    for preset, word_len in (("cris-refcoco", 17), ("cris-refcocog", 22)):
        cfg, model = train_config.preset_defaults(preset), __import__("model").get_preset(preset).model
        assert (model.input_size, model.word_len, model.deform, model.se) == (416, word_len, False, False)
        assert (cfg.epochs, cfg.lr, cfg.milestones, cfg.lr_gamma, cfg.backbone_lr_scale, cfg.batch_size, cfg.loss,
                cfg.clip_weights) == (50, 1e-4, [35], 0.1, 0.1, 64, "bce", "RN101")


def test_train_and_evaluate_run_on_a_refcoco_lmdb_folder(tmp_path):
    import train
    root = refer_root(tmp_path)
    lmdbs = tmp_path / "refcoco_unc"
    for split, name in (("train", "train"), ("testA", "val")):  # 3 tasks each
        refcoco.build_refcoco(root, "refcoco", "unc", split, lmdbs / f"{name}.lmdb", progress=False)
    run = tmp_path / "run"
    train.main(["--preset", "smoke", "--data", str(lmdbs), "--out", str(run), "--epochs", "1", "--batch-size", "2",
                "--num-workers", "0", "--no-eval-test"])
    evaluate.main(["--ckpt", str(run / "best.pth"), "--data", str(lmdbs / "val.lmdb"), "--json",
                   str(tmp_path / "m.json"), "--no-progress", "--save-masks", str(tmp_path / "masks")])
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n"] == 3 and result["subsets"] == {} and sorted(p.stem for p in (tmp_path / "masks").glob("*.png")) == \
        ["104", "105", "107"]
    evaluate.main(["--data", str(lmdbs / "val.lmdb"), "--pred-masks", str(tmp_path / "masks"), "--json",
                   str(tmp_path / "again.json"), "--no-progress"])
    again = json.loads((tmp_path / "again.json").read_text())
    assert (again["mIoU"], again["oIoU"]) == (result["mIoU"], result["oIoU"])  # the saved masks score the same


# ----------------------------------------------------------------------------- hostile and careless input (issue 33)

def test_duplicate_ref_and_sentence_ids_are_refused_naming_both(tmp_path):
    root = refer_root(tmp_path)
    refs = [json.loads(json.dumps(r)) for r in UNC]
    refs[3]["ref_id"] = refs[1]["ref_id"]
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\).p: refs #1 and #3 have the same ref_id 2"):
        refcoco.build_refcoco(root, "refcoco", "unc", "val", tmp_path / "x.lmdb", progress=False)
    refs = [json.loads(json.dumps(r)) for r in UNC]
    refs[4]["sentences"][0]["sent_id"] = 101
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"ref 1 sentences\[1\] and ref 5 sentences\[0\] have the same sent_id 101"):
        refcoco.build_refcoco(root, "refcoco", "unc", "val", tmp_path / "x.lmdb", progress=False)
    content = json.loads((root / "refcoco" / "instances.json").read_text())
    content["annotations"][1]["id"] = 11  # the later would replace ref 1's annotation
    (root / "refcoco" / "instances.json").write_text(json.dumps(content))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(UNC, protocol=2))
    with pytest.raises(ValueError, match=r"instances.json: annotations\[0\] and annotations\[1\] have the same id 11"):
        refcoco.build_refcoco(root, "refcoco", "unc", "val", tmp_path / "x.lmdb", progress=False)
    assert not (tmp_path / "x.lmdb").exists()


def test_empty_sentences_make_no_task_and_are_counted(tmp_path, capsys):
    root = refer_root(tmp_path)
    refs = [json.loads(json.dumps(r)) for r in UNC]
    refs[0]["sentences"][1]["sent"] = "   "
    refs[0]["sentences"][2]["sent"] = ""
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    ds = build(root, tmp_path, split="train")
    assert [ds[i]["task_id"] for i in range(len(ds))] == ["100"]
    assert ds.header["empty_phrases"] == 2 and ds.header["empty_phrase_examples"] == ["ref 1 sent_id 101",
                                                                                       "ref 1 sent_id 102"]
    data.main(["build", "--source", "refcoco", "--root", str(root), "--dataset", "refcoco", "--split-by", "unc",
               "--split", "train", "--out", str(tmp_path / "t.lmdb")])
    assert "warning: 2 sentences are empty or only spaces: no phrase, so no task, e.g. ref 1 sent_id 101" \
        in capsys.readouterr().out


def test_deeply_nested_refs_are_a_clean_error_naming_the_file(tmp_path):
    root = refer_root(tmp_path)
    path = root / "refcoco" / "refs(unc).p"
    path.write_bytes(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")  # [[[...]]] 100,000 deep
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*nested (too|deeper)"):
        refcoco.build_refcoco(root, "refcoco", "unc", "val", tmp_path / "x.lmdb", progress=False)
    deep = {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [{"sent_id": 1, "sent": "x"}]}
    # [deep, [[[...]]]], by hand (pickle.dumps itself would recurse): MARK, deep, 100,000 lists, APPENDS
    path.write_bytes(b"\x80\x02](" + pickle.dumps(deep, protocol=2)[2:-1] + b"]" * 100_000 + b"a" * 99_999 + b"e.")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: ref #1 is a list nested too deeply to show"):
        refcoco.build_refcoco(root, "refcoco", "unc", "val", tmp_path / "x.lmdb", progress=False)
    path.unlink()
    json_path = root / "refcoco" / "refs(unc).json"
    json_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"{re.escape(str(json_path))}: JSON nested deeper"):
        refcoco.build_refcoco(root, "refcoco", "unc", "val", tmp_path / "x.lmdb", progress=False)
