"""A synthetic referring dataset in exactly PhraseCut's layout, made on a CPU in seconds.

    python data.py synth --out data/synth --images 1600 --seed 0 --size 192 --aspect 1

`synthesize` writes images/<image_id>.jpg, image_data_split.json, refer_{train,val,test,miniv}.json
and name_att_rel_count.json, so the converter, loader, training and evaluation run the same way on
it and on the real VGPhraseCut_v0. `ensure_synthetic` makes it once in a cache, with its LMDBs.

Splits: 80/10/10 train/validation/test by image; miniv is a fifth of the validation images. As in
PhraseCut, those say split "miniv" in image_data_split.json and their tasks are in refer_miniv.json
only, not in refer_val.json (official tools load both with split="val_miniv"). `synth` refuses an
--out that exists and is not an empty folder.

No-target phrases (`--no-target-rate R`, generalized referring segmentation as in gRefCOCO): a share R
of the phrases name nothing in their image, of three kinds (NO_TARGET_KINDS): a colour and shape pair
that no shape has ("purple star" where stars and purple shapes may be, but no purple star), a shape
that is absent ("hexagon"), and a relation that does not hold ("circle left of the blue square" where
two or more circles are all clearly right of it), each worded as the phrases that hold are, so that the
words alone do not give it away (docs/choices.md). They are written in PhraseCut's format with no instance (empty
Polygons, instance_boxes and ann_ids, so an empty mask), "no_target": true and "no_target_kind", which
the LMDB keeps. R = 0 (the default) writes exactly the files it wrote before the option existed.
"""
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from helpers.files import atomic_path
from sources.lmdb_store import LMDB_VERSION
from sources.phrasecut import SPLITS, build_lmdb

DEMO_NUM_IMAGES = 1600  # synthetic images for the demo: 1280 train, 128 val, 32 miniv, 160 test

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
           "yellow": (235, 205, 45), "purple": (145, 60, 195), "white": (245, 245, 245)}

# Shape radius as a fraction of the image's longer side. At the demo's 192 px a small shape's radius
# is 23 px, about one and a half cells of the model's stride-16 grid; smaller shapes (0.08) made the
# 10-minute demo mostly a test of boundary resolution rather than of grounding.
SIZES = {"small": 0.12, "large": 0.21}

SYNTH_VERSION = 3  # bump when the generator's output changes: it names the cache directory
NO_TARGET_VERSION = 2  # the same for the no-target phrases alone (--no-target-rate > 0); 2: relations worded as
                       # the ones that hold (version 1's were all "<kind> <predicate> the <colour> <kind>")

RELATIONS = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}

NO_TARGET_KINDS = ("pair", "shape", "relation")  # the kinds of phrases that name nothing (see above)


def _outline(kind, cx, cy, r):
    """Polygon [[x, y], ...] (ints) of one shape of radius r centred at (cx, cy)."""
    if kind == "circle":
        angles, radii = np.linspace(0, 2 * np.pi, 32, endpoint=False), [r] * 32
    elif kind == "square":
        angles, radii = np.pi / 4 + np.arange(4) * np.pi / 2, [1.25 * r] * 4
    elif kind == "triangle":
        angles, radii = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3, [1.2 * r] * 3
    elif kind == "star":
        angles, radii = -np.pi / 2 + np.arange(10) * np.pi / 5, [1.2 * r, 0.5 * r] * 5
    elif kind == "hexagon":
        angles, radii = np.arange(6) * np.pi / 3, [1.05 * r] * 6
    else:  # diamond: a rhombus taller than wide, so it never looks like a square
        return [[round(cx + dx * r), round(cy + dy * r)]
                for dx, dy in ((0, -1.2), (0.75, 0), (0, 1.2), (-0.75, 0))]
    return [[round(cx + q * np.cos(a)), round(cy + q * np.sin(a))] for a, q in zip(angles, radii)]


