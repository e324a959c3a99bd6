"""Evaluate a SegVLM checkpoint on PhraseCut with the official evaluator's definitions.

Run (one process, or one process per GPU with torchrun; the numbers are identical):

    python evaluate.py --ckpt runs/paper/best.pth                  # <data_dir>/test.lmdb of that run
    python evaluate.py --ckpt best.pth --data data/val.lmdb --json val.json
    python evaluate.py --ckpt best_model.pth --data lmdb/test.lmdb # CRIS's released weights (cris.py)
    python evaluate.py --ckpt best.pth --save-masks preds/ --vis vis/ --num 16
    torchrun --standalone --nproc_per_node=4 evaluate.py --ckpt best.pth --json test.json

Metrics (PhraseCut's official evaluator). Every task is scored at the
*original* image size: the (B, 1, S/4, S/4) logits go through a sigmoid, are
upsampled and cropped out of the letterbox by `data.unletterbox`, then
thresholded. Per task I = |G and P|, U = |G or P|, IoU = 0 when I == 0 else I / U.

- mIoU      mean of the per-task IoU (the paper's Table 1 "mean IoU")
- oIoU      cumulative ("overall") IoU, sum(I) / sum(U)
- prec@k    fraction of tasks with IoU strictly greater than k, k in 0.5 ... 0.9

The same metrics for each of PhraseCut's subsets (`phrasecut_subsets`); the paper's
Table 1 reports the overall mean IoU and Prec@k only. Every number is a fraction
in [0, 1]; the printed table shows percentages.

Threshold: 0.35 on the sigmoid, CRIS's value (its test script thresholds the
upsampled probability at 0.35). A mask head trained with BCE/RAF on sparse
foreground is slightly under-confident, so a cut below 0.5 recovers thin parts;
`--threshold` changes it, and the JSON does not depend on anything else.

Under torchrun every rank scores the tasks rank, rank + W, rank + 2W, ...
(no padding, so no task counts twice), the per-task (I, U, subsets) are
gathered with all_gather_object and the metrics are computed once from the
full list in dataset order: the result is exactly that of one process.

On CUDA the forward passes go through CUDA graphs (predict.FastSegVLM; --no-fast
runs the model eagerly): the same numbers, launched faster. Timing is
benchmark.py's job.

The CLI checks --device and its outputs (--json, --save-masks, --vis: writable, not the
checkpoint or the data) before loading anything, so a mistake fails at once, not after the run.
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import distributed

DEFAULT_THRESHOLD = 0.35  # CRIS's cut on the sigmoid; see the module docstring
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_KEYS = ("mIoU", "oIoU") + tuple(f"prec@{k}" for k in PREC_THRESHOLDS) + ("n",)

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


def parse_threshold(text) -> float:
    """A --threshold value (argparse type of evaluate.py, predict.py and train.py): strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def parse_device(text) -> torch.device:
    """A --device value (argparse type of evaluate.py and predict.py): cpu, cuda, cuda:N or mps, present here.

    Checked when the flags are parsed, so a wrong device fails before anything is loaded."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no usable CUDA GPU "
                                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS (Apple GPU) is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def same_file(a, b) -> bool:
    """Whether paths a and b name one file: equal once resolved (symlinks, '..') or hard links to one file."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def make_dir(path, what):
    """mkdir -p `path` for the output `what` (e.g. "--save-masks"); a ValueError naming both when impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a directory; name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what}: cannot create the directory {path} ({e.strerror}: {e.filename})") from None
    return path


# --------------------------------------------------------------------------- metrics

def task_iou(pred, gt):
    """Intersection and union of one task's binary masks, as Python ints.

    pred, gt: (H, W) bool (or 0/1) numpy arrays or torch tensors of the same
    shape, at the original image size. Returns (I, U) = (|G and P|, |G or P|).
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool().to(torch.as_tensor(pred).device)
        return int((pred & gt).sum()), int((pred | gt).sum())
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def iou(intersection, union):
    """The official per-task IoU: 0 when the intersection is empty (so also when U == 0)."""
    return 0.0 if intersection == 0 else intersection / union


