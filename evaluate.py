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

Under torchrun every rank scores one contiguous block of the tasks (no padding, so no task counts
twice); the per-task (I, U, subsets) are gathered and the metrics computed once from the full list in
dataset order: the result is exactly that of one process. On CUDA the forward passes go through CUDA
graphs (helpers/inference.FastSegVLM; --no-fast runs the model eagerly): the same numbers, faster.
The flags and outputs are checked before anything is loaded (helpers/eval_files.py).
"""
import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import PhraseCutLMDB, collate, unique_images
from helpers import distributed, transforms
from helpers.checkpoints import load_checkpoint
from helpers.cli import make_dir, parse_device, parse_threshold, run_tool
from helpers.eval_files import check_outputs, claim_outputs, resolve_data_path
from helpers.files import atomic_path, load_mask, mask_path, save_mask
from helpers.inference import FastSegVLM, eval_mode
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
    amp: bf16 autocast on CUDA (the sigmoid and the scoring stay in float32).
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
        fast = cuda_graphs and device.type == "cuda"
        forward = FastSegVLM(net, amp=amp) if fast else net  # FastSegVLM applies amp itself
        grouped = not fast and isinstance(net, SegVLM)  # another model gets (image, tokens) only
        for batch in tqdm(loader, desc="evaluate", disable=not (progress and rank == 0), leave=False):
            inputs = batch["image"], batch["tokens"]
            if grouped:  # each distinct image once, and which one each phrase is about
                image, index = unique_images(batch["image"], batch["image_id"])
                inputs = image, batch["tokens"], index
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda" and not fast):
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
                # the item's subsets, decided by phrasecut_subsets from its PhraseCut records
                tasks.append((indices[len(tasks)], inter, union, batch["subsets"][i]))  # loader keeps shard order
                if save_masks is not None:
                    save_mask(pred, mask_path(save_masks, task_id))
                if ceiling:
                    best = grid_ceiling_prediction(batch["mask"][i], h, w)
                    ceiling_tasks.append((tasks[-1][0], *task_iou(best, batch["gt_mask"][i].bool())))

    tasks = gather_tasks(tasks)
    result = summarize_tasks([t[1:] for t in tasks], getattr(dataset, "subset_names", None),
                             getattr(dataset, "subset_note", None), getattr(dataset, "category_names", None))
    if per_task:
        result["per_task"] = [{"index": i, "iou": iou(inter, union), "subsets": list(names)}
                              for i, inter, union, names in tasks]
    if ceiling:
        ceiling_tasks = gather_tasks(ceiling_tasks)
        result["ceiling"] = summarize([t[1] for t in ceiling_tasks], [t[2] for t in ceiling_tasks])
    return result


def evaluate_masks(dataset, pred_dir, progress=True):
    """Score saved masks, pred_dir/<task_id>.png at each image's size (non-zero = foreground), against
    an LMDB's ground truth (PhraseCutLMDB.targets), with evaluate's metrics, subsets and categories.
    Every file is looked for first: missing ones are a ValueError counting them and naming a few."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise ValueError(f"--pred-masks {pred_dir} is not a folder of <task_id>.png masks")
    paths = [mask_path(pred_dir, task_id) for task_id in dataset.task_ids()]
    missing = [p.stem for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"--pred-masks {pred_dir}: {len(missing)} of {len(paths)} masks are missing, e.g. "
                         f"{', '.join(m + '.png' for m in missing[:5])} (one <task_id>.png per task of --data)")
    tasks = []
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
        tasks.append((*task_iou(pred, gt, ignore), subsets))
    return summarize_tasks(tasks, dataset.subset_names, dataset.subset_note, dataset.category_names)


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
    """--vis: write `num` figures (the first tasks of `dataset`) to out_dir: image, ground truth, prediction.

    Each PNG shows the image at its original size (cut back out of the network's letterboxed input,
    so at most input_size sharp), the ground truth and the prediction (outside the mask dimmed), and
    the phrase with the task's IoU in the title. Files are named overlay_name(k, task_id); returns the
    written paths.
    """
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
            fig.suptitle(f'"{item["phrase"]}"   IoU {score:.3f}   ({item["task_id"]})')
            fig.tight_layout()
            mask_path(out_dir, str(item["task_id"]))  # refuses unsafe ids before naming a file after them
            path = out_dir / overlay_name(k, item["task_id"])
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=80, format="png")
            paths.append(path)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py",
                                description="Evaluate a SegVLM checkpoint on PhraseCut (official metrics).")
    p.add_argument("--ckpt", help="checkpoint written by train.py, or a best_model.pth of CRIS's training code; "
                                  "the model is rebuilt from it alone")
    p.add_argument("--pred-masks", metavar="DIR", help="score these saved <task_id>.png masks instead of a model "
                                                       "(needs --data)")
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
                   help="CUDA graphs on CUDA (inference.FastSegVLM); no effect on the CPU (default on)")
    args = p.parse_args(argv)
    if bool(args.ckpt) == bool(args.pred_masks):
        p.error("give --ckpt (a model to run) or --pred-masks DIR (saved masks to score), one of the two")
    if args.pred_masks:
        if not args.data:
            p.error("--pred-masks needs --data, the LMDB whose tasks the masks answer")
        model_only = [f for f in ("--save-masks", "--vis", "--ceiling", "--amp")
                      if getattr(args, f[2:].replace("-", "_"))]
        if model_only:
            p.error(f"{', '.join(model_only)} need a model (--ckpt); --pred-masks only scores saved masks")
    for name, least in (("batch_size", 1), ("num", 1), ("workers", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}")
    try:
        check_outputs(args)
    except ValueError as e:
        p.error(str(e))
    return args


def run(args):
    """The CLI's work; raises ValueError / OSError for the user's mistakes (parse_args checked the flags)."""

    if args.pred_masks:
        return run_pred_masks(args)
    rank, world, device = distributed.init()
    device = args.device or device  # already checked by parse_device

    net, ckpt = load_checkpoint(args.ckpt, map_location="cpu")
    net.to(device)
    cfg = net.config
    path = resolve_data_path(ckpt, args.data)
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
            with atomic_path(args.json) as tmp:
                tmp.write_text(json.dumps({**result, "definitions": DEFINITIONS}, indent=2) + "\n")
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
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({**result, "definitions": DEFINITIONS}, indent=2) + "\n")
    print(f"{args.pred_masks} on {path}: mIoU {100 * result['mIoU']:.2f}  oIoU {100 * result['oIoU']:.2f}  "
          f"P@0.5 {100 * result['prec@0.5']:.2f}  P@0.9 {100 * result['prec@0.9']:.2f}  ({result['n']} tasks)")
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
    run_tool("evaluate.py", main)
