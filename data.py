"""The data a model learns from: (task record, image bytes) -> a training or evaluation item, and batches.

    PhraseCutLMDB(path)               a split's LMDB (sources/lmdb_store.py), what train.py and evaluate.py read
    PhraseCutFolder(root, split)      the same items straight from a PhraseCut directory
    MixedTasks([lmdb, ...])           several sources' training tasks as one (train.py --data A B ...)
    ImageGroupedSampler, collate      batches that hold each image's phrases together

An item is the letterboxed, CLIP-normalised image (3, S, S), the phrase's CLIP tokens (word_len), and
the ground-truth mask twice: letterboxed at the model's output size S/4 for the loss (eq. 4-8), and at
the image's original size for the metrics (evaluate.py). Eval items also carry `subsets`, the task's
official subsets (phrasecut_subsets) or, for COCO and VOC, its instance count and category; and
`ignore_mask`, the pixels left out of the score (VOC's void) or None. Every item carries `no_target`:
true for a phrase that names nothing in its image (gRefCOCO's ann_id [-1], synth's no-target phrases).

Every source is first converted to one LMDB format, from the command line:

    python data.py synth --out data/synth --images 1600 --seed 0 --size 192 --aspect 1
    python data.py build --root data/synth --split train --out data/train.lmdb
    python data.py build --root VGPhraseCut_v0 --split val --out val.lmdb --skip-missing
    python data.py build --source refcoco --root refer/data --dataset refcoco --split-by unc --split val \
        --out refcoco/val.lmdb
    python data.py build --source grefcoco --root R --split val --out grefcoco/val.lmdb
    python data.py build --source coco --annotations instances_val2017.json --images val2017/ --out coco.lmdb
    python data.py build --source voc --root VOCdevkit/VOC2012 --split val --out voc_val.lmdb
    python data.py bench data/train.lmdb            # samples/s from the LMDB and from the folder

The converters live in sources/ (one file per source, and sources/lmdb_store.py, the format they all write);
docs/data.md says how to prepare each dataset.
"""
import bisect
import os
import time
from pathlib import Path

import lmdb
import torch
from torch.utils.data import ConcatDataset, Dataset

from helpers.cli import run_tool
from helpers.transforms import cached_tokens, decode_image, letterbox, letterbox_mask, polygons_to_mask, warn_if_cut
from sources import phrasecut
from sources.build import make_parser, run
from sources.lmdb_store import read_header, read_record, reader, task_masks
from sources.phrasecut import (
    frequency_ranks,
    image_info_of,
    image_path,
    load_tasks,
    phrasecut_subsets,
    read_counts,
    read_image_info,
)

INSTANCE_SUBSETS = ("i_single", "i_multi", "i_many")  # by the number of instance boxes (phrasecut_subsets)


