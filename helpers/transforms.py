"""The model's inputs and outputs: CLIP tokens, images, masks, the letterbox and back.

    image (H, W) --letterbox--> (3, S, S) CLIP-normalised --model--> logits (1, S/4, S/4)
          --sigmoid, unletterbox--> probability (H, W) at the original size

Choices where PhraseCut and the paper are silent (all deliberate, all tested):
- Letterbox: scale = S / max(W, H), content resized (PIL bilinear) to round(W*scale) x round(H*scale)
  and *centred* (CRIS-like); padding is CLIP's mean, i.e. exactly 0 after normalisation.
- Mask: the official rule (PhraseCut utils/data_transfer.polygons_to_mask): points truncated with
  int(), ImageDraw.polygon(points, outline=1, fill=1) on an 'L' image at the original size, union of
  all polygons of all instances, polygons of fewer than 2 points skipped. Instances without polygons
  add nothing. The letterboxed mask is that mask resized with nearest-neighbour and padded with 0.
- Images are decoded in stored pixel order, as PhraseCut does: its polygons are on the stored pixels,
  so the EXIF orientation is deliberately not applied here (inference.open_image, whose input is a
  photo as it displays, applies it).
  JPEGs at least 2x larger than their letterboxed size are decoded at a reduced DCT scale first
  (PIL's Image.draft), then resized as usual.
  Modes: alpha is dropped, palettes expanded, CMYK converted by PIL; 16-bit images are scaled
  from 0..65535 to 0..255; float images are clipped to 0..255.
- Phrases: CLIP's tokenizer (ftfy + byte-level BPE, so any Unicode works), truncated to word_len
  with the end token kept; the datasets warn once per process with the words kept (kept_words).
  The model reads word_len - 2 tokens, and no more of a phrase is tokenised than can hold them
  (phrase_ids): CLIP's BPE takes time that grows faster than a word's length (100,000 letters took
  57 s), so a word is cut at max_word_bytes before BPE and a phrase at max_phrase_chars before
  anything. Every phrase the model can read is tokenised exactly as clip.tokenize does.
"""
import functools
import io
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # 0-1 scale, RGB

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)

_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


# CLIP's longest BPE token, in UTF-8 bytes (eight 4-byte emoji; a test reads it off the vocabulary): a token covers
# at most this many bytes of a word, and a character is at least one byte.
LONGEST_TOKEN = 32


def max_word_bytes(word_len):
    """The bytes of one word that CLIP's BPE is given: (word_len - 2) x LONGEST_TOKEN + 1. A word is a unit of
    CLIP's pre-tokenizer (a run of letters, one digit, a run of other signs), each BPE'd on its own. The model reads
    word_len - 2 tokens; a word of more bytes than this has more tokens than that by itself, so the phrase is cut
    whatever its bytes split into, and a word the model can read is never cut. (Such a cut word may split into other
    first tokens than the whole word would: the model reads it cut either way.)"""
    return max(word_len - 2, 0) * LONGEST_TOKEN + 1


def max_phrase_chars(word_len):
    """The characters of a phrase that are read at all: 16 times the longest text the model can read (word_len - 2
    tokens of at most LONGEST_TOKEN bytes, a space after each), counted once its runs of spaces are one space. A
    phrase the model can read is longer only when most of it is what else CLIP's cleaning drops (control characters,
    HTML entities); one that is longer is read from its first max_phrase_chars characters, and counts as cut
    (kept_words says what is kept)."""
    return 16 * max(word_len - 2, 1) * (LONGEST_TOKEN + 1)


def _clip_tokenizer():
    """CLIP's tokenizer object and its module (the text cleaning). clip is imported on first use, as the project
    imports it (helpers/clip_weights.py): its import is slow."""
    from helpers.clip_weights import clip
    return clip.clip._tokenizer, clip.simple_tokenizer


