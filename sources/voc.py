"""PASCAL VOC 2012's segmentation set, with category prompts: one task per class present in an image.

    python data.py build --source voc --root VOCdevkit/VOC2012 --split val --out voc_val.lmdb

The layout (VOC 2012's devkit):

    <root>/JPEGImages/<name>.jpg
    <root>/SegmentationClass/<name>.png      palette PNGs: index 0 background, 1-20 the classes in
                                             VOC's order, 255 the "void" border
    <root>/ImageSets/Segmentation/{train,val}.txt   one image name per line

The paper's generalisation test (Section 5.2, Fig. 7) prompts with category names. A task is one
image and one class present in it (not the background): its phrase is the class's name in words
("potted plant", "dining table", "tv monitor"), its id `<image name>_<class index>` (2007_000032_15),
its mask the pixels of that index, and its ignore region the 255 pixels, which count in neither the
intersection nor the union, as in VOC's own scoring (metrics.task_iou). Both are stored as COCO's
compressed RLE (transforms.mask_to_rle).
"""
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.transforms import mask_to_rle
from sources.lmdb_store import check_out, write_lmdb

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

NAMES = tuple({"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}.get(c, c)
              for c in CLASSES)  # the phrases: index i + 1 is NAMES[i]

SPLITS = ("train", "val")

VOID = 255

_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def read_class_png(path):
    """A SegmentationClass PNG as (H, W) uint8 class indices; a ValueError naming the file unless it is a
    palette image whose indices are 0-20 or 255, within PIL's decompression-bomb limit."""
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # an error, as for images
            if im.mode != "P":
                raise ValueError(f"{path}: a mode {im.mode} image, expected a palette (mode P) PNG whose index is "
                                 "the class, as VOC's SegmentationClass holds")
            labels = np.asarray(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: the class PNG is too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the class PNG ({err})") from None
    wrong = sorted(set(np.unique(labels).tolist()) - set(range(len(CLASSES) + 1)) - {VOID})
    if wrong:
        raise ValueError(f"{path}: class indices {wrong[:10]} are none of VOC's (0 background, 1-20, 255 void)")
    return labels


def image_names(root, split):
    """The image names of ImageSets/Segmentation/<split>.txt, each a plain name."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: VOC's segmentation splits are {', '.join(SPLITS)}")
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is --root VOC2012's folder (VOCdevkit/VOC2012)?")
    names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    lines = {}
    for i, name in enumerate(names):
        if not _NAME.fullmatch(name):
            raise ValueError(f"{path}: line {i + 1} {name[:80]!r} is not an image name (letters, digits, _ and -)")
        if name in lines:
            raise ValueError(f"{path}: entries {lines[name]} and {i + 1} both name {name}; each image once")
        lines[name] = i + 1
    return path, names


def voc_tasks(labels, name):
    """The tasks of one image's class map (H, W): one per class present, in index order."""
    void = labels == VOID
    ignore = [mask_to_rle(void)] if void.any() else []
    return [{"task_id": f"{name}_{c}", "image_id": name, "phrase": NAMES[c - 1], "category": NAMES[c - 1],
             "category_id": c, "segmentation": [mask_to_rle(labels == c)], "ignore": ignore}
            for c in np.unique(labels).tolist() if 1 <= c <= len(CLASSES)]


def build_voc(root, split, out, skip_missing=False, progress=True):
    """Convert one VOC 2012 segmentation split to a single-file LMDB at `out`; returns stats."""
    root, out = Path(root), Path(out)
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: VOC's segmentation splits are {', '.join(SPLITS)}")
    check_out(out, [root, root / "ImageSets" / "Segmentation" / f"{split}.txt"],  # before any input is read
              folders=[root / "JPEGImages", root / "SegmentationClass"])
    list_file, names = image_names(root, split)
    tasks, files, missing, unreadable = [], {}, [], []
    for name in names:
        png = root / "SegmentationClass" / f"{name}.png"
        if not png.is_file():
            if not skip_missing:
                raise FileNotFoundError(f"{png} is missing ({list_file} lists {name}; --skip-missing converts "
                                        "without it)")
            missing.append(name)
            continue
        try:
            labels = read_class_png(png)
        except ValueError as err:
            if not skip_missing:
                raise ValueError(f"{err}; --skip-missing converts without it") from None
            unreadable.append(name)
            continue
        new = voc_tasks(labels, name)
        if new:  # an image of background and void alone has no task, and is not stored
            files[name] = (root / "JPEGImages" / f"{name}.jpg", (labels.shape[1], labels.shape[0]))
            tasks += new
    header = {"dataset": "voc", "split": split, "source": str(root.resolve()), "categories": list(NAMES),
              "missing_masks": len(missing), "missing_mask_names": missing[:20],
              "unreadable_masks": len(unreadable), "unreadable_mask_names": unreadable[:20]}
    return write_lmdb(out, header, files, tasks, where=list_file, skip_missing=skip_missing, exact_size=True,
                      progress=progress,
                      listed_by=lambda i: f"its class PNG {root / 'SegmentationClass' / f'{i}.png'} (image id {i})")
