"""RefCOCO, RefCOCO+ and RefCOCOg in the refer API's layout (github.com/lichengunc/refer), to LMDB.

    python data.py build --source refcoco --root refer/data --dataset refcoco --split-by unc --split val \
        --out refcoco/val.lmdb

The layout, as the refer API reads it:

    <root>/refcoco/instances.json, refs(unc).p, refs(google).p
    <root>/refcoco+/instances.json, refs(unc).p
    <root>/refcocog/instances.json, refs(google).p, refs(umd).p
    <root>/images/mscoco/images/train2014/   COCO train2014 (refer's place; CRIS's is <root>/images/train2014/,
                                              and --images names any other)

instances.json is in COCO's format (coco.read_instances). A refs file is a list of refs {ref_id,
ann_id, image_id, category_id, split, sentences: [{sent_id, sent, ...}]}: a Python 2 pickle, read
here by `PlainUnpickler`, which builds only lists, dicts, strings and numbers and refuses any other
global (naming it) before anything in the file runs; refs(<splitBy>).json with the same records is
accepted too. The refs of a split are chosen as REFER.getRefIds(split=...) chooses them
(`select_refs`), and each of a ref's sentences is one task: its phrase the sentence's `sent`, its id
the `sent_id` (a sentence that is empty or only spaces makes no task: build counts them, names a few
in the LMDB's header and says so), its mask the ref's annotation as REFER.getMask makes it (polygons or RLE, parts
united, at the size instances.json gives the image: transforms.coco_mask), with the annotation's box
and the ref and sentence ids kept.
"""
import pickle
from pathlib import Path

from helpers.files import read_json, short_repr
from sources.coco import read_instances
from sources.lmdb_store import check_out, write_lmdb

# (dataset, splitBy) -> the splits used with it
SPLITS = {("refcoco", "unc"): ("train", "val", "testA", "testB"), ("refcoco", "google"): ("train", "val"),
          ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
          ("refcocog", "google"): ("train", "val"), ("refcocog", "umd"): ("train", "val", "test")}

DATASETS = ("refcoco", "refcoco+", "refcocog")

IMAGE_DIRS = ("images/mscoco/images/train2014", "images/train2014")  # refer's layout, CRIS's


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds only what pickle makes without a global: lists, dicts, tuples, strings,
    numbers, None and booleans. Every class or function a pickle names (the way a payload runs code:
    os.system, builtins.eval, ...) is refused before it is looked up, so nothing in the file runs.
    Python 2 byte strings are read as UTF-8 (an invalid byte becomes U+FFFD)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names the global {module}.{name}, and a refs file holds only lists, "
                                     "dicts, strings and numbers; refused, nothing in it was run")


def read_refs_file(path):
    """The list a refs pickle (PlainUnpickler) or .json file holds, unchecked inside; errors name the file."""
    path = Path(path)
    if path.suffix == ".json":
        refs = read_json(path, list)
    else:
        try:
            with open(path, "rb") as f:
                refs = PlainUnpickler(f, encoding="utf-8", errors="replace").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, MemoryError, RecursionError) as err:
            raise ValueError(f"{path}: not a refs pickle that can be read safely: {err}") from None
    if not isinstance(refs, list):
        raise ValueError(f"{path}: holds a {type(refs).__name__}, expected a list of refs")
    return refs


def check_unique(path, ref, index, ref_ids, sent_ids):
    """A ref's ref_id and its sentences' sent_ids (a task's id) seen once in the file: ref_ids {ref_id: index}
    and sent_ids {sent_id: (ref_id, j)} hold those seen so far and are updated; a ValueError names both records."""
    if ref["ref_id"] in ref_ids:
        raise ValueError(f"{path}: refs #{ref_ids[ref['ref_id']]} and #{index} have the same ref_id {ref['ref_id']}; "
                         "each ref_id must be unique")
    ref_ids[ref["ref_id"]] = index
    for j, sent in enumerate(ref["sentences"]):
        if sent["sent_id"] in sent_ids:
            other = sent_ids[sent["sent_id"]]
            raise ValueError(f"{path}: ref {other[0]} sentences[{other[1]}] and ref {ref['ref_id']} sentences[{j}] "
                             f"have the same sent_id {sent['sent_id']} (a task's id); each must be unique")
        sent_ids[sent["sent_id"]] = (ref["ref_id"], j)


