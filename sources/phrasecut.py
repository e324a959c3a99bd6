"""PhraseCut's files and rules: reading and checking VGPhraseCut_v0, its subsets, its LMDB converter.

    python data.py build --root VGPhraseCut_v0 --split val --out val.lmdb --skip-missing

A PhraseCut directory holds images/<image_id>.jpg, image_data_split.json (per image: image_id,
width, height, split, coco_id, ...), refer_{train,val,test,miniv}.json (one record per task) and
name_att_rel_count.json. `build_lmdb` converts one split to the project's LMDB (lmdb_store): each
task record is PhraseCut's fields + the image file's width and height + "image_info", the width,
height and coco_id that image_data_split.json records. Masks are rasterised from the polygons at
load time (transforms.polygons_to_mask). Images stream in one at a time (the refer JSON is loaded
whole). Its size is close to the split's JPEG + annotation bytes (docs/measurements.md).

Input checks (`build`): every task record is validated (its fields, types, [x, y] points of finite
numbers, a non-empty phrase) and an error names the refer file, the task and the field; image paths
must resolve inside <root>/images/ (no ../, absolute ids or symlinks out; the folder itself may be a
symlink); images over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) are refused as
predict.py refuses them, and skipped with --skip-missing like missing or unreadable ones. --out must
not be, or be inside, one of --root's inputs, and an existing --out must be an LMDB this tool wrote
(it is replaced; anything else is refused before any work: delete it first).

The mask and letterbox use the image file's own size. PhraseCut's subsets (`phrasecut_subsets`) use
image_data_split.json (required): its width x height divides the region's area, its coco_id decides
d_cocotv; the builder counts size disagreements in the header. name_att_rel_count.json is optional:
without it the header's name_att_rel_count is null and evaluation leaves the c*/a* subsets out.
"""
from pathlib import Path

from helpers.files import JSON_TYPES, read_json, short_repr
from sources.lmdb_store import check_out, write_lmdb

SPLITS = ("train", "val", "test", "miniv")

TASK_FIELDS = ("task_id", "image_id", "phrase", "instance_boxes", "Polygons")

INPUT_FILES = ("image_data_split.json", "image_data_split3000.json", "name_att_rel_count.json",
               *(f"refer_{s}.json" for s in SPLITS), "synthetic.json")

SYNTHETIC_MARK = "synthetic.json"  # written by sources/synthetic.synthesize; the header's "synthetic" copies it


# The official evaluator's subsets (PhraseCut's utils/subset.py), in groups: instances, phrase
# structure, size, name and attribute frequency rank, COCO images. Its c_coco, t_stuff/t_obj and
# attribute kinds (a_color, ...) rely on word lists in its code and are not reproduced here.
RANK_SUBSETS = ("c20", "c100", "c500", "c21-100", "c101-500", "c500+",
                "a20", "a100", "a200", "a21-100", "a101-200", "a200+")

SUBSETS = ("i_single", "i_multi", "i_many",
           "p_name", "p_att", "p_att+", "p_rel", "p_rel+", "p_verbose", "p_attm", "p_relm", "p_att_rel",
           "s_small", "s_mid", "s_large") + RANK_SUBSETS + ("d_cocotv", "d_notcocotv")

NO_RANKS_NOTE = ("c*/a* subsets left out: the data was converted without name_att_rel_count.json, "
                 "which ranks the names and attributes")

SMALL_AREA, LARGE_AREA = 0.02, 0.2  # relative ground-truth area boundaries


# ----------------------------------------------------------------------------- the files

def _is_id(value):
    return type(value) is int or (type(value) is str and value != "")


def _is_point(p):  # [x, y], numbers within 10 million pixels (comparisons also refuse NaN and inf)
    return (type(p) is list and len(p) == 2 and type(p[0]) in (int, float) and type(p[1]) in (int, float)
            and -1e7 < p[0] < 1e7 and -1e7 < p[1] < 1e7)


