"""The figures that show a model's score on chosen tasks: a run's prediction grid (train.py's predictions.png)
and the ablation's Figs. 4-6 (tools/ablation.py), each task labelled with its IoU (evaluate.task_iou)."""
from pathlib import Path

from evaluate import PREC_THRESHOLDS, iou, task_iou
from helpers.files import atomic_path
from helpers.inference import eval_mode
from helpers.visualize import draw_panel, predict_item, save_figure
from model import DEFAULT_THRESHOLD


def _draw_example(axes, net, item, threshold, device) -> float:
    """Image, ground truth and prediction of one evaluation item on three axes -> its IoU."""
    image, gt, pred = predict_item(net, item, threshold, device)
    for ax, (title, mask) in zip(axes, [("image", None), ("ground truth", gt), ("prediction", pred)]):
        draw_panel(ax, image, mask, title)
    return iou(*task_iou(pred, gt, item.get("ignore_mask")))  # VOC's void counts in neither


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
            cell.suptitle(f'"{item["phrase"]}"  ({label}): IoU {100 * score:.1f} %', fontsize=10)
            chosen.append((label, index, score))
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    return chosen


# The ablation's figures (tools/ablation.py): Fig. 4, Fig. 5 and Fig. 6 of the paper, from Table 2's numbers.

def percent_label(metric: str) -> str:
    return "IoU" if metric == "mIoU" else f"P@{round(100 * float(metric.split('@')[1]))}"


def plot_precision_curves(variants: list[dict], path, caption: str = "") -> None:
    """Fig. 4: Prec@k (percent) against k = 50 ... 90, one curve per variant, mean over the seeds with
    a band of +- one standard deviation. variants: [{"variant", "mean", "std"}] as table2.json holds them."""
    from matplotlib.figure import Figure

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
    save_figure(fig, path, caption)


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
    ax.set_xticks(range(len(metrics)), [percent_label(m) for m in metrics])
    ax.set(ylabel="gain over the stage before (points)", title="Fig. 5: incremental gain of each stage")
    ax.legend(fontsize=8)
    save_figure(fig, path, caption)


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
                image, gt, pred = predict_item(net, item, threshold, dev)
            scores[name] = iou(*task_iou(pred, gt, item.get("ignore_mask")))
            draw_panel(axes[2 + k], image, pred, f"{name}\nIoU {100 * scores[name]:.1f} %")
        draw_panel(axes[0], image, None, "image")
        draw_panel(axes[1], image, gt, "ground truth")
        cell.suptitle(f'"{item["phrase"]}"  ({label})', fontsize=10)
        drawn.append({"label": label, "index": index, "phrase": item["phrase"], "iou": scores})
    save_figure(fig, path, caption, dpi=72)
    return drawn
