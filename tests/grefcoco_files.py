"""A gRefCOCO folder in ReLA's layout, built by hand (grefcoco/grefs(unc).json, instances.json,
images/train2014/), for the gRefCOCO tests.

It reuses coco_files' three images and five annotations (a two-part polygon, overlapping parts, a crowd
region as uncompressed RLE, a compressed RLE, a polygon) and adds a polygon on image 2, so that a ref
can name a crowd region and a plain one together. The refs cover one target (ann_id a bare int and a
list of one), several targets, several with a crowd region among them, and no target (ann_id [-1],
category_id [-1]), with one to three sentences each, in the four splits.
"""
import json
import pickle

from coco_files import SIZES, file_name, instances
from PIL import Image

EXTRA = {"id": 16, "image_id": 2, "category_id": 2, "iscrowd": 0, "bbox": [1, 1, 8, 9],
         "segmentation": [[1, 1, 9, 1, 9, 10, 1, 10]]}


def grefcoco_instances():
    content = instances()
    content["annotations"].append(EXTRA)
    return content


def gref(ref_id, ann_id, image_id, split, sentences, category_id=None):
    if category_id is None:
        category_id = [-1] if ann_id == [-1] else [1]
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": category_id, "split": split,
            "sent_ids": [s for s, _ in sentences],
            "sentences": [{"sent_id": s, "sent": text, "raw": text, "tokens": text.split()} for s, text in sentences]}


GREFS = [
    gref(1, 11, 1, "train", [(500, "left man"), (501, "man on the left"), (502, "guy in red")]),  # bare int
    gref(2, [11, 12], 1, "train", [(503, "man and table")]),                                       # two targets
    gref(3, [13, 16], 2, "val", [(504, "the crowd and the box"), (505, "everything on the left")]),  # one crowd
    gref(4, [-1], 3, "val", [(506, "the purple star"), (507, "a dog")]),                           # no target
    gref(5, [14, 15], 3, "testA", [(508, "both things")], category_id=[2, 1]),
    gref(6, [-1], 1, "testB", [(509, "a cat")], category_id=-1),
    gref(7, [15], 3, "testB", [(510, "triangle person"), (511, "bottom left")]),                   # list of one
    gref(8, [13], 2, "train", [(512, "only the crowd")]),                                          # crowd alone
]

# hand-counted: refs of each split (ref["split"] exactly) x their sentences
COUNTS = {"train": 3 + 1 + 1, "val": 2 + 2, "testA": 1, "testB": 1 + 2}
NO_TARGET = {506, 507, 509}  # the sent_ids of refs with ann_id [-1]


def grefcoco_root(tmp_path, refs=None, pickled=False, image_dir="images/train2014"):
    """gRefCOCO's data root: grefcoco/grefs(unc).json (or .p), grefcoco/instances.json, images at image_dir."""
    root = tmp_path / "grefcoco_root"
    images = root / image_dir
    images.mkdir(parents=True)
    for i, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), (30 * i, 90, 150)).save(images / file_name(i))
    (root / "grefcoco").mkdir()
    (root / "grefcoco" / "instances.json").write_text(json.dumps(grefcoco_instances()))
    refs = GREFS if refs is None else refs
    if pickled:
        (root / "grefcoco" / "grefs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    else:
        (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    return root
