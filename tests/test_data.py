"""The data pipeline: synthetic PhraseCut -> LMDB -> dataset items, masks against PhraseCut's own
rule, letterbox round trips, DataLoader workers, image modes, the sampler."""
import collections
import hashlib
import io
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from phrasecut_files import copy_root, good_task, official_mask, rectangle, tasks_of, tiny_root
from PIL import Image
from torch.utils.data import DataLoader

import data
import data as datasets
from helpers import inference, transforms
from sources import lmdb_store, phrasecut, synthetic


def test_synthetic_layout_subsets_and_determinism(synth, tmp_path):
    root, _, _ = synth
    for name in ["image_data_split.json", "name_att_rel_count.json"] + [f"refer_{s}.json" for s in phrasecut.SPLITS]:
        assert (root / name).is_file(), name
    tasks = sum((tasks_of(root, s) for s in phrasecut.SPLITS), [])
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
    a, b = synthetic.synthesize(tmp_path / "a", 6, seed=3, size=64), synthetic.synthesize(tmp_path / "b", 6, seed=3, size=64)
    assert digest(a) == digest(b)
    assert digest(a) != digest(synthetic.synthesize(tmp_path / "c", 6, seed=4, size=64))


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
    ids = {s: {t["task_id"] for t in tasks_of(root, s)} for s in phrasecut.SPLITS}
    assert ids["miniv"] and ids["val"] and not ids["val"] & ids["miniv"]  # PhraseCut's val lacks miniv
    assert sum(len(v) for v in ids.values()) == len(set().union(*ids.values()))  # no task in two files
    for s in phrasecut.SPLITS:
        # what PhraseCut's loader does for split s: look every task's image up among the images of split s
        listed = {d["image_id"] for d in images if d["split"] == s}
        assert {t["image_id"] for t in tasks_of(root, s)} == listed, s