def _check_task(task, file, index):
    """A refer record's fields, types and points, checked; a ValueError names the file, task and field."""
    if not isinstance(task, dict):
        raise ValueError(f"{file}: record #{index} is a JSON {JSON_TYPES.get(type(task))}, expected an object")
    missing = [k for k in TASK_FIELDS if k not in task]
    if missing:
        raise ValueError(f"{file}: task {task.get('task_id', f'#{index}')!r} lacks fields {missing}")
    where = f"{file}: task {task['task_id']!r}"

    def fail(field, value, expected):
        raise ValueError(f"{where}: {field} is {short_repr(value)}, expected {expected}")
    ps = task.get("phrase_structure")
    for field, value, ok, expected in (
            ("task_id", task["task_id"], _is_id, "a string or an integer"),
            ("image_id", task["image_id"], _is_id, "an integer or a string"),
            ("phrase", task["phrase"], lambda v: isinstance(v, str) and v.strip(), "a non-empty string"),
            ("instance_boxes", task["instance_boxes"], lambda v: isinstance(v, list), "a list"),
            ("phrase_structure", ps, lambda v: v is None or isinstance(v, dict), "an object or null")):
        if not ok(value):
            fail(field, value, expected)
    for key, expected in (("name", str), ("type", str), ("attributes", list), ("relation_descriptions", list)):
        value = (ps or {}).get(key)
        if not (value is None or isinstance(value, expected)) or \
                (key == "attributes" and not all(isinstance(a, str) for a in value or [])):
            fail(f"phrase_structure.{key}", value, "a list of strings" if key == "attributes" else
                 f"a JSON {JSON_TYPES[expected]} or null")
    if not isinstance(task["Polygons"], list):
        fail("Polygons", task["Polygons"], "a list of instances, each a list of polygons of [x, y] points")
    if "no_target" in task and (not isinstance(task["no_target"], bool) or task["no_target"] and task["Polygons"]):
        fail("no_target", task["no_target"], "true (the phrase names nothing: Polygons empty) or false")
    for i, instance in enumerate(task["Polygons"]):
        if not isinstance(instance, list):
            fail(f"Polygons[{i}]", instance, "a list of polygons (an instance)")
        for j, polygon in enumerate(instance):
            if not isinstance(polygon, list):
                fail(f"Polygons[{i}][{j}]", polygon, "a list of [x, y] points")
            for k, point in enumerate(polygon):
                if not _is_point(point):
                    fail(f"Polygons[{i}][{j}][{k}]", point, "[x, y], two finite numbers (pixels)")


def load_tasks(root, split):
    """refer_<split>.json's tasks, every record checked (_check_task)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    refer = Path(root) / f"refer_{split}.json"
    if not refer.is_file():
        raise FileNotFoundError(f"{refer} not found: is --root a PhraseCut directory?")
    tasks = read_json(refer, list)
    for i, task in enumerate(tasks):
        _check_task(task, refer, i)
    return tasks


def read_image_info(root):
    """{image_id as str: its record} from the root's image_data_split.json (the name PhraseCut's
    downloader gives it; image_data_split3000.json, its name on PhraseCut's drive, is accepted too). Two
    records of one image_id (5 and "5" included) are refused, naming both."""
    for name in ("image_data_split.json", "image_data_split3000.json"):
        path = Path(root) / name
        if path.is_file():
            infos, index = {}, {}
            for i, d in enumerate(read_json(path, list)):
                if not (isinstance(d, dict) and _is_id(d.get("image_id"))
                        and all(type(d.get(k)) is int and d[k] > 0 for k in ("width", "height"))):
                    raise ValueError(f"{path}: record #{i} is {short_repr(d)}, expected an object with image_id, "
                                     "and width and height as positive integers")
                key = str(d["image_id"])
                if key in index:  # the later would silently replace the earlier's size and coco_id
                    raise ValueError(f"{path}: records #{index[key]} and #{i} have the same image_id {d['image_id']!r};"
                                     " each image once")
                infos[key], index[key] = d, i
            return infos
    raise FileNotFoundError(f"{Path(root) / 'image_data_split.json'} not found: PhraseCut's list of images "
                            "(width, height, coco_id) is needed for its subsets")


def read_counts(root):
    """name_att_rel_count.json's "cat" and "att" lists ([word, count], most frequent first), or None
    when the root has no such file."""
    path = Path(root) / "name_att_rel_count.json"
    if not path.is_file():
        return None
    counts = read_json(path, dict)
    for key in ("cat", "att"):
        pairs = counts.get(key)
        if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                for p in pairs)):
            raise ValueError(f"{path}: {key!r} is {short_repr(pairs)}, expected a list of [word, count] pairs")
    return {"cat": counts["cat"], "att": counts["att"]}


def image_path(images, task):
    """`images`/<image_id>.jpg resolved, for a task; `images` is the resolved images folder. A ValueError
    when it leads outside that folder: an image_id such as ../../x or /x, or a symlink that leaves it."""
    path = (images / f"{task['image_id']}.jpg").resolve()
    if not path.is_relative_to(images):
        raise ValueError(f"task {task['task_id']}: image_id {task['image_id']!r} leads outside {images}/ "
                         f"(to {path}); refused")
    return path


def image_info_of(infos, task):
    """What the subsets need from the task's image record: width, height, coco_id."""
    info = infos.get(str(task["image_id"]))
    if info is None:
        raise ValueError(f"task {task['task_id']}: image {task['image_id']} is not in image_data_split.json")
    return {"width": info["width"], "height": info["height"], "coco_id": info.get("coco_id")}


