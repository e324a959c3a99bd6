"""The metrics (PhraseCut's official evaluator's definitions) and the evaluation of a model with them.

Run (one process, or one process per GPU with torchrun; the numbers are identical):

    python evaluate.py --ckpt runs/demo/best.pth                   # <data_dir>/test.lmdb of that run
    python evaluate.py --ckpt best.pth --data data/val.lmdb --json val.json
    python evaluate.py --ckpt best.pth --save-masks preds/ --vis vis/ --num 16
    torchrun --standalone --nproc_per_node=4 evaluate.py --ckpt best.pth --json test.json
    python evaluate.py --data refcoco/val.lmdb --pred-masks preds/ --json val.json  # saved masks, no model

--ckpt takes a checkpoint written by train.py or by CRIS's own training code (docs/cris.md). Any
LMDB that `data.py build` writes is scored the same way: PhraseCut, RefCOCO/+/g, and category prompts
on COCO and VOC (per-category scores under "categories"; VOC's "void" pixels in neither I nor U).
--pred-masks scores a folder of <task_id>.png masks at each image's size (non-zero = foreground).

Metrics. Every task is scored at the *original* image size: the (B, 1, S/4, S/4) logits go through a
sigmoid, are upsampled and cropped out of the letterbox (`transforms.unletterbox`), then cut at the
threshold (0.35, CRIS's). Per task I = |G and P|, U = |G or P|, IoU = 0 when I == 0 else I / U.

- mIoU      mean of the per-task IoU (the paper's Table 1 "mean IoU"; CRIS's "IoU")
- oIoU      cumulative ("overall") IoU, sum(I) / sum(U) (LAVT's "oIoU")
- prec@k    fraction of tasks with IoU strictly greater than k, k in 0.5 ... 0.9

The same for each of the data's subsets (phrasecut_subsets; a category for COCO and VOC). Every
number is a fraction in [0, 1]; the printed table shows percentages.

Data with phrases that name nothing (gRefCOCO, `data.py synth --no-target-rate`) also get the GRES
metrics of ReLA's evaluator (refer_evaluation.py, as fixed on 2023-08-26): an empty predicted mask is the
answer "no target" (`summarize_gres`), and gIoU, cIoU, N_acc, T_acc, Pr@0.7/0.8/0.9 join the JSON.

Under torchrun every rank scores one contiguous block of the tasks (no padding, so no task counts
twice); the per-task (I, U, subsets) are gathered and the metrics computed once from the full list in
dataset order: the result is exactly that of one process. On CUDA the forward passes go through CUDA
graphs (helpers/inference.FastSegVLM; --no-fast runs the model eagerly): the same numbers, faster.
The flags and outputs are checked before anything is loaded (helpers/eval_files.py).
"""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import PhraseCutLMDB, collate, unique_images
from helpers import distributed, transforms
from helpers.cli import make_dir, run_tool
from helpers.engines import FastSegVLM
from helpers.eval_files import claim_outputs, open_model, parse_args, resolve_data_path
from helpers.files import atomic_path, load_mask, mask_path, save_mask
from helpers.inference import eval_mode
from helpers.provenance import UNITS
from helpers.visualize import draw_panel, overlay_name, predict_item
from model import DEFAULT_THRESHOLD, SegVLM

# The metrics, as PhraseCut's official evaluator defines them.

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

DEFINITIONS = {  # what each key of the JSON is, as the field names it
    "mIoU": "mean over tasks (expressions) of the per-task IoU; CRIS's 'IoU', the paper's 'mean IoU'",
    "oIoU": "overall (cumulative) IoU, sum of intersections / sum of unions over tasks; LAVT's 'oIoU'",
    "prec@k": "fraction of tasks whose IoU is strictly above k",
    "size": "every mask at its image's original size; ignored pixels (VOC's void) in neither I nor U"}

METRIC_KEYS = ("mIoU", "oIoU") + tuple(f"prec@{k}" for k in PREC_THRESHOLDS) + ("n",)

# The GRES metrics, as ReLA's evaluator (gres_model/evaluation/refer_evaluation.py after commit 884ef17).

GRES_PREC = (0.7, 0.8, 0.9)

GRES_DEFINITIONS = {
    "gIoU": "GRES: mean over all tasks of the per-task IoU, where a no-target task answered with an empty mask "
            "scores 1 and one answered with a mask 0, and a target task answered with an empty mask 0",
    "cIoU": "GRES: sum of I / sum of U; a no-target task answered empty adds nothing, one answered with a mask "
            "adds its area to U; a target task answered empty adds I = 0 and its U",
    "N_acc": "GRES: share of no-target tasks answered with an empty mask (no target)",
    "T_acc": "GRES: share of target tasks answered with a non-empty mask",
    "Pr@k": "GRES: share of target tasks whose IoU is at least k (ReLA's >=), k in 0.7, 0.8, 0.9",
    "N_acc_by_kind": "not GRES: [no-target tasks, N_acc] per kind of no-target phrase, where the data names kinds"}