def test_synthetic_count_file_matches_the_phrases(synth):
    root, _, _ = synth
    counts = json.loads((root / "name_att_rel_count.json").read_text())
    assert set(counts) == {"cat", "att", "rel"}
    cat, att, rel = collections.Counter(), collections.Counter(), collections.Counter()
    for s in phrasecut.SPLITS:  # recounted here, over every split
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
    cands = {text: set(ids) for text, _, ids in synthetic._phrases(shapes, 100, 100)}
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
    with lmdb_store.reader(out).begin() as txn:
        keys = [k for k, _ in txn.cursor()]
        assert txn.get(b"img/" + next(iter(image_ids)).encode()) == \
            (root / "images" / f"{next(iter(image_ids))}.jpg").read_bytes()  # the file's own bytes
    assert sum(k.startswith(b"img/") for k in keys) == len(image_ids) == stats["num_images"]
    assert sum(k.startswith(b"task/") for k in keys) == len(tasks)
    item = ds[0]
    assert set(item) == {"image", "tokens", "mask", "image_id", "no_target"} and item["no_target"] is False
    assert item["image_id"] == str(tasks[0]["image_id"])
    assert ds.image_ids() == [str(t["image_id"]) for t in tasks]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["tokens"].shape == (12,) and item["tokens"].dtype == torch.long
    assert item["mask"].shape == (1, 64, 64) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(item["tokens"], transforms.tokenize(tasks[0]["phrase"], 12)[0])
    ev = data.PhraseCutLMDB(out, input_size=64, train=False)[len(ds) - 1]
    t = tasks[-1]
    assert ev["task_id"] == t["task_id"] and ev["phrase"] == t["phrase"]
    assert ev["num_instances"] == len(t["instance_boxes"])
    assert ev["phrase_type"] == t["phrase_structure"]["type"]
    assert ("p_rel" in ev["subsets"]) == (ev["phrase_type"] == "relation")
    assert ev["orig_size"].tolist() == list(ev["gt_mask"].shape)
    assert set(ev["subsets"]) <= set(phrasecut.SUBSETS) and "d_notcocotv" in ev["subsets"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_items_read_in_a_row_equal_items_read_alone(synth):
    """The dataset keeps the last image it decoded (an image's phrases are read one after another) and each
    phrase's tokens: items read in the sampler's order, or twice in a row, equal those of a fresh dataset per
    item, where nothing is kept, and share no storage."""
    root, out, _ = synth
    ds = data.PhraseCutLMDB(out, input_size=64, word_len=12)
    order = list(datasets.ImageGroupedSampler(ds.image_ids(), 4, seed=3)) + [5, 5, 0]
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
        assert torch.equal(item["mask"], transforms.letterbox_mask(gt, 80))
    odd = [[[[2.7, 3.2], [30.9, 4.1], [20.5, 25.6]], [[5, 5]], [[1, 30], [20, 38]]], [],
           [[[-4, -4], [10, -4], [10, 6], [-4, 6]]]]  # floats, 1 point, 2 points, no polygon, outside
    assert np.array_equal(transforms.polygons_to_mask(odd, 40, 32), official_mask(odd, 40, 32))


@pytest.mark.parametrize("h, w", [(30, 50), (50, 30)])
def test_unletterbox_inverts_letterbox(h, w):
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        mask[y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = 1
    boxed = transforms.letterbox_mask(mask, 100)  # scale 2 exactly: the round trip is exact
    assert torch.equal(transforms.unletterbox(boxed, h, w)[0] > 0.5, torch.from_numpy(mask).bool())
    low = torch.nn.functional.interpolate(boxed[None], size=(25, 25), mode="bilinear", align_corners=False)
    back = transforms.unletterbox(low, h, w, input_size=100)[0, 0] > 0.5  # an S/4 map, CRIS's protocol
    m = torch.from_numpy(mask).bool()
    assert (back & m).sum() / (back | m).sum() > 0.6
    boxed = transforms.letterbox_mask(mask, 77)  # non-integer scale: nearest then bilinear, close
    back = transforms.unletterbox(boxed, h, w)[0] > 0.5
    assert (back & m).sum() / (back | m).sum() > 0.8


def test_letterbox_centres_and_pads_with_clip_mean():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    canvas, meta = transforms.letterbox(img, 80)
    assert meta["content"] == (20, 0, 40, 80) and meta["orig_size"] == (20, 40)
    assert canvas[:, :20].abs().max() == 0 and canvas[:, 60:].abs().max() == 0
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(transforms.CLIP_MEAN)) / torch.tensor(transforms.CLIP_STD)
    assert torch.allclose(canvas[:, 40, 40], red, atol=1e-5)
    shown = transforms.unnormalize(canvas)  # RGB in [0, 1] again: the image, and CLIP's mean where it pads
    assert torch.allclose(shown[:, 40, 40], torch.tensor([1.0, 0, 0]), atol=1e-6)
    assert torch.allclose(shown[:, 0, 0], torch.tensor(transforms.CLIP_MEAN), atol=1e-6)


def test_workers_give_the_same_samples(synth):
    _, out, _ = synth
    ds = data.PhraseCutLMDB(out, input_size=48, train=False)
    ds[0]  # the parent opens the LMDB before forking: workers must reopen their own
    n = 12

    def run(workers):
        loader = DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=4,
                            num_workers=workers, collate_fn=datasets.collate)
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
    phrasecut.build_lmdb(root, "train", out, progress=False)
    ds = data.PhraseCutLMDB(out, input_size=64)
    for i, t in enumerate(tasks):
        if t["image_id"] in ids[:len(modes)]:
            item = ds[i]
            assert torch.isfinite(item["image"]).all() and item["image"].abs().max() < 3
    white = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(transforms.to_rgb(white)).min() == 255


def test_tokenize_truncates_and_handles_unicode():
    tokens = transforms.tokenize(["word " * 50, "café rouge ☕ 猫", "circle"], 10)
    assert tokens.shape == (3, 10) and tokens.dtype == torch.long
    eot = transforms.tokenize("circle", 10)[0].max()
    assert tokens[0, -1] == eot and (tokens[1] == eot).any()


def test_ensure_synthetic_is_made_once(tmp_path):
    first = synthetic.ensure_synthetic(tmp_path, num_images=6, seed=1, size=64)
    for split in ("train", "val", "test"):
        assert len(data.PhraseCutLMDB(first / f"{split}.lmdb")) > 0
    stamp = (first / "train.lmdb").stat().st_mtime_ns
    assert synthetic.ensure_synthetic(tmp_path, num_images=6, seed=1, size=64) == first
    assert (first / "train.lmdb").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no half-made copies left
    square = synthetic.ensure_synthetic(tmp_path, num_images=6, seed=1, size=64, aspect=1.0)
    assert square != first and square.name.endswith(f"px64x64_gen3_lmdb{lmdb_store.LMDB_VERSION}")


