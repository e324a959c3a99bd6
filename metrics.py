"""The referring-segmentation metrics, as PhraseCut's official evaluator defines them.

Per task, at the original image size: I = |G and P|, U = |G or P|, IoU = 0 when I == 0 else I / U.

- mIoU      mean of the per-task IoU (the paper's Table 1 "mean IoU"; CRIS's "IoU")
- oIoU      cumulative ("overall") IoU, sum(I) / sum(U) (LAVT's "oIoU")
- prec@k    fraction of tasks with IoU strictly greater than k, k in 0.5 ... 0.9

Every number is a fraction in [0, 1]; `format_table` prints percentages. Which subsets a task
belongs to is the data's business (phrasecut.phrasecut_subsets, a category for COCO and VOC);
`summarize_tasks` scores each. Pixels of an ignore region (VOC's "void") count in neither I nor U.
"""
import math

import numpy as np
import torch

import distributed

DEFAULT_THRESHOLD = 0.35  # CRIS's cut on the sigmoid; see the module docstring

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

DEFINITIONS = {  # what each key of the JSON is, as the field names it
    "mIoU": "mean over tasks (expressions) of the per-task IoU; CRIS's 'IoU', the paper's 'mean IoU'",
    "oIoU": "overall (cumulative) IoU, sum of intersections / sum of unions over tasks; LAVT's 'oIoU'",
    "prec@k": "fraction of tasks whose IoU is strictly above k",
    "size": "every mask at its image's original size; ignored pixels (VOC's void) in neither I nor U"}

METRIC_KEYS = ("mIoU", "oIoU") + tuple(f"prec@{k}" for k in PREC_THRESHOLDS) + ("n",)


def task_iou(pred, gt, ignore=None):
    """Intersection and union of one task's binary masks, as Python ints.

    pred, gt: (H, W) bool (or 0/1) numpy arrays or torch tensors of the same
    shape, at the original image size. ignore: None, or an (H, W) bool mask of
    pixels that count in neither (VOC's 255 "void" border, as VOC's own scoring
    leaves it out). Returns (I, U) = (|G and P and not V|, |(G or P) and not V|).
    """
    if tuple(pred.shape) != tuple(gt.shape) or (ignore is not None and tuple(ignore.shape) != tuple(gt.shape)):
        raise ValueError(f"prediction {tuple(pred.shape)}, ground truth {tuple(gt.shape)}"
                         f"{'' if ignore is None else f' and ignore mask {tuple(ignore.shape)}'} differ in shape")
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        pred = torch.as_tensor(pred).bool()
        gt = torch.as_tensor(gt).bool().to(pred.device)
        keep = None if ignore is None else ~torch.as_tensor(ignore).bool().to(pred.device)
        inter, union = pred & gt, pred | gt
        if keep is not None:
            inter, union = inter & keep, union & keep
        return int(inter.sum()), int(union.sum())
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    inter, union = np.logical_and(pred, gt), np.logical_or(pred, gt)
    if ignore is not None:
        keep = ~np.asarray(ignore).astype(bool)
        inter, union = inter & keep, union & keep
    return int(inter.sum()), int(union.sum())


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


def summarize_tasks(tasks, names=None, note=None, categories=None):
    """The JSON layout from per-task records [(I, U, subset names), ...].

    Returns {metric keys of `summarize` for all tasks, "subsets": {name: same keys}}, with a "note"
    when one is given. names: the subsets to report, in order, each present even when empty (n = 0);
    the data decides them (e.g. phrasecut.subset_names). None: every name the tasks carry, in order of
    first appearance. categories: COCO's or VOC's category names, each reported under "categories"
    (a task's names hold its category); None: no such key.
    """
    result = summarize([t[0] for t in tasks], [t[1] for t in tasks])
    if names is None:
        names = list(dict.fromkeys(name for t in tasks for name in t[2] if name not in (categories or ())))
    for key, group in (("subsets", names), ("categories", categories)):
        if group is None:
            continue
        result[key] = {}
        for name in group:
            members = [t for t in tasks if name in t[2]]
            result[key][name] = summarize([t[0] for t in members], [t[1] for t in members])
    if note:
        result["note"] = note
    return result


def format_table(result):
    """The metrics as a text table in percent, one row for all tasks, one per subset, one per category."""
    named = list(result.get("subsets", {}).items()) + list(result.get("categories", {}).items())
    width = max([10] + [len(name) for name, _ in named])
    header = f"{'subset':<{width}} {'n':>7} {'mIoU':>7} {'oIoU':>7}" + "".join(f" {'P@' + str(k):>7}" for k in PREC_THRESHOLDS)
    rows = [header, "-" * len(header)]
    for name, m in [("all", result)] + named:
        cells = [m["mIoU"], m["oIoU"]] + [m[f"prec@{k}"] for k in PREC_THRESHOLDS]
        rows.append(f"{name:<{width}} {m['n']:>7d}" + "".join(f" {'-' if v is None else f'{100 * v:.2f}':>7}" for v in cells))
    if result.get("note"):
        rows.append(f"note: {result['note']}")
    return "\n".join(rows)


def gather_tasks(tasks):
    """Every rank's per-task records, merged in dataset order, on every rank.

    tasks: [(index, I, U, subset names), ...] of this rank. Python ints cross
    the wire as they are (all_gather_object pickles them), so sums stay exact.
    """
    tasks = sorted((t for shard in distributed.all_gather(tasks) for t in shard), key=lambda t: t[0])
    if len({t[0] for t in tasks}) != len(tasks):
        raise RuntimeError("a task was scored twice; the shards overlap")
    return tasks
