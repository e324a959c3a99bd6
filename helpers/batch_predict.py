"""A folder of images at once: every image x every phrase, one mask PNG each, and an index (predict.py --images).

    python predict.py --ckpt best.pth --images photos/ --phrases phrases.txt --out masks/

- The images (`find_images`): a folder is searched recursively (every file but hidden ones is tried; what
  is not an image is reported as such; a symbolic link to a folder is not followed, one to a file is an
  image of its own name); files may also be named one by one. A source that is --out or inside it, or
  inside another source, is refused; when --out is inside a source folder, its files are not read as
  images, and those this tool did not write are counted in a note.
- An image's key, the folder of its masks under OUT, depends on its source alone, never on the other
  sources nor on where symbolic links lead: '<source's name>/<path under the source>' for a folder
  ('photos/holiday/beach.jpg' for --images photos/), '<file's name>' for a file. A source whose name an
  earlier source (in the order given) already has, or that starts with '.', gets '~<8 hex of its absolute
  path>' after its name.
- Each image is decoded and letterboxed by DataLoader workers (`ImageFiles`, `batch_size` at a time) and
  goes through the model on its own, the run's phrases PAIRS_PER_PASS at a time (the image encoded once
  per pass, SegVLM's image_index), as inference.iter_proba passes them. So an image's masks are, bit for
  bit, those inference.predict(model, image, <the run's phrases>) gives (the same letterbox, tokens,
  passes, sigmoid, unletterbox and threshold), whatever the other images and whether the run resumed
  another. A mask of `predict.py --image X --phrase Y` (one phrase, one pass) agrees with it up to
  rounding: a pass of several phrases sums in another order (docs/predict.md gives the measured agreement).
- OUT/<key>/<phrase>-<16 hex>.png, 0/255 at the image's own size (helpers/folder_index.mask_name: no two
  phrases ever share a file). OUT/index.csv gets one row per mask once it is written (image, phrase, mask
  relative to OUT, fraction of the image, width, height; cells a spreadsheet would run as formulas are
  quoted, folder_index.cell).
- Resumable: a rerun skips every pair whose mask the index lists for that phrase (and that still exists);
  nothing of theirs is written again. A row that a killed run left half-written is dropped.
- An image that cannot be read (missing, empty, truncated, not an image, too large) is named with the
  reason; the others are all done, and the failures are returned for the caller's count and exit status.
- OUT is held by this run (files.hold_dir) and checked before the model is loaded (`plan`): an index.csv
  or a mask this tool did not write, a symbolic link or a file on the way to a mask, are refused
  (cli.claim_files); nothing is ever written through a link. Every mask is written atomically
  (files.save_mask); Ctrl-C stops between two writes and leaves an index that a rerun continues from.
- The model's output is checked on every pass ((phrases, 1, S/4, S/4)); what is counted is what was written.
"""
import hashlib
import os
import stat
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from helpers import transforms
from helpers.cli import WRITTEN, check_inside, claim_files, make_folders, shown, written_names
from helpers.engines import net_device
from helpers.files import LOCK_NAME, hold_dir, save_mask
from helpers.folder_index import COLUMNS, INDEX, index_rows, mask_name, name_for, open_index, phrase_stem, write_row
from helpers.inference import PAIRS_PER_PASS, open_image, probability_map

__all__ = ["find_images", "read_phrases", "unique", "plan", "execute", "run", "read_index", "INDEX", "COLUMNS",
           "mask_name", "PAIRS_PER_PASS"]
RESERVED = {name.casefold() for name in (INDEX, WRITTEN, LOCK_NAME)}  # OUT's own files: no image key may be one


class Found(NamedTuple):
    images: list  # (path as found, key), in a stable order
    notes: list  # lines to say before the work (files under --out left out, folders that cannot be read)


class Plan(NamedTuple):
    out: Path
    images: list  # (path, key) of every image
    phrases: list
    todo: list  # (path, key, [(phrase number, mask name)]) of the images with pairs to do
    skipped: int  # pairs the index lists done
    names: list  # the files this run writes in OUT, index.csv first
    keep: int  # index.csv's complete bytes (a half-written row after them is cut)