class _PhraseCutItems(Dataset):
    """Turns (task record, image bytes) into a training or evaluation item; subclasses read them."""

    ranks = None  # frequency_ranks of name_att_rel_count.json, when the data has one
    dataset = "phrasecut"  # the LMDB header's "dataset": phrasecut, refcoco, coco or voc
    category_names = None  # COCO's or VOC's categories, for per-category scores; None elsewhere
    said_cut = False  # a phrase longer than word_len was reported (once per process, for all datasets)

    def __init__(self, input_size=416, word_len=22, train=True):
        self.input_size, self.word_len, self.train = input_size, word_len, train
        self._last_image = None  # (name, size), letterboxed image, (H, W): see __getitem__

    def _read(self, index):
        raise NotImplementedError

    @property
    def subset_names(self) -> list:
        """The subsets evaluation reports for this data, in order: PhraseCut's (phrasecut.subset_names),
        the instance-count ones for COCO's categories, none for RefCOCO/+/g and VOC."""
        if self.dataset == "phrasecut":
            return phrasecut.subset_names(self.ranks is not None)
        return list(INSTANCE_SUBSETS) if self.dataset == "coco" else []

    @property
    def subset_note(self):
        """Why some subsets are missing, or None."""
        return None if self.ranks is not None or self.dataset != "phrasecut" else phrasecut.NO_RANKS_NOTE

    def _subsets(self, task, gt):
        """The task's subset names (and its category, for COCO and VOC)."""
        if self.dataset != "phrasecut":
            n = len(task.get("instance_boxes", []))  # PhraseCut's rule: 1, 2 to 4, 5 or more
            names = [INSTANCE_SUBSETS[0 if n == 1 else 1 if n <= 4 else 2]] if self.dataset == "coco" and n else []
            return names + ([task["category"]] if "category" in task else [])
        ps = task.get("phrase_structure") or {}
        info = task["image_info"]  # width, height, coco_id from image_data_split.json
        iw, ih, (h, w) = info["width"], info["height"], gt.shape
        if gt.shape == (ih, iw) or iw * ih > 4 * w * h:  # an absurd listing (old files) allocates nothing
            region = gt
        else:
            region = polygons_to_mask(task["Polygons"], iw, ih)
        rel_area = int(region.sum()) / region.size  # the official relative size, exact in float64
        return phrasecut_subsets(ps, len(task["instance_boxes"]), rel_area, bool(info.get("coco_id")), self.ranks)

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tasks")
        task, data = self._read(index)
        size = self.input_size
        name = f"images/{task['image_id']}{'.jpg' if self.dataset == 'phrasecut' else ''}"
        # An image's phrases are read one after another (ImageGroupedSampler, evaluation in task order), so
        # the last image decoded is kept: a DataLoader worker then decodes each image about once a batch.
        if self._last_image is None or self._last_image[0] != (name, size):
            img, (h, w) = decode_image(data, name, fit=size)
            self._last_image = ((name, size), letterbox(img, size, orig_size=(h, w))[0], (h, w))
        _, image, (h, w) = self._last_image
        image = image.clone()  # each item its own tensor
        gt, ignore = task_masks({**task, "width": w, "height": h})
        tokens = cached_tokens(task["phrase"], self.word_len).clone()
        if tokens[-1] and not _PhraseCutItems.said_cut:  # a full row: perhaps a cut phrase
            _PhraseCutItems.said_cut = warn_if_cut(task["phrase"], self.word_len, f"task {task['task_id']}: ",
                                                   " (said once per process: other long phrases are cut too)")
        item = {"image": image, "tokens": tokens, "mask": letterbox_mask(gt, size), "image_id": str(task["image_id"]),
                "no_target": bool(task.get("no_target", False))}  # absent (older files, most sources): false
        if not self.train:
            ps = task.get("phrase_structure") or {}
            item.update(
                task_id=str(task["task_id"]), phrase=task["phrase"],
                orig_size=torch.tensor([h, w], dtype=torch.long), gt_mask=torch.from_numpy(gt.copy()),
                ignore_mask=None if ignore is None else torch.from_numpy(ignore),
                num_instances=len(task.get("instance_boxes", [])), phrase_type=ps.get("type", "verbose"),
                subsets=self._subsets(task, gt))
        return item


class PhraseCutLMDB(_PhraseCutItems):
    """Tasks from one split's LMDB, any source (phrasecut, refcoco, coco, voc: lmdb_store's format).

    Items: image (3,S,S) float CLIP-normalised, tokens (L,) long, mask (1,S,S) float {0,1}, image_id
    (a string: images with several phrases recur, see ImageGroupedSampler). With
    train=False also: task_id, phrase, orig_size [H, W], gt_mask (H,W) uint8 at the original size,
    ignore_mask (H,W) bool (VOC's void pixels, left out of the score) or None, num_instances,
    phrase_type, subsets (names: phrasecut_subsets for PhraseCut, whose size subsets divide the
    region's area by the image's as image_data_split.json records it; i_single/i_multi/i_many and the
    category for COCO; the category for VOC).
    The LMDB is opened lazily per process (see reader), so DataLoader workers (fork or spawn) each
    get their own; the length comes from the header record, checked against the records (read_header)."""

    def __init__(self, path, input_size=416, word_len=22, train=True):
        super().__init__(input_size, word_len, train)
        self.path = str(path)
        self.header = read_header(self.path)
        self.num_tasks = self.header["num_tasks"]
        self.dataset = self.header["dataset"]
        counts = self.header.get("name_att_rel_count")
        self.ranks = frequency_ranks(counts) if counts is not None else None
        self.category_names = self.header.get("categories")

    def __len__(self):
        return self.num_tasks

    def targets(self, index):
        """What scoring a saved mask needs, without decoding the image: (task_id, gt (H, W) uint8,
        ignore (H, W) bool or None, subset names), at the image file's size."""
        task, _ = self._read(index, image=False)
        gt, ignore = task_masks(task)
        return str(task["task_id"]), gt, ignore, self._subsets(task, gt)

    def image_ids(self) -> list:
        """Each task's image_id as a string, in task order (read from every task record)."""
        return self._field("image_id")

    def task_ids(self) -> list:
        """Each task's task_id as a string, in task order."""
        return self._field("task_id")

    def no_target_flags(self) -> list:
        """Each task's no_target flag (a phrase that names nothing), in task order; absent reads as False."""
        return self._field("no_target", bool, default=False)

    def no_target_kinds(self) -> list:
        """Each task's kind of no-target phrase where the data names it (synthetic: pair, shape, relation), else ""."""
        return self._field("no_target_kind", str, default="")

    def _field(self, name, convert=str, default=None):
        with reader(self.path).begin() as txn:
            keys = (b"task/%08d" % i for i in range(self.num_tasks))
            records = (read_record(self.path, k, txn.get(k)) for k in keys)
            return [convert(r[name] if default is None else r.get(name, default)) for r in records]

    def _read(self, index, image=True):
        key = b"task/%08d" % index
        with reader(self.path).begin() as txn:
            task = read_record(self.path, key, txn.get(key))
            data = txn.get(b"img/" + str(task["image_id"]).encode()) if image else b""
        if data is None:
            raise ValueError(f"{self.path}: record img/{task['image_id']} (for {key.decode()}) is missing")
        return task, data


