"""Running a trained model: load it, feed it a photo and a phrase, get the mask back.

    from helpers.inference import load_model, predict
    model = load_model("best.pth")
    print(model.trained_on)                                       # what the checkpoint was trained on
    mask = predict(model, "dog.jpg", "black dog")                # (H, W) bool at the image's size
    masks = predict(model, "dog.jpg", ["black dog", "the ball"])  # a list: the image encoded once

The image may be a path, a PIL image or an (H, W, 3) uint8 numpy array (`as_image`).

The pipeline is the evaluation's: `transforms.letterbox` to the checkpoint's input size,
`transforms.tokenize` to its word length, the model, a sigmoid, then `transforms.unletterbox` back
to the original size and the threshold (0.35, CRIS's, metrics.DEFAULT_THRESHOLD). `open_image`
applies the photo's EXIF orientation first, so the mask fits the image as viewers display it.

load_model runs the model on the fastest engine of this machine (helpers/engines.py: OpenVINO on a CPU where it is
installed, in bf16 where the CPU computes it natively; CUDA graphs under bf16 autocast on CUDA); engine="eager",
precision="fp32" is the PyTorch model itself in float32.
"""
import contextlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from helpers import distributed, provenance, transforms
from helpers.cli import check_threshold
from helpers.engines import CHOICES, PRECISIONS, net_device, open_engine
from helpers.model_files import read_model_file
from model import DEFAULT_THRESHOLD, build_model