def test_square_synthetic_images_and_the_aspect_range(tmp_path):
    """aspect 1: every image is size x size, in image_data_split.json and on disk, with the usual
    phrases; an aspect outside [0.5, 1] is refused."""
    root = synthetic.synthesize(tmp_path / "sq", num_images=8, seed=2, size=96, aspect=1.0)
    infos = json.loads((root / "image_data_split.json").read_text())
    assert {(d["width"], d["height"]) for d in infos} == {(96, 96)}
    for d in infos:
        with Image.open(root / "images" / f"{d['image_id']}.jpg") as im:
            assert im.size == (96, 96)
    tasks = sum((tasks_of(root, s) for s in phrasecut.SPLITS), [])
    assert {t["phrase_structure"]["type"] for t in tasks} <= {"name", "attribute", "relation"} and len(tasks) >= 8 * 4
    for aspect in (0.4, 1.5):
        with pytest.raises(ValueError, match="aspect must be between 0.5 and 1"):
            synthetic.synthesize(tmp_path / f"bad{aspect}", num_images=4, aspect=aspect)


def test_long_phrases_warn_with_the_words_kept(tmp_path, monkeypatch):
    long = "the small red circle to the left of the large blue square"  # 12 words, 12 tokens
    assert transforms.kept_words(long, 14) is None and transforms.kept_words(long, 8) == "the small red circle to the"
    with pytest.warns(UserWarning, match="longer than 8 tokens .* the model sees only 'the small red circle to the'"):
        assert transforms.warn_if_cut(long, 8)
    tasks = [good_task(task_id=f"1__{i}", phrase=p) for i, p in enumerate([long, "a", long + " again", long])]
    ds = datasets.PhraseCutFolder(tiny_root(tmp_path, tasks), "train", input_size=32, word_len=14)
    monkeypatch.setattr(datasets._PhraseCutItems, "said_cut", False)
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
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own filter, which says a repeated warning once
        for _ in range(2):
            inference.predict_proba(Stub(), Image.new("RGB", (16, 12)), long)
        inference.predict_proba(Stub(), Image.new("RGB", (16, 12)), "red circle")
    assert [str(w.message).count("sees only 'the small red circle to the'") for w in seen] == [1, 1]


def test_dataset_uses_stored_pixels_not_exif_orientation(tmp_path):
    """PhraseCut's polygons are on the stored pixels, so the dataset ignores EXIF orientation."""
    root = tiny_root(tmp_path, [good_task(Polygons=[rectangle(0, 0, 20, 5)])])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.new("RGB", (40, 30), (90, 120, 150)).save(root / "images" / "1.jpg", exif=exif)
    from PIL import ImageOps
    assert ImageOps.exif_transpose(Image.open(root / "images" / "1.jpg")).size == (30, 40)
    item = datasets.PhraseCutFolder(root, "train", input_size=32, train=False)[0]
    assert item["orig_size"].tolist() == [30, 40] and item["gt_mask"][:5, :20].all() and item["gt_mask"].sum() == 100


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 3), (3, 2)])
def test_image_grouped_sampler_keeps_each_images_phrases_together(world, batch):
    """Ranks take disjoint shares of each global batch, no task twice, the phrases of an image
    next to each other; equal lengths on every rank; the epoch reshuffles; the same seed, the
    same order."""
    ids = [str(i // 4) if i < 20 else str(5 + (i - 20) // 3) for i in range(29)]  # 5 images x4, 3 x3
    def epoch(e, seed=0):
        samplers = [datasets.ImageGroupedSampler(ids, batch, r, world, seed) for r in range(world)]
        for s in samplers:
            s.set_epoch(e)
        return [list(s) for s in samplers]
    shares = epoch(0)
    step = batch * world
    assert all(len(s) == len(shares[0]) == 29 // step * batch for s in shares)
    assert all(len(s) == len(datasets.ImageGroupedSampler(ids, batch, 0, world)) for s in shares)
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
    distinct, index = datasets.unique_images(images, ["b", "a", "b", "c", "a"])
    assert index.tolist() == [0, 1, 0, 2, 1] and index.dtype == torch.long
    assert torch.equal(distinct[:, 0, 0, 0], torch.tensor([0.0, 1.0, 3.0]))
    assert torch.equal(distinct[index][[0, 1, 3]], images[[0, 1, 3]])
