"""`python data.py synth|build|bench`: the command line of the data layer, and which converter each source uses.

data.py holds the dataset a model reads; this module holds what makes its LMDBs: the flags of each
source, the call of its converter (sources/<source>.py) and the report of what a build wrote.
"""
import argparse

from helpers.cli import positive_int
from sources.coco import build_coco
from sources.grefcoco import build_grefcoco
from sources.phrasecut import build_lmdb
from sources.refcoco import build_refcoco
from sources.synthetic import synthesize
from sources.voc import build_voc

# build's flags each source takes (besides --out and --skip-missing), the first ones required
SOURCE_FLAGS = {"phrasecut": (("root", "split"), ()), "refcoco": (("root", "dataset", "split_by", "split"), ("images",)),
                "grefcoco": (("root", "split"), ("images",)),
                "coco": (("annotations", "images"), ("template",)), "voc": (("root", "split"), ())}


def make_parser(prog, description):
    """data.py's parser: the commands synth, build and bench with their flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a synthetic PhraseCut")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--images", type=positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=positive_int, default=160, help="longer image side in pixels")
    p.add_argument("--aspect", type=float, default=0.75,
                   help="shorter side / longer side, 0.5 to 1 (default 0.75: 4:3; 1: square)")
    p.add_argument("--no-target-rate", type=float, default=0.0,
                   help="share of phrases that name nothing in their image, 0 to 0.5 (default 0): an absent colour "
                        "and shape pair, an absent shape, a relation that does not hold; empty mask, no_target true")
    p = sub.add_parser("build", help="convert one split to LMDB")
    p.add_argument("--source", default="phrasecut", choices=sorted(SOURCE_FLAGS),
                   help="phrasecut (default), refcoco (RefCOCO/+/g), grefcoco (gRefCOCO), coco (category "
                        "prompts) or voc")
    p.add_argument("--root", help="PhraseCut's folder, the refer API's data folder, gRefCOCO's (holding grefcoco/), "
                                  "or VOCdevkit/VOC2012")
    p.add_argument("--split", help="phrasecut: train, val, test, miniv; refcoco: train, val, testA, testB, test "
                                   "(as the dataset has them); grefcoco: train, val, testA, testB; voc: train, val")
    p.add_argument("--dataset", help="refcoco: refcoco, refcoco+ or refcocog")
    p.add_argument("--split-by", help="refcoco: unc or google (refcoco), unc (refcoco+), google or umd (refcocog)")
    p.add_argument("--images", help="coco: the images folder; refcoco, grefcoco: COCO train2014, when not under --root")
    p.add_argument("--annotations", help="coco: an instances file, e.g. instances_val2017.json")
    p.add_argument("--template", help='coco: the phrase around the category name, e.g. "a photo of a {}"')
    p.add_argument("--out", required=True, help="the LMDB file: new, or one this tool wrote (replaced)")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip tasks whose image is missing, unreadable or over PIL's decompression-bomb limit")
    p = sub.add_parser("bench", help="samples/s at the input size")
    p.add_argument("path")
    p.add_argument("--root", default=None, help="PhraseCut directory (default: the one it was built from)")
    p.add_argument("--n", type=positive_int, default=300)
    p.add_argument("--input-size", type=positive_int, default=416)
    return parser


def build(args, parser):
    """`data.py build`: the source's converter with its flags; a flag another source takes is refused."""
    required, optional = SOURCE_FLAGS[args.source]
    missing = [f"--{f.replace('_', '-')}" for f in required if getattr(args, f) is None]
    if missing:
        parser.error(f"build --source {args.source} needs {' and '.join(missing)}")
    foreign = [f"--{f.replace('_', '-')}" for f in ("root", "split", "dataset", "split_by", "images", "annotations",
                                                   "template") if getattr(args, f) is not None
               and f not in required + optional]
    if foreign:
        parser.error(f"build --source {args.source} does not take {', '.join(foreign)}")
    common = dict(out=args.out, skip_missing=args.skip_missing)
    if args.source == "refcoco":
        return build_refcoco(args.root, args.dataset, args.split_by, args.split, images=args.images, **common)
    if args.source == "grefcoco":
        return build_grefcoco(args.root, args.split, images=args.images, **common)
    if args.source == "coco":
        return build_coco(args.annotations, args.images, template=args.template or "{}", **common)
    if args.source == "voc":
        return build_voc(args.root, args.split, **common)
    return build_lmdb(args.root, args.split, **common)


def print_build(out, s):
    """What a build wrote, and each thing it counted that a user should know."""
    for note in s["stale_temporaries"]:
        print(f"note: {note}")
    print(f"{out}: {s['num_tasks']} tasks, {s['num_images']} images; skipped {s['skipped_tasks']} "
          f"tasks ({s['skipped_images']} missing, unreadable or too large images"
          f"{', e.g. ' + ', '.join(s['skipped_image_ids'][:5]) if s['skipped_images'] else ''})")
    for key, examples, what in (
            ("size_mismatches", "size_mismatch_examples", "images differ in size from image_data_split.json (masks "
             "use the file's size, the size subsets the listed one)"),
            ("empty_tasks", "empty_task_ids", "tasks have an empty ground truth (every prediction scores IoU 0 on them)"),
            ("multi_frame_images", "multi_frame_examples", "images have several frames (GIF, TIFF); the first was used"),
            ("missing_masks", "missing_mask_names", "images listed have no class PNG (skipped)"),
            ("unreadable_masks", "unreadable_mask_names", "class PNGs cannot be read (skipped with their images)"),
            ("empty_phrases", "empty_phrase_examples", "sentences are empty or only spaces: no phrase, so no task")):
        if s.get(key):
            print(f"warning: {s[key]} {what}, e.g. {'; '.join(map(str, s[examples][:5]))}")
    if s.get("no_target_tasks"):
        print(f"{s['no_target_tasks']} tasks name nothing in their image (no target: an empty mask is the right answer)")
    if "annotation_bytes" in s:
        print(f"size {s['lmdb_bytes']:,} bytes = {s['ratio']:.3f} x (images {s['image_bytes']:,} + "
              f"annotations {s['annotation_bytes']:,})")
    else:
        print(f"size {s['lmdb_bytes']:,} bytes (images {s['image_bytes']:,})")


def run(args, parser):
    """synth or build, as parsed by make_parser; a bad record or file raises ValueError or OSError."""
    if args.command == "synth":
        out = synthesize(args.out, args.images, args.seed, args.size, progress=True, aspect=args.aspect,
                         no_target_rate=args.no_target_rate)
        print(f"wrote {args.images} images to {out}")
    else:
        print_build(args.out, build(args, parser))
