"""A folder of images at once: every image x every phrase, one mask PNG each, and an index (predict.py --images).

    python predict.py --ckpt best.pth --images photos/ --phrases phrases.txt --out masks/

- The images: a folder is searched recursively (every file but hidden ones and those under --out is
  tried; what is not an image is reported as such); files may also be named one by one.
- Each image is decoded and letterboxed by DataLoader workers (`ImageFiles`), `batch_size` images go
  through the model at once, and each image is encoded once for all its phrases (SegVLM's image_index).
  The mask of a pair is the one `predict.py --image X --phrase Y --mask M` writes: the same letterbox,
  tokens, model, sigmoid, unletterbox (inference.probability_map) and threshold.
- OUT/<image's path under the common folder>/<phrase>-<8 hex>.png, 0/255 at the image's own size; the hex
  is a hash of the phrase, so two phrases never share a file. OUT/index.csv gets one row per mask once it
  is written (image, phrase, mask relative to OUT, fraction of the image, width, height).
- Resumable: a rerun skips every pair whose mask the index lists (and that still exists); nothing of
  theirs is written again. A row that a killed run left half-written is dropped.
- An image that cannot be read (missing, empty, truncated, not an image, too large) is named with the
  reason; the others are all done, and `run` returns the failures for the caller's count and exit status.
- OUT is held by this run (files.hold_dir); a file in OUT this project did not write is never overwritten
  (cli.claim_files); every mask is written atomically (files.save_mask); Ctrl-C stops between two
  writes and leaves an index that a rerun continues from.
"""
import csv
import hashlib
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from helpers import transforms
from helpers.cli import claim_files
from helpers.files import hold_dir, save_mask
from helpers.inference import net_device, open_image, probability_map

INDEX = "index.csv"
COLUMNS = ("image", "phrase", "mask", "fraction", "width", "height")


def find_images(sources, out_dir=None) -> list:
    """The files to segment, in a stable order: each folder of `sources` searched recursively (hidden files and
    folders skipped, and anything under out_dir), each file as named. A ValueError for a source that does not
    exist, or when there is no file at all."""
    out_dir = Path(out_dir).resolve() if out_dir is not None else None
    found, seen = [], set()
    for source in map(Path, sources):
        if source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(source).parts))
        elif source.exists():
            files = [source]
        else:
            raise ValueError(f"--images {source}: no such file or folder")
        for path in files:
            resolved = path.resolve()
            if resolved in seen or (out_dir is not None and out_dir in resolved.parents):
                continue
            seen.add(resolved)
            found.append(path)
    if not found:
        raise ValueError(f"--images {' '.join(map(str, sources))}: no files found")
    return found


def read_phrases(path) -> list:
    """The phrases of a --phrases file: one a line, blank lines skipped, repeats dropped; a ValueError naming
    the file when it cannot be read or holds none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--phrases {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--phrases {path}: cannot be read ({e.strerror})") from None
    phrases = unique(line.strip() for line in text.splitlines())
    if not phrases:
        raise ValueError(f"--phrases {path} holds no phrase (one phrase a line)")
    return phrases


def unique(phrases) -> list:
    """Non-empty phrases in their order, each once."""
    return list(dict.fromkeys(p for p in phrases if p))


def mask_name(relative, phrase) -> str:
    """The mask of `phrase` on the image at `relative` (a path under the common folder), relative to OUT:
    '<relative>/<phrase, letters and digits>-<8 hex of its SHA-1>.png', POSIX separators."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", phrase).strip("_")[:40] or "phrase"
    digest = hashlib.sha1(phrase.encode("utf-8")).hexdigest()[:8]
    return f"{Path(relative).as_posix()}/{slug}-{digest}.png"


def relative_names(paths) -> list:
    """Each path relative to the deepest folder holding them all (resolved): unique, as the paths are."""
    resolved = [Path(p).resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(root) for p in resolved]


