"""data.py: synthetic PhraseCut -> LMDB -> dataset, masks against PhraseCut's own rule, letterbox
round trips, DataLoader workers, failure modes, image modes."""
import collections
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

import data
import evaluate


def official_mask(polygons, w, h):
    """PhraseCut's utils/data_transfer.polygons_to_mask, restated: one image per polygon, union."""
    out = np.zeros((h, w), bool)
    for instance in polygons:
        for polygon in instance:
            if len(polygon) < 2:
                continue
            img = Image.new("L", (w, h), 0)
            ImageDraw.Draw(img).polygon([(int(x), int(y)) for x, y in polygon], outline=1, fill=1)
            out |= np.asarray(img) > 0
    return out.astype(np.uint8)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "VGPhraseCut_v0"
    data.synthesize(root, num_images=40, seed=0, size=96)
    out = root.parent / "train.lmdb"
    stats = data.build_lmdb(root, "train", out, progress=False)
    return root, out, stats


def tasks_of(root, split="train"):
    return json.loads((Path(root) / f"refer_{split}.json").read_text())


def test_synthetic_layout_subsets_and_determinism(synth, tmp_path):
    root, _, _ = synth
    for name in ["image_data_split.json", "name_att_rel_count.json"] + [f"refer_{s}.json" for s in data.SPLITS]:
        assert (root / name).is_file(), name
    tasks = sum((tasks_of(root, s) for s in data.SPLITS), [])
    for t in tasks:
        assert set(t) == {"task_id", "image_id", "ann_ids", "instance_boxes", "Polygons", "phrase",
                          "phrase_structure"}
        assert t["task_id"].split("__")[0] == str(t["image_id"])
        assert len(t["Polygons"]) == len(t["instance_boxes"]) == len(t["ann_ids"]) >= 1
        assert set(t["phrase_structure"]) == {"name", "attributes", "relation_ids",
                                              "relation_descriptions", "type"}
        assert (root / "images" / f"{t['image_id']}.jpg").is_file()
    counts = [len(t["instance_boxes"]) for t in tasks]
    assert 1 in counts and any(2 <= c <= 4 for c in counts) and max(counts) >= 5
    assert {t["phrase_structure"]["type"] for t in tasks} == {"name", "attribute", "relation"}
    assert 4 <= len(tasks) / len({t["image_id"] for t in tasks}) <= 5

    def digest(d):
        return {p.relative_to(d): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*")
                if p.is_file()}
    a, b = data.synthesize(tmp_path / "a", 6, seed=3, size=64), data.synthesize(tmp_path / "b", 6, seed=3, size=64)
    assert digest(a) == digest(b)
    assert digest(a) != digest(data.synthesize(tmp_path / "c", 6, seed=4, size=64))


def test_synthetic_splits_and_image_list_as_phrasecut_has_them(synth):
    root, _, _ = synth
    images = json.loads((root / "image_data_split.json").read_text())
    assert len(images) == 40 and len({d["image_id"] for d in images}) == 40
    for d in images:
        assert set(d) == {"image_id", "width", "height", "split", "url", "coco_id", "flickr_id"}
        assert Image.open(root / "images" / f"{d['image_id']}.jpg").size == (d["width"], d["height"])
    split_of = {d["image_id"]: d["split"] for d in images}
    assert sorted(collections.Counter(split_of.values()).items()) == \
        [("miniv", 1), ("test", 4), ("train", 32), ("val", 3)]  # validation 10 %, a fifth of it miniv
    ids = {s: {t["task_id"] for t in tasks_of(root, s)} for s in data.SPLITS}
    assert ids["miniv"] and ids["val"] and not ids["val"] & ids["miniv"]  # PhraseCut's val lacks miniv
    assert sum(len(v) for v in ids.values()) == len(set().union(*ids.values()))  # no task in two files
    for s in data.SPLITS:
        # what PhraseCut's loader does for split s: look every task's image up among the images of split s
        listed = {d["image_id"] for d in images if d["split"] == s}
        assert {t["image_id"] for t in tasks_of(root, s)} == listed, s


def test_synthetic_count_file_matches_the_phrases(synth):
    root, _, _ = synth
    counts = json.loads((root / "name_att_rel_count.json").read_text())
    assert set(counts) == {"cat", "att", "rel"}
    cat, att, rel = collections.Counter(), collections.Counter(), collections.Counter()
    for s in data.SPLITS:  # recounted here, over every split
        for t in tasks_of(root, s):
            ps = t["phrase_structure"]
            cat[ps["name"]] += 1
            att.update(ps["attributes"])
            rel.update(d[0] for d in ps["relation_descriptions"])
    for key, expected in (("cat", cat), ("att", att), ("rel", rel)):
        pairs = counts[key]
        assert all(isinstance(p, list) and len(p) == 2 for p in pairs)
        assert dict(pairs) == dict(expected) and len(pairs) == len(expected), key  # complete, no duplicate
        assert [n for _, n in pairs] == sorted((n for _, n in pairs), reverse=True), key  # high to low
    assert {"circle", "shapes"} <= set(cat) and {"red", "small"} <= set(att)
    assert set(rel) == {"left of", "right of", "above", "below"}


