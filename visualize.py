"""Pictures of a model at work and of a run: overlays, the prediction grid, training curves.

Every figure is drawn on a bare matplotlib Figure (no pyplot, so no global backend: a notebook's
inline backend is left alone) and written whole (atomic_path).
"""
from pathlib import Path

import torch

import transforms
from cli import make_dir
from files import atomic_path, mask_path
from inference import eval_mode
from metrics import DEFAULT_THRESHOLD, iou, task_iou

@torch.no_grad()
def overlay_name(k, task_id) -> str:
    """save_overlays' file name for its k-th figure, of task `task_id`."""
    return f"{k:04d}_{task_id}.png"


def save_overlays(model, dataset, out_dir, num=8, threshold=DEFAULT_THRESHOLD, device=None):
    """Write `num` figures (the first tasks of `dataset`) to out_dir: image, ground truth, prediction.

    Each PNG shows the image at its original size (cut back out of the
    network's letterboxed input, so at most input_size sharp), the ground truth
    and the prediction (outside the mask dimmed), and the phrase with the task's
    IoU in the title. Files are named <k>_<task_id>.png. Returns the written paths.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    out_dir = make_dir(out_dir, "the figures' folder")
    paths = []
    with eval_mode(model, device) as (net, device):
        for k in range(min(num, len(dataset))):
            item = dataset[k]
            fig = Figure(figsize=(12, 4.4))
            score = _draw_example(fig.subplots(1, 3), net, item, threshold, device)
            fig.suptitle(f'"{item["phrase"]}"   IoU {score:.3f}   ({item["task_id"]})')
            fig.tight_layout()
            mask_path(out_dir, str(item["task_id"]))  # refuses unsafe ids before naming a file after them
            path = out_dir / overlay_name(k, item["task_id"])
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=80, format="png")
            paths.append(path)
    return paths


def _draw_example(axes, net, item, threshold, device) -> float:
    """Image, ground truth and prediction of one evaluation item on three axes -> its IoU."""
    image, gt, pred = _predict(net, item, threshold, device)
    for ax, (title, mask) in zip(axes, [("image", None), ("ground truth", gt), ("prediction", pred)]):
        _panel(ax, image, mask, title)
    return iou(*task_iou(pred, gt, item.get("ignore_mask")))  # VOC's void counts in neither


def _predict(net, item, threshold, device):
    """One evaluation item -> (image as (H, W, 3) numpy at its original size, ground truth, prediction),
    the image cut back out of the network's letterboxed input."""
    with torch.no_grad():
        logits = net(item["image"][None].to(device), item["tokens"][None].to(device)).float().cpu()
    gt = item["gt_mask"].bool()
    h, w = gt.shape
    pred = transforms.unletterbox(logits[0, 0].sigmoid(), h, w, input_size=item["image"].shape[-1]) > threshold
    image = transforms.unletterbox(transforms.unnormalize(item["image"]), h, w).clamp(0, 1).permute(1, 2, 0).numpy()
    return image, gt, pred


def _panel(ax, image, mask, title):
    """The image, or with a mask everything outside it dimmed (coloured shapes keep their colours)."""
    ax.imshow(image if mask is None else image * (0.2 + 0.8 * mask.numpy()[..., None]))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


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
    with eval_mode(model, device) as (net, device):
        for (label, index), cell in zip(picks, cells):
            item = dataset[index]
            score = _draw_example(cell.subplots(1, 3), net, item, threshold, device)
            cell.suptitle(f'"{item["phrase"]}"  ({label}): IoU {score:.2f}', fontsize=10)
            chosen.append((label, index, score))
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    return chosen


