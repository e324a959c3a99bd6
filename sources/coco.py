"""MS COCO instances files, and category prompts on COCO: one task per (image, category present).

    python data.py build --source coco --annotations instances_val2017.json --images val2017/ --out coco.lmdb
    python data.py build --source coco ... --template "a photo of a {}"

The paper's generalisation test (Section 5.2, Fig. 7) prompts the model with the names of the
objects' categories. A task here is one image and one category present in it: its phrase is the
category's name (through --template when given, which the LMDB's header records), its mask the
union of that category's instances in the image, crowd regions included (COCO's uncompressed RLE),
decoded with pycocotools (transforms.coco_mask) at the size the instances file gives the image; its
"instance_boxes" are those instances' [x, y, w, h] boxes, so the i_single / i_multi / i_many subsets
apply (a crowd region counts as one box). A task's id is `<image_id>_<category_id>`.

`read_instances` also serves RefCOCO/+/g (refcoco.py), whose instances.json is in COCO's format.
"""
from pathlib import Path

from helpers.files import read_json, short_repr
from helpers.transforms import check_segmentation
from sources.lmdb_store import check_out, write_lmdb


def _positive_int(value):
    return type(value) is int and value > 0


def _unique(path, key, seen, record, index):
    """seen[id] = (record, its index in the list); a ValueError naming both records when the id is taken:
    a later record would silently replace the earlier (a task lost, or another category's name)."""
    if record["id"] in seen:
        first, where = seen[record["id"]]
        raise ValueError(f"{path}: {key}[{where}] and {key}[{index}] have the same id {record['id']} "
                         f"({short_repr(first)} and {short_repr(record)}); each id must be unique")
    seen[record["id"]] = (record, index)


def read_instances(path):
    """A COCO instances file, checked: ({image id: image record}, {ann id: annotation}, {category id:
    category}). Images need id, file_name, width and height; annotations id, image_id (a listed image),
    category_id (a listed category), bbox [x, y, w, h] and a segmentation that fits the image
    (check_segmentation); categories id and name. Two records of one list with the same id are refused, naming
    both (the later would silently replace the earlier). Errors name the file and the record."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the COCO instances file in it, e.g. "
                         f"{path / 'instances_val2017.json'}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a COCO instances file)")
    content = read_json(path, dict)
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            raise ValueError(f"{path}: {key!r} is {short_repr(content.get(key))}, expected a list (COCO's format)")
    images, anns, cats = {}, {}, {}
    for i, img in enumerate(content["images"]):
        if not (isinstance(img, dict) and type(img.get("id")) is int and isinstance(img.get("file_name"), str)
                and img["file_name"] and _positive_int(img.get("width")) and _positive_int(img.get("height"))):
            raise ValueError(f"{path}: images[{i}] is {short_repr(img)}, expected an object with id, file_name, and "
                             "width and height as positive integers")
        if "/" in img["file_name"] or "\\" in img["file_name"] or img["file_name"].startswith("."):
            raise ValueError(f"{path}: image {img['id']}: file_name {img['file_name']!r} is not a plain file name")
        _unique(path, "images", images, img, i)
    for i, cat in enumerate(content["categories"]):
        if not (isinstance(cat, dict) and type(cat.get("id")) is int and isinstance(cat.get("name"), str)
                and cat["name"].strip()):
            raise ValueError(f"{path}: categories[{i}] is {short_repr(cat)}, expected an object with id and name")
        _unique(path, "categories", cats, cat, i)
    for i, ann in enumerate(content["annotations"]):
        if not (isinstance(ann, dict) and type(ann.get("id")) is int):
            raise ValueError(f"{path}: annotations[{i}] is {short_repr(ann)}, expected an object with an integer id")
        where = f"{path}: annotation {ann['id']}"
        if ann.get("image_id") not in images:
            raise ValueError(f"{where}: image_id {short_repr(ann.get('image_id'))} is not among the file's images")
        if ann.get("category_id") not in cats:
            raise ValueError(f"{where}: category_id {short_repr(ann.get('category_id'))} is not among its categories")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(type(v) in (int, float) for v in box)):
            raise ValueError(f"{where}: bbox is {short_repr(box)}, expected [x, y, w, h]")
        img = images[ann["image_id"]][0]
        try:
            check_segmentation(ann.get("segmentation"), img["height"], img["width"])
        except ValueError as err:
            raise ValueError(f"{where}: segmentation: {err}") from None
        _unique(path, "annotations", anns, ann, i)
    return ({k: v for k, (v, _) in images.items()}, {k: v for k, (v, _) in anns.items()},
            {k: v for k, (v, _) in cats.items()})


def coco_tasks(images, anns, cats, template="{}"):
    """One task per (image, category present): the category's instances united, in image order, then
    category id order; task id `<image_id>_<category_id>`, phrase template.format(name)."""
    groups = {}
    for ann in anns.values():
        groups.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
    tasks = []
    for (image_id, cat_id), members in sorted(groups.items()):
        members.sort(key=lambda a: a["id"])
        name = cats[cat_id]["name"]
        tasks.append({"task_id": f"{image_id}_{cat_id}", "image_id": str(image_id),
                      "phrase": template.format(name), "category": name, "category_id": cat_id,
                      "ann_ids": [a["id"] for a in members], "iscrowd": [int(bool(a.get("iscrowd"))) for a in members],
                      "instance_boxes": [a["bbox"] for a in members],
                      "segmentation": [a["segmentation"] for a in members]})
    return tasks


def check_template(template):
    """--template: text with exactly one "{}", where the category's name goes."""
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise ValueError(f"--template {template!r} must hold exactly one {{}} (where the category's name goes) "
                         "and no other braces, e.g. \"a photo of a {}\"")
    return template


def build_coco(annotations, images_dir, out, template="{}", skip_missing=False, progress=True):
    """Convert a COCO instances file and its images folder to one LMDB of category tasks; returns stats."""
    annotations, images_dir, out = Path(annotations), Path(images_dir), Path(out)
    check_template(template)
    check_out(out, [annotations], folders=[images_dir], what="--annotations/--images")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir} is not a folder (COCO's images, e.g. val2017/)")
    images, anns, cats = read_instances(annotations)
    tasks = coco_tasks(images, anns, cats, template)
    used = {t["image_id"] for t in tasks}
    files = {str(i): (images_dir / img["file_name"], (img["width"], img["height"]))
             for i, img in images.items() if str(i) in used}
    names = [cats[c]["name"] for c in sorted(cats)]
    header = {"dataset": "coco", "split": annotations.stem, "source": str(annotations.resolve()),
              "images_dir": str(images_dir.resolve()), "template": template, "categories": names}
    return write_lmdb(out, header, files, tasks, where=annotations, skip_missing=skip_missing, exact_size=True,
                      progress=progress)
