"""PhraseCut for SegVLM: a synthetic PhraseCut, a PhraseCut -> LMDB converter, and the dataset.

    python data.py synth --out data/synth --images 1600 --seed 0 --size 192 --aspect 1
    python data.py build --root data/synth --split train --out data/train.lmdb
    python data.py build --root VGPhraseCut_v0 --split val --out val.lmdb --skip-missing
    python data.py bench data/train.lmdb            # samples/s from the LMDB and from the folder

`synth` writes a small referring dataset in exactly PhraseCut's layout (images/<image_id>.jpg,
image_data_split.json, refer_{train,val,test,miniv}.json, name_att_rel_count.json), so the converter,
loader, training and evaluation run the same way on it and on the real VGPhraseCut_v0.

LMDB (one file per split, no pickle): b"__header__" JSON {format, version, split, num_tasks,
num_images, skipped_tasks, name_att_rel_count, ...}, checked by the loader; b"img/<image_id>" the
image file's own bytes, stored once however many phrases share it; b"task/<index:08d>" one JSON task
record (PhraseCut's fields + the image file's width and height + "image_info", the width, height and
coco_id that image_data_split.json records). Masks are rasterised from the polygons at load time. Images
stream in one at a time (the refer JSON is loaded whole); the file is written as .NAME.tmp-PID and
renamed when complete, so a killed run never leaves a file that looks finished. The loader compares
the file's size with the page count LMDB records in its first page, so a truncated copy is reported as
such (reading past the end of a mapped file would be a bus error). Its size is close to
the split's JPEG + annotation bytes (docs/measurements.md); LMDB stores each value over ~2 KB in whole
4 KiB pages, so small images pay more.

Choices where PhraseCut and the paper are silent (all deliberate, all tested):
- Letterbox: scale = S / max(W, H), content resized (PIL bilinear) to round(W*scale) x round(H*scale)
  and *centred* (CRIS-like); padding is CLIP's mean, i.e. exactly 0 after normalisation.
- Mask: the official rule (PhraseCut utils/data_transfer.polygons_to_mask): points truncated with
  int(), ImageDraw.polygon(points, outline=1, fill=1) on an 'L' image at the original size, union of
  all polygons of all instances, polygons of fewer than 2 points skipped. Instances without polygons
  add nothing. The letterboxed mask is that mask resized with nearest-neighbour and padded with 0.
- Images are decoded in stored pixel order, as PhraseCut does: its polygons are on the stored pixels,
  so the EXIF orientation is deliberately not applied here (predict.py, whose input is a photo as it
  displays, applies it).
  JPEGs at least 2x larger than their letterboxed size are decoded at a reduced DCT scale first
  (PIL's Image.draft), then resized as usual.
  Modes: alpha is dropped, palettes expanded, CMYK converted by PIL; 16-bit images are scaled
  from 0..65535 to 0..255; float images are clipped to 0..255.
- Phrases: CLIP's tokenizer (ftfy + byte-level BPE, so any Unicode works), truncated to word_len
  with the end token kept; the datasets warn once per process with the words kept (kept_words).
- The mask and letterbox use the image file's own size. PhraseCut's subsets use image_data_split.json
  (required): its width x height divides the region's area, its coco_id decides d_cocotv; the builder
  counts size disagreements in the header. name_att_rel_count.json is optional: without it the
  header's name_att_rel_count is null and evaluation leaves the c*/a* subsets out.
- Input checks (`build`): every task record is validated (its fields, types, [x, y] points of finite
  numbers, a non-empty phrase) and an error names the refer file, the task and the field; image paths
  must resolve inside <root>/images/ (no ../, absolute ids or symlinks out; the folder itself may be a
  symlink); images over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) are refused as
  predict.py refuses them, and skipped with --skip-missing like missing or unreadable ones. --out must
  not be, or be inside, one of --root's inputs, and an existing --out must be an LMDB this tool wrote
  (it is replaced; anything else is refused before any work: delete it first). `synth` refuses an
  --out that exists and is not an empty folder.
- Eval items carry `subsets`, the task's official subsets (evaluate.phrasecut_subsets).
- Synthetic splits: 80/10/10 train/validation/test by image; miniv is a fifth of the validation
  images. As in PhraseCut, those say split "miniv" in image_data_split.json and their tasks are in
  refer_miniv.json only, not in refer_val.json (official tools load both with split="val_miniv").
"""
import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import lmdb
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm import tqdm

