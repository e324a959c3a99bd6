"""Command-line helpers shared by the tools: flag types, path checks, outputs, signals.

Each raises argparse.ArgumentTypeError (a flag's type) or ValueError (a path that cannot be read or
written), with a message that names the flag; the tools turn them into one-line errors. Every tool's
outputs go through `check_output` / `check_output_dir` before any work, the files it writes into a
folder through `claim_files`, and its main through `run_tool` (Ctrl-C and SIGTERM end it with one line).
"""
import argparse
import contextlib
import errno
import json
import numbers
import os
import signal
import stat
import sys
import tempfile
from pathlib import Path, PurePosixPath

import torch

from helpers.files import atomic_path


def shown(text) -> str:
    """`text` (a file name, a phrase, a record's field: anything a user or a file supplied) as a terminal or a log
    may print it: every control character (C0, C1, DEL), format character (bidirectional overrides among them) and
    line or paragraph separator (U+2028, U+2029, U+0085) written as a Python escape (\\x1b, \\u2028), so that
    the text can neither move the cursor, clear the screen nor forge a line of its own; other characters, accents
    and scripts included, as they are."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def parse_threshold(text) -> float:
    """A --threshold value (argparse type of evaluate.py, predict.py and train.py): strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def check_threshold(value, name="threshold") -> float:
    """The Python API's threshold (inference.predict): a real number strictly between 0 and 1, parse_threshold's
    rule; a ValueError naming `name` otherwise (NaN would give an empty mask, -1 a full one, without a word)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    try:
        return parse_threshold(value)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{name} {e}") from None


def parse_device(text) -> torch.device:
    """A --device value (argparse type of evaluate.py and predict.py): cpu, cuda, cuda:N or mps, present here.

    Checked when the flags are parsed, so a wrong device fails before anything is loaded."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no usable CUDA GPU "
                                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS (Apple GPU) is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def same_file(a, b) -> bool:
    """Whether paths a and b name one file: equal once resolved (symlinks, '..') or hard links to one file."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        if os.path.abspath(a) == os.path.abspath(b):
            return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def make_dir(path, what):
    """mkdir -p `path` for the output `what` (e.g. "--save-masks"); a ValueError naming both when impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a directory; name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what}: cannot create the directory {path} ({e.strerror}: {e.filename})") from None
    return path


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_path(path, flag) -> Path:
    """Refuse (a ValueError naming the flag) a path that cannot be resolved (a symlink loop, a name too long)
    or that is neither a regular file nor a directory: reading a FIFO waits for a writer, a device never
    ends, and a write to /dev/null is lost. A missing path or a directory is left to the caller, whose
    message says what it expected."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return Path(path)
        raise ValueError(f"{flag} {path} cannot be resolved ({e.strerror})") from None
    for test, kind in _KINDS:
        if test(mode):
            raise ValueError(f"{flag} {path} is not a regular file but {kind}")
    return Path(path)


def check_writable(path, flag) -> None:
    """Refuse a folder (or, when it does not exist yet, its nearest existing parent) this process cannot create
    a file in: permissions, a read-only file system. Tried with a real file, which is removed at once."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".segvlm-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in {folder} ({e.strerror})") from None


def check_output(path, flag, inputs=(), outputs=(), example="out.json") -> Path:
    """One output file, checked before any work: not unresolvable nor special (check_path), not a directory,
    not one of `inputs` nor of `outputs` ((flag, path) pairs; a path may be None), in a folder that exists
    or is created here and can be written in. A ValueError naming the flag otherwise."""
    path = check_path(path, flag)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file, e.g. {path / example}")
    for other_flag, other in inputs:
        if other and same_file(path, other):
            raise ValueError(f"{flag} {path} is the {other_flag} file; writing there would destroy it")
    for other_flag, other in outputs:
        if other and same_file(path, other):
            raise ValueError(f"{flag} {path} and {other_flag} {other} are the same file; name two files")
    check_writable(make_dir(path.parent, f"{flag}'s folder"), flag)
    return path


def check_output_dir(path, flag, inputs=()) -> Path:
    """One output folder, checked before any work: resolvable, a directory (created here) that can be written
    in, and none of `inputs` ((flag, path) pairs). A ValueError naming the flag otherwise."""
    path = check_path(path, flag)
    for other_flag, other in inputs:
        if other and same_file(path, other):
            raise ValueError(f"{flag} {path} is the {other_flag} file; name a new folder")
    check_writable(make_dir(path, flag), flag)
    return path


WRITTEN = ".segvlm-written"  # in a folder a tool writes into: the names of the files it wrote there
RECORD_HEADER = "# segvlm-written 2: one name a line, as a JSON string"  # the first format: one bare name a line


