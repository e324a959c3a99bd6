"""data.py: synthetic PhraseCut -> LMDB -> dataset, masks against PhraseCut's own rule, letterbox
round trips, DataLoader workers, failure modes, image modes."""
import hashlib
import io
import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

import data


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
    for name in ["image_data_split.json"] + [f"refer_{s}.json" for s in data.SPLITS]:
        assert (root / name).is_file(), name
    tasks = sum((tasks_of(root, s) for s in ("train", "val", "test")), [])
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
    miniv = {t["task_id"] for t in tasks_of(root, "miniv")}
    assert miniv and miniv <= {t["task_id"] for t in tasks_of(root, "val")}

    def digest(d):
        return {p.relative_to(d): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*")
                if p.is_file()}
    a, b = data.synthesize(tmp_path / "a", 6, seed=3, size=64), data.synthesize(tmp_path / "b", 6, seed=3, size=64)
    assert digest(a) == digest(b)
    assert digest(a) != digest(data.synthesize(tmp_path / "c", 6, seed=4, size=64))


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
    assert set(item) == {"image", "tokens", "mask"}
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["tokens"].shape == (12,) and item["tokens"].dtype == torch.long
    assert item["mask"].shape == (1, 64, 64) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(item["tokens"], data.tokenize(tasks[0]["phrase"], 12)[0])
    ev = data.PhraseCutLMDB(out, input_size=64, train=False)[len(ds) - 1]
    t = tasks[-1]
    assert ev["task_id"] == t["task_id"] and ev["phrase"] == t["phrase"] and ev["index"] == len(ds) - 1
    assert ev["num_instances"] == len(t["instance_boxes"])
    assert ev["phrase_type"] == t["phrase_structure"]["type"]
    assert ev["has_relations"] == (ev["phrase_type"] == "relation")
    assert ev["orig_size"].tolist() == list(ev["gt_mask"].shape)
    assert ev["mask_area"] == pytest.approx(ev["gt_mask"].float().mean().item())
    with pytest.raises(IndexError):
        ds[len(ds)]


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
    assert batch["image"].shape == (4, 3, 48, 48) and batch["has_attributes"].dtype == torch.bool


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