def load_model(ckpt_path, device=None, engine="auto", precision="auto", fast=None, quick_start=False, cache_dir=None):
    """Load any model file and run it on an engine: a .pth (train.py's, CRIS's best_model.pth), a model folder
    (config.json + model.safetensors) or an ONNX graph (tools/export.py's) -> a module called as SegVLM is,
    `model(image, tokens, image_index=None) -> logits`, in eval mode.

    The file is read and checked by model_files.read_model_file (errors for missing, truncated, foreign or
    hostile files are its). device: default this process's GPU if there is one, else the CPU.
    engine: "auto" (the fastest engine on this machine, engines.choose_engine: OpenVINO on a CPU where it is
    installed), "eager" (the PyTorch model itself), "torch" (engines.FastSegVLM: CUDA graphs on CUDA, bf16 autocast
    and channels-last on a CPU with native bf16), "openvino", or "onnxruntime" (an ONNX graph). precision: "auto"
    (bf16 on CUDA and on a CPU with native bf16, engines.native_bf16; float32 elsewhere), "bf16" or "fp32": every
    engine but onnxruntime honours it. fast: the older switch, True for "torch", False for "eager".
    quick_start: the caller runs the model once (predict.py --image): "auto" then takes no engine that converts
    the model first. cache_dir: a folder of your own where OpenVINO's conversion is kept for the next process.

    `model.engine` and `model.precision` say what runs; `model.trained_on` is what the file says the model was
    trained on (provenance.of_checkpoint: dataset, split sizes, preset, epochs, best val score; "unknown" where the
    file does not tell); `provenance.describe(model.trained_on)` is that as one line, and
    `provenance.knows_only_synthetic` says when the masks on a photo mean nothing (provenance.SYNTHETIC_NOTE).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if engine not in CHOICES:
        raise ValueError(f"engine must be one of {CHOICES}, got {engine!r}")
    if fast is not None:
        if engine not in ("auto", "torch" if fast else "eager"):
            raise ValueError(f"fast={fast} contradicts engine={engine!r}; give one of the two")
        engine = "torch" if fast else "eager"
    found = read_model_file(ckpt_path)
    return open_engine(found, device or distributed.info().device, engine, precision, quick_start, cache_dir)


def trained_checkpoint(root=".", preset="demo"):
    """The trained checkpoint the notebooks show, or None for random weights: $SEGVLM_CKPT when it is set
    ("none" or empty: random weights), else the newest best.pth of a `preset` run under `root`: runs/<preset>
    (train.py's) or a dated runs/<preset>-<date>-<time>, never another preset's (runs/demo-gres is not a demo run)."""
    chosen = os.environ.get("SEGVLM_CKPT")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none") else Path(chosen)
    own = re.compile(re.escape(preset) + r"(-\d{8}-\d{6})?")
    found = sorted((p for p in Path(root).glob("runs/*/best.pth") if own.fullmatch(p.parent.name)),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def weights_line(ckpt, trained_on, root=".") -> str:
    """Which checkpoint, what it was trained on and its test score, in one line (notebooks' figures say it):
    "runs/demo/best.pth: trained on ... ; test mean IoU 70.69 % (718 phrases)". The path is shown relative to
    `root` when it lies under it, so that a rendered notebook names the repository's file, not the renderer's folder."""
    shown = Path(ckpt)
    with contextlib.suppress(ValueError):  # abspath, not resolve: runs/ may be a link to another disk
        shown = Path(os.path.abspath(ckpt)).relative_to(os.path.abspath(root))
    scores = provenance.test_scores(ckpt)
    return f"{shown}: {provenance.describe(trained_on)}" + (f"; {scores}" if scores else "")


def notebook_model(root=".", preset="demo", **overrides):
    """(model in eval mode on the CPU, a line saying which weights it has): trained_checkpoint(root, preset)'s, the
    PyTorch model itself in float32 (the same figures on any CPU), with weights_line's provenance; else `preset`'s
    random weights (build_model(preset, **overrides), seed 0)."""
    ckpt = trained_checkpoint(root, preset)
    if ckpt is not None:
        model = load_model(ckpt, "cpu", engine="eager", precision="fp32")
        return model, f"trained weights from {weights_line(ckpt, model.trained_on, root)}"
    torch.manual_seed(0)
    model = build_model(preset, **overrides).eval()
    return model, (f"random weights (the {preset} preset): no runs/{preset}/best.pth under {Path(root).resolve()} "
                   f"and no $SEGVLM_CKPT; `python train.py --preset {preset}` trains one")


def unwrap(model):
    # DDP's forward may talk to the other ranks (buffer broadcast), and shards
    # differ in length by one batch: run the plain module instead.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def eval_mode(model, device=None):
    """(the plain module, the device to run on: `device` or its parameters'), in eval mode inside the
    block; the module's own train/eval mode is restored after it."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        yield net, torch.device(device) if device is not None else next(net.parameters()).device
    finally:
        net.train(was_training)


BYTES_PER_PIXEL = 8  # 16-bit RGBA, uncompressed: no real image file at PIL's pixel limit is larger


def open_image(path, max_side=None):
    """Open and fully decode an image file as RGB, upright; a clear ValueError when that is unsafe or impossible.

    max_side: a picture whose longer side is larger comes out reduced to fit it (aspect kept), decoded at
    a reduced scale where the format allows (a JPEG through PIL's draft: 1/2, 1/4, 1/8), so a small file of
    huge pixel size never costs its full size in memory; its stored (width, height) is then in
    `image.info["original_size"]`. Default None: the full size.

    The EXIF orientation is applied (ImageOps.exif_transpose): a phone photo stored sideways comes
    out upright, so the mask fits the photo as viewers show it. (The dataset does not: PhraseCut's
    polygons are on the stored pixels.)
    Refused: a missing path (FileNotFoundError), a directory, a URL, a file PIL cannot identify,
    a truncated/corrupt file, an image larger than PIL's decompression-bomb
    limit (Image.MAX_IMAGE_PIXELS; its warning is treated as an error too), and a file larger than any
    image within that limit could be (BYTES_PER_PIXEL a pixel), refused before it is read.
    """
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)):
        raise ValueError(f"{path}: URLs are not supported, download it first")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not an image")
    limit = Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS * BYTES_PER_PIXEL
    if limit and path.stat().st_size > limit:  # before PIL reads any of it
        raise ValueError(f"{path} is {path.stat().st_size / 2 ** 30:.1f} GiB, far beyond any image PIL decodes "
                         f"(at most {Image.MAX_IMAGE_PIXELS:,} pixels, {limit / 2 ** 30:.1f} GiB even uncompressed "
                         f"at 16-bit RGBA); not read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
                if max_side and max(size) > max_side and im.format == "JPEG":
                    scale = max_side / max(size)  # the draft keeps at least this size, never less
                    im.draft("RGB", (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))))
                im.load()  # decode now, so a truncated file fails here and not later
                # upright as displayed; 16-bit and float images scaled, as in the dataset
                image = transforms.to_rgb(ImageOps.exif_transpose(im))
        if max_side and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.BILINEAR)
        if max_side and max(size) > max_side:
            image.info["original_size"] = size
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:  # SyntaxError: some malformed headers; ValueError: bad EXIF
        raise ValueError(f"{path}: cannot decode the image ({e})") from None


def check_phrase(phrase):
    if not isinstance(phrase, str):
        raise ValueError(f"a phrase must be a string, got {type(phrase).__name__} {phrase!r}")
    if not phrase.strip():
        raise ValueError(f"the phrase is empty: {phrase!r}")
    return phrase.strip()