def written_names(folder) -> set:
    """The names `folder`'s record (.segvlm-written) lists: the files a tool of this project wrote there. Each
    name is a JSON string on its own line (ASCII only, so a name holding a line break, U+2028 or bytes that
    are not UTF-8 is one name); a record of the first format (one bare name a line, no header) is read too.
    A ValueError when the record is not a regular file (a symlink, a folder) or a line of it is damaged."""
    path = Path(folder) / WRITTEN
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return set()
    if not stat.S_ISREG(mode):
        raise ValueError(f"{shown(path)} is not a regular file ({_kind(mode)}); this project writes it there to list "
                         f"its own files: remove it, or name another folder")
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if lines[0] != RECORD_HEADER:
        return {line for line in lines if line}  # the first format wrote name + "\n": split on "\n" alone
    names = set()
    for number, line in enumerate(lines[1:], 2):
        if not line:
            continue
        try:
            name = json.loads(line)
        except json.JSONDecodeError:
            name = None
        if not isinstance(name, str):
            raise ValueError(f"{shown(path)}, line {number}: not a JSON string (the record of the files this project "
                             f"wrote there is damaged); remove it, and move the folder's files elsewhere")
        names.add(name)
    return names


def _kind(mode) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _real_folder(path, folder, name, flag) -> bool:
    """Whether `path` (a folder on the way from `folder` to folder/name) exists; a ValueError when it is a
    symbolic link (it could lead outside `folder`) or not a folder."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise ValueError(f"{flag} {shown(folder)}: {shown(path)} is a symbolic link; this tool writes only into real "
                         f"folders inside {flag}, never through a link (it could lead outside): replace it with a "
                         f"folder, or name another {flag}")
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{flag} {shown(folder)}: {shown(path)} is {_kind(mode) if not stat.S_ISREG(mode) else 'a file'}"
                         f" where this tool needs a folder (for {shown(name)}); move it, or name another {flag}")
    return True


def _parts(name, flag) -> tuple:
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or any(part in (".", "..") for part in parts):
        raise ValueError(f"{flag}: {shown(name)} is not a name inside the folder")  # a caller's mistake, said plainly
    return parts


def check_inside(folder, name, flag, checked=None) -> bool:
    """Whether folder/name (`name` relative, '/'-separated) exists, for a file a tool is about to write there.
    A ValueError naming the flag when writing it could touch anything but a regular file inside `folder`: a
    folder on the way that is a symbolic link or a file, or a name that is a symbolic link, a folder, a
    FIFO or a device (checked with lstat: a link is never followed). `checked`: a set of folders known good,
    filled as they are checked (many names share them)."""
    parts = _parts(name, flag)
    path = Path(folder)
    for part in parts[:-1]:
        path = path / part
        if checked is not None and path in checked:
            continue
        if not _real_folder(path, folder, name, flag):
            return False  # the rest of the way does not exist either
        if checked is not None:
            checked.add(path)
    path = path / parts[-1]
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise ValueError(f"{flag} {shown(folder)}: {shown(path)} is {_kind(mode)} where this tool writes a file; "
                         f"it never writes through a link nor replaces a folder: move it, or name another {flag}")
    return True


def make_folders(folder, name, flag) -> Path:
    """Create the folders between `folder` and folder/name, each a real folder inside `folder` (check_inside's
    rule, checked again as they are made, just before the file is written) -> folder/name."""
    parts = _parts(name, flag)
    path = Path(folder)
    for part in parts[:-1]:
        path = path / part
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        _real_folder(path, folder, name, flag)
    return path / parts[-1]


def claim_files(folder, names, flag, record=True) -> None:
    """Before a tool writes `names` (relative, '/'-separated) into `folder`: a ValueError when any of them exists
    and is not one this project wrote there (a user's file is never overwritten), or when writing it would go
    through a symbolic link or meet a file where a folder is needed (check_inside); else, with `record` (one
    process of several records), the names are added to the folder's record (.segvlm-written, written_names),
    so that the next run may write them again."""
    folder = Path(folder)
    ours = written_names(folder)
    checked = set()
    foreign = [name for name in names if check_inside(folder, name, flag, checked) and name not in ours]
    if foreign:
        raise ValueError(f"{flag} {shown(folder)} holds {len(foreign)} file(s) that this tool would overwrite and did "
                         f"not write, e.g. {shown(folder / foreign[0])}; move them, or name another folder")
    new = set(names) - ours
    if new and record:
        with atomic_path(folder / WRITTEN) as tmp:
            lines = [RECORD_HEADER] + [json.dumps(name) for name in sorted(ours | new)]  # ASCII: \n only ends lines
            tmp.write_text("".join(line + "\n" for line in lines), encoding="ascii")


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every `finally` runs (atomic_path removes its file)."""


def _stop(signum, frame):
    raise Stopped()


def run_tool(prog, main, *args):
    """main(*args) as a tool's entry point: Ctrl-C (SIGINT) and SIGTERM unwind it like an exception, so that
    its temporary files are removed (files.atomic_path), and end it with one line and the shell's code
    128 + the signal's number, not a traceback. Under torchrun only the first process prints the line."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        return main(*args)
    except KeyboardInterrupt as e:
        signum, name = (signal.SIGTERM, "SIGTERM") if isinstance(e, Stopped) else (signal.SIGINT, "Ctrl-C")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while saying so: no traceback either
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: stopped by {name}; temporary files removed", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
