"""What a run directory holds, and how a run is saved and resumed.

    runs/<preset>/                          (or --out)
        config.json, command.txt, git.txt   the settings, every command that ran it, the code's commit
        metrics.jsonl, curves.png           one line per epoch, and its picture
        checkpoint.pth                      all --resume needs (every epoch)
        best.pth                            the best val mean IoU's weights, config and `trained_on`
        test_metrics.json, predictions.png  best.pth on test.lmdb, when there is one

Checkpoints hold plain tensors, numbers and strings (torch.load(weights_only=True) reads them),
each file written whole (atomic_path). A run killed at any point resumes to the same files. Each says
what its model was trained on (`trained_on`: dataset, split sizes, preset, epochs, best val score;
helpers/provenance.py). Scores are fractions in the files (metrics.jsonl, test_metrics.json, whose
`units` says so) and percent where printed.
"""
import contextlib
import dataclasses
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from helpers import distributed
from helpers.checkpoints import read_checkpoint_file
from helpers.files import atomic_path, hold_dir
from helpers.provenance import UNITS, percent, run_record
from helpers.train_config import NOT_RESUMED, TrainConfig, check_new_run_dir, out_dir
from helpers.visualize import plot_curves
from helpers.weights import check_finite, check_tensors, state_dict_misfit
from model import SegVLMConfig

CHECKPOINT_FORMAT = "segvlm-checkpoint-v1"