import evaluate  # the official subset rule, applied to eval items

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # 0-1 scale, RGB
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPLITS = ("train", "val", "test", "miniv")
LMDB_FORMAT = "segvlm-phrasecut"
LMDB_VERSION = 2  # 2: task "image_info" and the header's name_att_rel_count, for the subsets
DEMO_NUM_IMAGES = 1600  # synthetic images for the demo: 1280 train, 128 val, 32 miniv, 160 test
_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def tokenize(phrases, word_len=22):
    """CLIP BPE tokens, (N, word_len) long; long phrases are cut, keeping the end-of-text token (what is
    kept: kept_words)."""
    import clip  # imported here: clip imports pkg_resources, slow and noisy at module import
    if isinstance(phrases, str):
        phrases = [phrases]
    return clip.tokenize(list(phrases), context_length=word_len, truncate=True).long()


@functools.lru_cache(maxsize=16384)
def _tokens(phrase, word_len):
    """tokenize(phrase, word_len)[0], kept per process: datasets repeat phrases, and CLIP's BPE runs in Python."""
    return tokenize(phrase, word_len)[0]


def kept_words(phrase, word_len=22):
    """What tokenize keeps of a phrase longer than word_len tokens (its first word_len - 2 tokens, as
    text: the start and end tokens take two), or None when the whole phrase fits."""
    from clip.clip import _tokenizer
    ids = _tokenizer.encode(phrase)
    return None if len(ids) <= word_len - 2 else _tokenizer.decode(ids[:word_len - 2]).strip()


def warn_if_cut(phrase, word_len, context="", note=""):
    """Warn, naming the words kept, when `phrase` is longer than word_len tokens; returns whether it was."""
    kept = kept_words(phrase, word_len)
    if kept is not None:
        warnings.warn(f"{context}phrase {phrase!r} is longer than {word_len} tokens (word_len) and is cut: "
                      f"the model sees only {kept!r}{note}", stacklevel=2)
    return kept is not None


# ----------------------------------------------------------------------------- images and masks

