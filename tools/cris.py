"""CRIS checkpoint compatibility: predict, evaluate and fine-tune SegVLM from a CRIS checkpoint.

CRIS's training code (Wang et al., CVPR 2022, github.com/DerrickWang005/CRIS.pytorch) writes
`best_model.pth` (CLIP RN50 or RN101 backbones; its configs train on RefCOCO, RefCOCO+ and RefCOCOg).
CRIS's authors published no checkpoints (that repository's issue #3, "Pretrained CRIS model", open
since June 2022, and #13 ask for them): such a file comes from your own run of CRIS's code or from
someone else who trained it. With the enhancement block off, SegVLM is CRIS's architecture (the
paper's baseline, Table 2's first row), so such a file runs here unchanged: only the parameter names
differ.

    python -m tools.cris convert best_model.pth cris_rn101.pth    # a normal checkpoint of this project
    python predict.py --ckpt best_model.pth --image photo.jpg --phrase "man in the red shirt"
    python evaluate.py --ckpt best_model.pth --data lmdb/test.lmdb
    python train.py --preset paper --init-from best_model.pth --data lmdb/

predict.py and evaluate.py read the file through `model_files.load_checkpoint`, which recognises it
(`is_cris_checkpoint`) and converts it in memory (`to_segvlm_checkpoint`). train.py's
`--init-from` copies every tensor into a SegVLM whose enhancement block is new (`init_model`).
helpers/checkpoints.py holds the format and its conversion, with the table of names.
"""
import argparse
import functools
import sys
from pathlib import Path

import torch

from helpers.checkpoints import (
    CRIS_DECODER_HEADS,
    CRIS_INPUT_SIZE,
    is_cris_checkpoint,
    read_checkpoint_file,
    summary,
    to_segvlm_checkpoint,
)
from helpers.cli import check_output, check_path, run_tool, same_file
from helpers.files import atomic_path
from model import SegVLMConfig


def check_paths(src, dst):
    """Refuse, before any work (a ValueError): a src that is not a file, and a dst that would replace src, that
    cannot be written, or that exists and is not a checkpoint this converter wrote (a user's file is never
    overwritten; a converted file may be converted again)."""
    src, dst = check_path(src, "src"), check_path(dst, "dst")
    if not src.is_file():
        raise ValueError(f"src {src}: {'a directory' if src.is_dir() else 'no such file'}; name CRIS's best_model.pth")
    if same_file(src, dst):
        raise ValueError(f"{dst}: the output would replace the CRIS file; choose another name")
    check_output(dst, "dst", example="cris.pth")
    if dst.exists() and not written_by_convert(dst):
        raise ValueError(f"dst {dst} exists and is not a checkpoint cris.py convert wrote; it is left alone: "
                         f"remove it, or name another file")


def written_by_convert(path) -> bool:
    """Whether `path` holds a checkpoint `convert` wrote (source "CRIS"); read lazily (mmap), never code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch file, or one holding code: not ours either way
        return False
    return isinstance(ckpt, dict) and ckpt.get("source") == "CRIS" and {"model", "config"} <= set(ckpt)


def convert(src, dst, **overrides) -> dict:
    """Write CRIS's file `src` as a checkpoint of this project at `dst` (temporary name, then rename)."""
    src, dst = Path(src), Path(dst)
    check_paths(src, dst)
    obj = read_checkpoint_file(src, "cpu")
    if not is_cris_checkpoint(obj):
        raise ValueError(f"{src} is not a CRIS checkpoint: expected CRIS's best_model.pth, a dict whose "
                         f"'state_dict' has keys module.backbone.*, module.neck.*, module.decoder.*, module.proj.*")
    ckpt = to_segvlm_checkpoint(obj, src, **overrides)
    with atomic_path(dst) as tmp:
        torch.save(ckpt, tmp)
    return ckpt


def config_flag(text, name):
    """An int flag that sets the config field `name`, checked by SegVLMConfig.check_field (argparse's type)."""
    try:
        return SegVLMConfig.check_field(name, int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def main(argv=None):
    p = argparse.ArgumentParser(prog="cris.py", description=__doc__.split("\n")[0],
                                epilog="Run `python -m tools.cris convert -h` for the converter's options.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a best_model.pth of CRIS's training code as a checkpoint of this project",
                       description="Write CRIS's best_model.pth as a checkpoint of this project (same weights, "
                                   "enhancement block off), loadable with torch.load(weights_only=True). An "
                                   "existing dst is replaced only when this converter wrote it.")
    c.add_argument("src", help="a best_model.pth written by CRIS's training code")
    c.add_argument("dst", help="the checkpoint to write")
    for name, text in (("input_size", f"input side the checkpoint's users resize to (CRIS's: {CRIS_INPUT_SIZE})"),
                       ("word_len", "longest phrase in tokens (default: CLIP's context, 77)"),
                       ("transformer_heads", "text transformer heads (default: CLIP's rule, width // 64)"),
                       ("decoder_heads", f"decoder heads (default: CRIS's {CRIS_DECODER_HEADS})")):
        c.add_argument("--" + name.replace("_", "-"), type=functools.partial(config_flag, name=name), help=text,
                       metavar=name.upper())
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "src", "dst") and v is not None}
    try:
        check_paths(args.src, args.dst)
    except ValueError as e:
        c.error(str(e))
    try:
        ckpt = convert(args.src, args.dst, **overrides)
    except (ValueError, OSError) as e:
        sys.exit(f"cris.py: error: {e}")
    print(summary(ckpt, args.src))
    print(f"wrote {args.dst}: {len(ckpt['model'])} tensors; model_files.load_checkpoint, predict.py, evaluate.py and "
          f"train.py --init-from read it")


if __name__ == "__main__":
    run_tool("cris.py", main)