class PhraseCutFolder(_PhraseCutItems):
    """The same items read straight from a PhraseCut directory (refer_<split>.json + images/)."""

    def __init__(self, root, split, input_size=416, word_len=22, train=True):
        super().__init__(input_size, word_len, train)
        self.root = Path(root)
        self.images = (self.root / "images").resolve()
        self.tasks = load_tasks(self.root, split)
        self.infos = read_image_info(self.root)
        counts = read_counts(self.root)
        self.ranks = frequency_ranks(counts) if counts is not None else None

    def __len__(self):
        return len(self.tasks)

    def _read(self, index):
        task = self.tasks[index]
        task = {**task, "image_info": image_info_of(self.infos, task)}
        return task, image_path(self.images, task).read_bytes()


class MixedTasks(ConcatDataset):
    """The training tasks of several LMDBs as one dataset (train.py --data DIR MORE...), e.g. gRefCOCO's with
    RefCOCO's, as ReLA trains.

    The sampling rule: every task of every source once per epoch, all shuffled together (DistributedSampler
    over the union; with group_by_image, ImageGroupedSampler shuffles the images of all sources together). A
    source's share of the steps is its share of the tasks; no source is repeated or cut to balance them.
    Image ids carry their source's position ("1/42"), so that two sources' images with the same id stay
    apart (unique_images encodes an id once per batch)."""

    def __init__(self, datasets):
        super().__init__(datasets)
        self.paths = [d.path for d in datasets]

    @property
    def header(self) -> dict:
        """What a checkpoint records of the data it was trained on (helpers/provenance.run_record): the first
        source's header, the tasks and images of all of them summed, and every source's dataset in `mixed`."""
        headers = [d.header for d in self.datasets]
        return {**headers[0], "num_tasks": sum(int(h.get("num_tasks", 0)) for h in headers),
                "num_images": sum(int(h.get("num_images", 0)) for h in headers),
                "mixed": [str(h.get("dataset", "unknown")) for h in headers]}

    def image_ids(self) -> list:
        return [f"{k}/{i}" for k, d in enumerate(self.datasets) for i in d.image_ids()]

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        k = bisect.bisect_right(self.cumulative_sizes, index)
        item = super().__getitem__(index)
        return {**item, "image_id": f"{k}/{item['image_id']}"}


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
        if key in ("gt_mask", "ignore_mask") or isinstance(first, str):
            out[key] = values
        elif isinstance(first, torch.Tensor) and all(v.shape == first.shape for v in values):
            out[key] = torch.stack(values)
        elif isinstance(first, (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


# The command line: bench is here (it reads the datasets above); synth and build are sources/build.py's.

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


def main(argv=None):
    """The CLI; a user mistake (a bad flag, file or record) prints `data.py: error: ...` and exits 2."""
    parser = make_parser("data.py", __doc__)
    args = parser.parse_args(argv)
    try:
        if args.command != "bench":
            return run(args, parser)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
        for source, rate in bench(args.path, args.root, args.n, args.input_size).items():
            print(f"{source:>6}: {rate:.1f} samples/s (1 process, {args.input_size}x{args.input_size})")
    except (ValueError, OSError, lmdb.Error) as err:
        parser.exit(2, f"data.py: error: {err}\n")


if __name__ == "__main__":
    run_tool("data.py", main)