# ----------------------------------------------------------------------------- the subsets

def frequency_ranks(counts):
    """{"cat": {name: rank}, "att": {attribute: rank}} from name_att_rel_count.json's content.

    A word's rank is its 0-based position in the file's list (sorted by count, high to low),
    as the official evaluator takes it (list.index: the first occurrence).
    """
    ranks = {}
    for key in ("cat", "att"):
        ranks[key] = {}
        for rank, (word, _count) in enumerate(counts[key]):
            ranks[key].setdefault(word, rank)
    return ranks


def _rank_subsets(prefix, rank, cuts):
    """The c* subsets of a 0-based rank for prefix "c", cuts (20, 100, 500) (a* likewise): the nested
    top-k sets that hold it (c20, c100, c500) and its band, c21-100, c101-500 or c500+ (below 20 the
    band is c20 itself)."""
    first, mid, last = cuts
    names = {f"{prefix}{k}" for k in cuts if rank < k}
    if first <= rank < mid:
        names.add(f"{prefix}{first + 1}-{mid}")
    elif mid <= rank < last:
        names.add(f"{prefix}{mid + 1}-{last}")
    elif rank >= last:
        names.add(f"{prefix}{last}+")
    return names


def phrasecut_subsets(phrase_structure, num_instances, rel_area, coco, ranks=None):
    """Names of the PhraseCut subsets one task belongs to, in SUBSETS order.

    The official evaluator's definitions (PhraseCut's utils/subset.py, get_subset, as revised in
    October 2019):
    - instances, num_instances = len(task["instance_boxes"]): i_single exactly 1, i_multi 2 to 4,
      i_many 5 or more; the three are disjoint.
    - phrase, from phrase_structure: p_att at least one attribute, p_attm more than one; p_rel at
      least one entry in "relation_descriptions", p_relm more than one ("relation_ids" do not
      count); p_att_rel both an attribute and a relation description; p_name / p_att+ / p_rel+ /
      p_verbose when "type" is name / attribute / relation / verbose.
    - size, rel_area = region pixels (the task's polygons rasterised at the width x height that
      image_data_split.json records) / (that width x height): s_small below 0.02, s_large above
      0.2, s_mid otherwise (both boundaries are s_mid).
    - name rank: the name's position in name_att_rel_count.json's "cat" list, 501 when absent:
      c20 / c100 / c500 below 20 / 100 / 500, and c20, c21-100, c101-500 or c500+ by band.
      attribute rank: the best (lowest) over the attributes in the "att" list, 201 when none is:
      a20 / a100 / a200 and a20, a21-100, a101-200 or a200+ likewise. ranks comes from
      `frequency_ranks`; with ranks None the c* and a* subsets are left out.
    - d_cocotv when coco (the image's image_data_split.json record has a non-empty coco_id),
      else d_notcocotv.
    """
    ps = phrase_structure or {}
    atts, rels = ps.get("attributes") or [], ps.get("relation_descriptions") or []
    names = {"d_cocotv" if coco else "d_notcocotv"}
    if num_instances == 1:
        names.add("i_single")
    elif 2 <= num_instances <= 4:
        names.add("i_multi")
    elif num_instances >= 5:
        names.add("i_many")
    for condition, name in ((len(atts) > 0, "p_att"), (len(atts) > 1, "p_attm"), (len(rels) > 0, "p_rel"),
                            (len(rels) > 1, "p_relm"), (atts and rels, "p_att_rel")):
        if condition:
            names.add(name)
    type_subset = {"name": "p_name", "attribute": "p_att+", "relation": "p_rel+",
                   "verbose": "p_verbose"}.get(ps.get("type"))
    if type_subset:
        names.add(type_subset)
    if rel_area < SMALL_AREA:
        names.add("s_small")
    elif rel_area > LARGE_AREA:
        names.add("s_large")
    else:
        names.add("s_mid")
    if ranks is not None:
        name_rank = ranks["cat"].get(ps.get("name"), 501)
        att_rank = min([201] + [ranks["att"][a] for a in atts if a in ranks["att"]])
        names |= _rank_subsets("c", name_rank, (20, 100, 500)) | _rank_subsets("a", att_rank, (20, 100, 200))
    return [name for name in SUBSETS if name in names]


