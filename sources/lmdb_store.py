"""The one LMDB format every source of data is converted to (one file per split, no pickle).

    b"__header__"      JSON {format, version, dataset, split, num_tasks, num_images, skipped_tasks, ...}
    b"img/<image_id>"  the image file's own bytes, stored once however many phrases share it
    b"task/<i:08d>"    one JSON task record: task_id, image_id, phrase, width and height of the image
                       file, and its mask as the source gives it (`task_masks`): PhraseCut's "Polygons",
                       or COCO "segmentation"s (polygons or RLE, united) and an optional "ignore" region;
                       "no_target": true on a phrase that names nothing (gRefCOCO's ann_id [-1], synth's
                       no-target phrases), its mask empty; absent (older files, other sources) reads as false

Every source's converter (phrasecut, refcoco, coco, voc) writes through `write_lmdb`, which makes the
checks that keep a file scorable: task ids that are safe, distinct file names (files.check_task_id,
case-insensitive too), images that decode (a multi-frame GIF or TIFF uses frame 0, and says so),
image records whose listed size is not absurd beside the file's (so that it never drives an
allocation far beyond the image), and a count of tasks whose ground truth is empty. Version 3 added
"dataset" and the COCO masks; version 2 files (PhraseCut only) are still read.

The file is written as .NAME.tmp-PID and renamed when complete (files.atomic_path), so a killed run
never leaves a file that looks finished. The reader compares the file's size with the page count
LMDB records in its first page, so a truncated copy is reported as such (reading past the end of a
mapped file would be a bus error). LMDB stores each value over ~2 KB in whole 4 KiB pages, so small
images pay more.
"""
import io
import json
import os
import re
import warnings
from pathlib import Path

import lmdb
from PIL import Image
from tqdm import tqdm

from helpers.cli import check_writable
from helpers.files import JSON_TYPES, atomic_path, check_task_id, process_alive
from helpers.transforms import coco_mask, decode_image, polygons_to_mask

LMDB_FORMAT = "segvlm-phrasecut"

LMDB_VERSION = 3  # 2: task "image_info" and the header's name_att_rel_count; 3: "dataset", COCO masks

READ_VERSIONS = (2, 3)  # what the datasets still read

DATASETS = ("phrasecut", "refcoco", "grefcoco", "coco", "voc")

MAX_SIZE_RATIO = 2  # a listed width or height more than 2x (or under 1/2) the file's is refused as absurd

MAX_IMAGE_BYTES = 1 << 30  # an image file larger than any real photo is refused before it is read whole


_READERS = {}  # (st_dev, st_ino) -> (owner, lmdb.Environment); py-lmdb allows one per file per process


