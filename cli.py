"""Command-line helpers shared by the tools: flag types and output checks.

Each raises argparse.ArgumentTypeError (a flag's type) or ValueError (an output that cannot be
written), with a message that names the flag; the tools turn them into one-line errors.
"""
import argparse
import os
from pathlib import Path

import torch

def parse_threshold(text) -> float:
    """A --threshold value (argparse type of evaluate.py, predict.py and train.py): strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value



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
    if Path(a).resolve() == Path(b).resolve():
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
