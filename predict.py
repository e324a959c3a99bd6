"""Segment any image from any phrase with a trained SegVLM checkpoint.

Run:

    python predict.py --ckpt runs/paper/best.pth --image dog.jpg --phrase "black dog on the left"
    python predict.py --ckpt best.pth --image dog.jpg --phrase "the sky" --out sky.png --mask sky_mask.png
    python predict.py --ckpt best_model.pth --image photo.jpg --phrase "man in the red shirt"   # a CRIS checkpoint

(One image is one forward pass, so there is nothing to gain from torchrun here.)
On CUDA the model runs through `FastSegVLM` (CUDA graphs, bf16 autocast) unless
`--no-fast` is given; on the CPU it runs eagerly.

From Python, load the checkpoint once and call `predict` as often as needed:

    from predict import load_model, predict
    model = load_model("best.pth")
    masks = predict(model, "dog.jpg", ["black dog", "the ball"])   # (H, W) bool each, the image encoded once

The pipeline is the evaluation's: `transforms.letterbox` to the checkpoint's input
size, `transforms.tokenize` to its word length, the model, a sigmoid, then
`transforms.unletterbox` back to the original size and the threshold (0.35, CRIS's,
as in evaluate.py). `open_image` applies the photo's EXIF orientation first, so the
mask fits the image as viewers display it.

The CLI checks its outputs before any work: --out and --mask must be image names PIL
can write, and neither may be --image, --ckpt (under any path) or each other.
"""
import argparse
import sys
import warnings

from helpers.cli import check_output, check_path, parse_device, parse_threshold, run_tool
from helpers.files import atomic_path, image_format, mask_format, save_mask
from helpers.inference import _check_phrase, load_model, open_image, overlay, predict
from helpers.transforms import short_phrase
from model import DEFAULT_THRESHOLD

__all__ = ["load_model", "open_image", "predict", "main"]  # the Python API lives in helpers/inference.py

def check_outputs(args):
    """Refuse, before any work, inputs that are not files (a FIFO, a device, a symlink loop) and an --out/--mask
    that PIL cannot write (a lossy format for --mask), that is a directory or not a regular file, or that
    would overwrite an input (--image or --ckpt, under any path) or the other output (a ValueError).
    Their folders are created here."""
    inputs = [("--image", args.image), ("--ckpt", args.ckpt)]
    for flag, path in inputs:
        check_path(path, flag)
    outputs = [("--out", args.out), ("--mask", args.mask)]
    for (flag, path), other in zip(outputs, outputs[::-1]):
        if path is None:
            continue
        check_output(path, flag, inputs, [other], example="overlay.png")
        try:
            (mask_format if flag == "--mask" else image_format)(path)
        except ValueError as e:
            raise ValueError(f"{flag} {e}") from None


def main(argv=None):
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # clip's import, not ours
    p = argparse.ArgumentParser(prog="predict.py",
                                description="Segment an image from a phrase with a SegVLM checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, or a best_model.pth of CRIS's training code")
    p.add_argument("--image", required=True, help="image file (anything PIL reads)")
    p.add_argument("--phrase", required=True, help='what to segment, e.g. "black baseball cap"')
    p.add_argument("--out", default="overlay.png", help="overlay image to write (.png, .jpg, ...)")
    p.add_argument("--mask", help="also write the mask as a 0/255 image (.png, ...) at the image's size")
    p.add_argument("--threshold", type=parse_threshold, default=DEFAULT_THRESHOLD,
                   help=f"cut on the sigmoid (CRIS: {DEFAULT_THRESHOLD})")
    p.add_argument("--device", type=parse_device,
                   help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs + bf16 autocast (FastSegVLM); default on for CUDA, off on the CPU")
    args = p.parse_args(argv)
    try:
        check_outputs(args)
    except ValueError as e:
        p.error(str(e))
    try:
        phrase = _check_phrase(args.phrase)
        image = open_image(args.image)  # before the (slow) model load: bad input fails fast
        model = load_model(args.ckpt, args.device, fast=args.fast)
        mask = predict(model, image, phrase, args.threshold)
        with atomic_path(args.out) as tmp:
            overlay(image, mask, phrase).save(tmp, format=image_format(args.out))
        if args.mask:
            save_mask(mask, args.mask)
    except (ValueError, OSError) as e:
        sys.exit(f"predict.py: error: {e}")
    print(f'{short_phrase(phrase)}: {int(mask.sum())} of {mask.size} pixels ({100 * mask.mean():.1f}%); '
          f"overlay {args.out}" + (f", mask {args.mask}" if args.mask else ""))


if __name__ == "__main__":
    run_tool("predict.py", main)