def subset_names(ranked=True) -> list:
    """The subsets `phrasecut_subsets` can name, in SUBSETS order; without frequency ranks (no
    name_att_rel_count.json) the c* and a* subsets are left out."""
    return [name for name in SUBSETS if ranked or name not in RANK_SUBSETS]


# ----------------------------------------------------------------------------- PhraseCut -> LMDB

def build_lmdb(root, split, out, skip_missing=False, progress=True, commit_every=1000):
    """Convert one split of a PhraseCut directory to a single-file LMDB at `out`; returns stats.

    Layout (no pickle: JSON and raw bytes):
      b"__header__"     JSON {format, version, split, num_tasks, num_images, skipped_tasks, ...,
                        name_att_rel_count: read_counts(root), null without that file}
      b"img/<image_id>" the image file's own bytes, once per image
      b"task/<i:08d>"   JSON task record: PhraseCut's fields + width, height of the image file +
                        image_info {width, height, coco_id} from image_data_split.json
    The header's "synthetic" copies synthetic.json when the root has one (sources/synthetic.py's data).
    Written under a temporary name and renamed when complete; on any error the temporary is removed.
    Checked first (errors name the file, task and field): `out` (lmdb_store.check_out), every task (_check_task),
    image paths (image_path), and each image's decode, with PIL's decompression-bomb limit; with
    skip_missing, missing, unreadable and too large images are skipped with their tasks and counted.
    Images whose size differs from image_data_split.json's are counted, with examples, in the header;
    one more than 2x apart is refused as another image's record (lmdb_store.write_lmdb, whose other
    checks apply too).
    """
    root, out = Path(root), Path(out)
    check_out(out, [root, *(root / name for name in INPUT_FILES)], folders=[root / "images"])
    tasks = load_tasks(root, split)
    images, paths = (root / "images").resolve(), {}
    for task in tasks:
        if str(task["image_id"]) not in paths:
            paths[str(task["image_id"])] = image_path(images, task)
    refer_bytes = (root / f"refer_{split}.json").stat().st_size
    infos = read_image_info(root)
    image_info = {str(t["image_id"]): image_info_of(infos, t) for t in tasks}
    listed = {i: (info["width"], info["height"]) for i, info in image_info.items()}
    header = {"dataset": "phrasecut", "split": split, "source": str(root.resolve()), "name_att_rel_count": read_counts(root)}
    if (root / SYNTHETIC_MARK).is_file():  # the synthetic set in PhraseCut's layout: models trained on it say so
        header["synthetic"] = read_json(root / SYNTHETIC_MARK, dict)
    stats = write_lmdb(out, header,
                       {i: (path, listed[i]) for i, path in paths.items()},
                       [{**t, "image_info": image_info[str(t["image_id"])]} for t in tasks],
                       where=root / f"refer_{split}.json", skip_missing=skip_missing, progress=progress,
                       commit_every=commit_every)
    return {**stats, "annotation_bytes": refer_bytes,
            "ratio": stats["lmdb_bytes"] / (stats["image_bytes"] + refer_bytes)}
