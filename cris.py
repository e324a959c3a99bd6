"""CRIS checkpoint compatibility: predict, evaluate and fine-tune SegVLM from CRIS's released weights.

CRIS's authors (Wang et al., CVPR 2022, github.com/DerrickWang005/CRIS.pytorch) released
`best_model.pth` files for CLIP RN50 and RN101, trained on RefCOCO, RefCOCO+ and RefCOCOg.
With the enhancement block off, SegVLM is CRIS's architecture (the paper's baseline, Table 2's
first row), so such a file runs here unchanged: only the parameter names differ.

    python cris.py convert best_model.pth cris_rn101.pth    # a normal checkpoint of this project
    python predict.py --ckpt best_model.pth --image photo.jpg --phrase "man in the red shirt"
    python evaluate.py --ckpt best_model.pth --data lmdb/test.lmdb
    python train.py --preset paper --init-from best_model.pth --data lmdb/

predict.py and evaluate.py read the file through `checkpoints.load_checkpoint`, which recognises it
(`is_cris_checkpoint`) and converts it in memory (`to_segvlm_checkpoint`). train.py's
`--init-from` copies every tensor into a SegVLM whose enhancement block is new (`init_model`).
checkpoints.py holds the format and its conversion, with the table of names.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

if __name__ == "__main__":  # clip's own import warns about pkg_resources; not ours to fix
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from checkpoints import (CRIS_DECODER_HEADS, CRIS_INPUT_SIZE, is_cris_checkpoint, read_checkpoint_file,  # noqa: E402
                         summary, to_segvlm_checkpoint)
from files import atomic_path  # noqa: E402


def convert(src, dst, **overrides) -> dict:
    """Write CRIS's file `src` as a checkpoint of this project at `dst` (temporary name, then rename)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output would replace the CRIS file; choose another name")
    obj = read_checkpoint_file(src, "cpu")
    if not is_cris_checkpoint(obj):
        raise ValueError(f"{src} is not a CRIS checkpoint: expected CRIS's best_model.pth, a dict whose "
                         f"'state_dict' has keys module.backbone.*, module.neck.*, module.decoder.*, module.proj.*")
    ckpt = to_segvlm_checkpoint(obj, src, **overrides)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        torch.save(ckpt, tmp)
    return ckpt


def main(argv=None):
    p = argparse.ArgumentParser(prog="cris.py", description=__doc__.split("\n")[0],
                                epilog="Run `python cris.py convert -h` for the converter's options.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write CRIS's best_model.pth as a checkpoint of this project",
                       description="Write CRIS's best_model.pth as a checkpoint of this project (same weights, "
                                   "enhancement block off), loadable with torch.load(weights_only=True).")
    c.add_argument("src", help="CRIS's best_model.pth")
    c.add_argument("dst", help="the checkpoint to write")
    c.add_argument("--input-size", type=int, help=f"input side the checkpoint's users resize to (CRIS's: {CRIS_INPUT_SIZE})")
    c.add_argument("--word-len", type=int, help="longest phrase in tokens (default: CLIP's context, 77)")
    c.add_argument("--transformer-heads", type=int, help="text transformer heads (default: CLIP's rule, width // 64)")
    c.add_argument("--decoder-heads", type=int, help=f"decoder heads (default: CRIS's {CRIS_DECODER_HEADS})")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "src", "dst") and v is not None}
    try:
        ckpt = convert(args.src, args.dst, **overrides)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"cris.py: error: {e}")
    print(summary(ckpt, args.src))
    print(f"wrote {args.dst}: {len(ckpt['model'])} tensors; checkpoints.load_checkpoint, predict.py, evaluate.py and "
          f"train.py --init-from read it")


if __name__ == "__main__":
    main()
