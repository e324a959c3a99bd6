"""Drawing what a model predicts, and a run's curves: the pieces evaluate.py's --vis, the prediction grid and
the ablation's figures (helpers/figures.py) are made of.

Every figure is drawn on a bare matplotlib Figure (no pyplot, so no global backend: a notebook's
inline backend is left alone) and written whole (atomic_path).
"""
from pathlib import Path

import torch

from helpers import transforms
from helpers.files import atomic_path


def overlay_name(k, task_id) -> str:
    """save_overlays' file name for its k-th figure, of task `task_id`."""
    return f"{k:04d}_{task_id}.png"


def predict_item(net, item, threshold, device):
    """One evaluation item -> (image as (H, W, 3) numpy at its original size, ground truth, prediction),
    the image cut back out of the network's letterboxed input."""
    with torch.no_grad():
        logits = net(item["image"][None].to(device), item["tokens"][None].to(device)).float().cpu()
    gt = item["gt_mask"].bool()
    h, w = gt.shape
    pred = transforms.unletterbox(logits[0, 0].sigmoid(), h, w, input_size=item["image"].shape[-1]) > threshold
    image = transforms.unletterbox(transforms.unnormalize(item["image"]), h, w).clamp(0, 1).permute(1, 2, 0).numpy()
    return image, gt, pred


def draw_panel(ax, image, mask, title):
    """The image, or with a mask everything outside it dimmed (coloured shapes keep their colours)."""
    ax.imshow(image if mask is None else image * (0.2 + 0.8 * mask.numpy()[..., None]))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_curves(history: list[dict], path: Path, caption: str = "") -> None:
    """Training curves as a PNG, with `caption` under them when given (save_figure's). A bare Figure, so the
    caller's matplotlib backend (a notebook's inline one, say) is left alone."""
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
    if caption:
        save_figure(fig, path, caption)
        return
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def save_figure(fig, path, caption: str, dpi=100) -> None:
    """A figure with its caption under it, written whole (atomic_path)."""
    if caption:
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=8, wrap=True)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")


def palette_png(fig, colours=256) -> bytes:
    """`fig` as PNG bytes with an adaptive palette of at most `colours` colours (no dithering; cut at its drawing
    with bbox_inches="tight", as a notebook shows a figure). The synthetic images' textured backgrounds cost a
    full-colour PNG about 80 KB a picture and this about a seventh: a notebook that shows a dozen of them stays
    small enough to read on GitHub's page, and the shapes keep their colours."""
    import io

    from PIL import Image

    drawn = io.BytesIO()
    fig.savefig(drawn, format="png", bbox_inches="tight")
    image = Image.open(drawn).convert("RGB").quantize(colours, method=Image.Quantize.FASTOCTREE,
                                                      dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return out.getvalue()