def check_sentences(path, ref):
    """Each of a ref's sentences a {sent_id: integer, sent: string, ...}; a ValueError naming the file and ref."""
    for j, sent in enumerate(ref["sentences"]):
        if not (isinstance(sent, dict) and type(sent.get("sent_id")) is int and isinstance(sent.get("sent"), str)):
            raise ValueError(f"{path}: ref {ref['ref_id']}: sentences[{j}] is {short_repr(sent)}, expected "
                             "{sent_id: integer, sent: string, ...}")


def load_refs(path):
    """The refs of a refs(<splitBy>).p pickle (PlainUnpickler) or .json file, each checked; errors name
    the file and the ref. Two refs with one ref_id, or two sentences with one sent_id (a task's id),
    are refused naming both; so is a structure nested deeper than Python's recursion limit."""
    return read_checked_refs(path, check_refs)


def read_checked_refs(path, check):
    """read_refs_file's refs after check(refs, path); a ref nested past Python's recursion limit is a
    ValueError naming the file (gRefCOCO's loader shares this with RefCOCO's)."""
    refs = read_refs_file(path)
    try:
        check(refs, path)
    except RecursionError:
        raise ValueError(f"{path}: a ref is nested deeper than Python's recursion limit; not a refs file") from None
    return refs


def check_refs(refs, path):
    ref_ids, sent_ids = {}, {}
    for i, ref in enumerate(refs):
        if not (isinstance(ref, dict) and all(type(ref.get(k)) is int for k in ("ref_id", "ann_id", "image_id"))
                and isinstance(ref.get("split"), str) and isinstance(ref.get("sentences"), list)):
            raise ValueError(f"{path}: ref #{i} is {short_repr(ref)}, expected ref_id, ann_id and image_id as integers, "
                             "split a string and sentences a list")
        check_sentences(path, ref)
        check_unique(path, ref, i, ref_ids, sent_ids)


def select_refs(refs, split):
    """REFER.getRefIds(split=split)'s refs, in file order: testA/testB/testC take every ref whose split
    contains that letter (testAB is in both), testAB/testBC/testAC exactly that split, test every split
    containing "test", train and val exactly."""
    if split in ("testA", "testB", "testC"):
        return [r for r in refs if split[-1] in r["split"]]
    if split in ("testAB", "testBC", "testAC", "train", "val"):
        return [r for r in refs if r["split"] == split]
    if split == "test":
        return [r for r in refs if "test" in r["split"]]
    raise ValueError(f"split {split!r} is none of getRefIds' splits")


def check_names(dataset, split_by, split):
    """Refuse a dataset, splitBy or split the refer layout does not have, listing the valid ones."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    by = [b for d, b in SPLITS if d == dataset]
    if split_by not in by:
        raise ValueError(f"--split-by {split_by!r}: {dataset} comes split by {' or '.join(by)}")
    if split not in SPLITS[dataset, split_by]:
        raise ValueError(f"--split {split!r}: {dataset} ({split_by}) has the splits "
                         f"{', '.join(SPLITS[dataset, split_by])}")


def find_refs_file(folder, stem, named=".p", hint=""):
    """folder/<stem>.p, else folder/<stem>.json with the same records (the refer API's order, and G_REFER's);
    neither: a FileNotFoundError naming <stem><named> (the usual one), the other, and `hint`."""
    for suffix in (".p", ".json"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    other = ".json" if named == ".p" else ".p"
    raise FileNotFoundError(f"{folder / f'{stem}{named}'} not found (nor {other}): {hint}")


def refs_path(root, dataset, split_by):
    """<root>/<dataset>/refs(<splitBy>).p, or the .json with the same records."""
    return find_refs_file(Path(root) / dataset, f"refs({split_by})", ".p", "is --root the refer API's data "
                          "folder, holding refcoco/, refcoco+/ and refcocog/?")


def images_dir(root, given=None):
    """--images when given, else refer's or CRIS's COCO train2014 folder under root, whichever exists."""
    if given:
        if not Path(given).is_dir():
            raise FileNotFoundError(f"--images {given} is not a folder")
        return Path(given)
    for rel in IMAGE_DIRS:
        if (Path(root) / rel).is_dir():
            return Path(root) / rel
    raise FileNotFoundError(f"no COCO train2014 folder at {' or '.join(str(Path(root) / r) for r in IMAGE_DIRS)}; "
                            "pass --images DIR")


def no_phrase(ref, sent, empty) -> bool:
    """Whether a sentence is empty or only spaces: no phrase, so no task. Such a sentence is listed in `empty`
    (when given) as "ref R sent_id S", which `empty_phrases` puts in the LMDB's header (RefCOCO's and gRefCOCO's)."""
    if sent["sent"].strip():
        return False
    if empty is not None:
        empty.append(f"ref {ref['ref_id']} sent_id {sent['sent_id']}")
    return True