def _scene(rng, width, height):
    """Random shapes: dicts with kind, colour, size, r, cx, cy. One image in five has a group of
    5-6 small shapes sharing a kind, a colour or the size, so "all ..." phrases reach i_many."""
    longer, shapes = max(width, height), []
    group = str(rng.choice(["kind", "colour", "size"])) if rng.random() < 0.2 else None
    trait = {"kind": str(rng.choice(SHAPES)), "colour": str(rng.choice(list(COLOURS))),
             "size": "small", None: None}[group]
    n_group = int(rng.integers(5, 7)) if group else 0
    n_other = int(rng.integers(0, 3)) if group else int(rng.integers(3, 7))
    overlap = rng.random() < 0.25
    for k in range(n_group + n_other):
        in_group = k < n_group
        kinds = [x for x in SHAPES if group != "kind" or (x == trait) == in_group]
        colours = [x for x in COLOURS if group != "colour" or (x == trait) == in_group]
        sizes = ["small"] if in_group else ["large"] if group == "size" else list(SIZES)
        kind, colour, size = str(rng.choice(kinds)), str(rng.choice(colours)), str(rng.choice(sizes))
        if shapes and rng.random() < 0.6:  # a distractor: same kind or same colour as an earlier shape
            ref = shapes[int(rng.integers(len(shapes)))]
            if rng.random() < 0.5:
                kind = ref["kind"] if ref["kind"] in kinds else kind
            else:
                colour = ref["colour"] if ref["colour"] in colours else colour
        r = SIZES[size] * longer
        for _ in range(60):  # rejection sampling; a shape that finds no room is dropped
            cx, cy = rng.uniform(1.25 * r, width - 1.25 * r), rng.uniform(1.25 * r, height - 1.25 * r)
            gap = 0.7 if overlap and rng.random() < 0.3 else 1.1  # sometimes overlapping
            if all(np.hypot(cx - s["cx"], cy - s["cy"]) >= gap * (r + s["r"]) for s in shapes):
                shapes.append({"kind": kind, "colour": colour, "size": size, "r": r,
                               "cx": float(cx), "cy": float(cy)})
                break
    return shapes


def _describe(size, colour, kind, count):
    noun = (kind or "shape") + ("s" if count > 1 else "")
    words = [w for w in (size, colour) if w] + [noun]
    return ("all " if count > 1 else "") + " ".join(words), noun, [w for w in (size, colour) if w]


def _match(shapes, size, colour, kind):
    """The shapes a description fits (a word given as None is left out of it), as a frozenset of indices."""
    return frozenset(i for i, s in enumerate(shapes) if size in (None, s["size"])
                     and colour in (None, s["colour"]) and kind in (None, s["kind"]))


def _descriptions(shapes, kinds=(None, *SHAPES)):
    """{(size, colour, kind): the shapes it fits} for every description with a kind from `kinds` that fits
    some shape, the empty description left out; in the order size, colour, kind of (None, *SIZES),
    (None, *COLOURS) and `kinds`."""
    descs = {}
    for size in (None, *SIZES):
        for colour in (None, *COLOURS):
            for kind in kinds:
                ids = _match(shapes, size, colour, kind)
                if ids and (size, colour, kind) != (None, None, None):
                    descs[(size, colour, kind)] = ids
    return descs


def _objects(descs):
    """[(description, shape index)] of the descriptions that fit one shape and name its kind but not its size:
    what a relation is relative to ("the circle", "the blue circle")."""
    return [(d, next(iter(ids))) for d, ids in descs.items() if len(ids) == 1 and d[2] and not d[0]]


