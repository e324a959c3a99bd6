"""Running a trained model: load it, feed it a photo and a phrase, get the mask back.

    from helpers.inference import load_model, predict
    model = load_model("best.pth")
    mask = predict(model, "dog.jpg", "black dog")                # (H, W) bool at the image's size
    masks = predict(model, "dog.jpg", ["black dog", "the ball"])  # a list: the image encoded once

The image may be a path, a PIL image or an (H, W, 3) uint8 numpy array (`as_image`).

The pipeline is the evaluation's: `transforms.letterbox` to the checkpoint's input size,
`transforms.tokenize` to its word length, the model, a sigmoid, then `transforms.unletterbox` back
to the original size and the threshold (0.35, CRIS's, metrics.DEFAULT_THRESHOLD). `open_image`
applies the photo's EXIF orientation first, so the mask fits the image as viewers display it.

On CUDA, `FastSegVLM` replays CUDA graphs of the model's forward (load_model's default there).
"""
import contextlib
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from helpers import distributed, transforms
from helpers.checkpoints import load_checkpoint
from model import DEFAULT_THRESHOLD


def load_model(ckpt_path, device=None, fast=None):
    """Rebuild the model from a checkpoint (checkpoints.load_checkpoint), in eval mode on `device`.

    device: default this process's GPU if there is one, else the CPU. fast: wrap it in
    `FastSegVLM` (CUDA graphs + bf16 autocast); default on for CUDA, off on the
    CPU. Errors for missing, truncated or foreign files are load_checkpoint's.
    """
    net, _ = load_checkpoint(ckpt_path, map_location="cpu")
    net = net.to(device or distributed.info().device).eval()
    if fast is None:
        fast = net_device(net).type == "cuda"
    return FastSegVLM(net) if fast else net


def net_device(model):
    return next(model.parameters()).device


class FastSegVLM(torch.nn.Module):
    """Inference through CUDA graphs: SegVLM's forward captured once per input shape, then replayed.

    At batch 1 a forward pass is hundreds of small kernels, and launching them
    costs more than running them; a replayed graph launches them all at once.
    Use it like the model: `FastSegVLM(model)(image, tokens, image_index=None) -> logits`.

    - The inputs are checked first with `SegVLM.check_inputs`: the same errors as
      the eager model. The graph then runs `SegVLM.segment`.
    - A shape (images, image size, phrases, token length) is captured on its second call
      (its first runs eagerly, so the odd last batch of an evaluation costs no
      capture) and kept; at most `max_graphs` shapes, the oldest dropped. A new
      shape never reuses another shape's graph, and the output is copied out
      of the graph's memory, so no result is stale or wrong-shaped.
    - amp: bf16 autocast (fp16 where the GPU lacks bf16), default on for CUDA.
    - On the CPU, in train mode, or if a capture fails (with one warning), it
      runs the eager model instead.
    """

    def __init__(self, model, amp=None, cuda_graphs=True, max_graphs=4):
        super().__init__()
        self.model = model
        self.config = model.config
        cuda = net_device(model).type == "cuda"
        amp = cuda if amp is None else amp
        self.dtype = (torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16) if amp else None
        if cuda_graphs and not cuda:
            warnings.warn("CUDA graphs need a CUDA device; running the model eagerly", stacklevel=2)
        self.cuda_graphs = cuda_graphs and cuda
        self.max_graphs = max_graphs
        self.graphs = {}  # shape key -> (graph, static image, static tokens, static index, static logits)
        self.seen = set()

    def _eager(self, image, tokens, image_index=None):
        with torch.autocast(image.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model.segment(image, tokens, image_index)

    def forward(self, image, tokens, image_index=None):
        self.model.check_inputs(image, tokens, image_index)
        key = (tuple(image.shape), image.dtype, tuple(tokens.shape), image.device, image_index is None)
        if not (self.cuda_graphs and image.is_cuda and not self.model.training and not torch.is_grad_enabled()):
            return self._eager(image, tokens, image_index)
        if key not in self.graphs:
            if key not in self.seen:
                self.seen.add(key)
                return self._eager(image, tokens, image_index)
            try:
                self._capture(key, image, tokens, image_index)
            except Exception as e:  # noqa: BLE001 - any capture failure: eager from now on, said once
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running the model eagerly",
                              stacklevel=2)
                self.cuda_graphs = False
                self.graphs.clear()
                return self._eager(image, tokens, image_index)
        graph, static_image, static_tokens, static_index, static_out = self.graphs[key]
        static_image.copy_(image)
        static_tokens.copy_(tokens)
        if image_index is not None:
            static_index.copy_(image_index)
        graph.replay()
        return static_out.clone()

    def _capture(self, key, image, tokens, image_index=None):
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))  # the oldest shape; its memory goes with it
        static_image, static_tokens = image.clone(), tokens.clone()
        static_index = None if image_index is None else image_index.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up passes on a side stream, as torch.cuda.graph requires
            for _ in range(2):
                self._eager(static_image, static_tokens, static_index)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # autocast's cast cache must be off while capturing (PyTorch's CUDA graphs notes)
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype=self.dtype or torch.float32,
                                                      enabled=self.dtype is not None, cache_enabled=False):
            static_out = self.model.segment(static_image, static_tokens, static_index)
        self.graphs[key] = (graph, static_image, static_tokens, static_index, static_out)


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