def empty_phrases(empty) -> dict:
    """The header's count of the sentences no_phrase listed, and the first 20 of them (build's report names 5)."""
    return {"empty_phrases": len(empty), "empty_phrase_examples": empty[:20]}


def no_sentences(refs_file, split, empty) -> str:
    """The error for a split that makes no task."""
    return f"{refs_file}: split {split!r} holds no sentences{f' but {len(empty)} empty ones' if empty else ''}"


def refcoco_tasks(refs, images, anns, where, empty=None):
    """One task per sentence of each ref, in file order (see the module docstring). A sentence that is
    empty or only spaces is no phrase: it makes no task, and is listed in `empty` (no_phrase)."""
    tasks = []
    for ref in refs:
        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise ValueError(f"{where}: ref {ref['ref_id']}: ann_id {ref['ann_id']} is not in instances.json")
        if ann["image_id"] != ref["image_id"]:
            raise ValueError(f"{where}: ref {ref['ref_id']}: image_id {ref['image_id']}, but its annotation "
                             f"{ann['id']} is on image {ann['image_id']} in instances.json")
        for sent in ref["sentences"]:
            if no_phrase(ref, sent, empty):
                continue
            tasks.append({"task_id": str(sent["sent_id"]), "image_id": str(ann["image_id"]), "phrase": sent["sent"],
                          "ref_id": ref["ref_id"], "sent_id": sent["sent_id"], "ann_id": ann["id"],
                          "category_id": ann["category_id"], "bbox": ann["bbox"], "instance_boxes": [ann["bbox"]],
                          "segmentation": [ann["segmentation"]]})
    return tasks


def build_refcoco(root, dataset, split_by, split, out, images=None, skip_missing=False, progress=True):
    """Convert one split of RefCOCO/+/g to a single-file LMDB at `out` (lmdb_store.write_lmdb); returns stats."""
    check_names(dataset, split_by, split)
    root, out = Path(root), Path(out)
    instances, refs_file = root / dataset / "instances.json", refs_path(root, dataset, split_by)
    folder = images_dir(root, images)
    check_out(out, [instances, refs_file], folders=[folder])
    refs = select_refs(load_refs(refs_file), split)
    image_records, anns, _ = read_instances(instances)
    empty = []
    tasks = refcoco_tasks(refs, image_records, anns, refs_file, empty)
    if not tasks:
        raise ValueError(no_sentences(refs_file, split, empty))
    files = {}
    for t in tasks:
        img = image_records[int(t["image_id"])]
        files[t["image_id"]] = (folder / img["file_name"], (img["width"], img["height"]))
    header = {"dataset": "refcoco", "refer": {"dataset": dataset, "split_by": split_by}, "split": split,
              "source": str(root.resolve()), "images_dir": str(folder.resolve()), "num_refs": len(refs),
              **empty_phrases(empty)}
    return write_lmdb(out, header, files, tasks, where=refs_file, skip_missing=skip_missing, exact_size=True,
                      progress=progress)