def gres_task(intersection, union, no_target, answered_none):
    """One task by ReLA's rules -> (IoU, I, U) it adds. intersection, union: |G and P|, |G or P|;
    no_target: the phrase names nothing (G empty); answered_none: the predicted mask is empty."""
    if no_target:
        return (1.0, 0, 0) if answered_none else (0.0, 0, union)  # union is then the predicted area
    if answered_none:
        return 0.0, 0, union  # I = 0; union is then |G|
    return (0.0 if union == 0 else intersection / union), intersection, union


def summarize_gres(tasks):
    """The GRES metrics of [(I, U, no_target, answered_none), ...]: {"gIoU", "cIoU", "N_acc", "T_acc",
    "Pr@0.7", "Pr@0.8", "Pr@0.9"}, fractions. N_acc is None without no-target tasks; T_acc and Pr@k None
    without target tasks."""
    scored = [gres_task(*t) for t in tasks]
    total_u = sum(u for _, _, u in scored)
    targets = [s[0] for s, t in zip(scored, tasks) if not t[2]]
    empty = [t[3] for t in tasks if t[2]]
    out = {"gIoU": math.fsum(s[0] for s in scored) / len(tasks) if tasks else None,
           "cIoU": sum(i for _, i, _ in scored) / total_u if total_u else 0.0,
           "N_acc": sum(empty) / len(empty) if empty else None,
           "T_acc": sum(not t[3] for t in tasks if not t[2]) / len(targets) if targets else None}
    for k in GRES_PREC:
        out[f"Pr@{k}"] = sum(v >= k for v in targets) / len(targets) if targets else None
    return out


def add_gres(result, tasks, kinds=()):
    """result + summarize_gres of tasks [(I, U, subsets, no_target, answered_none), ...] when one of them is
    a no-target task (the data holds phrases that name nothing); result unchanged otherwise. kinds: each
    task's kind of no-target phrase where the data names one (synthetic data), for "N_acc_by_kind"."""
    if any(t[3] for t in tasks):
        result.update(summarize_gres([(t[0], t[1], t[3], t[4]) for t in tasks]))
        named = {k: [t[4] for j, t in zip(kinds, tasks) if j == k and t[3]] for k in set(kinds) - {""}}
        if any(named.values()):
            result["N_acc_by_kind"] = {k: [len(v), sum(v) / len(v)] for k, v in sorted(named.items()) if v}
    return result


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
    if "gIoU" in result:
        rows.append("GRES: " + "  ".join(f"{k} {'-' if result[k] is None else f'{100 * result[k]:.2f}'}"
                                          for k in ("gIoU", "cIoU", "N_acc", "T_acc", *(f"Pr@{p}" for p in GRES_PREC))))
    if "N_acc_by_kind" in result:
        rows.append("N_acc by kind: " + "  ".join(f"{k} {100 * v:.2f} (n={n})" for k, (n, v) in result["N_acc_by_kind"].items()))
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


# The evaluation of a model, and of saved masks.