def as_image(image):
    """A path (str or Path, read by open_image), a PIL image or an (H, W, 3) uint8 numpy array -> RGB PIL image.

    Anything else is refused with a ValueError that says what was expected: a float array, say, would
    be silently misread as 0-255 pixels (CRIS.pytorch issue #11 is users passing arrays to the model)."""
    if isinstance(image, (str, Path)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return transforms.to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a numpy image must be (H, W, 3) uint8 RGB, got {image.dtype} of shape {image.shape}")
        if 0 in image.shape:
            raise ValueError(f"the image is empty: shape {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    raise ValueError(f"image must be a file path, a PIL image or an (H, W, 3) uint8 numpy array, "
                     f"got {type(image).__name__}")


def _phrase_list(phrases):
    """(the phrases, checked and stripped, as a list; whether one bare string was given)."""
    if isinstance(phrases, str):
        return [check_phrase(phrases)], True
    if not isinstance(phrases, (list, tuple)):
        raise ValueError(f"phrases must be a string or a list of strings, got {type(phrases).__name__}")
    if not phrases:
        raise ValueError("no phrase given: pass a string or a non-empty list of strings")
    return [check_phrase(p) for p in phrases], False


PAIRS_PER_PASS = 64  # phrases of one image in one forward pass at most (iter_proba, the folder mode): memory bounded


@torch.no_grad()
def iter_proba(model, image, phrases):
    """predict_proba's maps one at a time: a generator of float32 numpy (H, W) maps, one per phrase in
    order, each made at the image's size only when asked for. The phrases go through the model
    PAIRS_PER_PASS at a time (the first map of each group runs it): the image is encoded once per group,
    so 10,000 phrases cost 157 passes of bounded memory, not one pass of gigabytes. For many phrases on a
    large picture, only one full-size map need be held at a time (the page does so). phrases: a string
    or a list of them."""
    phrases, _ = _phrase_list(phrases)
    image = as_image(image)
    cfg = model.config
    with warnings.catch_warnings():  # on every call (Python's default filter says a repeated warning once)
        warnings.simplefilter("always")
        for phrase in phrases:
            transforms.warn_if_cut(phrase, cfg.word_len)  # which words the model sees of a long phrase
    device = net_device(model)
    pixels = transforms.letterbox(image, cfg.input_size)[0][None].to(device)  # (1, 3, S, S) normalised
    for start in range(0, len(phrases), PAIRS_PER_PASS):
        group = phrases[start:start + PAIRS_PER_PASS]
        was_training = model.training
        model.eval()
        try:
            tokens = transforms.tokenize(group, cfg.word_len).to(device)  # (N, L)
            if len(group) == 1:
                logits = model(pixels, tokens)  # (1, 1, S/4, S/4)
            else:  # one image, N phrases: phrase i is about image 0
                index = torch.zeros(len(group), dtype=torch.long, device=device)
                logits = model(pixels, tokens, image_index=index)  # (N, 1, S/4, S/4)
        finally:
            model.train(was_training)
        for row in logits:  # (1, S/4, S/4) -> (H, W), one phrase at a time
            yield probability_map(row, image.height, image.width, cfg.input_size)


def predict_proba(model, image, phrases):
    """Foreground probability of each phrase on `image`: float32 numpy (H, W) in [0, 1] at the image's size.

    image: a path, a PIL image or an (H, W, 3) uint8 numpy array (as_image). phrases: one string ->
    one map; a list -> a list of maps, in order. A list is one forward pass per PAIRS_PER_PASS
    phrases: the image is letterboxed once and encoded once per pass, and every phrase is decoded
    against it (SegVLM's image_index), so N phrases (up to 64) cost one image encoding, not N. model: a
    SegVLM or FastSegVLM (its config gives input_size and word_len). iter_proba gives the same maps one at
    a time.
    """
    _, single = _phrase_list(phrases)
    probs = list(iter_proba(model, image, phrases))
    return probs[0] if single else probs


def probability_map(logits, height, width, input_size):
    """One phrase's logits (1, S/4, S/4) -> its probability map, float32 numpy (height, width): the sigmoid,
    then transforms.unletterbox (up to S, the content box, the image's size). predict_proba's and the
    folder mode's (helpers/batch_predict.py) one way from logits to a mask."""
    prob = logits.float().sigmoid()[0]  # (S/4, S/4)
    return transforms.unletterbox(prob, height, width, input_size=input_size).cpu().numpy().astype(np.float32)


NOT_FOUND = "not found in the picture"  # what the page and predict.py say for an empty mask: "no target"


def predict(model, image, phrases, threshold=DEFAULT_THRESHOLD):
    """The mask each phrase refers to in `image`: numpy bool (H, W) at the image's size; empty (all False)
    when the phrase names nothing there (the answer "no target": a model with the no-target head gives it,
    as generalized referring segmentation scores it).

        masks = predict(model, "dog.jpg", ["black dog", "the ball"])   # a list in, a list out

    image: a path, a PIL image or an (H, W, 3) uint8 numpy array; phrases: one string (one mask) or
    a list (a list of masks, the image encoded once); predict_proba says more. threshold: strictly between
    0 and 1 (as the command line's --threshold), else a ValueError naming it."""
    threshold = check_threshold(threshold)
    probs = predict_proba(model, image, phrases)
    return probs > threshold if isinstance(probs, np.ndarray) else [p > threshold for p in probs]


# Each phrase's colour in an overlay, in order: distinct hues that stay readable over a photo.
PALETTE = ((230, 30, 30), (30, 110, 240), (40, 190, 60), (250, 170, 0), (170, 50, 220),
           (0, 200, 200), (240, 80, 180), (140, 90, 30), (250, 250, 250), (20, 20, 20))


TINT_ROWS = 256  # tint works on bands of rows: a large picture needs no full-size temporaries


def tint(rgb, mask, color, alpha=0.55, out=None):
    """rgb (H, W, 3) float numpy with the pixels of mask (H, W) blended towards color (same scale).

    A bool mask blends its pixels by alpha; a float mask in [0, 1] (a probability map) blends each
    pixel by alpha times its value. The rows are blended a band at a time (the same arithmetic,
    pixel by pixel), so the only full-size array made is the result; out=rgb blends in place and
    makes none (the page does so), out=None returns a new array."""
    mask = np.asarray(mask)
    color = np.array(color, dtype=rgb.dtype)
    if out is None:
        out = rgb.copy()
    elif out is not rgb:
        out[...] = rgb
    for top in range(0, rgb.shape[0], TINT_ROWS):
        band, m = out[top:top + TINT_ROWS], mask[top:top + TINT_ROWS]
        if mask.dtype != bool:  # (1 - w) * rgb + w * color, computed in place: the same float32 arithmetic
            weight = alpha * np.clip(m.astype(np.float32), 0, 1)[..., None]
            band *= 1 - weight
            band += weight * color
        elif band.flags.c_contiguous:  # (1 - alpha) * rgb + alpha * color at the mask's pixels, by flat index
            pixels, where = band.reshape(-1, rgb.shape[-1]), np.flatnonzero(m)  # a view: written through
            pixels[where] = (1 - alpha) * pixels[where] + alpha * color
        else:
            band[m] = (1 - alpha) * band[m] + alpha * color
    return out


def overlay(image, masks, phrases=None, color=None, alpha=0.55):
    """The image with each mask tinted in its colour, and its phrase in the corner (PIL RGB image).

    masks: one (H, W) mask, or a list; bool masks are tinted where true, float maps (probabilities)
    by their value (tint). phrases: None, one string, or one per mask, written top left on a colour
    swatch as a legend, its text scaled to the picture (legend_font_size). color: one colour for a single
    mask (default red), or a list; default PALETTE in order, so the first phrase is red. One mask and
    its phrase give predict.py's picture.
    """
    single = not isinstance(masks, (list, tuple))
    masks = [masks] if single else list(masks)
    phrases = [phrases] if isinstance(phrases, str) or phrases is None else list(phrases)
    if phrases == [None]:
        phrases = [None] * len(masks)
    if len(phrases) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(phrases)} phrases")
    colors = [color or PALETTE[0]] if single else list(color or PALETTE)
    if len(colors) < len(masks):
        raise ValueError(f"{len(masks)} masks but only {len(colors)} colours")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    for mask, c in zip(masks, colors):
        if np.shape(mask) != base.shape[:2]:
            raise ValueError(f"mask of shape {np.shape(mask)} on an image of {base.shape[1]}x{base.shape[0]} (W x H)")
        base = tint(base, mask, c, alpha)
    return draw_legend(Image.fromarray(base.round().astype(np.uint8)), phrases, colors, single)


