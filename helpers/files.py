"""Files the tools read and write: atomic writes, a folder held by one run, JSON with clear errors, mask PNGs.

Every output of this project is written under a temporary name and renamed when complete
(`atomic_path`), so a killed run never leaves a file that looks finished; the temporary files a hard
kill left are removed by the next write of the same file, and a full disk is reported as such. A run
directory is held by one run at a time (`hold_dir`). JSON inputs are read
with errors that name the file and the position (`read_json`). Predicted masks are one PNG per
task, `<task_id>.png`, 0/255 at the original image size, the official PhraseCut evaluator's input
(`save_mask`, `load_mask`, `mask_path`).
"""
import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def short_repr(value, limit=60):
    try:
        text = repr(value)
    except RecursionError:  # a structure nested deeper than Python's recursion limit
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_json(path, expected=list):
    """A JSON file whose top level is `expected` (list or dict); errors name the file and the position. JSON
    nested deeper than Python's recursion limit (a hostile file) is refused as such, naming the file."""
    try:
        with open(path, "rb") as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        early = err.msg.startswith("Unterminated") or err.pos >= len(err.doc.rstrip())
        raise ValueError(f"{path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
                         f"{'; the file ends early: truncated?' if early else ''}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not JSON text: {err.reason} at byte {err.start}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested deeper than Python's recursion limit "
                         f"({sys.getrecursionlimit()} levels); no file of this project's inputs is") from None
    except ValueError as err:  # a number of more digits than Python converts (sys.get_int_max_str_digits)
        raise ValueError(f"{path} is not valid JSON for this project: {err}") from None
    if not isinstance(content, expected):
        raise ValueError(f"{path}: the top level is a JSON {JSON_TYPES.get(type(content))}, expected "
                         f"an {JSON_TYPES[expected]}")
    return content


MAX_METADATA = 1 << 20  # characters of one JSON metadata entry of a model file: a config or a record is a few hundred