def _phrases(shapes, width, height):
    """Candidate (phrase, phrase_structure, referred shape indices); every phrase refers to exactly
    its shapes. Name/attribute phrases are minimal: dropping any word would refer to more shapes,
    so a distractor (same kind in another colour, same colour in another kind, ...) makes each
    word necessary. Relation phrases disambiguate a kind that occurs 2+ times, with a clear margin."""
    descs = _descriptions(shapes)  # (size, colour, kind) -> referred shapes, every description that refers to some
    cands = []
    for (size, colour, kind), ids in descs.items():
        drops = [(None, colour, kind) if size else None, (size, None, kind) if colour else None,
                 (size, colour, None) if kind else None]
        if all(_match(shapes, *d) != ids for d in drops if d and any(d)):  # any(d): not the empty phrase
            text, noun, atts = _describe(size, colour, kind, len(ids))
            cands.append((text, {"name": noun, "attributes": atts, "relation_ids": [],
                                 "relation_descriptions": [], "type": "attribute" if atts else "name"}, ids))
    margin = 0.1 * max(width, height)
    objects = _objects(descs)
    for (size, colour, kind), ids in descs.items():
        for (_, ocolour, okind), obj in objects:  # objects: "circle", "blue circle"
            subjects = ids - {obj}
            if kind is None or len(subjects) < 2:
                continue
            for predicate, (axis, sign) in RELATIONS.items():
                key = ("cx", "cy")[axis]
                offset = {i: sign * (shapes[obj][key] - shapes[i][key]) for i in subjects}
                if any(abs(v) < margin for v in offset.values()):
                    continue  # too close to call
                referred = frozenset(i for i, v in offset.items() if v > 0)
                if referred and referred != subjects:
                    text, noun, atts = _describe(size, colour, kind, len(referred))
                    obj_text = _describe(None, ocolour, okind, 1)[0]
                    cands.append((f"{text} {predicate} the {obj_text}",
                                  {"name": noun, "attributes": atts, "relation_ids": [len(cands)],
                                   "relation_descriptions": [[predicate, okind]], "type": "relation"},
                                  referred))
    return cands


def _absent_phrases(shapes, width, height):
    """Phrases that name nothing in the image: {kind: [(phrase, phrase_structure), ...]} (NO_TARGET_KINDS)."""
    present, kinds = {(s["colour"], s["kind"]) for s in shapes}, sorted({s["kind"] for s in shapes})
    out = {kind: [] for kind in NO_TARGET_KINDS}
    for kind in kinds:  # a colour and shape pair that no shape has
        for colour in COLOURS:
            if (colour, kind) not in present:
                out["pair"].append((f"{colour} {kind}", {"name": kind, "attributes": [colour], "relation_ids": [],
                                                         "relation_descriptions": [], "type": "attribute"}))
    for kind in SHAPES:  # a shape that is absent
        if kind not in kinds:
            out["shape"].append((kind, {"name": kind, "attributes": [], "relation_ids": [],
                                        "relation_descriptions": [], "type": "name"}))
    # a relation that does not hold, worded as the relation phrases that do (_phrases): a subject described
    # by kind, maybe size and colour, that fits two or more shapes besides the object, an object that one
    # shape's kind (and maybe colour) names, and every subject clearly on the other side of it. Worded
    # alike, and about the same kind of scene, only the picture tells the two apart.
    margin, descs = 0.1 * max(width, height), _descriptions(shapes, kinds)
    objects = _objects(descs)  # "circle", "blue circle"
    for (size, colour, kind), ids in descs.items():
        for (_, ocolour, okind), o in objects:
            subjects = ids - {o}
            for predicate, (axis, sign) in RELATIONS.items():
                key = ("cx", "cy")[axis]
                if len(subjects) > 1 and all(sign * (shapes[o][key] - shapes[i][key]) < -margin for i in subjects):
                    text, noun, atts = _describe(size, colour, kind, 1)
                    out["relation"].append((f"{text} {predicate} the {_describe(None, ocolour, okind, 1)[0]}", {
                        "name": noun, "attributes": atts, "relation_ids": [0],
                        "relation_descriptions": [[predicate, okind]], "type": "relation"}))
    return out


def _no_target_tasks(rng, shapes, width, height, count, image_id, first):
    """`count` distinct phrases naming nothing (a kind drawn uniformly among those with candidates, then
    a phrase), as PhraseCut task records with no instance, numbered from `first`."""
    cands, tasks, used = _absent_phrases(shapes, width, height), [], set()
    for j in range(count):
        kinds = [k for k in NO_TARGET_KINDS if any(p not in used for p, _ in cands[k])]
        if not kinds:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        left = [c for c in cands[kind] if c[0] not in used]
        phrase, structure = left[int(rng.integers(len(left)))]
        used.add(phrase)
        tasks.append({"task_id": f"{image_id}__{first + j}", "image_id": image_id, "ann_ids": [], "instance_boxes": [],
                      "Polygons": [], "phrase": phrase, "phrase_structure": structure, "no_target": True,
                      "no_target_kind": kind})
    return tasks


