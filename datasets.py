"""The datasets: (task record, image bytes) -> training or evaluation item, and the batches.

    PhraseCutLMDB(path)               a split's LMDB (lmdb_store), what train.py and evaluate.py read
    PhraseCutFolder(root, split)      the same items straight from a PhraseCut directory
    ImageGroupedSampler, collate      batches that hold each image's phrases together

Eval items carry `subsets`, the task's official subsets (phrasecut_subsets).
"""
from pathlib import Path

import torch
from torch.utils.data import Dataset

import phrasecut
from lmdb_store import LMDB_FORMAT, LMDB_VERSION, read_record, reader
from phrasecut import _image_info, frequency_ranks, image_path, load_tasks, phrasecut_subsets, read_counts, \
    read_image_info
from transforms import _tokens, decode_image, letterbox, letterbox_mask, polygons_to_mask, warn_if_cut

class _PhraseCutItems(Dataset):
    """Turns (task record, image bytes) into a training or evaluation item; subclasses read them."""

    ranks = None  # frequency_ranks of name_att_rel_count.json, when the data has one
    said_cut = False  # a phrase longer than word_len was reported (once per process, for all datasets)

    def __init__(self, input_size=416, word_len=22, train=True):
        self.input_size, self.word_len, self.train = input_size, word_len, train
        self._last_image = None  # (name, size), letterboxed image, (H, W): see __getitem__

    def _read(self, index):
        raise NotImplementedError

    @property
    def subset_names(self) -> list:
        """The subsets evaluation reports for this data, in order (phrasecut.subset_names)."""
        return phrasecut.subset_names(self.ranks is not None)

    @property
    def subset_note(self):
        """Why some subsets are missing, or None."""
        return None if self.ranks is not None else phrasecut.NO_RANKS_NOTE

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
            img, (h, w) = decode_image(data, name, fit=size)
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
                subsets=phrasecut_subsets(ps, len(task["instance_boxes"]), rel_area,
                                                   bool(info.get("coco_id")), self.ranks))
        return item



class PhraseCutLMDB(_PhraseCutItems):
    """PhraseCut tasks from one split's LMDB made by build_lmdb.

    Items: image (3,S,S) float CLIP-normalised, tokens (L,) long, mask (1,S,S) float {0,1}, image_id
    (a string: images with several phrases recur, see ImageGroupedSampler). With
    train=False also: task_id, phrase, orig_size [H, W], gt_mask (H,W) uint8 at the original size,
    num_instances, phrase_type, subsets (names, phrasecut_subsets; its size subsets divide
    the region's area by the image's as image_data_split.json records it).
    The LMDB is opened lazily per process (see reader), so DataLoader workers (fork or spawn) each
    get their own; the length comes from the header record, whose format version is checked."""

    def __init__(self, path, input_size=416, word_len=22, train=True):
        super().__init__(input_size, word_len, train)
        self.path = str(path)
        with reader(self.path).begin() as txn:
            raw = txn.get(b"__header__")
            self.header = read_record(self.path, b"__header__", raw) if raw else {}
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
        self.ranks = frequency_ranks(counts) if counts is not None else None

    def __len__(self):
        return self.num_tasks

    def image_ids(self) -> list:
        """Each task's image_id as a string, in task order (read from every task record)."""
        return self._each("image_id")

    def task_ids(self) -> list:
        """Each task's task_id as a string, in task order (read from every task record)."""
        return self._each("task_id")

    def _each(self, field) -> list:
        with reader(self.path).begin() as txn:
            keys = (b"task/%08d" % i for i in range(self.num_tasks))
            return [str(read_record(self.path, k, txn.get(k))[field]) for k in keys]

    def _read(self, index):
        key = b"task/%08d" % index
        with reader(self.path).begin() as txn:
            task = read_record(self.path, key, txn.get(key))
            data = txn.get(b"img/" + str(task["image_id"]).encode())
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