def mean_iou(intersections, unions):
    """Mean of the per-task IoU. fsum makes it independent of the order of the tasks."""
    return math.fsum(iou(i, u) for i, u in zip(intersections, unions)) / len(intersections)


def cumulative_iou(intersections, unions):
    """sum(I) / sum(U) over all tasks, in exact integer sums; 0 when every union is empty."""
    total_u = sum(int(u) for u in unions)
    return 0.0 if total_u == 0 else sum(int(i) for i in intersections) / total_u


def precision_at(intersections, unions, k):
    """Fraction of tasks whose IoU is strictly greater than k (IoU == 0.5 is not a hit at 0.5)."""
    return sum(iou(i, u) > k for i, u in zip(intersections, unions)) / len(intersections)


def summarize(intersections, unions):
    """The metric dict of one set of tasks: {"mIoU", "oIoU", "prec@0.5" ... "prec@0.9", "n"}.

    Fractions in [0, 1]. An empty set gives n = 0 and None for every metric
    (JSON null), so a subset always has the same keys.
    """
    if len(intersections) != len(unions):
        raise ValueError("intersections and unions differ in length")
    n = len(intersections)
    if n == 0:
        return {**{key: None for key in METRIC_KEYS}, "n": 0}
    out = {"mIoU": mean_iou(intersections, unions), "oIoU": cumulative_iou(intersections, unions)}
    for k in PREC_THRESHOLDS:
        out[f"prec@{k}"] = precision_at(intersections, unions, k)
    out["n"] = n
    return out


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


def summarize_tasks(tasks, ranked=True):
    """The JSON layout from per-task records [(I, U, subset names), ...].

    Returns {metric keys of `summarize` for all tasks, "subsets": {name: same keys}}. Every name in
    SUBSETS is present, empty ones with n = 0, except with ranked=False (no name_att_rel_count.json):
    then the c* and a* subsets are left out and "note" says so.
    """
    result = summarize([t[0] for t in tasks], [t[1] for t in tasks])
    result["subsets"] = {}
    for name in SUBSETS:
        if ranked or name not in RANK_SUBSETS:
            members = [t for t in tasks if name in t[2]]
            result["subsets"][name] = summarize([t[0] for t in members], [t[1] for t in members])
    if not ranked:
        result["note"] = NO_RANKS_NOTE
    return result


def format_table(result):
    """The metrics as a text table in percent, one row for all tasks and one per subset."""
    header = f"{'subset':<10} {'n':>7} {'mIoU':>7} {'oIoU':>7}" + "".join(f" {'P@' + str(k):>7}" for k in PREC_THRESHOLDS)
    rows = [header, "-" * len(header)]
    for name, m in [("all", result)] + list(result.get("subsets", {}).items()):
        cells = [m["mIoU"], m["oIoU"]] + [m[f"prec@{k}"] for k in PREC_THRESHOLDS]
        rows.append(f"{name:<10} {m['n']:>7d}" + "".join(f" {'-' if v is None else f'{100 * v:.2f}':>7}" for v in cells))
    if result.get("note"):
        rows.append(f"note: {result['note']}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- masks on disk

_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def mask_path(out_dir, task_id):
    """out_dir / f"{task_id}.png", refusing any task id that could leave out_dir.

    Allowed: letters, digits, '_', '-', '.', not starting with '.', no '..',
    at most 200 characters (PhraseCut ids look like "2412359__1373393").
    Anything else (path separators, '..', absolute paths, NUL, empty) is a ValueError.
    """
    if not isinstance(task_id, str) or len(task_id) > 200 or ".." in task_id \
            or not _SAFE_TASK_ID.fullmatch(task_id):
        raise ValueError(f"unsafe task id for a file name: {task_id!r} (allowed: letters, digits, '_', '-', "
                         "'.', no leading '.', no '..')")
    out_dir = Path(out_dir)
    path = out_dir / f"{task_id}.png"
    if path.resolve().parent != out_dir.resolve():  # belt and braces against symlink tricks in the name
        raise ValueError(f"task id {task_id!r} resolves outside {out_dir}")
    return path


def image_format(path):
    """PIL's format for the file name `path` ("a.png" -> "PNG"); a ValueError naming it when PIL cannot write that."""
    from PIL import Image
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: not an image file name PIL can write (extension {Path(path).suffix or 'missing'});"
                         " use e.g. .png")
    return fmt


