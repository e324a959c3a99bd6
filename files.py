"""Files the tools read and write: atomic writes, JSON with clear errors, mask PNGs.

Every output of this project is written under a temporary name and renamed when complete
(`atomic_path`), so a killed run never leaves a file that looks finished. JSON inputs are read
with errors that name the file and the position (`read_json`). Predicted masks are one PNG per
task, `<task_id>.png`, 0/255 at the original image size, the official PhraseCut evaluator's input
(`save_mask`, `load_mask`, `mask_path`).
"""
import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_json(path, expected=list):
    """A JSON file whose top level is `expected` (list or dict); errors name the file and the position."""
    try:
        with open(path, "rb") as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        early = err.msg.startswith("Unterminated") or err.pos >= len(err.doc.rstrip())
        raise ValueError(f"{path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
                         f"{'; the file ends early: truncated?' if early else ''}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not JSON text: {err.reason} at byte {err.start}") from None
    if not isinstance(content, expected):
        raise ValueError(f"{path}: the top level is a JSON {_JSON_TYPES.get(type(content))}, expected "
                         f"an {_JSON_TYPES[expected]}")
    return content


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(path) as tmp:` write tmp, which becomes `path` when the block ends and is removed
    if it fails: a killed run never leaves half a file. tmp, .NAME.tmp-PID beside `path`, is on the same
    file system (an atomic rename) and never shared by two processes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed run that had our process id
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_task_id(task_id):
    """A ValueError unless `task_id` makes a safe file name (mask_path's rule): a string of letters,
    digits, '_', '-', '.', not starting with '.', no '..', at most 200 characters (PhraseCut ids look
    like "2412359__1373393"). Path separators, '..', absolute paths, NUL or empty are refused."""
    if not isinstance(task_id, str) or len(task_id) > 200 or ".." in task_id \
            or not _SAFE_TASK_ID.fullmatch(task_id):
        raise ValueError(f"unsafe task id for a file name: {_short(task_id)} (allowed: letters, digits, '_', '-', "
                         "'.', no leading '.', no '..')")


def mask_path(out_dir, task_id):
    """out_dir / f"{task_id}.png", refusing any task id that could leave out_dir (check_task_id)."""
    check_task_id(task_id)
    out_dir = Path(out_dir)
    path = out_dir / f"{task_id}.png"
    if path.resolve().parent != out_dir.resolve():  # belt and braces against symlink tricks in the name
        raise ValueError(f"task id {task_id!r} resolves outside {out_dir}")
    return path


def image_format(path):
    """PIL's format for the file name `path` ("a.png" -> "PNG"); a ValueError naming it when PIL cannot write that."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: not an image file name PIL can write (extension {Path(path).suffix or 'missing'});"
                         " use e.g. .png")
    return fmt


def save_mask(mask, path):
    """Write one (H, W) bool mask (numpy or torch) as a PNG, mode L, 0/255 (the official evaluator's input).

    Another extension PIL writes gives that format. Written atomically (atomic_path)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(mask).astype(bool).astype(np.uint8) * 255).save(tmp, format=fmt)


def load_mask(path):
    """Read a saved mask back as (H, W) bool: any nonzero pixel is foreground, as the official reader does."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0
