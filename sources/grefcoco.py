"""gRefCOCO (generalized referring expressions: one, several or no object) in ReLA's layout, to LMDB.

    python data.py build --source grefcoco --root R --split val --out grefcoco/val.lmdb

The layout (ReLA's datasets/DATASET.md; its loader is G_REFER in grefer.py):

    R/grefcoco/grefs(unc).json   (or grefs(unc).p, a Python 2 pickle, read first when both exist)
    R/grefcoco/instances.json    COCO's format (coco.read_instances)
    R/images/train2014/COCO_train2014_*.jpg   (--images names any other folder)

A ref is {ref_id, image_id, split, sentences: [{sent_id, sent, raw, tokens}], ann_id, category_id}.
Its `ann_id` is a list of annotation ids, or a bare int in some files (a list of one). A ref that
names nothing has ann_id == [-1] (its category_id may be [-1] too). The refs of a split are those
whose `split` field is exactly that split (G_REFER.getRefIds). Each sentence is one task: its id the
`sent_id`, its phrase the sentence's `sent` (a sentence that is empty or only spaces makes no task: build
counts them, names a few in the LMDB's header and says so, as for RefCOCO). Its mask is G_REFER.getMaskByRef(ref, merge=True): the
union of the ref's annotations that are not crowd regions (those are left out), decoded by
pycocotools at the size instances.json gives the image (transforms.coco_mask); all zeros for a
no-target ref. Every task records `no_target` (true for ann_id == [-1]), which the LMDB keeps and
evaluate.py's GRES metrics read; the other sources' tasks read as false.
A pickle is read with refcoco.PlainUnpickler (nothing in it runs); bad records are refused naming the
file and the ref, as for RefCOCO.
"""
from pathlib import Path

from helpers.files import short_repr
from sources.coco import read_instances
from sources.lmdb_store import check_out, write_lmdb
from sources.refcoco import (
    check_sentences,
    check_unique,
    empty_phrases,
    find_refs_file,
    no_phrase,
    no_sentences,
    read_checked_refs,
)

SPLITS = ("train", "val", "testA", "testB")

IMAGE_DIR = "images/train2014"  # ReLA's place for COCO train2014 under the data root

NO_TARGET = [-1]  # the ann_id of a ref that names nothing


def ann_ids(ref):
    """A ref's annotation ids as a list: a bare int is a list of one (grefer's _toList)."""
    ids = ref.get("ann_id")
    return ids if isinstance(ids, list) else [ids]


def load_grefs(path):
    """The refs of a grefs(<splitBy>).json or .p file, each checked; errors name the file and the ref."""
    return read_checked_refs(path, check_grefs)


def check_grefs(refs, path):
    ref_ids, sent_ids = {}, {}  # each ref_id and sent_id (a task's id) once, as RefCOCO's (check_unique)
    for i, ref in enumerate(refs):
        if not (isinstance(ref, dict) and all(type(ref.get(k)) is int for k in ("ref_id", "image_id"))
                and isinstance(ref.get("split"), str) and isinstance(ref.get("sentences"), list)):
            raise ValueError(f"{path}: ref #{i} is {short_repr(ref)}, expected ref_id and image_id as integers, "
                             "split a string and sentences a list")
        ids = ann_ids(ref)
        if not ids or not all(type(a) is int for a in ids):
            raise ValueError(f"{path}: ref {ref['ref_id']}: ann_id is {short_repr(ref.get('ann_id'))}, expected an "
                             "annotation id or a list of them ([-1]: no target)")
        if -1 in ids and ids != NO_TARGET:
            raise ValueError(f"{path}: ref {ref['ref_id']}: ann_id {ids} mixes -1 (no target) with annotations")
        check_sentences(path, ref)
        check_unique(path, ref, i, ref_ids, sent_ids)


def grefs_path(root, split_by="unc"):
    """<root>/grefcoco/grefs(<splitBy>).p, else the .json (G_REFER's order)."""
    return find_refs_file(Path(root) / "grefcoco", f"grefs({split_by})", ".json", "is --root gRefCOCO's data "
                          "folder, holding grefcoco/ and images/train2014/?")


def images_dir(root, given=None):
    """--images when given, else <root>/images/train2014."""
    folder = Path(given) if given else Path(root) / IMAGE_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"{'--images ' + str(given) if given else folder} is not a folder"
                                f"{'' if given else ' of COCO train2014 images; pass --images DIR'}")
    return folder


def grefcoco_tasks(refs, images, anns, where, empty=None):
    """One task per sentence of each ref, in file order (see the module docstring). A sentence that is empty or
    only spaces makes no task, and is listed in `empty` (refcoco.no_phrase)."""
    tasks = []
    for ref in refs:
        if ref["image_id"] not in images:
            raise ValueError(f"{where}: ref {ref['ref_id']}: image_id {ref['image_id']} is not in instances.json")
        ids = ann_ids(ref)
        no_target = ids == NO_TARGET
        found = [] if no_target else [anns.get(a) for a in ids]
        for a, ann in zip(ids, found):
            if ann is None:
                raise ValueError(f"{where}: ref {ref['ref_id']}: ann_id {a} is not in instances.json")
            if ann["image_id"] != ref["image_id"]:
                raise ValueError(f"{where}: ref {ref['ref_id']}: image_id {ref['image_id']}, but its annotation "
                                 f"{a} is on image {ann['image_id']} in instances.json")
        kept = [ann for ann in found if not ann.get("iscrowd")]  # getMaskByRef leaves crowd regions out
        for sent in ref["sentences"]:
            if no_phrase(ref, sent, empty):
                continue
            tasks.append({"task_id": str(sent["sent_id"]), "image_id": str(ref["image_id"]), "phrase": sent["sent"],
                          "ref_id": ref["ref_id"], "sent_id": sent["sent_id"], "ann_id": ids,
                          "category_id": ref.get("category_id"), "no_target": no_target,
                          "instance_boxes": [ann["bbox"] for ann in kept],
                          "segmentation": [ann["segmentation"] for ann in kept]})
    return tasks


def build_grefcoco(root, split, out, images=None, skip_missing=False, progress=True, split_by="unc"):
    """Convert one split of gRefCOCO to a single-file LMDB at `out` (lmdb_store.write_lmdb); returns stats."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: gRefCOCO has the splits {', '.join(SPLITS)}")
    root, out = Path(root), Path(out)
    refs_file = grefs_path(root, split_by)
    instances = refs_file.parent / "instances.json"
    folder = images_dir(root, images)
    check_out(out, [instances, refs_file], folders=[folder])
    refs = [r for r in load_grefs(refs_file) if r["split"] == split]
    image_records, anns, _ = read_instances(instances)
    empty = []
    tasks = grefcoco_tasks(refs, image_records, anns, refs_file, empty)
    if not tasks:
        raise ValueError(no_sentences(refs_file, split, empty))
    files = {}
    for t in tasks:
        img = image_records[int(t["image_id"])]
        files[t["image_id"]] = (folder / img["file_name"], (img["width"], img["height"]))
    header = {"dataset": "grefcoco", "refer": {"dataset": "grefcoco", "split_by": split_by}, "split": split,
              "source": str(root.resolve()), "images_dir": str(folder.resolve()), "num_refs": len(refs),
              **empty_phrases(empty)}
    return write_lmdb(out, header, files, tasks, where=refs_file, skip_missing=skip_missing, exact_size=True,
                      progress=progress)