def open_image(path):
    """Open and fully decode an image file as RGB, upright; a clear ValueError when that is unsafe or impossible.

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
    limit = Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS * BYTES_PER_PIXEL
    if limit and path.stat().st_size > limit:  # before PIL reads any of it
        raise ValueError(f"{path} is {path.stat().st_size / 2 ** 30:.1f} GiB, far beyond any image PIL decodes "
                         f"(at most {Image.MAX_IMAGE_PIXELS:,} pixels, {limit / 2 ** 30:.1f} GiB even uncompressed "
                         f"at 16-bit RGBA); not read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here and not later
                # upright as displayed; 16-bit and float images scaled, as in the dataset
                return transforms.to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:  # SyntaxError: some malformed headers; ValueError: bad EXIF
        raise ValueError(f"{path}: cannot decode the image ({e})") from None


def _check_phrase(phrase):
    if not isinstance(phrase, str) or not phrase.strip():
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
        return [_check_phrase(phrases)], True
    if not isinstance(phrases, (list, tuple)):
        raise ValueError(f"phrases must be a string or a list of strings, got {type(phrases).__name__}")
    if not phrases:
        raise ValueError("no phrase given: pass a string or a non-empty list of strings")
    return [_check_phrase(p) for p in phrases], False


@torch.no_grad()
def predict_proba(model, image, phrases):
    """Foreground probability of each phrase on `image`: float32 numpy (H, W) in [0, 1] at the image's size.

    image: a path, a PIL image or an (H, W, 3) uint8 numpy array (as_image). phrases: one string ->
    one map; a list -> a list of maps, in order. A list is one forward pass: the image is
    letterboxed and encoded once, and every phrase is decoded against it (SegVLM's image_index),
    so N phrases cost one image encoding, not N. model: a SegVLM or FastSegVLM (its config gives
    input_size and word_len).
    """
    phrases, single = _phrase_list(phrases)
    image = as_image(image)
    cfg = model.config
    with warnings.catch_warnings():  # on every call (Python's default filter says a repeated warning once)
        warnings.simplefilter("always")
        for phrase in phrases:
            transforms.warn_if_cut(phrase, cfg.word_len)  # which words the model sees of a long phrase
    device = net_device(model)
    was_training = model.training
    model.eval()
    try:
        pixels, _ = transforms.letterbox(image, cfg.input_size)  # (3, S, S) normalised
        tokens = transforms.tokenize(phrases, cfg.word_len).to(device)  # (N, L)
        if len(phrases) == 1:
            logits = model(pixels[None].to(device), tokens)  # (1, 1, S/4, S/4)
        else:  # one image, N phrases: phrase i is about image 0
            index = torch.zeros(len(phrases), dtype=torch.long, device=device)
            logits = model(pixels[None].to(device), tokens, image_index=index)  # (N, 1, S/4, S/4)
        probs = [transforms.unletterbox(p[0], image.height, image.width, input_size=cfg.input_size)
                 .cpu().numpy().astype(np.float32) for p in logits.float().sigmoid()]  # (S/4, S/4) -> (H, W)
    finally:
        model.train(was_training)
    return probs[0] if single else probs


NOT_FOUND = "not found in the picture"  # what the page and predict.py say for an empty mask: "no target"


def predict(model, image, phrases, threshold=DEFAULT_THRESHOLD):
    """The mask each phrase refers to in `image`: numpy bool (H, W) at the image's size; empty (all False)
    when the phrase names nothing there (the answer "no target": a model with the no-target head gives it,
    as generalized referring segmentation scores it).

        masks = predict(model, "dog.jpg", ["black dog", "the ball"])   # a list in, a list out

    image: a path, a PIL image or an (H, W, 3) uint8 numpy array; phrases: one string (one mask) or
    a list (a list of masks, the image encoded once); predict_proba says more."""
    probs = predict_proba(model, image, phrases)
    return probs > threshold if isinstance(probs, np.ndarray) else [p > threshold for p in probs]


# Each phrase's colour in an overlay, in order: distinct hues that stay readable over a photo.
PALETTE = ((230, 30, 30), (30, 110, 240), (40, 190, 60), (250, 170, 0), (170, 50, 220),
           (0, 200, 200), (240, 80, 180), (140, 90, 30), (250, 250, 250), (20, 20, 20))


def tint(rgb, mask, color, alpha=0.55):
    """rgb (H, W, 3) float numpy with the pixels of mask (H, W) blended towards color (same scale).

    A bool mask blends its pixels by alpha; a float mask in [0, 1] (a probability map) blends each
    pixel by alpha times its value."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        weight = alpha * np.clip(mask.astype(np.float32), 0, 1)[..., None]
        return (1 - weight) * rgb + weight * np.array(color, dtype=rgb.dtype)
    rgb = rgb.copy()
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.array(color, dtype=rgb.dtype)
    return rgb


def overlay(image, masks, phrases=None, color=None, alpha=0.55):
    """The image with each mask tinted in its colour, and its phrase in the corner (PIL RGB image).

    masks: one (H, W) mask, or a list; bool masks are tinted where true, float maps (probabilities)
    by their value (tint). phrases: None, one string, or one per mask, written top left on a colour
    swatch as a legend. color: one colour for a single mask (default red), or a list; default
    PALETTE in order, so the first phrase is red. One mask and its phrase give predict.py's picture.
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
    out = Image.fromarray(base.round().astype(np.uint8))
    draw, y = ImageDraw.Draw(out), 4
    for phrase, c in zip(phrases, colors):
        if not phrase:
            continue
        swatch = 0 if single else 12  # one phrase: the text alone, as predict.py has always written it
        box = draw.textbbox((4 + swatch, y), phrase)
        draw.rectangle((box[0] - 3 - swatch, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
        if swatch:
            draw.rectangle((4, box[1], 4 + swatch - 4, box[3]), fill=tuple(c))
        draw.text((4 + swatch, y), phrase, fill=(255, 255, 255))
        y = box[3] + 6
    return out