def plot_curves(history: list[dict], path: Path) -> None:
    """Training curves as a PNG. A bare Figure, so the caller's matplotlib backend
    (a notebook's inline one, say) is left alone."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    for key in ("loss", "bce", "focal", "dice"):
        a.plot(epochs, [h[key] for h in history], marker="o", label=key)
    a.set(xlabel="epoch", ylabel="training loss", title="loss terms (eq. 4-8)")
    a.legend()
    for key in ("val_mIoU", "val_oIoU", "val_prec@0.5"):
        b.plot(epochs, [h[key] for h in history], marker="o", label=key[4:])
    b.set(xlabel="epoch", ylim=(0, 1), title="validation")
    b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# The ablation's figures (ablation.py): Fig. 4, Fig. 5 and Fig. 6 of the paper, from Table 2's numbers.

def _percent_label(metric: str) -> str:
    return "IoU" if metric == "mIoU" else f"P@{round(100 * float(metric.split('@')[1]))}"


def plot_precision_curves(variants: list[dict], path, caption: str = "") -> None:
    """Fig. 4: Prec@k (percent) against k = 50 ... 90, one curve per variant, mean over the seeds with
    a band of +- one standard deviation. variants: [{"variant", "mean", "std"}] as table2.json holds them."""
    from matplotlib.figure import Figure

    from metrics import PREC_THRESHOLDS

    ks = [round(100 * k) for k in PREC_THRESHOLDS]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for v in variants:
        mean = [100 * v["mean"][f"prec@{k}"] for k in PREC_THRESHOLDS]
        std = [100 * (v["std"][f"prec@{k}"] or 0.0) for k in PREC_THRESHOLDS]
        ax.plot(ks, mean, marker="o", label=v["variant"])
        ax.fill_between(ks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set(xlabel="IoU threshold k (%)", ylabel="Prec@k (%)", xticks=ks, title="Fig. 4: precision across IoU thresholds")
    ax.legend(fontsize=8)
    _save(fig, path, caption)


def plot_stage_gains(gains: list[dict], metrics: list[str], path, caption: str = "") -> None:
    """Fig. 5: each stage's gain over the one before (percentage points), bars per metric, the error bar
    one standard deviation of the per-seed gains. gains: [{"stage", "mean", "std"}] as table2.json holds them."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.6))
    ax = fig.subplots()
    width = 0.8 / max(len(gains), 1)
    for j, g in enumerate(gains):
        xs = [i + (j - (len(gains) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, [100 * g["mean"][m] for m in metrics], width,
               yerr=[100 * (g["std"][m] or 0.0) for m in metrics], capsize=3, label=g["stage"])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(metrics)), [_percent_label(m) for m in metrics])
    ax.set(ylabel="gain over the stage before (points)", title="Fig. 5: incremental gain of each stage")
    ax.legend(fontsize=8)
    _save(fig, path, caption)


def variant_grid(models: list[tuple[str, object]], dataset, rows: list[tuple[str, int]], path,
                 threshold=DEFAULT_THRESHOLD, device=None, caption: str = "") -> list[dict]:
    """Fig. 6: one row per (label, dataset index) of `rows`; columns image, ground truth, then each
    model's prediction (drawn as prediction_grid draws them) titled with its name and the task's IoU.
    models: [(name, model)]. Written atomically; returns [{"label", "index", "phrase", "iou": {name: IoU}}]."""
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("variant_grid: no rows")
    cols = 2 + len(models)
    fig = Figure(figsize=(2.1 * cols, 2.45 * len(rows) + 0.6))
    cells = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    drawn = []
    for (label, index), cell in zip(rows, cells):
        item = dataset[index]
        axes = cell.subplots(1, cols)
        scores = {}
        for k, (name, model) in enumerate(models):
            with eval_mode(model, device) as (net, dev):
                image, gt, pred = _predict(net, item, threshold, dev)
            scores[name] = iou(*task_iou(pred, gt, item.get("ignore_mask")))
            _panel(axes[2 + k], image, pred, f"{name}\nIoU {scores[name]:.2f}")
        _panel(axes[0], image, None, "image")
        _panel(axes[1], image, gt, "ground truth")
        cell.suptitle(f'"{item["phrase"]}"  ({label})', fontsize=10)
        drawn.append({"label": label, "index": index, "phrase": item["phrase"], "iou": scores})
    _save(fig, path, caption, dpi=72)
    return drawn


def _save(fig, path, caption: str, dpi=100) -> None:
    """A figure with its caption under it, written whole (atomic_path)."""
    if caption:
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=8, wrap=True)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
