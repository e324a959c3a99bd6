"""Segment any image from any phrase with a trained SegVLM checkpoint.

Run:

    python predict.py --ckpt runs/paper/best.pth --image dog.jpg --phrase "black dog on the left"
    python predict.py --ckpt best.pth --image dog.jpg --phrase "the sky" --out sky.png --mask sky_mask.png
    python predict.py --ckpt best_model.pth --image photo.jpg --phrase "man in the red shirt"   # a CRIS checkpoint

(One image is one forward pass, so there is nothing to gain from torchrun here.)
The model runs on the fastest engine of this machine (--engine auto, helpers/engines.py): for one image the
PyTorch model (CUDA graphs on CUDA; bf16 autocast with channels-last on a CPU with native bf16), for a folder
OpenVINO on a CPU where it is installed (it converts the model first, which pays off after a few images). The
engine in use is said once on stderr. --engine eager, torch, openvino or onnxruntime forces one.

From Python, load the checkpoint once and call `predict` as often as needed:

    from predict import load_model, predict
    model = load_model("best.pth")
    masks = predict(model, "dog.jpg", ["black dog", "the ball"])   # (H, W) bool each, the image encoded once

The pipeline is the evaluation's: `transforms.letterbox` to the checkpoint's input
size, `transforms.tokenize` to its word length, the model, a sigmoid, then
`transforms.unletterbox` back to the original size and the threshold (0.35, CRIS's,
as in evaluate.py). `open_image` applies the photo's EXIF orientation first, so the
mask fits the image as viewers display it.

A checkpoint trained on the synthetic set (the demo's) knows only its shapes and colours: predict.py
then prints a note saying so once, on stderr (`model.trained_on` holds what a checkpoint was trained on).

The CLI checks its outputs before any work: --out and --mask must be image names PIL
can write, and neither may be --image, --ckpt (under any path) or each other.

A folder of images at once, every image with every phrase, each image its own forward pass and encoded
once for up to 64 of its phrases (helpers/batch_predict.py; docs/predict.md):

    python predict.py --ckpt best.pth --images photos/ --phrases phrases.txt --out masks/
    python predict.py --ckpt best.pth --images a.jpg b.jpg --phrase "the dog" --phrase "the ball" --out masks/

--onnx model.onnx (tools/export.py's) runs the exported graph (OpenVINO where installed, else onnxruntime), in
both modes; --ckpt also takes a safetensors folder (config.json + model.safetensors, tools/export.py --safetensors).
--precision: "auto" runs bf16 on CUDA and on a CPU with native bf16 (AVX512-BF16, AMX), float32 elsewhere; "fp32"
always float32.
"""
import argparse
import os
import sys

from helpers import batch_predict
from helpers.cli import check_output, check_output_dir, check_path, parse_device, parse_threshold, positive_int, run_tool, shown
from helpers.engines import CHOICES, PRECISIONS
from helpers.files import atomic_path, hold_dir, image_format, mask_format, save_mask
from helpers.inference import NOT_FOUND, check_phrase, load_model, open_image, overlay, predict
from helpers.provenance import SYNTHETIC_NOTE, knows_only_synthetic
from helpers.transforms import short_phrase
from model import DEFAULT_THRESHOLD

__all__ = ["load_model", "open_image", "predict", "main"]  # the Python API lives in helpers/inference.py