def draw_legend(out, phrases, colors, single=False):
    """overlay's legend, drawn on the PIL image `out` and returned: each phrase top left, on a swatch of
    its colour (single: the phrase alone, as predict.py writes it); a phrase None or "" is left out. The
    text is legend_font_size high, so the legend covers about the same share of any picture."""
    size = legend_font_size(out.width, out.height)
    font, pad = ImageFont.load_default(size), max(1, size // 4)  # PIL's own font (FreeType), scaled to the picture
    draw, y = ImageDraw.Draw(out), pad
    for phrase, c in zip(phrases, colors):
        if not phrase:
            continue
        swatch = 0 if single else size  # one phrase: the text alone, as predict.py has always written it
        box = draw.textbbox((2 * pad + swatch, y), phrase, font=font)
        draw.rectangle((pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=(0, 0, 0))
        if swatch:
            draw.rectangle((2 * pad, box[1], 2 * pad + swatch - pad - 1, box[3]), fill=tuple(c))
        draw.text((2 * pad + swatch, y), phrase, fill=(255, 255, 255), font=font)
        y = box[3] + 2 * pad + 1
    return out


def legend_font_size(width, height):
    """The legend's text height in pixels: a 24th of the picture's shorter side, from 8 (still legible; a
    192 px demo image) to 40, so that the legend covers about the same share of a small image as of a photo."""
    return int(min(40, max(8, round(min(width, height) / 24))))