def read_index(path) -> dict:
    """{mask: row} of an index; a half-written last row (a killed run) is dropped from the file. A ValueError
    when the file is not such an index (its header differs)."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # a row cut short by a kill: drop it, the pair is done again
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    rows = list(csv.reader(data.decode("utf-8", errors="replace").splitlines()))
    if not rows:
        return {}
    if tuple(rows[0][:len(COLUMNS)]) != COLUMNS:
        raise ValueError(f"{path} is not an index written by predict.py (expected the columns {', '.join(COLUMNS)}); "
                         f"move it or name another --out")
    return {row[2]: dict(zip(COLUMNS, row)) for row in rows[1:] if len(row) >= len(COLUMNS)}


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


def run(model, images, phrases, out, threshold, batch_size=4, workers=2, progress=None):
    """Segment every image of `images` (paths) with every phrase into `out` -> (summary dict, failures).

    summary: images, phrases, written (masks), skipped (pairs already in the index), and, when there was work,
    read (images this run opened) and seconds (their time, loader start included).

    model: a SegVLM, FastSegVLM or OnnxSegVLM (its config gives input_size and word_len). failures:
    [(path, reason)] of the images that could not be read. Raises ValueError when OUT is held by another
    run, holds a file this tool would overwrite and did not write, or holds a foreign index.csv.
    """
    out = Path(out)
    cfg = model.config
    names = relative_names(images)
    with hold_dir(out, "--out"):
        done = read_index(out / INDEX)
        done = {m: row for m, row in done.items() if (out / m).is_file()}  # a listed mask that is gone: redo it
        todo = []  # (path, relative name, [phrase numbers not done yet])
        for path, rel in zip(images, names):
            pending = [k for k, phrase in enumerate(phrases) if mask_name(rel, phrase) not in done]
            if pending:
                todo.append((path, rel, pending))
        claim_files(out, [INDEX] + [mask_name(rel, phrases[k]) for _, rel, pending in todo for k in pending], "--out")
        summary = {"images": len(images), "phrases": len(phrases), "written": 0, "skipped": len(images) *
                   len(phrases) - sum(len(p) for *_, p in todo)}
        failures = []
        if not todo:
            return summary, failures
        tokens = transforms.tokenize(phrases, cfg.word_len)  # (P, L), each phrase tokenised once
        with warnings.catch_warnings():  # said on every run, as predict_proba says it
            warnings.simplefilter("always")
            for phrase in phrases:
                transforms.warn_if_cut(phrase, cfg.word_len)
        device = net_device(model)
        loader = DataLoader(ImageFiles([path for path, *_ in todo], cfg.input_size), batch_size=batch_size,
                            num_workers=workers, collate_fn=_items)
        index_path = out / INDEX
        new_index = not index_path.exists() or index_path.stat().st_size == 0
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        bar = tqdm(total=len(todo), unit="img", desc="predict", file=sys.stderr, disable={True: False, False: True}.get(progress),
                   dynamic_ncols=True)
        try:
            with open(index_path, "a", newline="", encoding="utf-8") as f, torch.no_grad():
                writer = csv.writer(f)
                if new_index:
                    writer.writerow(COLUMNS)
                    f.flush()
                for batch in loader:
                    good = [item for item in batch if item[3] is None]
                    for i, *_, reason in batch:
                        if reason is not None:
                            failures.append((todo[i][0], reason))
                            tqdm.write(f"predict.py: skipped {reason}", file=sys.stderr)
                    if good:
                        summary["written"] += segment_batch(model, good, todo, phrases, tokens, device, out,
                                                            threshold, writer, f)
                    bar.update(len(batch))
        finally:
            bar.close()
            model.train(was_training)
        summary["seconds"] = time.perf_counter() - start  # the images read (or failed) in this run, from the first
        summary["read"] = len(todo)
    return summary, failures


def segment_batch(model, good, todo, phrases, tokens, device, out, threshold, writer, index_file) -> int:
    """One forward pass for the images of `good` with all their pending phrases; each mask is written, then its
    row appended to the index (flushed), so that a kill leaves no row without its mask. -> masks written."""
    pairs = [(u, k) for u, (i, *_) in enumerate(good) for k in todo[i][2]]  # (image in batch, phrase number)
    pixels = torch.stack([item[1] for item in good]).to(device)  # (U, 3, S, S): each image once
    image_index = torch.tensor([u for u, _ in pairs], dtype=torch.long, device=device)
    logits = model(pixels, tokens[[k for _, k in pairs]].to(device), image_index=image_index)  # (N, 1, S/4, S/4)
    for row, (u, k) in zip(logits, pairs):
        i, _, (height, width), _ = good[u]
        path, rel, _ = todo[i]
        mask = probability_map(row, height, width, model.config.input_size) > threshold
        name = mask_name(rel, phrases[k])
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        save_mask(mask, out / name)
        writer.writerow([str(path), phrases[k], name, f"{mask.mean():.6f}", width, height])
        index_file.flush()
    return len(pairs)