def read_resume(path: str) -> dict:
    """--resume's checkpoint.pth (read_checkpoint_file: never code), or a ValueError saying why it cannot be one."""
    try:
        ckpt = read_checkpoint_file(path)
    except (ValueError, OSError) as e:  # truncated, corrupt, not a torch file, or holding code
        raise ValueError(f"--resume: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise ValueError(f"--resume {path}: not a checkpoint.pth written by train.py (a run's full "
                         f"state); to start a new run from a file's weights (best.pth, CRIS's "
                         f"best_model.pth), use --init-from")
    try:
        SegVLMConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--resume {path}: its model config is not SegVLM's: {e}") from e
    if isinstance(ckpt.get("model"), dict):
        check_tensors(ckpt["model"], f"--resume {path}")
        check_finite(ckpt["model"], f"--resume {path}")
    return ckpt


def restore(ckpt: dict, model, optimizer, scheduler, scaler) -> tuple[int, float, list]:
    """Load a run's whole state, RNGs included -> (first epoch to run, best val mIoU so far, history)."""
    misfit = state_dict_misfit(model, ckpt["model"])
    if misfit:
        raise ValueError(f"--resume: the checkpoint's weights do not fit the model its config describes: {misfit}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"] + 1, ckpt["best_metric"], list(ckpt["history"])


def run_dir(cfg: TrainConfig) -> Path:
    """--out, else --resume's dir, else runs/<preset> (train_config.out_dir)."""
    return out_dir(cfg)


@contextlib.contextmanager
def hold_run_dir(cfg: TrainConfig, out: Path):
    """`with hold_run_dir(cfg, out):` this run holds its directory (files.hold_dir) for its whole life: a
    second run on it is refused at its start, naming this one. A new run checks again, holding it, that
    no other run has written there since its flags were checked."""
    with hold_dir(out, "--out"):
        if not cfg.resume:
            check_new_run_dir(out)
        yield out


def make_run_dir(cfg: TrainConfig, model_cfg, data_dir: Path, resume: dict | None = None,
                 out: Path | None = None) -> Path:
    """`out` (default run_dir(cfg)); rank 0 writes config.json, command.txt, git.txt there.

    A resumed run's config.json says what it changed ("resumed"), its command and commit are added to the
    others, and tidy_resumed_run makes the directory agree with the checkpoint."""
    out = run_dir(cfg) if out is None else out
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        config = {"train": dataclasses.asdict(cfg), "model": model_cfg.to_dict(),
                  "world_size": distributed.info().world, "data_dir": str(data_dir)}
        if resume is not None:
            tidy_resumed_run(out, resume)
            before = resume["args"]
            config["resumed"] = {"after_epoch": resume["epoch"] + 1, "changed": {
                k: [before[k], v] for k, v in config["train"].items()
                if k in before and before[k] != v and k not in NOT_RESUMED}}
        write_text(out / "config.json", json.dumps(config, indent=2))
        write_text(out / "command.txt", shlex.join([sys.executable] + sys.argv) + "\n", append=resume is not None)
        write_text(out / "git.txt", git_commit() + "\n", append=resume is not None)
    return out


def write_text(path: Path, text: str, append: bool = False) -> None:
    """`text` as the file's content (after its old content, with append), written whole (atomic_path)."""
    if append and path.is_file():
        text = path.read_text() + text
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tidy_resumed_run(out: Path, ckpt: dict) -> None:
    """Make a resumed run's directory agree with its checkpoint, wherever a kill fell: no temporaries of
    killed writes; metrics.jsonl from the checkpoint's history (an epoch logged but not checkpointed runs
    again and is listed once); best.pth from the checkpoint when its last epoch was the best and best.pth
    is not that epoch's (killed between the two writes, save_checkpoint)."""
    for tmp in out.glob(".*.tmp-*"):  # atomic_path's names
        tmp.unlink(missing_ok=True)
    history = ckpt["history"]
    write_text(out / "metrics.jsonl", "".join(metrics_line(h) for h in history))
    if max(history, key=lambda h: h["val_mIoU"]) is history[-1]:  # the first of equals: improvements are strict
        try:
            best = torch.load(out / "best.pth", map_location="cpu", weights_only=True, mmap=True)
            written = (best["epoch"], best["best_metric"])
        except Exception:  # missing or half-written
            written = None
        if written != (ckpt["epoch"], ckpt["best_metric"]):
            print(f"{out / 'best.pth'}: rewritten from the checkpoint's epoch {ckpt['epoch'] + 1}, its best")
            write_best(out, ckpt)


def log_epoch(out: Path, history: list[dict], epochs: int) -> None:
    """The last epoch's row: appended to metrics.jsonl, drawn into curves.png, printed."""
    last = history[-1]
    try:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(metrics_line(last))
    except OSError as e:  # a full disk, above all: name the file
        raise OSError(f"could not append to {out / 'metrics.jsonl'}: {e.strerror or e}") from None
    plot_curves(history, out / "curves.png")
    no_target = f" no_target {last['no_target']:.4f}" if "no_target" in last else ""  # the no-target head's BCE
    gres = "".join(f" {k} {percent(last['val_' + k])}" for k in ("gIoU", "N_acc", "T_acc") if last.get("val_" + k) is not None)
    print(f"epoch {last['epoch']}/{epochs}  loss {last['loss']:.4f} (bce {last['bce']:.4f} "
          f"focal {last['focal']:.4f} dice {last['dice']:.4f}{no_target})  val mIoU {percent(last['val_mIoU'])} "
          f"oIoU {percent(last['val_oIoU'])} P@0.5 {percent(last['val_prec@0.5'])}{gres}  {last['seconds']:.0f}s", flush=True)


def metrics_line(row: dict) -> str:
    """One epoch's row of metrics.jsonl, with `units`: its scores are fractions (provenance.UNITS)."""
    return json.dumps({**row, "units": UNITS}) + "\n"


def save_checkpoint(out: Path, model, optimizer, scheduler, scaler, history: list[dict], best: float,
                    improved: bool, cfg: TrainConfig, data_dir: Path, headers: tuple[dict, dict] = ({}, {})) -> None:
    """checkpoint.pth (all --resume needs) every epoch, then best.pth (weights, config) when val mIoU improved;
    plain tensors, numbers and strings (torch.load(weights_only=True) reads them), each written whole.
    headers: the train and val LMDBs' headers, for `trained_on` (provenance.run_record).
    A kill between the two leaves a checkpoint whose last epoch is the best: resuming rewrites best.pth from it."""
    trained_on = run_record(cfg.preset, history[-1]["epoch"], cfg.epochs, best, *headers, data_dir=data_dir)
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": model.config.to_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "epoch": history[-1]["epoch"] - 1, "best_metric": best,
             "history": history, "rng": rng_state(), "args": dataclasses.asdict(cfg),
             "data_dir": str(data_dir.resolve()), "trained_on": trained_on}
    with atomic_path(out / "checkpoint.pth") as tmp:
        torch.save(state, tmp)
    if improved:
        write_best(out, state)


BEST_KEYS = ("format", "model", "config", "epoch", "best_metric", "args", "data_dir", "trained_on")


def checkpoint_dict(model, **fields) -> dict:
    """What best.pth holds for `model` (weights and config), with the run's fields given or left empty;
    what a test or a tool writes when it makes a checkpoint of its own."""
    base = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": model.config.to_dict(),
            "epoch": 0, "best_metric": 0.0, "args": {}, "data_dir": ""}
    return {**base, **fields}


def write_best(out: Path, state: dict) -> None:
    """best.pth: a checkpoint's weights, config, epoch, metric and record (no optimizer); a checkpoint written
    before `trained_on` existed gives a best.pth without it."""
    with atomic_path(out / "best.pth") as tmp:
        torch.save({k: state[k] for k in BEST_KEYS if k in state}, tmp)


# ---------------------------------------------------------------------------
# what a run records: random number generators, the code's version


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