def check_outputs(args):
    """Refuse, before any work, inputs that are not files (a FIFO, a device, a symlink loop) and an --out/--mask
    that PIL cannot write (a lossy format for --mask), that is a directory or not a regular file, or that
    would overwrite an input (--image or --ckpt, under any path) or the other output (a ValueError).
    Their folders are created here."""
    inputs = [("--image", args.image), ("--ckpt", args.ckpt), ("--onnx", args.onnx)]
    for flag, path in inputs:
        if path is not None:
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="predict.py",
                                description="Segment an image (or a folder of images) from a phrase with a SegVLM "
                                            "checkpoint.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint written by train.py, a best_model.pth of CRIS's training code, or a "
                                      "safetensors folder (tools/export.py --safetensors)")
    model.add_argument("--onnx", help="an ONNX file written by tools/export.py, run through onnxruntime")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", help="image file (anything PIL reads)")
    inputs.add_argument("--images", nargs="+", metavar="DIR_OR_FILE",
                        help="folder mode: folders (searched recursively) and/or image files; needs --out DIR")
    p.add_argument("--phrase", action="append",
                   help='what to segment, e.g. "black baseball cap"; in folder mode it may be repeated')
    p.add_argument("--phrases", metavar="FILE", help="folder mode: a text file, one phrase a line")
    p.add_argument("--out", help="overlay image to write (default overlay.png); in folder mode the folder of "
                                 "masks and index.csv")
    p.add_argument("--mask", help="also write the mask as a 0/255 image (.png, ...) at the image's size")
    p.add_argument("--threshold", type=parse_threshold, default=DEFAULT_THRESHOLD,
                   help=f"cut on the sigmoid (CRIS: {DEFAULT_THRESHOLD})")
    p.add_argument("--device", type=parse_device,
                   help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--engine", choices=CHOICES, default="auto",
                   help="what runs the model (docs/predict.md): auto (default) the fastest here (on a CPU: OpenVINO for "
                        "a folder or an ONNX file, PyTorch for one image, which conversion would slow), eager (the "
                        "PyTorch model), torch (CUDA graphs; bf16 + channels-last on a CPU with native bf16), "
                        "openvino, onnxruntime (--onnx)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the older switch: --fast is --engine torch, --no-fast --engine eager")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 on CUDA and on a CPU with native bf16 (AVX512-BF16, AMX), float32 "
                        "elsewhere; every engine but onnxruntime honours it")
    p.add_argument("--engine-cache", metavar="DIR",
                   help="a folder of your own where OpenVINO keeps the converted model for the next run")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="folder mode: images decoded per batch (4); each goes through the model on its own")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="folder mode: image-decoding processes (default min(2, CPUs); 0 decodes in this one)")
    args = p.parse_args(argv)
    if args.images is None:
        wrong = [flag for flag, value in (("--phrases", args.phrases), ("--batch-size", argv_has(argv, "--batch-size")),
                                          ("--workers", argv_has(argv, "--workers"))) if value]
        if wrong:
            p.error(f"{', '.join(wrong)} belong(s) to the folder mode (--images)")
        if not args.phrase:
            p.error("--image needs --phrase")
        args.phrase, args.out = args.phrase[-1], args.out or "overlay.png"  # as ever, the last of a repeated flag
    else:
        if args.mask:
            p.error("--mask is for one --image; in folder mode every mask goes under --out")
        if not args.out:
            p.error("--images needs --out DIR, the folder for the masks and index.csv")
        if bool(args.phrase) == bool(args.phrases):
            p.error("--images needs --phrases FILE or --phrase (repeatable), one of the two")
        if args.workers < 0:
            p.error(f"--workers must be at least 0, got {args.workers}")
    if args.fast is not None:
        if args.engine not in ("auto", "torch" if args.fast else "eager"):
            p.error(f"--{'' if args.fast else 'no-'}fast contradicts --engine {args.engine}; give one of the two")
        args.engine = "torch" if args.fast else "eager"
    if args.onnx and args.engine in ("eager", "torch"):
        p.error(f"--engine {args.engine} runs a PyTorch model (--ckpt); --onnx runs on onnxruntime or openvino")
    if args.ckpt and args.engine == "onnxruntime":
        p.error("--engine onnxruntime runs an ONNX graph (--onnx); export one with python -m tools.export --onnx")
    return p, args


def argv_has(argv, flag):
    return any(a == flag or a.startswith(flag + "=") for a in (sys.argv[1:] if argv is None else argv))