def phrase_ids(phrase, word_len):
    """(the ids of the BPE tokens the model reads of `phrase`, at most word_len - 2; whether the phrase is cut).

    CLIP's own steps (SimpleTokenizer.encode: ftfy and HTML unescaping, spaces joined, lower case, its
    pre-tokenizer, byte-level BPE), with the work bounded by word_len: the phrase's first max_phrase_chars
    characters, each word's first max_word_bytes bytes, and no word after the one that fills word_len - 2 tokens.
    For any phrase of up to word_len - 2 tokens, the ids are CLIP's encode(phrase); for a longer one of words the
    model can read, its first word_len - 2."""
    tokenizer, text = _clip_tokenizer()
    limit, longest, most = max(word_len - 2, 0), max_word_bytes(word_len), max_phrase_chars(word_len)
    if len(phrase) > most:  # its runs of spaces as the one space CLIP's cleaning makes of them, before the cut
        phrase = re.sub(r"\s+", " ", phrase)
    cleaned = text.whitespace_clean(text.basic_clean(phrase[:most])).lower()
    ids = []
    for word in tokenizer.pat.finditer(cleaned):
        symbols = "".join(tokenizer.byte_encoder[b] for b in word.group().encode("utf-8")[:longest])
        ids.extend(tokenizer.encoder[token] for token in tokenizer.bpe(symbols).split(" "))
        if len(ids) > limit:
            return ids[:limit], True
    return ids, len(phrase) > most


def tokenize(phrases, word_len=22):
    """CLIP BPE tokens, (N, word_len) long, as clip.tokenize(phrases, word_len, truncate=True) gives them: the start
    token, the phrase's tokens (phrase_ids), the end token, zeros; a long phrase is cut, keeping the end-of-text
    token (what is kept: kept_words)."""
    if isinstance(phrases, str):
        phrases = [phrases]
    tokenizer, _ = _clip_tokenizer()
    start, end = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    tokens = torch.zeros(len(phrases), word_len, dtype=torch.long)
    for i, phrase in enumerate(phrases):
        row = [start, *phrase_ids(phrase, word_len)[0], end]
        if len(row) > word_len:  # clip.tokenize's truncation: the end token in the last place
            row = row[:word_len]
            row[-1] = end
        tokens[i, :len(row)] = torch.tensor(row)
    return tokens


@functools.lru_cache(maxsize=16384)
def cached_tokens(phrase, word_len):
    """tokenize(phrase, word_len)[0], kept per process: datasets repeat phrases, and CLIP's BPE runs in Python."""
    return tokenize(phrase, word_len)[0]


def kept_words(phrase, word_len=22):
    """What tokenize keeps of a phrase longer than word_len tokens (its first word_len - 2 tokens, as
    text: the start and end tokens take two), or None when the whole phrase fits. CLIP's BPE works on
    UTF-8 bytes, so the cut may fall inside a character: that character's bytes are dropped, never shown
    as a broken one."""
    ids, cut = phrase_ids(phrase, word_len)
    if not cut:
        return None
    tokenizer, _ = _clip_tokenizer()
    text = "".join(tokenizer.decoder[i] for i in ids)  # as CLIP's decode, whole characters
    return bytearray(tokenizer.byte_decoder[c] for c in text).decode("utf-8", errors="ignore") \
        .replace("</w>", " ").strip()


def short_phrase(phrase, limit=80):
    """A phrase for a message: quoted, and a long one cut to its first `limit` characters, with its length."""
    if len(phrase) <= limit:
        return repr(phrase)
    return f"{phrase[:limit]!r}... ({len(phrase):,} characters)"


def warn_if_cut(phrase, word_len, context="", note=""):
    """Warn, naming the words kept, when `phrase` is longer than word_len tokens; returns whether it was."""
    kept = kept_words(phrase, word_len)
    if kept is not None:
        warnings.warn(f"{context}phrase {short_phrase(phrase)} is longer than {word_len} tokens (word_len) and is "
                      f"cut: the model sees only {kept!r}{note}", stacklevel=2)
    return kept is not None