def reader(path):
    """This process's read-only environment for `path`, opened on first use. A forked DataLoader
    worker inherits its parent's environment, which LMDB must not use across fork: it is closed in
    the child (the parent's stays open) and a fresh one opened, so workers never share one. On opening,
    a file shorter than the pages LMDB's own first page counts is refused as truncated."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise FileNotFoundError(f"no LMDB file at {path}") from err
    key, owner = (st.st_dev, st.st_ino), (os.getpid(), st.st_size, st.st_mtime_ns)
    old_owner, env = _READERS.get(key, (None, None))
    if old_owner != owner:  # first use, a forked child, or a rebuilt file that reuses the inode
        if env is not None:
            env.close()
            del _READERS[key]  # so that a failed reopen below leaves no closed environment behind
        try:
            env = lmdb.open(str(path), subdir=False, readonly=True, lock=False,
                            readahead=False, meminit=False)
        except lmdb.Error as err:
            raise ValueError(f"{path} is not a readable LMDB file{' (it is empty)' if not st.st_size else ''}: "
                             f"{err}") from err
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]  # from the header page, read safely
        if st.st_size < need:  # reading a page past the end of the mapped file would be a bus error
            env.close()
            raise ValueError(f"{path} is truncated: {st.st_size:,} bytes, but its LMDB pages take {need:,}; "
                             "copy it again or rebuild it with `python data.py build`")
        _READERS[key] = (owner, env)
    return env


def read_record(path, key, raw):
    """An LMDB value decoded as a JSON object; a ValueError naming the file and the key otherwise."""
    try:
        record = json.loads(raw)  # TypeError when absent (None); ValueError when not UTF-8 JSON
        problem = None if isinstance(record, dict) else f"corrupt (a JSON {JSON_TYPES.get(type(record))})"
    except (TypeError, ValueError) as err:
        problem = "missing" if raw is None else f"corrupt ({err})"
    if problem:
        raise ValueError(f"{path}: record {key.decode()} is {problem}; rebuild it with `python data.py build`")
    return record


# ----------------------------------------------------------------------------- the masks of a task record

def task_masks(task):
    """A task record's ground truth and ignore region at its image file's size: ((H, W) uint8 {0,1},
    (H, W) bool or None). PhraseCut records carry "Polygons" (PhraseCut's own rule, polygons_to_mask);
    the COCO-based sources "segmentation", a list of COCO segmentations united as the refer API's
    getMask does (transforms.coco_mask), and VOC an "ignore" region (its 255 "void" pixels) in the same
    form. A bad segmentation is a ValueError naming the task."""
    w, h = task["width"], task["height"]
    if "Polygons" in task:
        return polygons_to_mask(task["Polygons"], w, h), None
    try:
        gt = coco_mask(task["segmentation"], h, w)
        ignore = coco_mask(task["ignore"], h, w).astype(bool) if task.get("ignore") else None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"task {task.get('task_id')!r}: its segmentation is unusable: {err}") from None
    return gt, ignore


# ----------------------------------------------------------------------------- writing (every source)

def check_out(out, inputs, folders=(), what="--root"):
    """Refuse, before any work, an `out` that is one of `inputs` (files or folders) or inside one of
    `folders` (of images, of masks), a directory, a folder this process cannot write in (cli.check_writable,
    naming --out), or an existing file that is not an LMDB of this format (one that is gets replaced)."""
    out = Path(out)
    target = out.resolve()
    for given in [*inputs, *folders]:
        path = Path(given).resolve()
        if target == path or (given in folders and target.is_relative_to(path)):
            raise ValueError(f"--out {out} is one of {what}'s inputs ({path}); write the LMDB elsewhere")
    if target.is_dir():
        raise ValueError(f"--out {out} is a directory; give the LMDB file's name, e.g. {out / 'val.lmdb'}")
    check_writable(out.parent, "--out")  # before any input is read: its folder must take the new file
    if out.exists():
        try:
            if not out.is_file():
                raise ValueError("not a regular file")
            with reader(out).begin() as txn:
                header = read_record(out, b"__header__", txn.get(b"__header__"))
            if header.get("format") != LMDB_FORMAT:
                raise ValueError(f"its header's format is {header.get('format')!r}")
        except ValueError as err:
            raise ValueError(f"--out {out} exists and is not an LMDB written by `data.py build` ({err}); "
                             "delete it first if it should be replaced") from None


def stale_temporaries(out):
    """Temporary files (.NAME.tmp-PID, files.atomic_path) that a killed build left beside `out`: those
    whose process is gone are removed; one whose process still runs is named. Returns one line each."""
    out = Path(out)
    notes = []
    if not out.parent.is_dir():
        return notes
    pattern = re.compile(re.escape(f".{out.name}.tmp-") + r"(\d+)")
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_file() or int(match[1]) == os.getpid():
            continue
        size = path.stat().st_size
        if process_alive(int(match[1])):
            notes.append(f"{path} ({size:,} bytes) belongs to process {match[1]}, still running: another build "
                         "of the same --out? Left alone")
        else:
            path.unlink(missing_ok=True)
            notes.append(f"removed {path} ({size:,} bytes), left by a build (process {match[1]}) that was killed")
    return notes


def _check_task_ids(tasks, where):
    """Every task id a safe file name, and no two equal once written as files (case-insensitive file
    systems included): `evaluate.py --save-masks` writes <task_id>.png per task."""
    seen = {}
    for i, task in enumerate(tasks):
        task_id = str(task["task_id"])  # PhraseCut's may be numbers; 5 and "5" make one file
        try:
            check_task_id(task_id)
        except ValueError as err:
            raise ValueError(f"{where}: task #{i}: {err}") from None
        key = task_id.casefold()
        if key in seen:
            first = str(tasks[seen[key]]["task_id"])
            same = "the same id" if first == task_id else f"the same file name as {first!r} on a case-insensitive disk"
            raise ValueError(f"{where}: task #{i} {task_id!r} has {same} (task #{seen[key]}); each task "
                             "needs its own <task_id>.png")
        seen[key] = i


def _absurd(listed, real):
    return any(a > MAX_SIZE_RATIO * b or b > MAX_SIZE_RATIO * a for a, b in zip(listed, real))


def _record(image_id):
    return f"its record (image id {image_id})"


def _read_image(path, listed, exact_size, image_id, listed_by=_record):
    """(bytes, (w, h), frames) of one image file; an error naming it and its record when it cannot be used."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} is missing (image id {image_id}; --skip-missing converts without it)")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"image {path} (image id {image_id}) is {path.stat().st_size:,} bytes, over the "
                         f"{MAX_IMAGE_BYTES:,} this tool reads for one image; --skip-missing converts without it")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():  # over PIL's limit is an error, as in predict.open_image
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            _, (h, w) = decode_image(data, str(path), fit=64)  # a full (if reduced) decode checks it
    except ValueError as err:
        raise ValueError(f"{err} (image id {image_id})") from None
    if listed is not None and tuple(listed) != (w, h) and (exact_size or _absurd(listed, (w, h))):
        why = ("its masks are made at the listed size" if exact_size else
               f"more than {MAX_SIZE_RATIO}x apart, so the record is not this image's")
        raise ValueError(f"image {path} is {w}x{h} but {listed_by(image_id)} lists {listed[0]}x{listed[1]} "
                         f"({why}); --skip-missing converts without it")
    with Image.open(io.BytesIO(data)) as im:
        return data, (w, h), getattr(im, "n_frames", 1)