@torch.no_grad()
def evaluate(model, dataset, threshold=DEFAULT_THRESHOLD, batch_size=8, num_workers=0, device=None,
             save_masks=None, progress=True, amp=False, cuda_graphs=False, per_task=False, ceiling=False):
    """Score `model` on every task of `dataset` and return the JSON layout.

    model: a SegVLM (or a DDP wrapper around one); put in eval mode here and
        returned to train mode afterwards if it was training.
    dataset: PhraseCutLMDB(..., train=False), whose items carry the
        original-size `gt_mask` and their `subsets`; its `ranks` is None when
        the data has no name_att_rel_count.json (then no c*/a* subsets).
    threshold: cut on the sigmoid probability at the original size.
    device: where to run; default the model's parameters' device.
    save_masks: a directory; each task's prediction is written there as
        <task_id>.png, 0/255 at the original size (each rank writes its shard).
    amp: bf16 autocast on CUDA or the CPU (the sigmoid and the scoring stay in float32); off by default,
        so that scores stay comparable (evaluate.py --precision bf16 turns it on).
    cuda_graphs: on CUDA, replay each batch shape's captured graph (inference.FastSegVLM).
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

    rank, world, _ = distributed.info()
    # contiguous blocks keep an image's tasks together; no padding: every task scored exactly once
    indices = range(rank * len(dataset) // world, (rank + 1) * len(dataset) // world)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    if save_masks is not None:
        make_dir(save_masks, "save_masks")

    tasks = []  # (dataset index, I, U, subset names)
    ceiling_tasks = []  # (dataset index, I, U) of the perfect decoder-grid map
    with eval_mode(model, device) as (net, device):
        engine = getattr(net, "engine", None) not in (None, "eager")  # an engine runs its own precision
        fast = cuda_graphs and device.type == "cuda" and not engine
        forward = FastSegVLM(net, amp=amp) if fast else net  # FastSegVLM applies amp itself
        grouped = not fast and (isinstance(net, SegVLM) or engine)  # another model gets (image, tokens) only
        amp = amp and not engine
        for batch in tqdm(loader, desc="evaluate", disable=not (progress and rank == 0), leave=False):
            inputs = batch["image"], batch["tokens"]
            if grouped:  # each distinct image once, and which one each phrase is about
                image, index = unique_images(batch["image"], batch["image_id"])
                inputs = image, batch["tokens"], index
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=amp and device.type in ("cuda", "cpu") and not fast):
                logits = forward(*(t.to(device) for t in inputs))  # (B, 1, S/4, S/4)
            prob = logits.float().sigmoid()
            size = batch["image"].shape[-1]  # the letterbox side S the logits' S/4 map covers
            for i, task_id in enumerate(batch["task_id"]):
                gt = batch["gt_mask"][i].to(device).bool()  # (H, W) at the original size
                h, w = gt.shape
                # (S/4, S/4) -> up to (S, S) -> content box -> (H, W), CRIS's protocol
                pred = transforms.unletterbox(prob[i, 0], h, w, input_size=size) > threshold
                ignore = batch.get("ignore_mask", [None] * len(batch["task_id"]))[i]  # VOC's void, or None
                inter, union = task_iou(pred, gt, ignore)
                no_target = bool(batch["no_target"][i]) if "no_target" in batch else False
                # the item's subsets, decided by phrasecut_subsets from its PhraseCut records; an empty mask
                # is the answer "no target" (add_gres)
                tasks.append((indices[len(tasks)], inter, union, batch["subsets"][i], no_target,
                              not bool(pred.any())))  # the loader keeps shard order
                if save_masks is not None:
                    save_mask(pred, mask_path(save_masks, task_id))
                if ceiling:
                    best = grid_ceiling_prediction(batch["mask"][i], h, w)
                    ceiling_tasks.append((tasks[-1][0], *task_iou(best, batch["gt_mask"][i].bool())))

    tasks = gather_tasks(tasks)
    result = summarize_tasks([t[1:] for t in tasks], getattr(dataset, "subset_names", None),
                             getattr(dataset, "subset_note", None), getattr(dataset, "category_names", None))
    kinds = dataset.no_target_kinds() if hasattr(dataset, "no_target_kinds") else []
    add_gres(result, [t[1:] for t in tasks], [kinds[t[0]] for t in tasks] if kinds else ())
    if per_task:
        result["per_task"] = [{"index": i, "iou": iou(inter, union), "subsets": list(names)}
                              for i, inter, union, names, *_ in tasks]
    if ceiling:
        ceiling_tasks = gather_tasks(ceiling_tasks)
        result["ceiling"] = summarize([t[1] for t in ceiling_tasks], [t[2] for t in ceiling_tasks])
    return result


def evaluate_masks(dataset, pred_dir, progress=True):
    """Score saved masks, pred_dir/<task_id>.png at each image's size (non-zero = foreground), against
    an LMDB's ground truth (PhraseCutLMDB.targets), with evaluate's metrics, subsets and categories.
    Every file is looked for first: missing ones are a ValueError counting them and naming a few. With
    no-target tasks also the GRES metrics (an all-zero mask is the answer "no target")."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise ValueError(f"--pred-masks {pred_dir} is not a folder of <task_id>.png masks")
    paths = [mask_path(pred_dir, task_id) for task_id in dataset.task_ids()]
    missing = [p.stem for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"--pred-masks {pred_dir}: {len(missing)} of {len(paths)} masks are missing, e.g. "
                         f"{', '.join(m + '.png' for m in missing[:5])} (one <task_id>.png per task of --data)")
    tasks, flags = [], dataset.no_target_flags()
    for i in tqdm(range(len(dataset)), desc="score", disable=not progress, leave=False):
        _, gt, ignore, subsets = dataset.targets(i)
        try:
            with Image.open(paths[i]) as im:  # the size from the header, before any pixel is decoded
                size = im.size
            if size != (gt.shape[1], gt.shape[0]):
                raise ValueError(f"{paths[i]} is {size[0]}x{size[1]}, but its image is {gt.shape[1]}x{gt.shape[0]}: "
                                 "masks are scored at the original size")
            pred = load_mask(paths[i])
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"{paths[i]}: not a readable mask image ({err})") from None
        tasks.append((*task_iou(pred, gt, ignore), subsets, flags[i], not pred.any()))
    return add_gres(summarize_tasks(tasks, dataset.subset_names, dataset.subset_note, dataset.category_names), tasks,
                    dataset.no_target_kinds())


