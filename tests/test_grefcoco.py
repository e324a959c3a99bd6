"""gRefCOCO in ReLA's layout: splits, one task per sentence, union masks without crowd regions, the
no-target flag, the pickle, bad records, and the flag's absence in other sources' LMDBs."""
import json
import pickle

import numpy as np
import pytest
from grefcoco_files import COUNTS, GREFS, NO_TARGET, grefcoco_root
from pycocotools.coco import COCO

import data
from sources import grefcoco


def build(root, tmp_path, split, **kw):
    out = tmp_path / "out" / f"grefcoco_{split}.lmdb"
    stats = grefcoco.build_grefcoco(root, split, out, progress=False, **kw)
    return data.PhraseCutLMDB(out, input_size=32, train=False), stats


def reference_mask(api, ref):
    """G_REFER.getMaskByRef(ref, merge=True), rebuilt from pycocotools: the union of the non-crowd
    annotations' masks; zeros at the image's size for ann_id [-1]."""
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    img = api.imgs[ref["image_id"]]
    out = np.zeros((img["height"], img["width"]), np.uint8)
    if ids == [-1]:
        return out
    for a in ids:
        if not api.anns[a]["iscrowd"]:
            out |= api.annToMask(api.anns[a])
    return out


@pytest.mark.parametrize("pickled", [False, True])
def test_tasks_per_split_masks_and_flags_follow_grefer(tmp_path, pickled):
    root = grefcoco_root(tmp_path, pickled=pickled)
    api = COCO(str(root / "grefcoco" / "instances.json"))
    sentences = {s["sent_id"]: (r, s) for r in GREFS for s in r["sentences"]}
    seen = set()
    for split, n in COUNTS.items():
        ds, stats = build(root, tmp_path, split)
        assert len(ds) == n == sum(len(r["sentences"]) for r in GREFS if r["split"] == split)
        assert stats["no_target_tasks"] == sum(s in NO_TARGET for s in map(int, ds.task_ids()))
        assert ds.no_target_flags() == [int(t) in NO_TARGET for t in ds.task_ids()]
        for i in range(len(ds)):
            item = ds[i]
            ref, sent = sentences[int(item["task_id"])]
            expected = reference_mask(api, ref)
            assert item["phrase"] == sent["sent"] and item["image_id"] == str(ref["image_id"])
            assert item["gt_mask"].shape == expected.shape
            assert np.array_equal(item["gt_mask"].numpy(), expected), ref["ref_id"]
            assert item["no_target"] == (sent["sent_id"] in NO_TARGET)
            seen.add(sent["sent_id"])
    assert seen == set(sentences)


def test_the_union_leaves_crowd_out_and_joins_several_targets(tmp_path):
    root = grefcoco_root(tmp_path)
    api = COCO(str(root / "grefcoco" / "instances.json"))
    ds, _ = build(root, tmp_path, "val")
    masks = {ds.targets(i)[0]: ds.targets(i)[1] for i in range(len(ds))}
    assert np.array_equal(masks["504"], api.annToMask(api.anns[16]))  # the crowd region 13 is left out
    assert masks["506"].shape == (32, 32) and not masks["506"].any()  # no target: zeros at the image's size
    train, stats = build(root, tmp_path, "train")
    two = {train.targets(i)[0]: train.targets(i)[1] for i in range(len(train))}["503"]
    assert np.array_equal(two, api.annToMask(api.anns[11]) | api.annToMask(api.anns[12]))
    assert stats["empty_tasks"] == 1 and stats["empty_task_ids"] == ["512"]  # a crowd-only ref: target, empty mask
    assert not train.no_target_flags()[-1]


