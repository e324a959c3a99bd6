"""Helpers of the RefCOCO, COCO and VOC tests: tiny folders in each official layout, built by hand.

The refer layout holds three COCO train2014 images and five annotations chosen for the cases the
converter must get right: a two-part polygon, two overlapping parts, a crowd region as COCO's
uncompressed RLE, a compressed RLE, and a plain polygon; refs files pickled with protocol 2, as
Python 2 wrote them, whose refs fall in train, val, testA, testB and testAB.
"""
import json
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as coco_rle

SIZES = {1: (40, 30), 2: (36, 24), 3: (32, 32)}  # image id -> (width, height)


def file_name(image_id):
    return f"COCO_train2014_{image_id:012d}.jpg"


def uncompressed_rle(mask):
    """COCO's crowd form: counts as a list of run lengths, column-major, starting with background."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def instances():
    """instances.json's content: 3 images, 5 annotations (see the module docstring), 2 categories."""
    crowd = np.zeros((24, 36), np.uint8)
    crowd[3:20, 5:30] = 1
    crowd[8:12, 10:14] = 0
    packed = np.zeros((32, 32), np.uint8)
    packed[2:9, 20:31] = 1
    rle = coco_rle.encode(np.asfortranarray(packed))
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 30, 20],
         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10], [20.5, 12, 31.5, 12, 26, 22]]},        # two parts
        {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [5, 5, 25, 20],
         "segmentation": [[5, 5, 25, 5, 25, 20, 5, 20], [15, 10, 30, 10, 30, 25, 15, 25]]},     # overlapping parts
        {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 1, "bbox": [5, 3, 25, 17],
         "segmentation": uncompressed_rle(crowd)},                                            # crowd RLE
        {"id": 14, "image_id": 3, "category_id": 2, "iscrowd": 0, "bbox": [20, 2, 11, 7],
         "segmentation": {"size": [32, 32], "counts": rle["counts"].decode()}},               # compressed RLE
        {"id": 15, "image_id": 3, "category_id": 1, "iscrowd": 0, "bbox": [1, 15, 14, 14],
         "segmentation": [[1, 15, 15, 15, 8, 29]]},
    ]
    return {"images": [{"id": i, "file_name": file_name(i), "width": w, "height": h} for i, (w, h) in SIZES.items()],
            "annotations": anns, "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dining table"}]}


def ref(ref_id, ann_id, image_id, split, sentences):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sent_ids": [s for s, _ in sentences],
            "sentences": [{"sent_id": s, "sent": text, "raw": text, "tokens": text.split()} for s, text in sentences]}


# refs per splitBy: train has a ref with three sentences; testAB belongs to testA and to testB
UNC = [ref(1, 11, 1, "train", [(100, "left man"), (101, "man on the left"), (102, "guy in red")]),
       ref(2, 12, 1, "val", [(103, "the table")]),
       ref(3, 13, 2, "testA", [(104, "crowd"), (105, "people at the back")]),
       ref(4, 14, 3, "testB", [(106, "small table")]),
       ref(5, 15, 3, "testAB", [(107, "triangle person")])]
GOOGLE = [ref(6, 11, 1, "train", [(200, "a man")]), ref(7, 12, 1, "train", [(201, "table")]),
          ref(8, 13, 2, "val", [(202, "the crowd"), (203, "many people")])]
UMD = [ref(9, 11, 1, "train", [(300, "a man")]), ref(10, 12, 1, "val", [(301, "table")]),
       ref(11, 13, 2, "test", [(302, "crowd")]), ref(12, 14, 3, "test", [(303, "small table"), (304, "top right")])]

LAYOUT = {"refcoco": {"unc": UNC, "google": GOOGLE}, "refcoco+": {"unc": UNC}, "refcocog": {"google": GOOGLE, "umd": UMD}}


def refer_root(tmp_path, image_dir="images/mscoco/images/train2014"):
    """The refer API's data folder with refcoco, refcoco+ and refcocog, and the images at `image_dir`."""
    root = tmp_path / "refer"
    images = root / image_dir
    images.mkdir(parents=True)
    for i, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), (30 * i, 90, 150)).save(images / file_name(i))
    for dataset, by in LAYOUT.items():
        (root / dataset).mkdir()
        (root / dataset / "instances.json").write_text(json.dumps(instances()))
        for split_by, refs in by.items():
            (root / dataset / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


def coco_folder(tmp_path):
    """COCO's layout, coco/annotations/instances_val2017.json and coco/val2017/, holding the same three
    images and five annotations; returns (the instances file, the images folder)."""
    folder = tmp_path / "coco"
    (folder / "val2017").mkdir(parents=True)
    (folder / "annotations").mkdir()
    for i, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), (30 * i, 90, 150)).save(folder / "val2017" / file_name(i))
    (folder / "annotations" / "instances_val2017.json").write_text(json.dumps(instances()))
    return folder / "annotations" / "instances_val2017.json", folder / "val2017"


def voc_labels():
    """A 40x30 class map: person (15) with a void (255) border, a dining table (11), background 0."""
    labels = np.zeros((30, 40), np.uint8)
    labels[5:20, 5:15] = 255
    labels[6:19, 6:14] = 15
    labels[22:28, 20:38] = 11
    return labels


def voc_root(tmp_path, labels=None, split="val", mode="P"):
    """VOC2012's folder with one image, 2007_000032, whose class PNG holds `labels` (default voc_labels)."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    labels = voc_labels() if labels is None else labels
    Image.new("RGB", (labels.shape[1], labels.shape[0]), (100, 50, 25)).save(root / "JPEGImages" / "2007_000032.jpg")
    png = Image.fromarray(labels, "L")
    if mode == "P":
        png = png.convert("P")
        png.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    png.save(root / "SegmentationClass" / "2007_000032.png")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("2007_000032\n")
    return root