def write_lmdb(out, header, images, tasks, *, where, skip_missing=False, exact_size=False, progress=True,
               commit_every=1000, listed_by=_record):
    """Write one split to a single-file LMDB at `out` (this module's layout); returns the header + stats.

    header: the source's own fields (dataset, split, source, ...), merged into the written header.
    images: {image_id (str): (path, listed (width, height) or None)}; each file is stored once.
    tasks: records with task_id, image_id (as str, a key of images), phrase and the mask fields of `task_masks`;
        the image file's width and height are added. where: the input file named in errors. listed_by(image_id):
        what gave an image its listed size, as errors name it (default "its record (image id ...)").
    Refused (ValueError): unsafe or colliding task ids; an image that is missing, unreadable, over PIL's
    decompression-bomb limit, or whose listed size differs (exact_size: the masks are made at the
    listed size) or is absurd (over MAX_SIZE_RATIO) beside the file's - with skip_missing such images
    are skipped with their tasks and counted. Counted and reported: tasks whose ground truth is empty,
    multi-frame images (frame 0 is used), other size mismatches; tasks marked "no_target" (whose
    mask is meant to be empty) are counted apart, as no_target_tasks. Written as .NAME.tmp-PID and renamed
    when complete; stale temporaries of killed runs are removed first (stale_temporaries)."""
    out = Path(out)
    _check_task_ids(tasks, where)
    stale = stale_temporaries(out)
    image_ids = sorted(images, key=str.encode)  # byte order: append
    out.parent.mkdir(parents=True, exist_ok=True)
    map_size = (1 << 30) + sum(2 * len(json.dumps(t)) for t in tasks)
    for path, _ in images.values():
        map_size += 2 * path.stat().st_size + 8192 if path.is_file() else 0
    sizes, bad, image_bytes, mismatches, frames, empty, no_target = {}, [], 0, [], [], [], 0
    with atomic_path(out) as tmp:
        env = lmdb.open(str(tmp), subdir=False, map_size=map_size, lock=False, meminit=False)
        try:
            txn = env.begin(write=True)
            for k, image_id in enumerate(tqdm(image_ids, desc=f"images {header.get('split', '')}",
                                              disable=not progress)):
                path, listed = images[image_id]
                try:
                    data, (w, h), n_frames = _read_image(path, listed, exact_size, image_id, listed_by)
                except (OSError, ValueError):
                    if not skip_missing:
                        raise
                    bad.append(image_id)
                    continue
                if n_frames > 1:
                    frames.append(f"{image_id}: frame 0 of {n_frames}")
                if listed is not None and tuple(listed) != (w, h):
                    mismatches.append(f"{image_id}: file {w}x{h}, listed {listed[0]}x{listed[1]}")
                txn.put(b"img/" + image_id.encode(), data, append=True)
                sizes[image_id], image_bytes = (w, h), image_bytes + len(data)
                if (k + 1) % commit_every == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            n = 0
            for task in tasks:
                if str(task["image_id"]) not in sizes:
                    continue
                w, h = sizes[str(task["image_id"])]
                record = {**task, "width": w, "height": h}
                gt, ignore = task_masks(record)
                no_target += bool(task.get("no_target"))
                if not task.get("no_target") and not (gt.any() if ignore is None else (gt.astype(bool) & ~ignore).any()):
                    empty.append(str(task["task_id"]))
                txn.put(b"task/%08d" % n, json.dumps(record, separators=(",", ":")).encode(), append=True)
                n += 1
                if n % (20 * commit_every) == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            if n == 0:
                raise ValueError(f"{where}: no tasks left in split {header.get('split')!r} after skipping "
                                 f"{len(bad)} images")
            header = {"format": LMDB_FORMAT, "version": LMDB_VERSION, **header,
                      "num_tasks": n, "num_images": len(sizes), "skipped_tasks": len(tasks) - n,
                      "skipped_images": len(bad), "skipped_image_ids": bad[:20],
                      "size_mismatches": len(mismatches), "size_mismatch_examples": mismatches[:20],
                      "empty_tasks": len(empty), "empty_task_ids": empty[:20], "no_target_tasks": no_target,
                      "multi_frame_images": len(frames), "multi_frame_examples": frames[:20]}
            txn.put(b"__header__", json.dumps(header).encode())
            txn.commit()
            env.sync(True)
        finally:
            env.close()
    return {**header, "stale_temporaries": stale, "lmdb_bytes": os.path.getsize(out), "image_bytes": image_bytes}