def to_rgb(img):
    """Any PIL mode -> 'RGB' (see the module docstring for the rule per mode)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float32)
        if img.mode != "F":
            arr = arr / 257.0  # 16-bit range -> 8-bit range
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def open_image(data, name, fit=None):
    """Decode image bytes -> (RGB PIL image, (H, W) of the stored image); errors name `name`.

    fit=S: a JPEG at least twice the size of its letterboxed content is decoded at a reduced DCT
    scale (PIL's draft: 1/2, 1/4 or 1/8, never below the content size), which is much faster."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if fit and img.format == "JPEG":
            nh, nw, _, _ = letterbox_geometry(h, w, fit)
            if w >= 2 * nw and h >= 2 * nh:
                img.draft(None, (nw, nh))
        img.load()
        return to_rgb(img), (h, w)
    except Image.UnidentifiedImageError:
        raise ValueError(f"cannot read image {name}: not an image file PIL can identify") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise ValueError(f"cannot read image {name}: {err}") from err


def polygons_to_mask(polygons, width, height):
    """Official PhraseCut rule. polygons: instances -> polygons -> [x, y]. -> (H, W) uint8 in {0, 1}."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for instance in polygons:
        for polygon in instance:
            if len(polygon) < 2:
                continue
            draw.polygon([(int(x), int(y)) for x, y in polygon], outline=1, fill=1)
    return np.asarray(canvas)


def letterbox_geometry(height, width, size):
    """Where an (height, width) image lands on the size x size canvas: (nh, nw, top, left)."""
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def letterbox(image, size, orig_size=None):
    """PIL image -> ((3, size, size) float CLIP-normalised, meta). Padding normalises to exactly 0.

    orig_size=(H, W) when `image` was decoded smaller (draft) than the stored image, so that the
    geometry matches the mask's. meta: orig_size (H, W) and content (top, left, nh, nw)."""
    h, w = orig_size or (image.height, image.width)
    nh, nw, top, left = letterbox_geometry(h, w, size)
    content = np.asarray(to_rgb(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    content = torch.from_numpy(content).permute(2, 0, 1)  # HWC -> CHW
    canvas = torch.zeros(3, size, size)
    canvas[:, top:top + nh, left:left + nw] = (content / 255.0 - _MEAN) / _STD
    return canvas, {"orig_size": (h, w), "content": (top, left, nh, nw)}


def unnormalize(pixels):
    """Undo letterbox's CLIP normalisation: (3, h, w) -> (3, h, w) RGB in [0, 1], for display."""
    return (pixels * _STD + _MEAN).clamp(0, 1)


def letterbox_mask(mask, size):
    """(H, W) {0,1} array -> (1, size, size) float, nearest-neighbour, padding 0."""
    h, w = mask.shape
    nh, nw, top, left = letterbox_geometry(h, w, size)
    small = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    canvas = torch.zeros(1, size, size)
    canvas[0, top:top + nh, left:left + nw] = torch.from_numpy(small.astype(np.float32))
    return canvas


def unletterbox(prob, orig_h, orig_w, input_size=None):
    """(..., s, s) map over the letterboxed canvas -> (..., orig_h, orig_w), bilinear.

    The content box is found with letterbox_geometry at resolution s, which is exact for s equal to
    the input size. For a coarser map (the model's S/4 logits) pass input_size=S: the map is first
    upsampled to S (CRIS's protocol), so rounding matches the letterbox exactly."""
    lead, s = prob.shape[:-2], prob.shape[-1]
    x = prob.reshape(-1, 1, s, s).float()
    if input_size is not None and input_size != s:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
        s = input_size
    nh, nw, top, left = letterbox_geometry(orig_h, orig_w, s)
    x = x[..., top:top + nh, left:left + nw]
    x = F.interpolate(x, size=(orig_h, orig_w), mode="bilinear", align_corners=False)
    return x.reshape(*lead, orig_h, orig_w)


# ----------------------------------------------------------------------------- datasets

class _PhraseCutItems(Dataset):
    """Turns (task record, image bytes) into a training or evaluation item; subclasses read them."""

    ranks = None  # evaluate.frequency_ranks of name_att_rel_count.json, when the data has one
    said_cut = False  # a phrase longer than word_len was reported (once per process, for all datasets)

    def __init__(self, input_size=416, word_len=22, train=True):
        self.input_size, self.word_len, self.train = input_size, word_len, train
        self._last_image = None  # (name, size), letterboxed image, (H, W): see __getitem__

    def _read(self, index):
        raise NotImplementedError

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tasks")
        task, data = self._read(index)
        size = self.input_size
        name = f"images/{task['image_id']}.jpg"
        # An image's phrases are read one after another (ImageGroupedSampler, evaluation in task order), so
        # the last image decoded is kept: a DataLoader worker then decodes each image about once a batch.
        if self._last_image is None or self._last_image[0] != (name, size):
            img, (h, w) = open_image(data, name, fit=size)
            self._last_image = ((name, size), letterbox(img, size, orig_size=(h, w))[0], (h, w))
        _, image, (h, w) = self._last_image
        image = image.clone()  # each item its own tensor
        gt = polygons_to_mask(task["Polygons"], w, h)
        tokens = _tokens(task["phrase"], self.word_len).clone()
        if tokens[-1] and not _PhraseCutItems.said_cut:  # a full row: perhaps a cut phrase
            _PhraseCutItems.said_cut = warn_if_cut(task["phrase"], self.word_len, f"task {task['task_id']}: ",
                                                   " (said once per process: other long phrases are cut too)")
        item = {"image": image, "tokens": tokens, "mask": letterbox_mask(gt, size), "image_id": str(task["image_id"])}
        if not self.train:
            ps = task.get("phrase_structure") or {}
            info = task["image_info"]  # width, height, coco_id from image_data_split.json
            iw, ih = info["width"], info["height"]
            region = gt if gt.shape == (ih, iw) else polygons_to_mask(task["Polygons"], iw, ih)
            rel_area = int(region.sum()) / (iw * ih)  # the official relative size, exact in float64
            item.update(
                task_id=str(task["task_id"]), phrase=task["phrase"],
                orig_size=torch.tensor([h, w], dtype=torch.long), gt_mask=torch.from_numpy(gt.copy()),
                num_instances=len(task["instance_boxes"]), phrase_type=ps.get("type", "verbose"),
                subsets=evaluate.phrasecut_subsets(ps, len(task["instance_boxes"]), rel_area,
                                                   bool(info.get("coco_id")), self.ranks))
        return item


_READERS = {}  # (st_dev, st_ino) -> (owner, lmdb.Environment); py-lmdb allows one per file per process


def _reader(path):
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


class PhraseCutLMDB(_PhraseCutItems):
    """PhraseCut tasks from one split's LMDB made by build_lmdb.

    Items: image (3,S,S) float CLIP-normalised, tokens (L,) long, mask (1,S,S) float {0,1}, image_id
    (a string: images with several phrases recur, see ImageGroupedSampler). With
    train=False also: task_id, phrase, orig_size [H, W], gt_mask (H,W) uint8 at the original size,
    num_instances, phrase_type, subsets (names, evaluate.phrasecut_subsets; its size subsets divide
    the region's area by the image's as image_data_split.json records it).
    The LMDB is opened lazily per process (see _reader), so DataLoader workers (fork or spawn) each
    get their own; the length comes from the header record, whose format version is checked."""

    def __init__(self, path, input_size=416, word_len=22, train=True):
        super().__init__(input_size, word_len, train)
        self.path = str(path)
        with _reader(self.path).begin() as txn:
            raw = txn.get(b"__header__")
            self.header = _record(self.path, b"__header__", raw) if raw else {}
            found = (self.header.get("format"), self.header.get("version"))
            if found != (LMDB_FORMAT, LMDB_VERSION):
                raise ValueError(f"{self.path}: found LMDB format {found[0]!r} version {found[1]!r}, "
                                 f"expected {LMDB_FORMAT!r} version {LMDB_VERSION}; rebuild it with "
                                 f"`python data.py build`")
            n, counts = self.header.get("num_tasks"), self.header.get("name_att_rel_count")
            if type(n) is not int or n < 1 or "name_att_rel_count" not in self.header:
                raise ValueError(f"{self.path}: record __header__ is corrupt (num_tasks {n!r}); rebuild it")
            if txn.get(b"task/%08d" % (n - 1)) is None:
                raise ValueError(f"{self.path}: the header counts {n} tasks but record task/{n - 1:08d} is "
                                 "missing; rebuild it with `python data.py build`")
        self.num_tasks = n
        self.ranks = evaluate.frequency_ranks(counts) if counts is not None else None

    def __len__(self):
        return self.num_tasks

    def image_ids(self) -> list:
        """Each task's image_id as a string, in task order (read from every task record)."""
        with _reader(self.path).begin() as txn:
            keys = (b"task/%08d" % i for i in range(self.num_tasks))
            return [str(_record(self.path, k, txn.get(k))["image_id"]) for k in keys]

    def _read(self, index):
        key = b"task/%08d" % index
        with _reader(self.path).begin() as txn:
            task = _record(self.path, key, txn.get(key))
            data = txn.get(b"img/" + str(task["image_id"]).encode())
        if data is None:
            raise ValueError(f"{self.path}: record img/{task['image_id']} (for {key.decode()}) is missing")
        return task, data


def _record(path, key, raw):
    """An LMDB value decoded as a JSON object; a ValueError naming the file and the key otherwise."""
    try:
        record = json.loads(raw)  # TypeError when absent (None); ValueError when not UTF-8 JSON
        problem = None if isinstance(record, dict) else f"corrupt (a JSON {_JSON_TYPES.get(type(record))})"
    except (TypeError, ValueError) as err:
        problem = "missing" if raw is None else f"corrupt ({err})"
    if problem:
        raise ValueError(f"{path}: record {key.decode()} is {problem}; rebuild it with `python data.py build`")
    return record


class PhraseCutFolder(_PhraseCutItems):
    """The same items read straight from a PhraseCut directory (refer_<split>.json + images/)."""

    def __init__(self, root, split, input_size=416, word_len=22, train=True):
        super().__init__(input_size, word_len, train)
        self.root = Path(root)
        self.images = (self.root / "images").resolve()
        self.tasks = _load_tasks(self.root, split)
        self.infos = read_image_info(self.root)
        counts = read_counts(self.root)
        self.ranks = evaluate.frequency_ranks(counts) if counts is not None else None

    def __len__(self):
        return len(self.tasks)

    def _read(self, index):
        task = self.tasks[index]
        task = {**task, "image_info": _image_info(self.infos, task)}
        return task, image_path(self.images, task).read_bytes()


class ImageGroupedSampler(torch.utils.data.Sampler):
    """One rank's task indices for an epoch, with the phrases of each image next to one another.

    PhraseCut has about 4.5 phrases per image (the synthetic set 4-5). The images are shuffled
    (seed + epoch: the same order on every rank), their tasks are laid out image after image and
    cut into global batches of batch_size x world tasks, and rank r takes the r-th batch_size of
    each. A batch then holds a few images with several phrases each, and the training step runs
    the image encoder once per distinct image (`unique_images`, SegVLM's image_index) instead of
    once per phrase. What changes from shuffled tasks: the phrases of one image share a step (the
    target of one is a distractor of another), and BatchNorm sees fewer distinct images per step.
    A partial last global batch is dropped, as DistributedSampler(drop_last=True) does.
    """

    def __init__(self, image_ids, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        groups = {}  # image id -> its task indices, images in order of first appearance
        for index, key in enumerate(image_ids):
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.num_tasks, self.batch_size, self.rank, self.world = len(image_ids), batch_size, rank, world
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.num_tasks // (self.batch_size * self.world) * self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        tasks = [t for g in order.tolist() for t in self.groups[g]]
        step = self.batch_size * self.world
        for first in range(0, len(tasks) - step + 1, step):  # each whole global batch
            start = first + self.rank * self.batch_size
            yield from tasks[start:start + self.batch_size]


def unique_images(image: torch.Tensor, image_ids) -> tuple:
    """A batch's images (B, 3, S, S) and their B ids -> (distinct images (U, 3, S, S), index (B,)),
    distinct in order of first appearance, so that image[i] is distinct[index[i]]."""
    slot, keep, index = {}, [], []
    for i, key in enumerate(image_ids):
        if key not in slot:
            slot[key] = len(keep)
            keep.append(i)
        index.append(slot[key])
    return image[keep], torch.tensor(index)


def collate(batch):
    """List of items -> dict: equal-shape tensors stacked, numbers and bools made tensors,
    strings and gt_mask (its size varies with the image) kept as lists."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        first = values[0]
        if key == "gt_mask" or isinstance(first, str):
            out[key] = values
        elif isinstance(first, torch.Tensor) and all(v.shape == first.shape for v in values):
            out[key] = torch.stack(values)
        elif isinstance(first, (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


# ----------------------------------------------------------------------------- PhraseCut -> LMDB

TASK_FIELDS = ("task_id", "image_id", "phrase", "instance_boxes", "Polygons")
INPUT_FILES = ("image_data_split.json", "image_data_split3000.json", "name_att_rel_count.json",
               *(f"refer_{s}.json" for s in SPLITS))
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_json(path, expected=list):
    """A JSON file whose top level is `expected` (list or dict); errors name the file and the position."""
    try:
        with open(path, "rb") as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        early = err.msg.startswith("Unterminated") or err.pos >= len(err.doc.rstrip())
        raise ValueError(f"{path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
                         f"{'; the file ends early: truncated?' if early else ''}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not JSON text: {err.reason} at byte {err.start}") from None
    if not isinstance(content, expected):
        raise ValueError(f"{path}: the top level is a JSON {_JSON_TYPES.get(type(content))}, expected "
                         f"an {_JSON_TYPES[expected]}")
    return content


def _is_id(value):
    return type(value) is int or (type(value) is str and value != "")


def _is_point(p):  # [x, y], numbers within 10 million pixels (comparisons also refuse NaN and inf)
    return (type(p) is list and len(p) == 2 and type(p[0]) in (int, float) and type(p[1]) in (int, float)
            and -1e7 < p[0] < 1e7 and -1e7 < p[1] < 1e7)


def _check_task(task, file, index):
    """A refer record's fields, types and points, checked; a ValueError names the file, task and field."""
    if not isinstance(task, dict):
        raise ValueError(f"{file}: record #{index} is a JSON {_JSON_TYPES.get(type(task))}, expected an object")
    missing = [k for k in TASK_FIELDS if k not in task]
    if missing:
        raise ValueError(f"{file}: task {task.get('task_id', f'#{index}')!r} lacks fields {missing}")
    where = f"{file}: task {task['task_id']!r}"

    def fail(field, value, expected):
        raise ValueError(f"{where}: {field} is {_short(value)}, expected {expected}")
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
                 f"a JSON {_JSON_TYPES[expected]} or null")
    if not isinstance(task["Polygons"], list):
        fail("Polygons", task["Polygons"], "a list of instances, each a list of polygons of [x, y] points")
    for i, instance in enumerate(task["Polygons"]):
        if not isinstance(instance, list):
            fail(f"Polygons[{i}]", instance, "a list of polygons (an instance)")
        for j, polygon in enumerate(instance):
            if not isinstance(polygon, list):
                fail(f"Polygons[{i}][{j}]", polygon, "a list of [x, y] points")
            for k, point in enumerate(polygon):
                if not _is_point(point):
                    fail(f"Polygons[{i}][{j}][{k}]", point, "[x, y], two finite numbers (pixels)")


def _load_tasks(root, split):
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
    downloader gives it; image_data_split3000.json, its name on PhraseCut's drive, is accepted too)."""
    for name in ("image_data_split.json", "image_data_split3000.json"):
        path = Path(root) / name
        if path.is_file():
            infos = {}
            for i, d in enumerate(read_json(path, list)):
                if not (isinstance(d, dict) and _is_id(d.get("image_id"))
                        and all(type(d.get(k)) is int and d[k] > 0 for k in ("width", "height"))):
                    raise ValueError(f"{path}: record #{i} is {_short(d)}, expected an object with image_id, "
                                     "and width and height as positive integers")
                infos[str(d["image_id"])] = d
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
            raise ValueError(f"{path}: {key!r} is {_short(pairs)}, expected a list of [word, count] pairs")
    return {"cat": counts["cat"], "att": counts["att"]}


def image_path(images, task):
    """`images`/<image_id>.jpg resolved, for a task; `images` is the resolved images folder. A ValueError
    when it leads outside that folder: an image_id such as ../../x or /x, or a symlink that leaves it."""
    path = (images / f"{task['image_id']}.jpg").resolve()
    if not path.is_relative_to(images):
        raise ValueError(f"task {task['task_id']}: image_id {task['image_id']!r} leads outside {images}/ "
                         f"(to {path}); refused")
    return path


def _image_info(infos, task):
    """What the subsets need from the task's image record: width, height, coco_id."""
    info = infos.get(str(task["image_id"]))
    if info is None:
        raise ValueError(f"task {task['task_id']}: image {task['image_id']} is not in image_data_split.json")
    return {"width": info["width"], "height": info["height"], "coco_id": info.get("coco_id")}


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(path) as tmp:` write tmp, which becomes `path` when the block ends and is removed
    if it fails: a killed run never leaves half a file. tmp, .NAME.tmp-PID beside `path`, is on the same
    file system (an atomic rename) and never shared by two processes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed run that had our process id
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_out(root, out, split):
    """Refuse an `out` that is, or is inside, one of `root`'s inputs, or that exists and is not an LMDB
    written by build_lmdb (one that is gets replaced); called before any work."""
    target, images = out.resolve(), (root / "images").resolve()
    if target == root.resolve() or target.is_relative_to(images) or \
            target in {(root / name).resolve() for name in INPUT_FILES}:
        raise ValueError(f"--out {out} is one of --root's inputs ({target}); write the LMDB elsewhere")
    if target.is_dir():
        raise ValueError(f"--out {out} is a directory; give the LMDB file's name, e.g. {out / f'{split}.lmdb'}")
    if out.exists():
        try:
            if not out.is_file():
                raise ValueError("not a regular file")
            with _reader(out).begin() as txn:
                header = _record(out, b"__header__", txn.get(b"__header__"))
            if header.get("format") != LMDB_FORMAT:
                raise ValueError(f"its header's format is {header.get('format')!r}")
        except ValueError as err:
            raise ValueError(f"--out {out} exists and is not an LMDB written by `data.py build` ({err}); "
                             "delete it first if it should be replaced") from None


def build_lmdb(root, split, out, skip_missing=False, progress=True, commit_every=1000):
    """Convert one split of a PhraseCut directory to a single-file LMDB at `out`; returns stats.

    Layout (no pickle: JSON and raw bytes):
      b"__header__"     JSON {format, version, split, num_tasks, num_images, skipped_tasks, ...,
                        name_att_rel_count: read_counts(root), null without that file}
      b"img/<image_id>" the image file's own bytes, once per image
      b"task/<i:08d>"   JSON task record: PhraseCut's fields + width, height of the image file +
                        image_info {width, height, coco_id} from image_data_split.json
    Written under a temporary name and renamed when complete; on any error the temporary is removed.
    Checked first (errors name the file, task and field): `out` (_check_out), every task (_check_task),
    image paths (image_path), and each image's decode, with PIL's decompression-bomb limit; with
    skip_missing, missing, unreadable and too large images are skipped with their tasks and counted.
    Images whose size differs from image_data_split.json's are counted, with examples, in the header.
    """
    root, out = Path(root), Path(out)
    _check_out(root, out, split)
    tasks = _load_tasks(root, split)
    images, paths = (root / "images").resolve(), {}
    for task in tasks:
        if str(task["image_id"]) not in paths:
            paths[str(task["image_id"])] = image_path(images, task)
    refer_bytes = (root / f"refer_{split}.json").stat().st_size
    infos = read_image_info(root)
    image_info = {str(t["image_id"]): _image_info(infos, t) for t in tasks}
    counts = read_counts(root)
    image_ids = sorted(paths, key=str.encode)  # byte order: append
    out.parent.mkdir(parents=True, exist_ok=True)
    map_size = 2 * refer_bytes + (1 << 30)
    for path in paths.values():
        map_size += 2 * path.stat().st_size + 8192 if path.is_file() else 0
    with atomic_path(out) as tmp:
        env = lmdb.open(str(tmp), subdir=False, map_size=map_size, lock=False, meminit=False)
        try:
            sizes, bad, image_bytes, mismatches = {}, [], 0, []
            txn = env.begin(write=True)
            for k, image_id in enumerate(tqdm(image_ids, desc=f"images {split}", disable=not progress)):
                path = paths[image_id]
                try:
                    if not path.is_file():
                        raise FileNotFoundError(f"image {path} is missing (--skip-missing converts without it)")
                    data = path.read_bytes()
                    with warnings.catch_warnings():  # over PIL's limit is an error, as in predict.open_image
                        warnings.simplefilter("error", Image.DecompressionBombWarning)
                        _, (h, w) = open_image(data, str(path), fit=64)  # a full (if reduced) decode checks it
                except (OSError, ValueError):
                    if not skip_missing:
                        raise
                    bad.append(image_id)
                    continue
                txn.put(b"img/" + image_id.encode(), data, append=True)
                sizes[image_id], image_bytes = (w, h), image_bytes + len(data)
                listed = (image_info[image_id]["width"], image_info[image_id]["height"])
                if listed != (w, h):
                    mismatches.append(f"{image_id}: file {w}x{h}, listed {listed[0]}x{listed[1]}")
                if (k + 1) % commit_every == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            n = 0
            for task in tasks:
                image_id = str(task["image_id"])
                if image_id not in sizes:
                    continue
                w, h = sizes[image_id]
                record = json.dumps({**task, "width": w, "height": h, "image_info": image_info[image_id]},
                                    separators=(",", ":"))
                txn.put(b"task/%08d" % n, record.encode(), append=True)
                n += 1
                if n % (20 * commit_every) == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            if n == 0:
                raise ValueError(f"no tasks left in {split} after skipping {len(bad)} images")
            header = {"format": LMDB_FORMAT, "version": LMDB_VERSION, "split": split,
                      "num_tasks": n, "num_images": len(sizes), "skipped_tasks": len(tasks) - n,
                      "skipped_images": len(bad), "skipped_image_ids": bad[:20],
                      "size_mismatches": len(mismatches), "size_mismatch_examples": mismatches[:20],
                      "source": str(root.resolve()), "name_att_rel_count": counts}
            txn.put(b"__header__", json.dumps(header).encode())
            txn.commit()
            env.sync(True)
        finally:
            env.close()
    lmdb_bytes = os.path.getsize(out)
    return {**header, "lmdb_bytes": lmdb_bytes, "image_bytes": image_bytes,
            "annotation_bytes": refer_bytes, "ratio": lmdb_bytes / (image_bytes + refer_bytes)}


# ----------------------------------------------------------------------------- synthetic PhraseCut

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
           "yellow": (235, 205, 45), "purple": (145, 60, 195), "white": (245, 245, 245)}
# Shape radius as a fraction of the image's longer side. At the demo's 192 px a small shape's radius
# is 23 px, about one and a half cells of the model's stride-16 grid; smaller shapes (0.08) made the
# 10-minute demo mostly a test of boundary resolution rather than of grounding.
SIZES = {"small": 0.12, "large": 0.21}
SYNTH_VERSION = 3  # bump when the generator's output changes: it names the cache directory
RELATIONS = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}


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


def _phrases(shapes, width, height):
    """Candidate (phrase, phrase_structure, referred shape indices); every phrase refers to exactly
    its shapes. Name/attribute phrases are minimal: dropping any word would refer to more shapes,
    so a distractor (same kind in another colour, same colour in another kind, ...) makes each
    word necessary. Relation phrases disambiguate a kind that occurs 2+ times, with a clear margin."""
    def match(size, colour, kind):
        return frozenset(i for i, s in enumerate(shapes) if size in (None, s["size"])
                         and colour in (None, s["colour"]) and kind in (None, s["kind"]))
    descs = {}  # (size, colour, kind) -> referred shapes, every description that refers to some
    for size in (None, *SIZES):
        for colour in (None, *COLOURS):
            for kind in (None, *SHAPES):
                ids = match(size, colour, kind)
                if ids and (size, colour, kind) != (None, None, None):
                    descs[(size, colour, kind)] = ids
    cands = []
    for (size, colour, kind), ids in descs.items():
        drops = [(None, colour, kind) if size else None, (size, None, kind) if colour else None,
                 (size, colour, None) if kind else None]
        if all(match(*d) != ids for d in drops if d and any(d)):  # any(d): not the empty phrase
            text, noun, atts = _describe(size, colour, kind, len(ids))
            cands.append((text, {"name": noun, "attributes": atts, "relation_ids": [],
                                 "relation_descriptions": [], "type": "attribute" if atts else "name"}, ids))
    margin = 0.1 * max(width, height)
    objects = [(d, next(iter(ids))) for d, ids in descs.items() if len(ids) == 1 and d[2] and not d[0]]
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


def synthesize(out_dir, num_images=200, seed=0, size=160, progress=False, aspect=0.75):
    """Write a synthetic referring dataset in PhraseCut's layout under out_dir; same seed, same bytes.

    Each image (longer side `size`, the shorter `aspect` times it: 4:3 by default, landscape or
    portrait; aspect 1 makes square images) holds 3-8 shapes of 6 kinds, 6 colours
    and 2 sizes; about 4-5 phrases per image of each PhraseCut type (name, attribute, relation), for
    one shape or several ("all green shapes"). Splits by image: 10 % validation (at least 2), of which
    a fifth is miniv, 10 % test, the rest train; each image's tasks are in the refer file of its split
    only. image_data_split.json has the real file's fields (url empty and coco_id, flickr_id null: the
    images are neither online nor from COCO or Flickr); name_att_rel_count.json counts all splits.
    out_dir must be new or an empty folder; the JSON files, written last, are each whole or absent."""
    if num_images < 4:
        raise ValueError("synthesize needs at least 4 images (train, val, miniv and test)")
    if not 0.5 <= aspect <= 1:
        raise ValueError(f"aspect must be between 0.5 and 1 (shorter side / longer side), got {aspect}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new one or delete it first")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
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
    counts = count_words([t for s in SPLITS for t in refer[s]])
    for name, obj in ([("image_data_split", images), ("name_att_rel_count", counts)]
                      + [(f"refer_{s}", refer[s]) for s in SPLITS]):
        with atomic_path(out / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(obj, separators=(",", ":")))
    return out


def ensure_synthetic(cache_dir, num_images=DEMO_NUM_IMAGES, seed=0, size=160, progress=False, aspect=0.75):
    """Make (once) and return a directory with train.lmdb, val.lmdb, test.lmdb and the raw
    synthetic PhraseCut under VGPhraseCut_v0/. Built in a temporary directory and renamed when
    finished, so a half-made cache is never taken for a finished one; if two processes race, the
    first rename wins and the other discards its copy."""
    cache_dir = Path(cache_dir)
    shape = f"px{size}" if aspect == 0.75 else f"px{size}x{round(size * aspect)}"
    final = cache_dir / f"synthetic_n{num_images}_seed{seed}_{shape}_gen{SYNTH_VERSION}_lmdb{LMDB_VERSION}"
    if (final / "COMPLETE").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        synthesize(tmp / "VGPhraseCut_v0", num_images, seed, size, progress=progress, aspect=aspect)
        for split in ("train", "val", "test"):
            build_lmdb(tmp / "VGPhraseCut_v0", split, tmp / f"{split}.lmdb", progress=progress)
        (tmp / "COMPLETE").write_text(json.dumps({"num_images": num_images, "seed": seed, "size": size,
                                                  "aspect": aspect}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "COMPLETE").is_file():
                raise RuntimeError(f"{final} exists but is incomplete; remove it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- benchmark and CLI

def _rate(dataset, n):
    for i in range(min(5, len(dataset))):  # warm up: page cache, tokenizer cache
        dataset[i]
    start = time.perf_counter()
    for i in range(n):
        dataset[i % len(dataset)]
    return n / (time.perf_counter() - start)


def bench(path, root=None, n=300, input_size=416):
    """Samples/s for one process producing training samples, from the LMDB and from the folder."""
    torch.set_num_threads(1)
    ds = PhraseCutLMDB(path, input_size=input_size)
    rates = {"lmdb": _rate(ds, n)}
    root = Path(root or ds.header["source"])
    if (root / f"refer_{ds.header['split']}.json").is_file():
        rates["folder"] = _rate(PhraseCutFolder(root, ds.header["split"], input_size), n)
    return rates


def _positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv=None):
    """The CLI; a user mistake (a bad flag, file or record) prints `data.py: error: ...` and exits 2."""
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a synthetic PhraseCut")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--images", type=_positive, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_positive, default=160, help="longer image side in pixels")
    p.add_argument("--aspect", type=float, default=0.75,
                   help="shorter side / longer side, 0.5 to 1 (default 0.75: 4:3; 1: square)")
    p = sub.add_parser("build", help="convert one split to LMDB")
    p.add_argument("--root", required=True)
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--out", required=True, help="the LMDB file: new, or one this tool wrote (replaced)")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip tasks whose image is missing, unreadable or over PIL's decompression-bomb limit")
    p = sub.add_parser("bench", help="samples/s at the input size")
    p.add_argument("path")
    p.add_argument("--root", default=None, help="PhraseCut directory (default: the one it was built from)")
    p.add_argument("--n", type=_positive, default=300)
    p.add_argument("--input-size", type=_positive, default=416)
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            out = synthesize(args.out, args.images, args.seed, args.size, progress=True, aspect=args.aspect)
            print(f"wrote {args.images} images to {out}")
        elif args.command == "build":
            s = build_lmdb(args.root, args.split, args.out, skip_missing=args.skip_missing)
            print(f"{args.out}: {s['num_tasks']} tasks, {s['num_images']} images; skipped {s['skipped_tasks']} "
                  f"tasks ({s['skipped_images']} missing, unreadable or too large images"
                  f"{', e.g. ' + ', '.join(s['skipped_image_ids'][:5]) if s['skipped_images'] else ''})")
            if s["size_mismatches"]:
                print(f"warning: {s['size_mismatches']} images differ in size from image_data_split.json (masks "
                      f"use the file's size, the size subsets the listed one), e.g. "
                      f"{'; '.join(s['size_mismatch_examples'][:5])}")
            print(f"size {s['lmdb_bytes']:,} bytes = {s['ratio']:.3f} x (images {s['image_bytes']:,} + "
                  f"annotations {s['annotation_bytes']:,})")
        else:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
            rates = bench(args.path, args.root, args.n, args.input_size)
            for source, rate in rates.items():
                print(f"{source:>6}: {rate:.1f} samples/s (1 process, {args.input_size}x{args.input_size})")
    except (ValueError, OSError, lmdb.Error) as err:
        parser.exit(2, f"data.py: error: {err}\n")


if __name__ == "__main__":
    main()