def test_the_command_line_and_bad_records(tmp_path, capsys):
    root = grefcoco_root(tmp_path)
    out = tmp_path / "v.lmdb"
    data.main(["build", "--source", "grefcoco", "--root", str(root), "--split", "val", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "v.lmdb: 4 tasks, 2 images" in printed and "2 tasks name nothing" in printed
    with pytest.raises(SystemExit):
        data.main(["build", "--source", "grefcoco", "--root", str(root), "--split", "test", "--out", str(out)])
    assert "gRefCOCO has the splits train, val, testA, testB" in capsys.readouterr().err
    cases = (({"ann_id": [11, 999]}, r"grefs\(unc\).json: ref 1: ann_id 999 is not in instances.json"),
             ({"ann_id": [-1, 11]}, r"ref 1: ann_id \[-1, 11\] mixes -1"),
             ({"ann_id": "11"}, r"ref 1: ann_id is '11', expected an annotation id"),
             ({"ann_id": 14}, r"ref 1: image_id 1, but its annotation 14 is on image 3"),
             ({"sentences": [{"sent": "x"}]}, r"ref 1: sentences\[0\] is"))
    for k, (change, message) in enumerate(cases):
        bad = tmp_path / f"bad{k}"
        grefs = [dict(GREFS[0], **change)] + GREFS[1:]
        with pytest.raises(ValueError, match=message):
            grefcoco.build_grefcoco(grefcoco_root(bad, refs=grefs), "train", bad / "x.lmdb", progress=False)
        assert not (bad / "x.lmdb").exists()
    (root / "grefcoco" / "grefs(unc).json").unlink()
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\).json not found"):
        grefcoco.build_grefcoco(root, "val", tmp_path / "y.lmdb", progress=False)


def test_a_pickle_naming_a_global_is_refused(tmp_path):
    root = grefcoco_root(tmp_path)
    (root / "grefcoco" / "grefs(unc).p").write_bytes(pickle.dumps([{"ref_id": print}], protocol=2))
    with pytest.raises(ValueError, match=r"grefs\(unc\).p: .*names the global .*print.*nothing in it was run"):
        grefcoco.build_grefcoco(root, "val", tmp_path / "x.lmdb", progress=False)


def test_images_flag_and_skip_missing(tmp_path):
    root = grefcoco_root(tmp_path, image_dir="elsewhere")
    with pytest.raises(FileNotFoundError, match="pass --images DIR"):
        build(root, tmp_path, "val")
    ds, _ = build(root, tmp_path, "val", images=root / "elsewhere")
    assert len(ds) == 4
    (root / "elsewhere" / "COCO_train2014_000000000003.jpg").unlink()
    ds, stats = build(root, tmp_path, "val", images=root / "elsewhere", skip_missing=True)
    assert (len(ds), stats["skipped_tasks"], stats["no_target_tasks"]) == (2, 2, 0)


def test_other_sources_read_no_target_as_false(tmp_path):
    from coco_files import refer_root

    from sources import refcoco
    out = tmp_path / "r.lmdb"
    refcoco.build_refcoco(refer_root(tmp_path), "refcoco", "unc", "val", out, progress=False)
    ds = data.PhraseCutLMDB(out, input_size=32, train=True)
    assert ds.no_target_flags() == [False] and ds[0]["no_target"] is False
    assert "no_target" not in json.dumps(ds._read(0, image=False)[0])  # the flag's absence is what old files hold


def test_empty_sentences_make_no_task_and_are_counted_as_for_refcoco(tmp_path, capsys):
    refs = json.loads(json.dumps(GREFS))
    refs[2]["sentences"][1]["sent"] = " \t "  # ref 3 (val), sent_id 505
    refs[3]["sentences"][0]["sent"] = ""  # ref 4 (val, no target), sent_id 506
    refs[4]["sentences"][0]["sent"] = "\n"  # ref 5, testA's only sentence
    root = grefcoco_root(tmp_path, refs=refs)
    ds, stats = build(root, tmp_path, "val")
    assert ds.task_ids() == ["504", "507"] and stats["no_target_tasks"] == 1
    assert ds.header["empty_phrases"] == 2 and ds.header["empty_phrase_examples"] == ["ref 3 sent_id 505",
                                                                                       "ref 4 sent_id 506"]
    data.main(["build", "--source", "grefcoco", "--root", str(root), "--split", "val", "--out", str(tmp_path / "v.lmdb")])
    assert ("warning: 2 sentences are empty or only spaces: no phrase, so no task, e.g. ref 3 sent_id 505; ref 4 "
            "sent_id 506") in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"grefs\(unc\).json: split 'testA' holds no sentences but 1 empty ones"):
        build(root, tmp_path, "testA")
    assert build(grefcoco_root(tmp_path / "clean"), tmp_path, "val")[0].header["empty_phrases"] == 0
