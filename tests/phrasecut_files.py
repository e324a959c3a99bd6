"""Helpers of the data tests: PhraseCut's own mask rule restated, and tiny PhraseCut directories."""
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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


def tasks_of(root, split="train"):
    return json.loads((Path(root) / f"refer_{split}.json").read_text())


def rectangle(x, y, w, h):
    """One instance: a w x h rectangle of pixels from (x, y), as PhraseCut polygons (outline included)."""
    return [[[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1]]]


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


def copy_root(root, tmp_path):
    return Path(shutil.copytree(root, tmp_path / "copy"))