def say(text) -> None:
    """A line on stderr in the tool's format, between the progress bar's updates."""
    tqdm.write(f"predict.py: {text}", file=sys.stderr)


def _identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files_under(folder, skip=None, notes=None) -> tuple:
    """(the files under `folder` as tuples of names, sorted; whether the folder whose identity is `skip` was met
    and left out). Hidden files and folders are left out, a symbolic link to a folder is not followed, and a
    folder that cannot be read is named in `notes`."""
    found, met, stack = [], False, [()]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(Path(folder, *rel)))
        except OSError as e:
            if notes is not None:
                notes.append(f"{shown(Path(folder, *rel))} cannot be read ({e.strerror}); its files are left out")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                if skip is not None and (st.st_dev, st.st_ino) == skip:
                    met = True
                else:
                    stack.append(rel + (entry.name,))
            elif _is_file(entry):  # a link to a file too: an image of its own name
                found.append(rel + (entry.name,))
    return sorted(found), met


def _is_file(entry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symbolic link in a loop: nothing to read, as a broken link
        return False


def _source_name(source, used) -> str:
    """The first part of the keys of `source`'s images: its name, or its name and 8 hex of its absolute path
    when an earlier source has that name (case aside), when it starts with '.' or is one of OUT's files."""
    absolute = os.path.abspath(source)
    name = os.path.basename(absolute) or "_"  # "/" has no name
    if name.casefold() in used or name.startswith("."):
        digest = hashlib.sha256(os.fsencode(absolute)).hexdigest()[:8]
        base, number = f"{name}~{digest}", 1
        name = base
        while name.casefold() in used:
            number += 1
            name = f"{base}-{number}"
    used.add(name.casefold())
    return name


def _inside(path, folder) -> bool:
    return path == folder or folder in path.parents


def find_images(sources, out_dir=None) -> Found:
    """The images of `sources` (folders and files, as --images takes them) with their keys (the module's
    docstring says the rule), in a stable order. A ValueError for a source that does not exist, that is
    out_dir or inside it, that is inside another folder source or holds one, or when there is no file."""
    out_dir = Path(out_dir) if out_dir is not None else None
    out_id = _identity(out_dir) if out_dir is not None else None
    out_real = out_dir.resolve() if out_id is not None else None
    images, notes, used, earlier = [], [], set(RESERVED), {}  # earlier: {absolute path: (source, is a folder)}
    for source in map(Path, sources):
        absolute = Path(os.path.abspath(source))
        if absolute in earlier:
            continue  # the same source twice
        if not os.path.exists(source):
            raise ValueError(f"--images {shown(source)}: no such file or folder")
        if out_real is not None and _inside(source.resolve(), out_real):
            where = "the --out folder" if source.resolve() == out_real else "inside --out"
            raise ValueError(f"--images {shown(source)} is {where} {shown(out_dir)}, where the masks go (a rerun would "
                             f"read them as images); name an --out outside the images")
        folder = source.is_dir()
        for other, (given, other_is_folder) in earlier.items():
            if (other_is_folder and _inside(absolute, other)) or (folder and _inside(other, absolute)):
                raise ValueError(f"--images {shown(source)} and --images {shown(given)}: one holds the other, so its "
                                 f"images would be done twice under two names; give one of them")
        earlier[absolute] = (source, folder)
        if folder:
            files, met = _files_under(source, out_id, notes)
            name = _source_name(source, used)
            images += [(Path(source, *parts), "/".join((name,) + parts)) for parts in files]
            if met:
                notes += _left_out(out_dir)
        else:
            images.append((source, _source_name(source, used)))
    if not images:
        raise ValueError(f"--images {' '.join(shown(s) for s in sources)}: no files found (hidden files are skipped)")
    return Found(images, notes)


def _left_out(out_dir) -> list:
    """The note on the files under --out (inside a source folder) that this tool did not write: never read."""
    ours = written_names(out_dir) | {INDEX}
    theirs = ["/".join(parts) for parts in _files_under(out_dir)[0] if "/".join(parts) not in ours]
    if not theirs:
        return []
    return [f"{len(theirs)} file(s) under --out {shown(out_dir)} are not read as images (the folder of the masks is never "
            f"searched), e.g. {shown(out_dir / theirs[0])}; move them out of --out to segment them"]


def read_phrases(path) -> list:
    """The phrases of a --phrases file: one a line, blank lines skipped, repeats dropped; a ValueError naming
    the file when it cannot be read or holds none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--phrases {shown(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--phrases {shown(path)}: cannot be read ({e.strerror})") from None
    phrases = unique(line.strip() for line in text.splitlines())
    if not phrases:
        raise ValueError(f"--phrases {shown(path)} holds no phrase (one phrase a line)")
    return phrases


def unique(phrases) -> list:
    """Non-empty phrases in their order, each once."""
    return list(dict.fromkeys(p for p in phrases if p))


def read_index(path) -> dict:
    """{mask: row} of an index predict.py wrote (folder_index.index_rows; its cells' quotes undone)."""
    return index_rows(path)[0]


def _regular(path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def plan(images, phrases, out) -> Plan:
    """What a run on OUT does, checked before any model is loaded or any byte written: each image's mask names
    (folder_index.name_for) and the pairs the index lists done. A ValueError naming the file when OUT's
    index.csv is not one this tool wrote (a user's file, a link, a folder) or not an index, or when a mask
    would overwrite a file this tool did not write or go through a link (cli.claim_files)."""
    out = Path(out)
    listed, keep = {}, 0
    if check_inside(out, INDEX, "--out"):
        if INDEX not in written_names(out):
            raise ValueError(f"--out {shown(out)}: {shown(out / INDEX)} was not written by predict.py (its {WRITTEN} "
                             f"does not list it); a user's file is never read, cut or added to: move it, or name "
                             f"another --out")
        listed, keep = index_rows(out / INDEX)
    todo, names, skipped = [], [INDEX], 0
    stems = [phrase_stem(phrase) for phrase in phrases]
    for path, key in images:
        taken, pending = set(), []
        for k, phrase in enumerate(phrases):
            name, done = name_for(key, phrase, listed, taken, stems[k])
            taken.add(name)
            if done and _regular(out / name):
                skipped += 1
            else:  # not listed, or listed and gone: done (again)
                pending.append((k, name))
                names.append(name)
        if pending:
            todo.append((path, key, pending))
    claim_files(out, names, "--out", record=False)
    return Plan(out, list(images), list(phrases), todo, skipped, names, keep)


def run(model, sources, phrases, out, threshold, batch_size=4, workers=2, progress=None, model_file=None):
    """Segment every image of `sources` (folders and files, find_images) with every phrase into `out` ->
    (summary dict, failures): find_images, then plan and execute while OUT is held (files.hold_dir)."""
    found = find_images(sources, out)
    for note in found.notes:
        say(f"note: {note}")
    with hold_dir(out, "--out"):
        return execute(model, plan(found.images, phrases, out), threshold, batch_size, workers, progress, model_file)


def execute(model, job, threshold, batch_size=4, workers=2, progress=None, model_file=None):
    """Do `job` (plan's) -> (summary dict, failures).

    summary: images, phrases, written (masks written and indexed), skipped (pairs already in the index), and,
    when there was work, read (images this run opened) and seconds (their time, loader start included).
    model: a SegVLM, FastSegVLM or OnnxSegVLM (its config gives input_size and word_len); model_file names it
    in errors. failures: [(path, reason)] of the images that could not be read. A ValueError when the model
    returns logits of another shape than (phrases, 1, S/4, S/4) (the masks written before are indexed)."""
    out, cfg = job.out, model.config
    claim_files(out, job.names, "--out")  # checked again, and recorded, just before anything is written
    summary = {"images": len(job.images), "phrases": len(job.phrases), "written": 0, "skipped": job.skipped}
    failures = []
    if not job.todo:
        return summary, failures
    cut = [phrase for phrase in job.phrases if transforms.kept_words(phrase, cfg.word_len) is not None]
    if cut:
        say(f"note: {len(cut)} phrase(s) longer than {cfg.word_len} tokens (word_len) are cut, the model sees their "
            f"start only: {', '.join(shown(transforms.short_phrase(p, 40)) for p in cut[:3])}{', ...' * (len(cut) > 3)}")
    tokens = transforms.tokenize(job.phrases, cfg.word_len)  # (P, L), each phrase tokenised once
    loader = DataLoader(ImageFiles([path for path, *_ in job.todo], cfg.input_size), batch_size=batch_size,
                        num_workers=workers, collate_fn=_items)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    bar = tqdm(total=len(job.todo), unit="img", desc="predict", file=sys.stderr, dynamic_ncols=True,
               disable={True: False, False: True}.get(progress))
    index_file, writer = open_index(out / INDEX, job.keep)
    try:
        with index_file, torch.no_grad():
            for batch in loader:
                for i, pixels, size, reason in batch:
                    if reason is None:
                        segment_image(model, pixels, size, job, i, tokens, threshold, writer, index_file, summary,
                                      model_file)
                    else:
                        failures.append((job.todo[i][0], reason))
                        say(f"skipped {shown(reason)}")
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    summary["seconds"] = time.perf_counter() - start  # the images read (or failed) in this run, from the first
    summary["read"] = len(job.todo)
    return summary, failures


class ImageFiles(Dataset):
    """Item i: (i, letterboxed pixels (3, S, S) or None, (height, width) or None, the reason it failed or None).
    A file that cannot be read is an item with its reason, never an exception: the others go on."""

    def __init__(self, paths, size):
        self.paths, self.size = list(paths), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = open_image(self.paths[i])
            pixels, _ = transforms.letterbox(image, self.size)
        except FileNotFoundError:
            return i, None, None, f"{self.paths[i]}: no such file (removed during the run?)"
        except (ValueError, OSError) as e:
            return i, None, None, str(e)
        except Exception as e:  # noqa: BLE001 - any decoder failure on one file must not stop the others
            return i, None, None, f"{self.paths[i]}: cannot decode the image ({type(e).__name__}: {e})"
        return i, pixels, (image.height, image.width), None


def _items(batch):
    return batch  # a list of ImageFiles items, kept apart: some are failures


def check_logits(logits, pairs, size, model_file) -> None:
    """A ValueError naming the model file unless `logits` is (pairs, 1, size/4, size/4): a graph whose batch is
    fixed, or whose output is another map, must not give masks (nor a count of masks it did not give)."""
    expected = (pairs, 1, size // 4, size // 4)
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if shape != expected:
        raise ValueError(f"{shown(model_file or 'the model')} returned logits of shape {shape} for {pairs} phrase(s) on "
                         f"one image, expected {expected} (phrases, 1, S/4, S/4 with S = input_size {size}); stopped, "
                         f"the masks written before are in the index")


def segment_image(model, pixels, size, job, i, tokens, threshold, writer, index_file, summary, model_file) -> None:
    """Image i of job.todo: the run's phrases in groups of PAIRS_PER_PASS, one forward pass each, exactly as
    inference.iter_proba passes them (one phrase: no image_index), for every group that holds a pending
    phrase; only the pending phrases' masks are written. So a pass never depends on what is done already:
    a resumed run writes the bytes a clean run writes, in any precision. Each mask is written, then its row
    appended to the index (flushed), so that a kill leaves no row without its mask; summary["written"]
    counts them."""
    path, _, pending = job.todo[i]
    names = dict(pending)  # phrase number -> mask name, for the pending ones
    height, width = size
    device = net_device(model)
    pixels = pixels[None].to(device)  # (1, 3, S, S)
    for start in range(0, len(job.phrases), PAIRS_PER_PASS):
        group = range(start, min(start + PAIRS_PER_PASS, len(job.phrases)))
        if not any(k in names for k in group):
            continue
        group_tokens = tokens[list(group)].to(device)  # (N, L)
        if len(group) == 1:
            logits = model(pixels, group_tokens)
        else:
            logits = model(pixels, group_tokens, image_index=torch.zeros(len(group), dtype=torch.long, device=device))
        check_logits(logits, len(group), model.config.input_size, model_file)  # (N, 1, S/4, S/4)
        for row, k in zip(logits, group):
            if k not in names:
                continue  # done by an earlier run
            mask = probability_map(row, height, width, model.config.input_size) > threshold
            save_mask(mask, make_folders(job.out, names[k], "--out"))  # every folder on the way a real one in OUT
            write_row(writer, [path, job.phrases[k], names[k], f"{mask.mean():.6f}", width, height])
            index_file.flush()
            summary["written"] += 1