def _render(rng, shapes, width, height):
    """Noisy textured background, then the shapes, then sensor-like noise -> RGB PIL image."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(75, 165) + rng.uniform(-18, 18, size=3)
    field = (rng.uniform(-30, 30) * xx + rng.uniform(-30, 30) * yy
             + 12 * np.sin(2 * np.pi * (rng.uniform(2, 6) * xx + rng.random()))
             * np.sin(2 * np.pi * (rng.uniform(2, 6) * yy + rng.random())))
    bg = base + field[..., None] + rng.normal(0, 7, size=(height, width, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for s in shapes:
        fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[s["colour"]])
        draw.polygon([tuple(p) for p in s["polygon"]], fill=fill, outline=fill)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 5, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def count_words(tasks):
    """name_att_rel_count.json's content for `tasks`: {"cat", "att", "rel"}, each a list of [word, count]
    sorted by count from high to low (ties alphabetically), counting each phrase's name, its attributes
    and the predicates of its relation_descriptions ([predicate, object name] pairs)."""
    counters = {"cat": Counter(), "att": Counter(), "rel": Counter()}
    for task in tasks:
        ps = task["phrase_structure"]
        counters["cat"][ps["name"]] += 1
        counters["att"].update(ps["attributes"])
        counters["rel"].update(predicate for predicate, _ in ps["relation_descriptions"])
    return {key: sorted(([word, n] for word, n in c.items()), key=lambda p: (-p[1], p[0]))
            for key, c in counters.items()}


def synthesize(out_dir, num_images=200, seed=0, size=160, progress=False, aspect=0.75, no_target_rate=0.0):
    """Write a synthetic referring dataset in PhraseCut's layout under out_dir; same seed, same bytes.

    Each image (longer side `size`, the shorter `aspect` times it: 4:3 by default, landscape or
    portrait; aspect 1 makes square images) holds 3-8 shapes of 6 kinds, 6 colours
    and 2 sizes; about 4-5 phrases per image of each PhraseCut type (name, attribute, relation), for
    one shape or several ("all green shapes"). Splits by image: 10 % validation (at least 2), of which
    a fifth is miniv, 10 % test, the rest train; each image's tasks are in the refer file of its split
    only. synthetic.json says the data is this generator's (its settings), so that a model trained on it