def read_header(path):
    """The header of the LMDB at `path`, checked against its records: a readable version, a task count
    that the records match exactly (a header that disagrees with them is refused, naming both counts)."""
    env = reader(path)
    with env.begin() as txn:
        raw = txn.get(b"__header__")
        header = read_record(path, b"__header__", raw) if raw else {}
        found = (header.get("format"), header.get("version"))
        if found[0] != LMDB_FORMAT or found[1] not in READ_VERSIONS:
            raise ValueError(f"{path}: found LMDB format {found[0]!r} version {found[1]!r}, expected "
                             f"{LMDB_FORMAT!r} version {LMDB_VERSION} (or an older {', '.join(map(str, READ_VERSIONS[:-1]))}); "
                             "rebuild it with "
                             "`python data.py build`")
        n, images = header.get("num_tasks"), header.get("num_images")
        if type(n) is not int or n < 1 or type(images) is not int or images < 1 or \
                (header.get("dataset", "phrasecut") == "phrasecut" and "name_att_rel_count" not in header):
            raise ValueError(f"{path}: record __header__ is corrupt (num_tasks {n!r}, num_images {images!r}); "
                             "rebuild it")
        if txn.get(b"task/%08d" % (n - 1)) is None:
            raise ValueError(f"{path}: the header counts {n} tasks but record task/{n - 1:08d} is missing; "
                             "rebuild it with `python data.py build`")
        entries = env.stat()["entries"]
        if entries != 1 + n + images:
            raise ValueError(f"{path}: the header counts {n} tasks and {images} images, but the file holds "
                             f"{entries - 1} records, not {n + images}: it disagrees with its records; rebuild it "
                             "with `python data.py build`")
    header.setdefault("dataset", "phrasecut")
    return header