def save_mask(mask, path):
    """Write one (H, W) bool mask (numpy or torch) as a PNG, mode L, 0/255 (the official evaluator's input).

    Another extension PIL writes gives that format. Written atomically (data.atomic_path)."""
    import data
    from PIL import Image
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    fmt = image_format(path)
    with data.atomic_path(path) as tmp:
        Image.fromarray(np.asarray(mask).astype(bool).astype(np.uint8) * 255).save(tmp, format=fmt)


def load_mask(path):
    """Read a saved mask back as (H, W) bool: any nonzero pixel is foreground, as the official reader does."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


# --------------------------------------------------------------------------- evaluation

def gather_tasks(tasks):
    """Every rank's per-task records, merged in dataset order, on every rank.

    tasks: [(index, I, U, subset names), ...] of this rank. Python ints cross
    the wire as they are (all_gather_object pickles them), so sums stay exact.
    """
    tasks = sorted((t for shard in distributed.all_gather(tasks) for t in shard), key=lambda t: t[0])
    if len({t[0] for t in tasks}) != len(tasks):
        raise RuntimeError("a task was scored twice; the shards overlap")
    return tasks


def _unwrap(model):
    # DDP's forward may talk to the other ranks (buffer broadcast), and shards
    # differ in length by one batch: run the plain module instead.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def _eval_mode(model, device=None):
    """(the plain module, the device to run on: `device` or its parameters'), in eval mode inside the
    block; the module's own train/eval mode is restored after it."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    try:
        yield net, torch.device(device) if device is not None else next(net.parameters()).device
    finally:
        net.train(was_training)


@torch.no_grad()
def evaluate(model, dataset, threshold=DEFAULT_THRESHOLD, batch_size=8, num_workers=0, device=None,
             save_masks=None, progress=True, amp=False, cuda_graphs=False, per_task=False, ceiling=False):
    """Score `model` on every task of `dataset` and return the JSON layout.

    model: a SegVLM (or a DDP wrapper around one); put in eval mode here and
        returned to train mode afterwards if it was training.
    dataset: data.PhraseCutLMDB(..., train=False), whose items carry the
        original-size `gt_mask` and their `subsets`; its `ranks` is None when
        the data has no name_att_rel_count.json (then no c*/a* subsets).
    threshold: cut on the sigmoid probability at the original size.
    device: where to run; default the model's parameters' device.
    save_masks: a directory; each task's prediction is written there as
        <task_id>.png, 0/255 at the original size (each rank writes its shard).
    amp: bf16 autocast on CUDA (the sigmoid and the scoring stay in float32).
    cuda_graphs: on CUDA, replay each batch shape's captured graph (predict.FastSegVLM).
    per_task: also return "per_task", [{"index", "iou", "subsets"}] for every task in dataset
        order (prediction_grid picks its examples from it).
    ceiling: also return "ceiling", decoder_grid_ceiling's scores for the same tasks, made from
        the items this pass reads anyway (no second pass over the data).

    Returns {"mIoU", "oIoU", "prec@0.5", ..., "prec@0.9", "n", "subsets": {name:
    same keys}} (see summarize_tasks), fractions in [0, 1]. Under torch.distributed each rank scores
    one contiguous block of the tasks and every rank returns the same full result.

    A SegVLM gets a batch's phrases of one image with one copy of the image (image_index; the tasks
    of an image are consecutive in PhraseCut's files and in the LMDB): in eval mode the same logits,
    with fewer image-encoder passes. The CUDA-graph path keeps one image per phrase, so that each
    batch size is captured once.
    """
    import data  # the dataset pipeline; imported here so the metric functions stand alone
    from model import SegVLM
    from predict import FastSegVLM
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    rank, world, _ = distributed.info()
    # contiguous blocks keep an image's tasks together; no padding: every task scored exactly once
    indices = range(rank * len(dataset) // world, (rank + 1) * len(dataset) // world)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=data.collate)
    if save_masks is not None:
        make_dir(save_masks, "save_masks")

    tasks = []  # (dataset index, I, U, subset names)
    ceiling_tasks = []  # (dataset index, I, U) of the perfect decoder-grid map
    with _eval_mode(model, device) as (net, device):
        fast = cuda_graphs and device.type == "cuda"
        forward = FastSegVLM(net, amp=amp) if fast else net  # FastSegVLM applies amp itself
        grouped = not fast and isinstance(net, SegVLM)  # another model gets (image, tokens) only
        for batch in tqdm(loader, desc="evaluate", disable=not (progress and rank == 0), leave=False):
            inputs = batch["image"], batch["tokens"]
            if grouped:  # each distinct image once, and which one each phrase is about
                image, index = data.unique_images(batch["image"], batch["image_id"])
                inputs = image, batch["tokens"], index
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda" and not fast):
                logits = forward(*(t.to(device) for t in inputs))  # (B, 1, S/4, S/4)
            prob = logits.float().sigmoid()
            size = batch["image"].shape[-1]  # the letterbox side S the logits' S/4 map covers
            for i, task_id in enumerate(batch["task_id"]):
                gt = batch["gt_mask"][i].to(device).bool()  # (H, W) at the original size
                h, w = gt.shape
                # (S/4, S/4) -> up to (S, S) -> content box -> (H, W), CRIS's protocol
                pred = data.unletterbox(prob[i, 0], h, w, input_size=size) > threshold
                inter, union = task_iou(pred, gt)
                # the item's subsets, decided by phrasecut_subsets from its PhraseCut records
                tasks.append((indices[len(tasks)], inter, union, batch["subsets"][i]))  # loader keeps shard order
                if save_masks is not None:
                    save_mask(pred, mask_path(save_masks, task_id))
                if ceiling:
                    best = grid_ceiling_prediction(batch["mask"][i], h, w)
                    ceiling_tasks.append((tasks[-1][0], *task_iou(best, batch["gt_mask"][i].bool())))

    tasks = gather_tasks(tasks)
    result = summarize_tasks([t[1:] for t in tasks], ranked=getattr(dataset, "ranks", None) is not None)
    if per_task:
        result["per_task"] = [{"index": i, "iou": iou(inter, union), "subsets": list(names)}
                              for i, inter, union, names in tasks]
    if ceiling:
        ceiling_tasks = gather_tasks(ceiling_tasks)
        result["ceiling"] = summarize([t[1] for t in ceiling_tasks], [t[2] for t in ceiling_tasks])
    return result


# --------------------------------------------------------------------------- pictures

@torch.no_grad()
def save_overlays(model, dataset, out_dir, num=8, threshold=DEFAULT_THRESHOLD, device=None):
    """Write `num` figures (the first tasks of `dataset`) to out_dir: image, ground truth, prediction.

    Each PNG shows the image at its original size (cut back out of the
    network's letterboxed input, so at most input_size sharp), the ground truth
    and the prediction (outside the mask dimmed), and the phrase with the task's
    IoU in the title. Files are named <k>_<task_id>.png. Returns the written paths.
    """
    import data
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    out_dir = make_dir(out_dir, "the figures' folder")
    paths = []
    with _eval_mode(model, device) as (net, device):
        for k in range(min(num, len(dataset))):
            item = dataset[k]
            fig = Figure(figsize=(12, 4.4))
            score = _draw_example(fig.subplots(1, 3), net, item, threshold, device)
            fig.suptitle(f'"{item["phrase"]}"   IoU {score:.3f}   ({item["task_id"]})')
            fig.tight_layout()
            mask_path(out_dir, str(item["task_id"]))  # refuses unsafe ids before naming a file after them
            path = out_dir / f"{k:04d}_{item['task_id']}.png"
            with data.atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=80, format="png")
            paths.append(path)
    return paths


def _draw_example(axes, net, item, threshold, device) -> float:
    """Image, ground truth and prediction of one evaluation item on three axes -> its IoU.
    The image is shown at its original size, cut back out of the network's letterboxed input; in
    the mask panels everything outside the mask is dimmed, so coloured shapes keep their colours."""
    import data

    with torch.no_grad():
        logits = net(item["image"][None].to(device), item["tokens"][None].to(device)).float().cpu()
    gt = item["gt_mask"].bool()
    h, w = gt.shape
    pred = data.unletterbox(logits[0, 0].sigmoid(), h, w, input_size=item["image"].shape[-1]) > threshold
    image = data.unletterbox(data.unnormalize(item["image"]), h, w).clamp(0, 1).permute(1, 2, 0).numpy()
    for ax, (title, mask) in zip(axes, [("image", None), ("ground truth", gt), ("prediction", pred)]):
        ax.imshow(image if mask is None else image * (0.2 + 0.8 * mask.numpy()[..., None]))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return iou(*task_iou(pred, gt))


# Rows of prediction_grid: a typical task (the median IoU) of each kind of phrase, then failures.
GRID_KINDS = (("name", "p_name"), ("attribute", "p_att+"), ("relation", "p_rel+"), ("several", "i_multi"),
              ("many", "i_many"))


def prediction_grid(model, dataset, per_task, path, failures=3, threshold=DEFAULT_THRESHOLD, device=None):
    """One PNG of chosen test tasks, each as image | ground truth | prediction with its phrase and IoU.

    per_task: evaluate(..., per_task=True)["per_task"]. Chosen: for each kind in GRID_KINDS that
    the data has, the task at that kind's median IoU (what a typical phrase of the kind gets, not
    the best), then the `failures` tasks with the lowest IoU. Written atomically; returns the
    chosen [(label, dataset index, IoU)].
    """
    import data
    from matplotlib.figure import Figure

    picks, used = [], set()
    for label, subset in GRID_KINDS:
        kind = sorted((t["iou"], t["index"]) for t in per_task if subset in t["subsets"] and t["index"] not in used)
        if kind:
            _, index = kind[len(kind) // 2]
            picks.append((f"{label}, median of {len(kind)}", index))
            used.add(index)
    worst = sorted((t["iou"], t["index"]) for t in per_task if t["index"] not in used)[:failures]
    picks += [(f"failure {k + 1}", index) for k, (_, index) in enumerate(worst)]
    if not picks:
        raise ValueError("prediction_grid: per_task is empty")

    cols = 2  # examples side by side, each three panels wide
    rows = -(-len(picks) // cols)
    fig = Figure(figsize=(6.6 * cols, 2.6 * rows))
    cells = fig.subfigures(rows, cols, squeeze=False).flat
    chosen = []
    with _eval_mode(model, device) as (net, device):
        for (label, index), cell in zip(picks, cells):
            item = dataset[index]
            score = _draw_example(cell.subplots(1, 3), net, item, threshold, device)
            cell.suptitle(f'"{item["phrase"]}"  ({label}): IoU {score:.2f}', fontsize=10)
            chosen.append((label, index, score))
    with data.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    return chosen


# --------------------------------------------------------------------------- command line

def resolve_data_path(ckpt, data_arg=None):
    """--data if given, else <checkpoint's data_dir>/test.lmdb; a clear error when neither exists."""
    if data_arg:
        path = Path(data_arg)
        if not path.exists():
            raise FileNotFoundError(f"--data {path} does not exist")
        if path.is_dir():
            raise ValueError(f"--data {path} is a directory; pass the LMDB file itself, e.g. {path / 'test.lmdb'}")
        return path
    data_dir = ckpt.get("data_dir") or ""
    if not data_dir:
        raise ValueError("the checkpoint does not say which data it was trained beside (no 'data_dir'); "
                         "pass --data PATH.lmdb")
    path = Path(data_dir) / "test.lmdb"
    if not path.exists():
        raise FileNotFoundError(f"{path} (the checkpoint's data_dir/test.lmdb) does not exist; pass --data PATH.lmdb")
    return path


def decoder_grid_ceiling(dataset, stride=16, threshold=0.5, progress=False) -> dict:
    """The scores of a perfect prediction made at the decoder's resolution.

    CRIS, and so SegVLM, builds its mask from the decoder's stride-16 grid
    (26x26 at 416 px, 12x12 at the demo's 192 px): the projector only upsamples,
    with no skip from finer features. Here each letterboxed ground-truth mask
    is averaged over stride x stride cells (an ideal decoder map), brought to
    the logits' size (S/4) by bilinear upsampling, mapped back to the original
    size like a prediction and cut at `threshold`. The result, in the layout of
    `summarize`, bounds what a mask that is only an upsampled grid can score;
    the learned projector can do somewhat better only by sharpening edges.
    """
    from tqdm import tqdm

    tasks = []
    for i in tqdm(range(len(dataset)), desc="ceiling", disable=not progress, leave=False):
        item = dataset[i]
        h, w = item["orig_size"].tolist()
        pred = grid_ceiling_prediction(item["mask"], h, w, stride, threshold)
        tasks.append(task_iou(pred, item["gt_mask"].bool()))
    return summarize([t[0] for t in tasks], [t[1] for t in tasks])


def grid_ceiling_prediction(mask, h, w, stride=16, threshold=0.5):
    """One letterboxed ground-truth mask (1, S, S) -> the (h, w) bool prediction of a perfect
    decoder map: averaged over stride x stride cells, bilinearly upsampled to the logits' S/4,
    mapped back to the original size like a prediction, cut at `threshold`."""
    import torch.nn.functional as F

    import data
    size = mask.shape[-1]
    grid = F.avg_pool2d(mask[None].float(), stride)  # (1, 1, S/16, S/16)
    prob = F.interpolate(grid, size=size // 4, mode="bilinear", align_corners=False)  # (1, 1, S/4, S/4)
    return data.unletterbox(prob[0, 0], h, w, input_size=size) > threshold


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py",
                                description="Evaluate a SegVLM checkpoint on PhraseCut (official metrics).")
    p.add_argument("--ckpt", help="checkpoint written by train.py, or CRIS's released best_model.pth; "
                                  "the model is rebuilt from it alone")
    p.add_argument("--data", help="eval LMDB (default: <checkpoint's data_dir>/test.lmdb)")
    p.add_argument("--threshold", type=parse_threshold, default=DEFAULT_THRESHOLD,
                   help=f"cut on the sigmoid probability (default {DEFAULT_THRESHOLD}, CRIS's)")
    p.add_argument("--batch-size", type=int, default=8, help="per process (default 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", type=parse_device, help="cpu, cuda, cuda:N or mps (default: this rank's GPU if "
                                                        "there is one, else cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the forward pass (CUDA only)")
    p.add_argument("--json", metavar="OUT.json", help="write the metrics there")
    p.add_argument("--save-masks", metavar="DIR", help="write <task_id>.png per task, 0/255 at the original size")
    p.add_argument("--vis", metavar="DIR", help="write --num overlay figures there")
    p.add_argument("--num", type=int, default=8, help="how many figures --vis writes (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ceiling", action="store_true",
                   help="also score a perfect prediction made at the decoder's stride-16 grid (decoder_grid_ceiling)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA graphs on CUDA (predict.FastSegVLM); no effect on the CPU (default on)")
    args = p.parse_args(argv)
    if not args.ckpt:
        p.error("--ckpt is required")
    for name, least in (("batch_size", 1), ("num", 1), ("workers", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}")
    try:
        check_outputs(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_outputs(args):
    """Refuse, before any work, outputs that cannot be written or would overwrite an input (a ValueError).

    --save-masks and --vis must be directories (created here), --json a file in a directory
    that exists or can be created, and no output may be the checkpoint or the data."""
    for flag in ("save_masks", "vis"):
        if getattr(args, flag):
            make_dir(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.json:
        path = Path(args.json)
        if path.is_dir():
            raise ValueError(f"--json {path} is a directory; name a file, e.g. {path / 'metrics.json'}")
        for flag, given in (("--ckpt", args.ckpt), ("--data", args.data)):
            if given and same_file(path, given):
                raise ValueError(f"--json {path} is the {flag} file; writing the metrics there would destroy it")
        make_dir(path.parent, "--json's folder")


def run(args):
    """The CLI's work; raises ValueError / OSError for the user's mistakes (parse_args checked the flags)."""
    import data
    import model as segvlm

    rank, world, device = distributed.init()
    device = args.device or device  # already checked by parse_device

    net, ckpt = segvlm.load_checkpoint(args.ckpt, map_location="cpu")
    net.to(device)
    cfg = net.config
    path = resolve_data_path(ckpt, args.data)
    dataset = data.PhraseCutLMDB(str(path), input_size=cfg.input_size, word_len=cfg.word_len, train=False)
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no tasks")

    start = time.perf_counter()
    result = evaluate(net, dataset, threshold=args.threshold, batch_size=args.batch_size,
                      num_workers=args.workers, device=device, save_masks=args.save_masks,
                      progress=not args.no_progress, amp=args.amp, cuda_graphs=args.fast, ceiling=args.ceiling)
    seconds = time.perf_counter() - start
    c = result.pop("ceiling", None)
    if rank == 0:
        print(format_table(result))
        if args.json:
            with data.atomic_path(args.json) as tmp:
                tmp.write_text(json.dumps(result, indent=2) + "\n")
        if args.vis:
            save_overlays(net, dataset, args.vis, num=args.num, threshold=args.threshold, device=device)
        print(f"{args.ckpt} on {path}: mIoU {100 * result['mIoU']:.2f}  oIoU {100 * result['oIoU']:.2f}  "
              f"P@0.5 {100 * result['prec@0.5']:.2f}  P@0.7 {100 * result['prec@0.7']:.2f}  "
              f"P@0.9 {100 * result['prec@0.9']:.2f}  ({result['n']} tasks, threshold {args.threshold}, "
              f"{world} process{'es' if world > 1 else ''}, {seconds:.1f} s)")
        if c is not None:
            print(f"ceiling: a perfect {cfg.input_size // 16}x{cfg.input_size // 16} decoder map (stride 16 at "
                  f"{cfg.input_size} px) upsampled to the logits would score mIoU {100 * c['mIoU']:.2f}  "
                  f"oIoU {100 * c['oIoU']:.2f}  P@0.5 {100 * c['prec@0.5']:.2f}  P@0.9 {100 * c['prec@0.9']:.2f}")
    return result


def main(argv=None):
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # clip's import, not ours
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # the user's data or files; argparse already exited 2 for bad flags
        sys.exit(f"evaluate.py: error: {e}")
    except RuntimeError as e:  # a peer that stalled or died under torchrun: say so, not a traceback
        if (message := distributed.peer_failure(e)) is None:
            raise
        sys.exit(f"evaluate.py: error: {message}")
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