can say so (helpers/provenance.py). image_data_split.json has the real file's fields (url empty and coco_id, flickr_id null: the
    images are neither online nor from COCO or Flickr); name_att_rel_count.json counts all splits.
    no_target_rate: the expected share of phrases that name nothing (0 to 0.5; the module docstring),
    drawn from a generator of their own, so that the other phrases and the images stay as they are.
    out_dir must be new or an empty folder; the JSON files, written last, are each whole or absent."""
    if num_images < 4:
        raise ValueError("synthesize needs at least 4 images (train, val, miniv and test)")
    if not 0 <= no_target_rate <= 0.5:
        raise ValueError(f"no_target_rate must be between 0 and 0.5, got {no_target_rate}")
    if not 0.5 <= aspect <= 1:
        raise ValueError(f"aspect must be between 0.5 and 1 (shorter side / longer side), got {aspect}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new one or delete it first")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    no_target_rng = np.random.default_rng([seed, 31])  # only drawn from with no_target_rate > 0
    order = rng.permutation(num_images)
    n_val, n_test = max(2, round(0.1 * num_images)), max(1, round(0.1 * num_images))  # n_val with miniv
    n_miniv = max(1, n_val // 5)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[int(i) + 1] = ("miniv" if rank < n_miniv else "val" if rank < n_val
                                else "test" if rank < n_val + n_test else "train")
    images, refer = [], {s: [] for s in SPLITS}
    for image_id in tqdm(range(1, num_images + 1), desc="synth", disable=not progress):
        short = round(size * aspect)
        width, height = (size, short) if rng.random() < 0.6 else (short, size)
        shapes = _scene(rng, width, height)
        for s in shapes:
            s["polygon"] = _outline(s["kind"], s["cx"], s["cy"], s["r"])
        _render(rng, shapes, width, height).save(out / "images" / f"{image_id}.jpg", "JPEG", quality=90)
        split = split_of[image_id]
        images.append({"image_id": image_id, "width": width, "height": height, "split": split, "url": "",
                       "coco_id": None, "flickr_id": None})
        cands = _phrases(shapes, width, height)
        group = [c for c in cands if len(c[2]) >= 5]  # always ask for the big group: i_many
        chosen, used = group[:1], {group[0][0]} if group else set()
        weights = {"name": 1.0, "attribute": 2.0, "relation": 1.5}  # per type, uniform within it
        target = int(rng.integers(4, 6))
        while len(chosen) < target:
            left = [c for c in cands if c[0] not in used]
            if not left:
                break
            p = np.array([weights[c[1]["type"]] / sum(c[1]["type"] == d[1]["type"] for d in left)
                          for c in left])
            pick = left[int(rng.choice(len(left), p=p / p.sum()))]
            chosen.append(pick)
            used.add(pick[0])
        for j, (phrase, structure, ids) in enumerate(chosen):
            ids = sorted(ids)
            boxes = []
            for i in ids:
                xs, ys = [p[0] for p in shapes[i]["polygon"]], [p[1] for p in shapes[i]["polygon"]]
                boxes.append([min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1])
            task = {"task_id": f"{image_id}__{j}", "image_id": image_id,
                    "ann_ids": [image_id * 100 + i for i in ids], "instance_boxes": boxes,
                    "Polygons": [[shapes[i]["polygon"]] for i in ids], "phrase": phrase,
                    "phrase_structure": structure}
            refer[split].append(task)
        if no_target_rate > 0:  # k ~ Binomial(n, r / (1 - r)): k / (n + k) is about r on average
            k = int(no_target_rng.binomial(len(chosen), no_target_rate / (1 - no_target_rate)))
            refer[split] += _no_target_tasks(no_target_rng, shapes, width, height, k, image_id, len(chosen))
    counts = count_words([t for s in SPLITS for t in refer[s]])
    mark = {"generator": "sources/synthetic.py", "version": SYNTH_VERSION, "num_images": num_images, "seed": seed,
            "size": size, "aspect": aspect, **({"no_target_version": NO_TARGET_VERSION} if no_target_rate else {})}
    # build_lmdb copies it into the LMDB header: "synthetic"
    for name, obj in ([("image_data_split", images), ("name_att_rel_count", counts), ("synthetic", mark)]
                      + [(f"refer_{s}", refer[s]) for s in SPLITS]):
        with atomic_path(out / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(obj, separators=(",", ":")))
    return out


def ensure_synthetic(cache_dir, num_images=DEMO_NUM_IMAGES, seed=0, size=160, progress=False, aspect=0.75,
                     no_target_rate=0.0):
    """Make (once) and return a directory with train.lmdb, val.lmdb, test.lmdb and the raw
    synthetic PhraseCut under VGPhraseCut_v0/. Built in a temporary directory and renamed when
    finished, so a half-made cache is never taken for a finished one; if two processes race, the
    first rename wins and the other discards its copy."""
    cache_dir = Path(cache_dir)
    shape = f"px{size}" if aspect == 0.75 else f"px{size}x{round(size * aspect)}"
    nt = f"_nt{no_target_rate:g}v{NO_TARGET_VERSION}" if no_target_rate else ""
    final = cache_dir / f"synthetic_n{num_images}_seed{seed}_{shape}{nt}_gen{SYNTH_VERSION}_lmdb{LMDB_VERSION}"
    if (final / "COMPLETE").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        synthesize(tmp / "VGPhraseCut_v0", num_images, seed, size, progress=progress, aspect=aspect,
                   no_target_rate=no_target_rate)
        for split in ("train", "val", "test"):
            build_lmdb(tmp / "VGPhraseCut_v0", split, tmp / f"{split}.lmdb", progress=progress)
        (tmp / "COMPLETE").write_text(json.dumps({"num_images": num_images, "seed": seed, "size": size,
                                                  "aspect": aspect, "no_target_rate": no_target_rate}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "COMPLETE").is_file():
                raise RuntimeError(f"{final} exists but is incomplete; remove it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