# ----------------------------------------------------------------------------- images and masks

def to_rgb(img):
    """Any PIL mode -> 'RGB' (see the module docstring for the rule per mode)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float32)
        if img.mode != "F":
            arr = arr / 257.0  # 16-bit range -> 8-bit range
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def decode_image(data, name, fit=None):
    """Decode image bytes -> (RGB PIL image, (H, W) of the stored image); errors name `name`.

    fit=S: a JPEG at least twice the size of its letterboxed content is decoded at a reduced DCT
    scale (PIL's draft: 1/2, 1/4 or 1/8, never below the content size), which is much faster."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if fit and img.format == "JPEG":
            nh, nw, _, _ = letterbox_geometry(h, w, fit)
            if w >= 2 * nw and h >= 2 * nh:
                img.draft(None, (nw, nh))
        img.load()
        return to_rgb(img), (h, w)
    except Image.UnidentifiedImageError:
        raise ValueError(f"cannot read image {name}: not an image file PIL can identify") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise ValueError(f"cannot read image {name}: {err}") from err


def polygons_to_mask(polygons, width, height):
    """Official PhraseCut rule. polygons: instances -> polygons -> [x, y]. -> (H, W) uint8 in {0, 1}."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for instance in polygons:
        for polygon in instance:
            if len(polygon) < 2:
                continue
            draw.polygon([(int(x), int(y)) for x, y in polygon], outline=1, fill=1)
    return np.asarray(canvas)


def letterbox_geometry(height, width, size):
    """Where an (height, width) image lands on the size x size canvas: (nh, nw, top, left)."""
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def letterbox(image, size, orig_size=None):
    """PIL image -> ((3, size, size) float CLIP-normalised, meta). Padding normalises to exactly 0.

    orig_size=(H, W) when `image` was decoded smaller (draft) than the stored image, so that the
    geometry matches the mask's. meta: orig_size (H, W) and content (top, left, nh, nw)."""
    h, w = orig_size or (image.height, image.width)
    nh, nw, top, left = letterbox_geometry(h, w, size)
    content = np.asarray(to_rgb(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    content = torch.from_numpy(content).permute(2, 0, 1)  # HWC -> CHW
    canvas = torch.zeros(3, size, size)
    canvas[:, top:top + nh, left:left + nw] = (content / 255.0 - _MEAN) / _STD
    return canvas, {"orig_size": (h, w), "content": (top, left, nh, nw)}


def unnormalize(pixels):
    """Undo letterbox's CLIP normalisation: (3, h, w) -> (3, h, w) RGB in [0, 1], for display."""
    return (pixels * _STD + _MEAN).clamp(0, 1)


def letterbox_mask(mask, size):
    """(H, W) {0,1} array -> (1, size, size) float, nearest-neighbour, padding 0."""
    h, w = mask.shape
    nh, nw, top, left = letterbox_geometry(h, w, size)
    small = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    canvas = torch.zeros(1, size, size)
    canvas[0, top:top + nh, left:left + nw] = torch.from_numpy(small.astype(np.float32))
    return canvas


def unletterbox(prob, orig_h, orig_w, input_size=None):
    """(..., s, s) map over the letterboxed canvas -> (..., orig_h, orig_w), bilinear.

    The content box is found with letterbox_geometry at resolution s, which is exact for s equal to
    the input size. For a coarser map (the model's S/4 logits) pass input_size=S: the map is first
    upsampled to S (CRIS's protocol), so rounding matches the letterbox exactly."""
    lead, s = prob.shape[:-2], prob.shape[-1]
    x = prob.reshape(-1, 1, s, s).float()
    if input_size is not None and input_size != s:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
        s = input_size
    nh, nw, top, left = letterbox_geometry(orig_h, orig_w, s)
    x = x[..., top:top + nh, left:left + nw]
    x = F.interpolate(x, size=(orig_h, orig_w), mode="bilinear", align_corners=False)
    return x.reshape(*lead, orig_h, orig_w)


# ----------------------------------------------------------------------------- COCO masks (polygons, RLE)

def rle_counts(text):
    """The run lengths a compressed COCO RLE string encodes (pycocotools' rleFrString, restated), so that
    a record is checked before pycocotools, which does not bound-check, decodes it into memory."""
    counts, p = [], 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            if p >= len(text) or not 48 <= ord(text[p]) < 112:
                raise ValueError("its counts string is not a COCO RLE (a character outside '0'-'o', or cut short)")
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << 5 * k
            more, p, k = c & 0x20, p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def check_segmentation(seg, height, width):
    """A ValueError saying what is wrong unless `seg` is a COCO segmentation that fits a height x width
    image: polygons (lists of an even number, at least 6, of finite coordinates within one image size
    of the image: pycocotools allocates by the polygon's extent) or an RLE {size: [height, width],
    counts: run lengths (a list, "uncompressed") or COCO's compressed string} covering every pixel once."""
    if isinstance(seg, list):
        for j, poly in enumerate(seg):
            if not (isinstance(poly, list) and len(poly) % 2 == 0 and all(type(v) in (int, float) for v in poly)):
                raise ValueError(f"polygon {j} is not an even number of coordinates")
            if len(poly) < 6:  # pycocotools would read a 4-number polygon as a box [x, y, w, h], or fail
                raise ValueError(f"polygon {j} has {len(poly)} coordinates, {len(poly) // 2} point(s); a polygon "
                                 "needs at least 3 points (6 coordinates)")
            xs, ys = poly[0::2], poly[1::2]
            if not all(-width <= x <= 2 * width for x in xs) or not all(-height <= y <= 2 * height for y in ys):
                raise ValueError(f"polygon {j} has points far outside the {width}x{height} image")
        return
    if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
        raise ValueError("expected polygons (a list) or an RLE ({size, counts})")
    if seg["size"] != [height, width]:
        raise ValueError(f"its RLE size is {seg['size']!r}, but the image is [height, width] = [{height}, {width}]")
    counts = seg["counts"]
    if isinstance(counts, str):
        counts = rle_counts(counts)
    elif not (isinstance(counts, list) and all(type(c) is int for c in counts)):
        raise ValueError("its RLE counts are neither a list of integers nor a string")
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(f"its RLE run lengths cover {sum(counts)} pixels (some negative?), not {height} x {width}")


def coco_mask(segmentations, height, width):
    """COCO segmentations -> their union, (H, W) uint8 {0, 1}, as the refer API's getMask makes a mask:
    polygons through pycocotools' frPyObjects(seg, height, width), an uncompressed RLE (a crowd region)
    through frPyObjects as well, a compressed RLE as it is; decoded, the parts summed, > 0 is foreground.
    Each segmentation is checked first (check_segmentation): the caller names the record."""
    from pycocotools import mask as coco_rle  # imported here: only the COCO sources need it
    out = np.zeros((height, width), np.uint8)
    for seg in segmentations:
        check_segmentation(seg, height, width)
        if isinstance(seg, list):
            if not seg:
                continue
            rle = coco_rle.frPyObjects(seg, height, width)
        elif isinstance(seg["counts"], list):
            rle = coco_rle.frPyObjects(seg, height, width)
        else:
            rle = {"size": [height, width], "counts": seg["counts"].encode("ascii")}
        m = coco_rle.decode(rle)
        out |= (m.sum(axis=2) if m.ndim == 3 else m) > 0
    return out


def mask_to_rle(mask):
    """(H, W) bool or {0,1} -> COCO's compressed RLE {size, counts: str} (JSON-able; coco_mask reads it)."""
    from pycocotools import mask as coco_rle
    rle = coco_rle.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