def open_model(args, quick_start=False):
    """The model of --onnx or --ckpt on its engine, said once on stderr; a model trained only on the synthetic set
    says so once, on stderr, before any mask it qualifies. quick_start: one image (no engine that converts)."""
    model = load_model(args.onnx or args.ckpt, args.device, engine=args.engine, precision=args.precision,
                       quick_start=quick_start, cache_dir=args.engine_cache)
    print(f"predict.py: engine {model.engine} ({model.precision}){' chosen for this machine' * (args.engine == 'auto')}",
          file=sys.stderr, flush=True)
    if knows_only_synthetic(model.trained_on):
        print(f"predict.py: note: {SYNTHETIC_NOTE}", file=sys.stderr, flush=True)
    return model


def main(argv=None):
    p, args = parse_args(argv)
    if args.images is not None:
        return folder_main(p, args)
    try:
        check_outputs(args)
    except ValueError as e:
        p.error(shown(e))
    try:
        phrase = check_phrase(args.phrase)
        image = open_image(args.image)  # before the (slow) model load: bad input fails fast
        model = open_model(args, quick_start=True)
        mask = predict(model, image, phrase, args.threshold)
        with atomic_path(args.out) as tmp:
            overlay(image, mask, phrase).save(tmp, format=image_format(args.out))
        if args.mask:
            save_mask(mask, args.mask)
    except (ValueError, OSError) as e:
        sys.exit(f"predict.py: error: {shown(e)}")
    found = f"{int(mask.sum())} of {mask.size} pixels ({100 * mask.mean():.1f}%)" if mask.any() else NOT_FOUND
    print(f'{shown(short_phrase(phrase))}: {found}; overlay {shown(args.out)}'
          + (f", mask {shown(args.mask)}" if args.mask else ""))


def folder_main(p, args):
    """--images: every image with every phrase (helpers/batch_predict); exit 1 when an image could not be read.
    The flags, the images and OUT (its index, its files, its links) are checked before the model is loaded."""
    try:
        for flag in ("--ckpt", "--onnx", "--phrases"):
            if getattr(args, flag[2:]) is not None:
                check_path(getattr(args, flag[2:]), flag)
        out = check_output_dir(args.out, "--out", [("--ckpt", args.ckpt), ("--onnx", args.onnx),
                                                   ("--phrases", args.phrases)])
        phrases = (batch_predict.read_phrases(args.phrases) if args.phrases
                   else batch_predict.unique(p.strip() for p in args.phrase))
        if not phrases:
            raise ValueError("--phrase: every phrase given is empty")
        found = batch_predict.find_images(args.images, out)
    except ValueError as e:
        p.error(shown(e))
    for note in found.notes:
        print(f"predict.py: note: {note}", file=sys.stderr, flush=True)
    try:
        with hold_dir(out, "--out"):
            job = batch_predict.plan(found.images, phrases, out)  # a refusal of OUT comes before the (slow) load
            model = open_model(args)
            summary, failures = batch_predict.execute(model, job, args.threshold, args.batch_size, args.workers,
                                                      model_file=args.onnx or args.ckpt)
    except (ValueError, OSError) as e:
        sys.exit(f"predict.py: error: {shown(e)}")
    print(f"predict.py: {summary['images']} image(s) x {summary['phrases']} phrase(s): {summary['written']} mask(s) "
          f"written, {summary['skipped']} already in {shown(out / batch_predict.INDEX)}"
          + (f"; {summary['read']} image(s) in {summary['seconds']:.1f} s, "
             f"{summary['read'] / summary['seconds']:.2f} images/s" if summary.get("read") else ""))
    if failures:
        sys.exit(f"predict.py: {len(failures)} of {summary['images']} image(s) could not be read (named above); "
                 f"the others are done")


if __name__ == "__main__":
    run_tool("predict.py", main)
