"""How far an engine's masks are from the PyTorch model's float32 masks, on a checkpoint's test split.

    python -m tools.agree --ckpt runs/demo/best.pth                      # the default engine of this machine
    python -m tools.agree --ckpt runs/demo-gres/best.pth --engine openvino --precision bf16
    python -m tools.agree --ckpt best.pth --data data/val.lmdb --limit 500 --json agree.json

Every task of the split (or the first --limit) is segmented twice, by the eager model in float32 (the reference,
what evaluate.py scores by default) and by the engine asked for (helpers/engines.py; default "auto", what
predict.py's folder mode, the page and load_model run here), each mask at the image's own size as predict.py
writes it (unletterbox, threshold 0.35). Printed, and written to --json:

- mean_iou: the mean over tasks of the IoU between the two masks (1 where both are empty), the figure
  docs/choices.md holds the default engine's bf16 to (at least 0.98);
- share_at_least_0_98: the share of tasks whose two masks have an IoU of at least 0.98; min_iou;
- no_target_agree: on data with phrases that name nothing, the share of tasks both answer alike ("no target",
  an empty mask, or a mask);
- the mean IoU against the ground truth of each (reference_mIoU, engine_mIoU: PhraseCut's definition, evaluate.py's
  mIoU).
"""
import argparse
import json
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from data import PhraseCutLMDB, collate
from evaluate import task_iou
from helpers import transforms
from helpers.cli import check_output, check_path, positive_int, run_tool
from helpers.engines import CHOICES, PRECISIONS, open_engine
from helpers.eval_files import resolve_data_path
from helpers.files import atomic_path
from helpers.model_files import read_model_file
from model import DEFAULT_THRESHOLD


def masks(model, batch, threshold):
    """Each task's mask at its image's size (predict.py's), from one forward pass over the batch."""
    with torch.no_grad():
        logits = model(batch["image"], batch["tokens"]).float().sigmoid()
    size = batch["image"].shape[-1]
    return [transforms.unletterbox(logits[i, 0], *gt.shape, input_size=size) > threshold
            for i, gt in enumerate(batch["gt_mask"])]


def iou(a, b) -> float:
    """The IoU of two masks of one task; 1 where both are empty (they agree)."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def official_iou(pred, gt) -> float:
    """PhraseCut's per-task IoU against the ground truth (evaluate.py's mIoU): 0 when I is 0, else I / U."""
    inter, union = task_iou(pred, gt)
    return inter / union if inter else 0.0


def agreement(found, dataset, engine="auto", precision="auto", batch_size=8, threshold=DEFAULT_THRESHOLD) -> dict:
    """The figures of the module docstring for the model file `found` (model_files.read_model_file's)."""
    reference = open_engine(found, "cpu", "eager", "fp32")
    other = open_engine(found, "cpu", engine, precision)
    pairs, gt_ref, gt_other, same_answer = [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        for a, b, gt in zip(masks(reference, batch, threshold), masks(other, batch, threshold), batch["gt_mask"]):
            pairs.append(iou(a, b))
            gt_ref.append(official_iou(a, gt.bool()))
            gt_other.append(official_iou(b, gt.bool()))
            same_answer.append(bool(a.any()) == bool(b.any()))
    pairs = np.array(pairs)
    result = {"ckpt": found.path, "engine": other.engine, "precision": other.precision, "tasks": len(pairs),
              "mean_iou": float(pairs.mean()), "min_iou": float(pairs.min()),
              "share_at_least_0_98": float((pairs >= 0.98).mean()), "no_target_agree": float(np.mean(same_answer)),
              "reference_mIoU": float(np.mean(gt_ref)), "engine_mIoU": float(np.mean(gt_other))}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.agree", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint, a model folder or an ONNX graph")
    p.add_argument("--data", help="an LMDB (default: <checkpoint's data_dir>/test.lmdb)")
    p.add_argument("--engine", choices=CHOICES, default="auto", help="the engine compared with eager float32")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the engine's precision (default auto)")
    p.add_argument("--limit", type=positive_int, help="only the first LIMIT tasks")
    p.add_argument("--json", help="also write the figures there")
    args = p.parse_args(argv)
    try:
        check_path(args.ckpt, "--ckpt")
        if args.json:
            check_output(args.json, "--json", [("--ckpt", args.ckpt)], example="agree.json")
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        found = read_model_file(args.ckpt)
        path = resolve_data_path(found.checkpoint, args.data)
        dataset = PhraseCutLMDB(str(path), input_size=found.config.input_size, word_len=found.config.word_len,
                                train=False)
        if args.limit:
            dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        result = agreement(found, dataset, args.engine, args.precision)
    except (ValueError, OSError) as e:
        sys.exit(f"agree: error: {e}")
    result["data"] = str(path)
    print(f"{args.ckpt} on {path}: engine {result['engine']} ({result['precision']}) against eager float32 over "
          f"{result['tasks']} tasks: mean IoU {result['mean_iou']:.4f} (min {result['min_iou']:.3f}; "
          f"{100 * result['share_at_least_0_98']:.1f} % at least 0.98), same answer (mask or no target) "
          f"{100 * result['no_target_agree']:.2f} %; test mIoU {100 * result['reference_mIoU']:.2f} (float32) vs "
          f"{100 * result['engine_mIoU']:.2f}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_tool("agree.py", main)