def test_phrases_refer_to_exactly_their_shapes():
    def shape(kind, colour, cx, cy):
        return {"kind": kind, "colour": colour, "size": "small", "r": 5, "cx": cx, "cy": cy}
    shapes = [shape("circle", "red", 10, 50), shape("circle", "red", 90, 50),
              shape("circle", "blue", 50, 50), shape("square", "red", 50, 90)]
    cands = {text: set(ids) for text, _, ids in data._phrases(shapes, 100, 100)}
    assert cands["red circle left of the blue circle"] == {0}
    assert cands["circle right of the blue circle"] == {1}
    assert cands["blue shape"] == {2} and cands["square"] == {3} and cands["all red circles"] == {0, 1}
    assert "red square" not in cands  # "red" is not needed: there is only one square


def test_roundtrip_counts_and_items(synth):
    root, out, stats = synth
    tasks = tasks_of(root)
    ds = data.PhraseCutLMDB(out, input_size=64, word_len=12)
    assert len(ds) == len(tasks) == stats["num_tasks"]
    image_ids = {str(t["image_id"]) for t in tasks}
    with data._reader(out).begin() as txn:
        keys = [k for k, _ in txn.cursor()]
        assert txn.get(b"img/" + next(iter(image_ids)).encode()) == \
            (root / "images" / f"{next(iter(image_ids))}.jpg").read_bytes()  # the file's own bytes
    assert sum(k.startswith(b"img/") for k in keys) == len(image_ids) == stats["num_images"]
    assert sum(k.startswith(b"task/") for k in keys) == len(tasks)
    item = ds[0]
    assert set(item) == {"image", "tokens", "mask", "image_id"}
    assert item["image_id"] == str(tasks[0]["image_id"])
    assert ds.image_ids() == [str(t["image_id"]) for t in tasks]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["tokens"].shape == (12,) and item["tokens"].dtype == torch.long
    assert item["mask"].shape == (1, 64, 64) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(item["tokens"], data.tokenize(tasks[0]["phrase"], 12)[0])
    ev = data.PhraseCutLMDB(out, input_size=64, train=False)[len(ds) - 1]
    t = tasks[-1]
    assert ev["task_id"] == t["task_id"] and ev["phrase"] == t["phrase"]
    assert ev["num_instances"] == len(t["instance_boxes"])
    assert ev["phrase_type"] == t["phrase_structure"]["type"]
    assert ("p_rel" in ev["subsets"]) == (ev["phrase_type"] == "relation")
    assert ev["orig_size"].tolist() == list(ev["gt_mask"].shape)
    assert set(ev["subsets"]) <= set(evaluate.SUBSETS) and "d_notcocotv" in ev["subsets"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_items_read_in_a_row_equal_items_read_alone(synth):
    """The dataset keeps the last image it decoded (an image's phrases are read one after another) and each
    phrase's tokens: items read in the sampler's order, or twice in a row, equal those of a fresh dataset per
    item, where nothing is kept, and share no storage."""
    root, out, _ = synth
    ds = data.PhraseCutLMDB(out, input_size=64, word_len=12)
    order = list(data.ImageGroupedSampler(ds.image_ids(), 4, seed=3)) + [5, 5, 0]
    for index in order:
        item, alone = ds[index], data.PhraseCutLMDB(out, input_size=64, word_len=12)[index]
        for key in ("image", "tokens", "mask"):
            assert torch.equal(item[key], alone[key]), (index, key)
    a, b = ds[1], ds[1]
    assert a["image"].data_ptr() != b["image"].data_ptr() and a["tokens"].data_ptr() != b["tokens"].data_ptr()
    a["image"].zero_(), a["tokens"].zero_()
    assert torch.equal(ds[1]["image"], b["image"]) and torch.equal(ds[1]["tokens"], b["tokens"])
    other = data.PhraseCutLMDB(out, input_size=96, word_len=12)  # another size, another decode
    assert other[1]["image"].shape == (3, 96, 96)
    assert data.PhraseCutLMDB(out, input_size=64, word_len=12, train=False)[1]["tokens"].equal(b["tokens"])


def test_mask_is_official_rule_then_letterbox(synth):
    root, out, _ = synth
    ds = data.PhraseCutLMDB(out, input_size=80, train=False)
    for i, t in enumerate(tasks_of(root)[:25]):
        w, h = Image.open(root / "images" / f"{t['image_id']}.jpg").size
        gt = official_mask(t["Polygons"], w, h)
        item = ds[i]
        assert np.array_equal(item["gt_mask"].numpy(), gt)
        assert torch.equal(item["mask"], data.letterbox_mask(gt, 80))
    odd = [[[[2.7, 3.2], [30.9, 4.1], [20.5, 25.6]], [[5, 5]], [[1, 30], [20, 38]]], [],
           [[[-4, -4], [10, -4], [10, 6], [-4, 6]]]]  # floats, 1 point, 2 points, no polygon, outside
    assert np.array_equal(data.polygons_to_mask(odd, 40, 32), official_mask(odd, 40, 32))


@pytest.mark.parametrize("h, w", [(30, 50), (50, 30)])
def test_unletterbox_inverts_letterbox(h, w):
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        mask[y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = 1
    boxed = data.letterbox_mask(mask, 100)  # scale 2 exactly: the round trip is exact
    assert torch.equal(data.unletterbox(boxed, h, w)[0] > 0.5, torch.from_numpy(mask).bool())
    low = torch.nn.functional.interpolate(boxed[None], size=(25, 25), mode="bilinear", align_corners=False)
    back = data.unletterbox(low, h, w, input_size=100)[0, 0] > 0.5  # an S/4 map, CRIS's protocol
    m = torch.from_numpy(mask).bool()
    assert (back & m).sum() / (back | m).sum() > 0.6
    boxed = data.letterbox_mask(mask, 77)  # non-integer scale: nearest then bilinear, close
    back = data.unletterbox(boxed, h, w)[0] > 0.5
    assert (back & m).sum() / (back | m).sum() > 0.8


def test_letterbox_centres_and_pads_with_clip_mean():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    canvas, meta = data.letterbox(img, 80)
    assert meta["content"] == (20, 0, 40, 80) and meta["orig_size"] == (20, 40)
    assert canvas[:, :20].abs().max() == 0 and canvas[:, 60:].abs().max() == 0
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    assert torch.allclose(canvas[:, 40, 40], red, atol=1e-5)
    shown = data.unnormalize(canvas)  # RGB in [0, 1] again: the image, and CLIP's mean where it pads
    assert torch.allclose(shown[:, 40, 40], torch.tensor([1.0, 0, 0]), atol=1e-6)
    assert torch.allclose(shown[:, 0, 0], torch.tensor(data.CLIP_MEAN), atol=1e-6)


def test_workers_give_the_same_samples(synth):
    _, out, _ = synth
    ds = data.PhraseCutLMDB(out, input_size=48, train=False)
    ds[0]  # the parent opens the LMDB before forking: workers must reopen their own
    n = 12

    def run(workers):
        loader = DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=4,
                            num_workers=workers, collate_fn=data.collate)
        return list(loader)
    for a, b in zip(run(0), run(2)):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            elif k == "gt_mask":
                assert all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
            else:
                assert a[k] == b[k], k
    batch = run(0)[0]
    assert isinstance(batch["gt_mask"], list) and isinstance(batch["task_id"], list)
    assert batch["subsets"] == [ds[i]["subsets"] for i in range(4)]  # a list of name lists
    assert batch["image"].shape == (4, 3, 48, 48) and batch["num_instances"].dtype == torch.long


def copy_root(root, tmp_path):
    return Path(shutil.copytree(root, tmp_path / "copy"))


def test_corrupt_image_is_named_and_leaves_no_lmdb(synth, tmp_path):
    root = copy_root(synth[0], tmp_path)
    ids = sorted({str(t["image_id"]) for t in tasks_of(root)}, key=str.encode)
    bad = root / "images" / f"{ids[len(ids) // 2]}.jpg"  # halfway through the conversion
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "out" / "train.lmdb"
    with pytest.raises(ValueError, match=f"images/{ids[len(ids) // 2]}.jpg"):
        data.build_lmdb(root, "train", out, progress=False)
    assert list(out.parent.iterdir()) == []  # neither the LMDB nor its temporary file
    stats = data.build_lmdb(root, "train", out, skip_missing=True, progress=False)
    assert stats["skipped_images"] == 1 and stats["skipped_tasks"] >= 1


def test_atomic_path_shows_the_file_only_when_it_is_whole(tmp_path):
    target = tmp_path / "checkpoint.pth"
    with data.atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
        assert not target.exists() and tmp.parent == tmp_path  # same file system: the rename is atomic
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_missing_image_and_skip_missing(synth, tmp_path):
    root = copy_root(synth[0], tmp_path)
    tasks = tasks_of(root)
    gone = tasks[0]["image_id"]
    (root / "images" / f"{gone}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"images/{gone}.jpg"):
        data.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    assert not (tmp_path / "t.lmdb").exists()
    stats = data.build_lmdb(root, "train", tmp_path / "t.lmdb", skip_missing=True, progress=False)
    lost = sum(t["image_id"] == gone for t in tasks)
    assert stats["skipped_tasks"] == lost and len(data.PhraseCutLMDB(tmp_path / "t.lmdb")) == len(tasks) - lost


def test_build_errors_name_their_cause(synth, tmp_path):
    root = copy_root(synth[0], tmp_path)
    tasks = tasks_of(root)
    tasks[3]["phrase"] = "  "
    (root / "refer_train.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=tasks[3]["task_id"]):
        data.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    (root / "refer_test.json").unlink()
    with pytest.raises(FileNotFoundError, match="refer_test.json"):
        data.build_lmdb(root, "test", tmp_path / "t.lmdb", progress=False)
    old = tmp_path / "old.lmdb"
    env = lmdb.open(str(old), subdir=False, map_size=1 << 20, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"__header__", json.dumps({"format": data.LMDB_FORMAT, "version": 999}).encode())
    env.close()
    with pytest.raises(ValueError, match=f"{old}.*version 999.*version {data.LMDB_VERSION}"):
        data.PhraseCutLMDB(old)
    tasks[3]["phrase"] = "a phrase again"
    (root / "refer_train.json").write_text(json.dumps(tasks))
    images = json.loads((root / "image_data_split.json").read_text())
    (root / "image_data_split.json").write_text(json.dumps([d for d in images if d["image_id"] != tasks[0]["image_id"]]))
    with pytest.raises(ValueError, match=f"{tasks[0]['task_id']}.*not in image_data_split.json"):
        data.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    (root / "image_data_split.json").unlink()
    with pytest.raises(FileNotFoundError, match="image_data_split.json"):
        data.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)


def rectangle(x, y, w, h):
    """One instance: a w x h rectangle of pixels from (x, y), as PhraseCut polygons (outline included)."""
    return [[[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1]]]


def test_subsets_use_the_listed_image_size_and_the_count_file(tmp_path):
    """Hand-made PhraseCut: one 60x40 image file that image_data_split.json lists as 100x50 (5000 pixels),
    so the relative sizes 0.02 and 0.2 are whole pixel counts; the official rule divides by 5000."""
    root = tmp_path / "hand"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (60, 40), (90, 120, 150)).save(root / "images" / "7.jpg")
    Image.new("RGB", (30, 30), (90, 120, 150)).save(root / "images" / "8.jpg")
    (root / "image_data_split.json").write_text(json.dumps([
        {"image_id": 7, "width": 100, "height": 50, "split": "val", "url": "", "coco_id": 4321, "flickr_id": None},
        {"image_id": 8, "width": 30, "height": 30, "split": "val", "url": "", "coco_id": None, "flickr_id": None}]))
    counts = {"cat": [[f"n{i}", 1000 - i] for i in range(30)], "att": [["red", 5], ["big", 4]], "rel": [["on", 1]]}
    (root / "name_att_rel_count.json").write_text(json.dumps(counts))

    def task(i, boxes, name="n0", atts=(), rels=(), ids=(), kind="name", image_id=7):
        return {"task_id": f"{image_id}__{i}", "image_id": image_id, "ann_ids": list(range(len(boxes))),
                "instance_boxes": [[0, 0, 1, 1]] * len(boxes), "Polygons": boxes, "phrase": f"phrase {i}",
                "phrase_structure": {"name": name, "attributes": list(atts), "relation_ids": list(ids),
                                     "relation_descriptions": [list(r) for r in rels], "type": kind}}
    cases = [  # (task, expected subsets among i_*, s_*, p_*, c*, a*, d_*)
        (task(0, [rectangle(0, 0, 9, 11)]), "s_small"),        # 99 px = 0.0198 (0.04 of the 60x40 file)
        (task(1, [rectangle(0, 0, 10, 10)]), "s_mid"),         # 100 px = 0.02 exactly
        (task(2, [rectangle(0, 0, 6, 17)]), "s_mid"),          # 102 px = 0.0204
        (task(3, [rectangle(0, 0, 27, 37)]), "s_mid"),         # 999 px = 0.1998
        (task(4, [rectangle(0, 0, 40, 25)]), "s_mid"),         # 1000 px = 0.2 exactly
        (task(5, [rectangle(0, 0, 77, 13)]), "s_large"),       # 1001 px = 0.2002, beyond the file's width
        (task(6, [rectangle(0, 0, 5, 5), rectangle(50, 0, 5, 5)]), "i_multi"),
        (task(7, [rectangle(10 * k, 0, 3, 3) for k in range(4)]), "i_multi"),
        (task(8, [rectangle(10 * k, 0, 3, 3) for k in range(5)]), "i_many"),
        (task(9, [rectangle(0, 0, 5, 5)], ids=[11, 12], kind="verbose"), "p_verbose"),
        (task(10, [rectangle(0, 0, 5, 5)], atts=["big", "red"], rels=[("on", "n3"), ("by", "n4")], kind="relation"),
         "p_att p_rel p_rel+ p_attm p_relm p_att_rel"),
        (task(11, [rectangle(0, 0, 5, 5)], name="n19"), "c20"),
        (task(12, [rectangle(0, 0, 5, 5)], name="n20"), "c21-100"),
        (task(13, [rectangle(0, 0, 5, 5)], name="zebra"), "c500+"),
        (task(14, [rectangle(0, 0, 20, 20)], image_id=8), "d_notcocotv"),  # 400 / 900 px
    ]
    (root / "refer_val.json").write_text(json.dumps([t for t, _ in cases]))
    stats = data.build_lmdb(root, "val", tmp_path / "val.lmdb", progress=False)
    assert stats["size_mismatches"] == 1 and stats["name_att_rel_count"] == {"cat": counts["cat"], "att": counts["att"]}
    ds = data.PhraseCutLMDB(tmp_path / "val.lmdb", input_size=32, train=False)
    folder = data.PhraseCutFolder(root, "val", input_size=32, train=False)
    for i, (t, expected) in enumerate(cases):
        names = ds[i]["subsets"]
        assert names == folder[i]["subsets"]
        assert set(expected.split()) <= set(names), (t["task_id"], names)
    assert ds[0]["gt_mask"].shape == (40, 60) and ds[0]["gt_mask"].sum() == 99  # the mask itself: the file's size
    assert ds[0]["subsets"] == ["i_single", "p_name", "s_small", "c20", "c100", "c500", "a200+", "d_cocotv"]
    assert "s_large" in ds[14]["subsets"]  # 400 / 900 of the listed size
    assert [n for n in ds[10]["subsets"] if n[0] in "ac"] == ["c20", "c100", "c500", "a20", "a100", "a200"]
    assert "p_rel" not in ds[9]["subsets"] and [n for n in ds[12]["subsets"] if n[0] == "c"] == \
        ["c100", "c500", "c21-100"]


def test_every_image_mode_loads(synth, tmp_path):
    root = copy_root(synth[0], tmp_path)
    tasks = tasks_of(root)
    ids = list(dict.fromkeys(t["image_id"] for t in tasks))
    modes = {"L": "JPEG", "CMYK": "JPEG", "RGBA": "PNG", "LA": "PNG", "P": "PNG", "1": "PNG",
             "I;16": "PNG", "I": "TIFF", "F": "TIFF"}
    for image_id, (mode, fmt) in zip(ids, modes.items()):
        path = root / "images" / f"{image_id}.jpg"
        rgb = Image.open(path).convert("RGB")
        if mode.startswith("I"):
            img = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
            img = img if mode == "I;16" else img.convert("I")
        elif mode == "F":
            img = rgb.convert("L").convert("F")
        else:
            img = rgb.convert(mode)
        buf = io.BytesIO()
        img.save(buf, fmt)
        path.write_bytes(buf.getvalue())  # PhraseCut's name; PIL reads by content
        assert Image.open(path).mode == mode
    out = tmp_path / "modes.lmdb"
    data.build_lmdb(root, "train", out, progress=False)
    ds = data.PhraseCutLMDB(out, input_size=64)
    for i, t in enumerate(tasks):
        if t["image_id"] in ids[:len(modes)]:
            item = ds[i]
            assert torch.isfinite(item["image"]).all() and item["image"].abs().max() < 3
    white = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(data.to_rgb(white)).min() == 255


def test_tokenize_truncates_and_handles_unicode():
    tokens = data.tokenize(["word " * 50, "café rouge ☕ 猫", "circle"], 10)
    assert tokens.shape == (3, 10) and tokens.dtype == torch.long
    eot = data.tokenize("circle", 10)[0].max()
    assert tokens[0, -1] == eot and (tokens[1] == eot).any()


def test_ensure_synthetic_is_made_once(tmp_path):
    first = data.ensure_synthetic(tmp_path, num_images=6, seed=1, size=64)
    for split in ("train", "val", "test"):
        assert len(data.PhraseCutLMDB(first / f"{split}.lmdb")) > 0
    stamp = (first / "train.lmdb").stat().st_mtime_ns
    assert data.ensure_synthetic(tmp_path, num_images=6, seed=1, size=64) == first
    assert (first / "train.lmdb").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no half-made copies left
    square = data.ensure_synthetic(tmp_path, num_images=6, seed=1, size=64, aspect=1.0)
    assert square != first and square.name.endswith("px64x64_gen3_lmdb2")


def test_square_synthetic_images_and_the_aspect_range(tmp_path):
    """aspect 1: every image is size x size, in image_data_split.json and on disk, with the usual
    phrases; an aspect outside [0.5, 1] is refused."""
    root = data.synthesize(tmp_path / "sq", num_images=8, seed=2, size=96, aspect=1.0)
    infos = json.loads((root / "image_data_split.json").read_text())
    assert {(d["width"], d["height"]) for d in infos} == {(96, 96)}
    for d in infos:
        with Image.open(root / "images" / f"{d['image_id']}.jpg") as im:
            assert im.size == (96, 96)
    tasks = sum((tasks_of(root, s) for s in data.SPLITS), [])
    assert {t["phrase_structure"]["type"] for t in tasks} <= {"name", "attribute", "relation"} and len(tasks) >= 8 * 4
    for aspect in (0.4, 1.5):
        with pytest.raises(ValueError, match="aspect must be between 0.5 and 1"):
            data.synthesize(tmp_path / f"bad{aspect}", num_images=4, aspect=aspect)


# ----------------------------------------------------------------------------- hostile and careless input

def good_task(**changes):
    task = {"task_id": "1__0", "image_id": 1, "ann_ids": [0], "instance_boxes": [[0, 0, 10, 10]],
            "Polygons": [rectangle(0, 0, 10, 10)], "phrase": "grey box",
            "phrase_structure": {"name": "box", "attributes": ["grey"], "relation_ids": [],
                                 "relation_descriptions": [], "type": "attribute"}}
    return {**task, **changes}


def tiny_root(tmp_path, tasks=None, sizes=((40, 30),), listed=None):
    """A PhraseCut of images 1, 2, ... of `sizes`, listed in image_data_split.json at `listed` (default:
    their own sizes), and refer_train.json holding `tasks` (default: one good task)."""
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    for i, size in enumerate(sizes, 1):
        Image.new("RGB", size, (90, 120, 150)).save(root / "images" / f"{i}.jpg")
    (root / "image_data_split.json").write_text(json.dumps([
        {"image_id": i, "width": w, "height": h, "split": "train", "url": "", "coco_id": None, "flickr_id": None}
        for i, (w, h) in enumerate(listed or sizes, 1)]))
    (root / "refer_train.json").write_text(json.dumps([good_task()] if tasks is None else tasks))
    return root


def cli_error(argv, capsys):
    """data.main(argv) must fail as a user mistake: exit 2, `data.py...: error: ...`, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        data.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("data.py") and ": error: " in last, err
    return last


def test_build_never_replaces_an_input_or_a_foreign_file(tmp_path):
    root = tiny_root(tmp_path)
    snapshot = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    (tmp_path / "link.lmdb").symlink_to(root / "refer_train.json")
    for out in (root / "refer_train.json", root / "image_data_split.json", root / "images" / "1.jpg",
                root / "images" / "new.lmdb", root, root / "images", tmp_path / "link.lmdb"):
        with pytest.raises(ValueError, match="one of --root's inputs"):
            data.build_lmdb(root, "train", out, progress=False)
    notes = tmp_path / "notes.lmdb"
    notes.write_text("my notes")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=f"{notes} exists and is not an LMDB written by .*delete it first"):
        data.build_lmdb(root, "train", notes, progress=False)
    (root / "refer_train.json").write_text("[{")  # the refusal comes first, before any work
    with pytest.raises(ValueError, match="is a directory"):
        data.build_lmdb(root, "train", tmp_path / "folder", progress=False)
    (root / "refer_train.json").write_bytes(snapshot[root / "refer_train.json"])
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == snapshot
    assert notes.read_text() == "my notes" and list((tmp_path / "folder").iterdir()) == []
    ours = tmp_path / "ours.lmdb"  # an LMDB this tool wrote is replaced
    data.build_lmdb(root, "train", ours, progress=False)
    assert data.build_lmdb(root, "train", ours, progress=False)["num_tasks"] == 1
    with pytest.raises(ValueError, match="not an empty folder.*delete it first"):
        data.synthesize(root, num_images=4, size=32)  # synth never writes over a dataset either
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == snapshot


def test_build_validates_every_task_record(tmp_path):
    no_polygons = good_task()
    del no_polygons["Polygons"]
    cases = [  # (refer_train.json's content, what the error must say)
        ([good_task(Polygons="circle")], r"task '1__0': Polygons is 'circle'"),
        ([good_task(Polygons=[[[[1, 2], [float("nan"), 3]]]])], r"Polygons\[0\]\[0\]\[1\] is \[nan, 3\]"),
        ([good_task(Polygons=[[[[1, 2], ["4", 3]]]])], r"Polygons\[0\]\[0\]\[1\] is \['4', 3\]"),
        ([good_task(Polygons=[[[[1, 2, 3]]]])], r"Polygons\[0\]\[0\]\[0\] is \[1, 2, 3\], expected \[x, y\]"),
        ([good_task(Polygons=[["x"]])], r"Polygons\[0\]\[0\] is 'x'"),
        ([good_task(phrase=None)], r"task '1__0': phrase is None, expected a non-empty string"),
        ([good_task(phrase=7)], r"phrase is 7"),
        ([good_task(image_id=[1])], r"image_id is \[1\]"),
        ([good_task(instance_boxes=3)], r"instance_boxes is 3"),
        ([good_task(phrase_structure={"attributes": "red"})], r"phrase_structure.attributes is 'red'"),
        ([good_task(), no_polygons], r"task '1__0' lacks fields \['Polygons'\]"),
        ([good_task(), "oops"], r"record #1 is a JSON string, expected an object"),
        ({"tasks": [good_task()]}, r"the top level is a JSON object, expected an array"),
    ]
    root = tiny_root(tmp_path)
    for content, message in cases:
        (root / "refer_train.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match="refer_train.json: .*" + message):
            data.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
        with pytest.raises(ValueError, match=message):
            data.PhraseCutFolder(root, "train")
        assert not (tmp_path / "t.lmdb").exists()


def test_build_reports_images_whose_size_differs_from_the_annotations(tmp_path, capsys):
    root = tiny_root(tmp_path, sizes=[(1, 1)], listed=[(40, 30)])  # a 1x1 file for a 40x30 image
    data.main(["build", "--root", str(root), "--split", "train", "--out", str(tmp_path / "t.lmdb")])
    out = capsys.readouterr().out
    assert "warning: 1 images differ in size from image_data_split.json" in out and "1: file 1x1, listed 40x30" in out
    assert data.PhraseCutLMDB(tmp_path / "t.lmdb").header["size_mismatch_examples"] == ["1: file 1x1, listed 40x30"]


def test_build_applies_the_decompression_bomb_limit(tmp_path, monkeypatch):
    root = tiny_root(tmp_path, [good_task(), good_task(task_id="2__0", image_id=2)], sizes=[(300, 200), (40, 30)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # image 1 (60,000 px) is only in PIL's warning range
    with pytest.raises(ValueError, match="images/1.jpg.*decompression bomb"):
        data.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    stats = data.build_lmdb(root, "train", tmp_path / "t.lmdb", skip_missing=True, progress=False)
    assert (stats["skipped_images"], stats["skipped_image_ids"], stats["num_tasks"]) == (1, ["1"], 1)


def test_image_paths_stay_inside_the_images_folder(tmp_path):
    root = tiny_root(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.jpg")
    (root / "images" / "2.jpg").symlink_to(tmp_path / "secret.jpg")
    for image_id in ("../../secret", str(tmp_path / "secret"), 2):
        (root / "refer_train.json").write_text(json.dumps([good_task(), good_task(task_id="x", image_id=image_id)]))
        with pytest.raises(ValueError, match=f"task x: image_id {image_id!r} leads outside"):
            data.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
        folder = data.PhraseCutFolder(root, "train", input_size=32)
        folder.infos[str(image_id)] = folder.infos["1"]
        with pytest.raises(ValueError, match="leads outside"):
            folder[1]
    linked = tmp_path / "linked"  # the images folder itself may be a symlink (another disk)
    linked.mkdir()
    (linked / "images").symlink_to(root / "images")
    for name in ("image_data_split.json", "refer_train.json"):
        (linked / name).symlink_to(root / name)
    (root / "refer_train.json").write_text(json.dumps([good_task()]))
    assert data.build_lmdb(linked, "train", tmp_path / "t.lmdb", progress=False)["num_images"] == 1


def test_damaged_lmdb_is_named_not_a_crash(synth, tmp_path):
    _, out, _ = synth
    half = tmp_path / "half.lmdb"
    half.write_bytes(out.read_bytes()[:out.stat().st_size // 2])
    # in a child process: without the size check, reading it is a bus error that would kill pytest
    run = subprocess.run([sys.executable, str(Path(data.__file__)), "bench", str(half), "--n", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"data.py: error: {half} is truncated" in run.stderr, run.stderr
    with pytest.raises(ValueError, match=f"{half} is truncated"):
        data.PhraseCutLMDB(half)

    def damaged(name, edit):
        path = tmp_path / name
        shutil.copy(out, path)
        env = lmdb.open(str(path), subdir=False, lock=False)
        with env.begin(write=True) as txn:
            edit(txn)
        env.close()
        return path
    bad = damaged("records.lmdb", lambda txn: (txn.put(b"task/00000003", b"\xff\x00garbage"),
                                               txn.put(b"task/00000004", b"[1, 2]")))
    ds = data.PhraseCutLMDB(bad, input_size=32)
    for i in (3, 4):
        with pytest.raises(ValueError, match=f"{bad}: record task/0000000{i} is corrupt"):
            ds[i]
    header = data.PhraseCutLMDB(out).header
    more = damaged("more.lmdb", lambda txn: txn.put(b"__header__", json.dumps({**header, "num_tasks": 10**6}).encode()))
    with pytest.raises(ValueError, match=f"{more}: the header counts 1000000 tasks but record task/00999999 is missing"):
        data.PhraseCutLMDB(more)
    garbled = damaged("header.lmdb", lambda txn: txn.put(b"__header__", b"\xff{"))
    with pytest.raises(ValueError, match=f"{garbled}: record __header__ is corrupt"):
        data.PhraseCutLMDB(garbled)


def test_cli_user_mistakes_exit_2_with_a_message(tmp_path, capsys):
    root = tiny_root(tmp_path)
    refer = root / "refer_train.json"
    build = ["build", "--root", str(root), "--split", "train", "--out", str(tmp_path / "t.lmdb")]
    good = refer.read_text()
    for content, message in ((good[:len(good) // 2], r"is not valid JSON: .*\(line 1, column \d+\); the file ends early"),
                             ("\x00\xff", "is not valid JSON"),
                             ('{"a": 1}', "top level is a JSON object, expected an array"),
                             ("[{}]", r"task '#0' lacks fields")):
        refer.write_bytes(content.encode("latin-1"))
        err = cli_error(build, capsys)
        assert re.search(f"{refer}.*{message}", err), err
    refer.write_text(good)
    (root / "images" / "1.jpg").write_bytes(b"not a jpeg")
    assert "cannot read image" in cli_error(build, capsys) and "images/1.jpg: not an image" in cli_error(build, capsys)
    (tmp_path / "dir").mkdir()
    assert "is a directory" in cli_error(build[:-1] + [str(tmp_path / "dir")], capsys)
    (root / "image_data_split.json").write_text("[1]")
    assert "image_data_split.json: record #0 is 1" in cli_error(build, capsys)
    assert "not an empty folder" in cli_error(["synth", "--out", str(root)], capsys)
    assert "expected a positive integer" in cli_error(["synth", "--out", str(tmp_path / "s"), "--images", "0"], capsys)
    assert "not a readable LMDB file" in cli_error(["bench", str(refer)], capsys)
    assert "no LMDB file" in cli_error(["bench", str(tmp_path / "nowhere.lmdb")], capsys)


def test_long_phrases_warn_with_the_words_kept(tmp_path, monkeypatch):
    long = "the small red circle to the left of the large blue square"  # 12 words, 12 tokens
    assert data.kept_words(long, 14) is None and data.kept_words(long, 8) == "the small red circle to the"
    with pytest.warns(UserWarning, match="longer than 8 tokens .* the model sees only 'the small red circle to the'"):
        assert data.warn_if_cut(long, 8)
    tasks = [good_task(task_id=f"1__{i}", phrase=p) for i, p in enumerate([long, "a", long + " again", long])]
    ds = data.PhraseCutFolder(tiny_root(tmp_path, tasks), "train", input_size=32, word_len=14)
    monkeypatch.setattr(data._PhraseCutItems, "said_cut", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ds[0], ds[1]  # exactly 14 tokens: a full row, nothing cut
        assert seen == []
        ds.word_len = 8
        for i in range(4):
            ds[i]
    assert len(seen) == 1 and "task 1__0: phrase" in str(seen[0].message) and "said once" in str(seen[0].message)

    class Stub(torch.nn.Module):  # just enough of a model for predict_proba
        config = SimpleNamespace(input_size=32, word_len=8)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, image, tokens):
            return torch.zeros(len(image), 1, 8, 8)
    import predict
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own filter, which says a repeated warning once
        for _ in range(2):
            predict.predict_proba(Stub(), Image.new("RGB", (16, 12)), long)
        predict.predict_proba(Stub(), Image.new("RGB", (16, 12)), "red circle")
    assert [str(w.message).count("sees only 'the small red circle to the'") for w in seen] == [1, 1]


def test_dataset_uses_stored_pixels_not_exif_orientation(tmp_path):
    """PhraseCut's polygons are on the stored pixels, so the dataset ignores EXIF orientation."""
    root = tiny_root(tmp_path, [good_task(Polygons=[rectangle(0, 0, 20, 5)])])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.new("RGB", (40, 30), (90, 120, 150)).save(root / "images" / "1.jpg", exif=exif)
    from PIL import ImageOps
    assert ImageOps.exif_transpose(Image.open(root / "images" / "1.jpg")).size == (30, 40)
    item = data.PhraseCutFolder(root, "train", input_size=32, train=False)[0]
    assert item["orig_size"].tolist() == [30, 40] and item["gt_mask"][:5, :20].all() and item["gt_mask"].sum() == 100


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 3), (3, 2)])
def test_image_grouped_sampler_keeps_each_images_phrases_together(world, batch):
    """Ranks take disjoint shares of each global batch, no task twice, the phrases of an image
    next to each other; equal lengths on every rank; the epoch reshuffles; the same seed, the
    same order."""
    ids = [str(i // 4) if i < 20 else str(5 + (i - 20) // 3) for i in range(29)]  # 5 images x4, 3 x3
    def epoch(e, seed=0):
        samplers = [data.ImageGroupedSampler(ids, batch, r, world, seed) for r in range(world)]
        for s in samplers:
            s.set_epoch(e)
        return [list(s) for s in samplers]
    shares = epoch(0)
    step = batch * world
    assert all(len(s) == len(shares[0]) == 29 // step * batch for s in shares)
    assert all(len(s) == len(data.ImageGroupedSampler(ids, batch, 0, world)) for s in shares)
    # interleave the ranks' batches back into the global order
    order = [t for b in range(len(shares[0]) // batch) for s in shares for t in s[b * batch:(b + 1) * batch]]
    assert len(set(order)) == len(order)
    seen = []  # each image's phrases form one run in the global order
    for t in order:
        if not seen or seen[-1] != ids[t]:
            assert ids[t] not in seen
            seen.append(ids[t])
    assert epoch(0) == shares and epoch(1) != shares and epoch(0, seed=1) != shares


def test_unique_images_round_trip():
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    distinct, index = data.unique_images(images, ["b", "a", "b", "c", "a"])
    assert index.tolist() == [0, 1, 0, 2, 1] and index.dtype == torch.long
    assert torch.equal(distinct[:, 0, 0, 0], torch.tensor([0.0, 1.0, 3.0]))
    assert torch.equal(distinct[index][[0, 1, 3]], images[[0, 1, 3]])
