"""Segment any image from any phrase with a trained SegVLM checkpoint.

Run:

    python predict.py --ckpt runs/paper/best.pth --image dog.jpg --phrase "black dog on the left"
    python predict.py --ckpt best.pth --image dog.jpg --phrase "the sky" --out sky.png --mask sky_mask.png
    python predict.py --ckpt best_model.pth --image photo.jpg --phrase "man in the red shirt"   # CRIS's weights

(One image is one forward pass, so there is nothing to gain from torchrun here.)

From Python, load the checkpoint once and call `predict` as often as needed:

    from predict import load_model, open_image, predict
    model = load_model("best.pth")
    mask = predict(model, open_image("dog.jpg"), "black dog")   # (H, W) bool at the image's size

The pipeline is the evaluation's: `data.letterbox` to the checkpoint's input
size, `data.tokenize` to its word length, the model, a sigmoid, then
`data.unletterbox` back to the original size and the threshold (0.35, CRIS's,
as in evaluate.py).
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

import data
from evaluate import DEFAULT_THRESHOLD


def load_model(ckpt_path, device=None):
    """Rebuild the model from a checkpoint (model.load_checkpoint), in eval mode on `device`.

    device: default the GPU if there is one, else the CPU. Errors for missing,
    truncated or foreign files are load_checkpoint's.
    """
    from model import load_checkpoint
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net, _ = load_checkpoint(ckpt_path, map_location="cpu")
    return net.to(device).eval()


def open_image(path):
    """Open and fully decode an image file as RGB, with a clear ValueError when that is unsafe or impossible.

    Refused: a missing path (FileNotFoundError), a file PIL cannot identify,
    a truncated/corrupt file, and an image larger than PIL's decompression-bomb
    limit (Image.MAX_IMAGE_PIXELS; its warning is treated as an error too).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here and not later
                return data.to_rgb(im)  # 16-bit and float images scaled, as in the dataset
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some malformed headers
        raise ValueError(f"{path}: cannot decode the image ({e})") from None


def _check_phrase(phrase):
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"the phrase is empty: {phrase!r}")
    return phrase.strip()


@torch.no_grad()
def predict_proba(model, image, phrase):
    """Foreground probability for `phrase` on `image`: float32 numpy (H, W) in [0, 1] at the image's size.

    model: a SegVLM (its config gives input_size and word_len); image: PIL image.
    """
    phrase = _check_phrase(phrase)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    cfg = model.config
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        pixels, _ = data.letterbox(image, cfg.input_size)  # (3, S, S) normalised
        tokens = data.tokenize([phrase], cfg.word_len)  # (1, L)
        logits = model(pixels[None].to(device), tokens.to(device))  # (1, 1, S/4, S/4)
        prob = data.unletterbox(logits.float().sigmoid()[0, 0], image.height, image.width,
                                input_size=cfg.input_size)  # (S/4, S/4) -> (H, W)
    finally:
        model.train(was_training)
    return prob.cpu().numpy().astype(np.float32)


def predict(model, image, phrase, threshold=DEFAULT_THRESHOLD):
    """The mask `phrase` refers to in `image`: numpy bool (H, W) at the image's size."""
    return predict_proba(model, image, phrase) > threshold


def overlay(image, mask, phrase=None, color=(230, 30, 30), alpha=0.55):
    """The image with the mask tinted in `color` and the phrase written in the corner (PIL RGB image)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    base[m] = (1 - alpha) * base[m] + alpha * np.array(color, dtype=np.float32)
    out = Image.fromarray(base.round().astype(np.uint8))
    if phrase:
        draw = ImageDraw.Draw(out)
        box = draw.textbbox((4, 4), phrase)
        draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
        draw.text((4, 4), phrase, fill=(255, 255, 255))
    return out


def main(argv=None):
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # clip's import, not ours
    p = argparse.ArgumentParser(description="Segment an image from a phrase with a SegVLM checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--image", required=True, help="image file (anything PIL reads)")
    p.add_argument("--phrase", required=True, help='what to segment, e.g. "black baseball cap"')
    p.add_argument("--out", default="overlay.png", help="overlay PNG to write")
    p.add_argument("--mask", help="also write the mask as a 0/255 PNG at the image's size")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="cut on the sigmoid (CRIS: 0.35)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        p.error(f"--threshold must be between 0 and 1, got {args.threshold}")
    try:
        phrase = _check_phrase(args.phrase)
        image = open_image(args.image)  # before the (slow) model load: bad input fails fast
        model = load_model(args.ckpt, args.device)
        mask = predict(model, image, phrase, args.threshold)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        overlay(image, mask, phrase).save(args.out)
        if args.mask:
            Path(args.mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.mask)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"predict.py: error: {e}")
    print(f'"{phrase}": {int(mask.sum())} of {mask.size} pixels ({100 * mask.mean():.1f}%); '
          f"overlay {args.out}" + (f", mask {args.mask}" if args.mask else ""))


if __name__ == "__main__":
    main()