def metadata_json(meta: dict, key: str, where):
    """The JSON value of the string entry `key` of a model file's metadata (a safetensors header's, an ONNX
    graph's), or None when absent; a ValueError naming `where` and the entry when it is not JSON, is longer than
    MAX_METADATA or nests deeper than Python's recursion limit (a hostile file)."""
    if key not in meta:
        return None
    text = meta[key]
    if len(text) > MAX_METADATA:
        raise ValueError(f"{where}: the metadata entry {key!r} holds {len(text):,} characters, more than any "
                         f"SegVLM model file writes ({MAX_METADATA:,})")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: the metadata entry {key!r} is JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{where}: the metadata entry {key!r} is not JSON ({e})") from None


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(path) as tmp:` write tmp, which becomes `path` when the block ends and is removed
    if it fails (an error, Ctrl-C, SIGTERM through cli.run_tool): a killed run never leaves half a file.
    tmp, .NAME.tmp-PID beside `path`, is on the same file system (an atomic rename) and never shared by
    two processes; those of processes that no longer run (a hard kill) are removed first. A write that
    fails because the disk is full is an OSError that says so and names `path`; `path` is untouched."""
    path = Path(path)
    tmp = temporary_name(path)
    remove_stale_temporaries(path)
    with contextlib.suppress(FileNotFoundError):  # a leftover of an earlier process of our id, or a planted link:
        tmp.unlink()                              # never written through
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if getattr(e, "errno", None) == errno.ENOSPC or (isinstance(e, RuntimeError) and _disk_full(tmp)):
            full = OSError(f"the disk is full: could not write {path} ({_free(tmp)} free); "
                           f"the previous {path.name}, if any, is unchanged")
            full.errno = errno.ENOSPC
            raise full from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def temporary_name(path) -> Path:
    """The name atomic_path writes `path` under until it is complete: .NAME.tmp-PID beside it (a message names
    `path` instead: the user never asked for this one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _free(path) -> str:
    try:
        return f"{shutil.disk_usage(Path(path).parent).free / 2 ** 20:.1f} MiB"
    except OSError:
        return "unknown space"


def _disk_full(path, least=2 ** 20) -> bool:
    try:
        return shutil.disk_usage(Path(path).parent).free < least
    except OSError:
        return False


def remove_stale_temporaries(path) -> list:
    """Remove the temporary files atomic_path left beside `path` for processes that no longer run on this
    machine (killed with SIGKILL, or the machine lost power) -> their paths."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except (OverflowError, OSError):
        return False
    return True


LOCK_NAME = ".segvlm-lock"  # in a run directory while a run holds it: which process, its command

try:
    import fcntl
except ImportError:  # Windows: no lock, the other checks stay
    fcntl = None


@contextlib.contextmanager
def hold_dir(folder, flag):
    """`with hold_dir(out, "--out"):` this process holds the folder (created if need be) until the block ends;
    another process that tries is refused with a ValueError naming the holder (process id, machine, start,
    command). The hold is an flock on folder/.segvlm-lock, so the system releases the hold of a process that
    died however it died: a lock file left by a dead process holds nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    while True:
        try:  # never through a symbolic link: the lock file is truncated, and would be another file
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            raise ValueError(f"{flag} {folder}: {lock} is not a regular file (a symbolic link, a folder or a "
                             f"FIFO); this project keeps its lock there: remove it")
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"{flag} {folder} is in use by another run ({dir_holder(folder) or 'starting'}); "
                             f"wait for it to end, stop it, or give another {flag}") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # not removed by a holder that ended between our open and our flock
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv)}\n").encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def dir_holder(folder):
    """Who holds `folder` (hold_dir's line: process, machine, start, command), or None when nobody does."""
    lock = Path(folder) / LOCK_NAME
    if fcntl is None or not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it: the file of a run that died
    except OSError:
        text = os.read(fd, 4096).decode(errors="replace").strip()
        return text[:300] or "a run that is starting"
    finally:
        os.close(fd)


_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_task_id(task_id):
    """A ValueError unless `task_id` makes a safe file name (mask_path's rule): a string of letters,
    digits, '_', '-', '.', not starting with '.', no '..', at most 200 characters (PhraseCut ids look
    like "2412359__1373393"). Path separators, '..', absolute paths, NUL or empty are refused."""
    if not isinstance(task_id, str) or len(task_id) > 200 or ".." in task_id \
            or not _SAFE_TASK_ID.fullmatch(task_id):
        raise ValueError(f"unsafe task id for a file name: {short_repr(task_id)} (allowed: letters, digits, '_', '-', "
                         "'.', no leading '.', no '..')")


def mask_path(out_dir, task_id):
    """out_dir / f"{task_id}.png", refusing any task id that could leave out_dir (check_task_id)."""
    check_task_id(task_id)
    out_dir = Path(out_dir)
    path = out_dir / f"{task_id}.png"
    if path.resolve().parent != out_dir.resolve():  # belt and braces against symlink tricks in the name
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link to {os.readlink(path)}, outside {out_dir}; refused: "
                             "a mask must be a file in the folder (copy it there)")
        raise ValueError(f"task id {task_id!r} resolves outside {out_dir}")
    return path


def image_format(path):
    """PIL's format for the file name `path` ("a.png" -> "PNG"); a ValueError naming it when PIL cannot write that."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: not an image file name PIL can write (extension {Path(path).suffix or 'missing'});"
                         " use e.g. .png")
    return fmt


LOSSLESS_MASK_FORMATS = ("PNG", "BMP", "TIFF", "PPM", "GIF")  # a mask is 0/255: a lossy format writes grey pixels


def mask_format(path):
    """image_format for a mask file: only a lossless format (.png, .bmp, .tif, .pgm), else a ValueError naming it."""
    fmt = image_format(path)
    if fmt not in LOSSLESS_MASK_FORMATS:
        raise ValueError(f"{path}: {fmt} is lossy or not meant for masks, and would write grey pixels into "
                         f"the 0/255 mask; use .png (or .bmp, .tif)")
    return fmt


def save_mask(mask, path):
    """Write one (H, W) bool mask (numpy or torch) as a PNG, mode L, 0/255 (the official evaluator's input).

    Another lossless extension (mask_format) gives that format. Written atomically (atomic_path)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    fmt = mask_format(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(mask).astype(bool).astype(np.uint8) * 255).save(tmp, format=fmt)


def load_mask(path):
    """Read a mask back as (H, W) bool, by the pixels' values, never their colours (README: non-zero =
    foreground): a palette image by its index (index 1 drawn black is foreground), a single-channel
    image (1, L, I, I;16, F) by its value, a colour image as non-zero in any channel. With an alpha
    channel (LA, PA, RGBA) a fully transparent pixel is background whatever its colour, and the other
    pixels follow the rule above; a palette's transparency table is not an alpha channel (the index
    decides). Lossy data is refused by its content, not its name (JPEG under .png, a TIFF compressed
    as JPEG): its artefacts would be scored. A ValueError names the file."""
    with Image.open(path) as im:
        lossy = im.format not in LOSSLESS_MASK_FORMATS or "jpeg" in str(im.info.get("compression", "")).lower()
        if lossy:
            raise ValueError(f"{path} holds {im.format or 'unknown'} data{' (JPEG-compressed)' * (im.format == 'TIFF')}"
                             f", a lossy format whose artefacts would be scored as the mask; save masks as PNG "
                             f"(or BMP, TIFF without JPEG compression)")
        alpha = None
        if im.mode in ("LA", "PA", "RGBA"):
            alpha = np.asarray(im.getchannel("A")) > 0
            im = im.convert({"LA": "L", "PA": "P", "RGBA": "RGB"}[im.mode]) if im.mode != "PA" else \
                Image.fromarray(np.asarray(im)[..., 0], "L")  # the index channel
        elif im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F", "RGB"):
            im = im.convert("RGB")
        pixels = np.asarray(im)
    foreground = (pixels != 0).any(axis=2) if pixels.ndim == 3 else pixels != 0
    return foreground & alpha if alpha is not None else foreground