def decoder_grid_ceiling(dataset, stride=16, threshold=0.5, progress=False) -> dict:
    """The scores of a perfect prediction made at the decoder's resolution.

    CRIS, and so SegVLM, builds its mask from the decoder's stride-16 grid (26x26 at 416 px, 12x12 at
    the demo's 192 px): the projector only upsamples, with no skip from finer features. Here each
    letterboxed ground-truth mask is averaged over stride x stride cells (an ideal decoder map), brought
    to the logits' size (S/4) by bilinear upsampling, mapped back to the original size like a prediction
    and cut at `threshold`. The result, in the layout of `summarize`, bounds what a mask that is only an
    upsampled grid can score; the learned projector can do somewhat better only by sharpening edges."""

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

    size = mask.shape[-1]
    grid = F.avg_pool2d(mask[None].float(), stride)  # (1, 1, S/16, S/16)
    prob = F.interpolate(grid, size=size // 4, mode="bilinear", align_corners=False)  # (1, 1, S/4, S/4)
    return transforms.unletterbox(prob[0, 0], h, w, input_size=size) > threshold


def save_overlays(model, dataset, out_dir, num=8, threshold=DEFAULT_THRESHOLD, device=None):
    """--vis: write `num` figures (the first tasks of `dataset`) to out_dir, overlay_name(k, task_id) each: the
    image at its original size (cut out of the letterboxed input, so at most input_size sharp), the ground
    truth and the prediction (outside the mask dimmed), the phrase and IoU in the title. Returns the paths."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    out_dir = make_dir(out_dir, "the figures' folder")
    paths = []
    with eval_mode(model, device) as (net, device):
        for k in range(min(num, len(dataset))):
            item = dataset[k]
            image, gt, pred = predict_item(net, item, threshold, device)
            fig = Figure(figsize=(12, 4.4))
            for ax, (title, mask) in zip(fig.subplots(1, 3), [("image", None), ("ground truth", gt), ("prediction", pred)]):
                draw_panel(ax, image, mask, title)
            score = iou(*task_iou(pred, gt, item.get("ignore_mask")))  # VOC's void counts in neither
            fig.suptitle(f'"{item["phrase"]}"   IoU {100 * score:.1f} %   ({item["task_id"]})')
            fig.tight_layout()
            mask_path(out_dir, str(item["task_id"]))  # refuses unsafe ids before naming a file after them
            path = out_dir / overlay_name(k, item["task_id"])
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=80, format="png")
            paths.append(path)
    return paths


def run(args):
    """The CLI's work; raises ValueError / OSError for the user's mistakes (parse_args checked the flags)."""

    if args.pred_masks:
        return run_pred_masks(args)
    rank, world, device = distributed.init()
    device = args.device or device  # already checked by parse_device
    net, found = open_model(args, device)
    cfg = net.config
    path = resolve_data_path(found.checkpoint, args.data)
    dataset = PhraseCutLMDB(str(path), input_size=cfg.input_size, word_len=cfg.word_len, train=False)
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no tasks")
    claim_outputs(args, dataset)

    start = time.perf_counter()
    result = evaluate(net, dataset, threshold=args.threshold, batch_size=args.batch_size,
                      num_workers=args.workers, device=device, save_masks=args.save_masks,
                      progress=not args.no_progress, amp=args.amp, cuda_graphs=args.fast, ceiling=args.ceiling)
    seconds = time.perf_counter() - start
    c = result.pop("ceiling", None)
    if rank == 0:
        print(format_table(result))
        if args.json:
            write_json(args.json, result)
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


def run_pred_masks(args):
    """--pred-masks: score a folder of saved masks against --data, print the table, write --json."""
    path = resolve_data_path({}, args.data)
    result = evaluate_masks(PhraseCutLMDB(str(path), train=False), args.pred_masks, progress=not args.no_progress)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    print(f"{args.pred_masks} on {path}: mIoU {100 * result['mIoU']:.2f}  oIoU {100 * result['oIoU']:.2f}  "
          f"P@0.5 {100 * result['prec@0.5']:.2f}  P@0.9 {100 * result['prec@0.9']:.2f}  ({result['n']} tasks)")
    return result


def write_json(path, result):
    """The metrics and their definitions (the GRES ones too when the data has no-target phrases) to `path`."""
    definitions = {**DEFINITIONS, **(GRES_DEFINITIONS if "gIoU" in result else {})}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**result, "units": UNITS, "definitions": definitions}, indent=2) + "\n")


def main(argv=None):
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
    run_tool("evaluate.py", main)
