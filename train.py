"""Train SegVLM: one plain torch.distributed loop, from a laptop CPU to several GPUs.

    # the bundled default: synthetic PhraseCut-format data, made once, on a CPU
    torchrun --standalone --nproc_per_node=2 train.py --preset demo
    python train.py --preset demo                      # the same in one process

    # PhraseCut with the paper's recipe (paper §4.2), 1 or 4 GPUs
    python train.py --preset paper --data lmdb/ --clip-weights RN101
    torchrun --standalone --nproc_per_node=4 train.py --preset paper --data lmdb/

    # from CRIS's released weights (its best_model.pth; cris.py): every CRIS tensor copied, the block new
    python train.py --preset paper --init-from best_model.pth --data lmdb/

    # several nodes: the same command on each node, torchrun's usual flags
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \
        --master_addr=HOST --master_port=29500 train.py --preset paper --data lmdb/

    python train.py --help                             # every field, with the preset's default

`--data DIR` holds `train.lmdb` and `val.lmdb` (and `test.lmdb`, evaluated at the
end), as `python data.py build --out DIR/<split>.lmdb` writes them. Validation
(every epoch, and the choice of best.pth) runs on val.lmdb alone: PhraseCut's
val split, whose files do not hold the 100 miniv images (those are in
refer_miniv.json; convert them to score them with evaluate.py). The run
directory (`--out`) receives config.json, command.txt, git.txt, metrics.jsonl
(one line per epoch), checkpoint.pth (every epoch), best.pth (best val mean
IoU), curves.png and, when test.lmdb exists, test_metrics.json (with the
decoder-grid ceiling) and predictions.png. An --out that
already holds a run is refused: continue it with --resume, or pick another.

`--resume DIR/checkpoint.pth` continues that run in DIR: every flag not typed
is the checkpoint's own, and a typed one that contradicts it is refused, except
those in RESUME_MAY_CHANGE (--epochs, where the data is, speed settings), which
config.json then records beside the checkpoint's values; command.txt keeps
every command. A run killed at any point resumes to the same files: metrics.jsonl
is rewritten from the checkpoint's history and best.pth from the checkpoint when
the kill fell between the two.

Under torchrun a collective waits $SEGVLM_DIST_TIMEOUT seconds (default 300)
for every process, so a stalled or stopped rank ends the run with an error
(distributed.py).

`train` reads as the recipe, one named step per line. The same code runs in
one process and under torchrun: `distributed.init` does nothing without
torchrun's environment, only rank 0 prints and writes, and the global batch is
split across ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import clip
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import distributed
import evaluate
from data import DEMO_NUM_IMAGES
from loss import RAFLoss
from model import (PRESETS, SegVLM, SegVLMConfig, build_model, get_preset, read_checkpoint_file,
                   state_dict_misfit)

CHECKPOINT_FORMAT = "segvlm-checkpoint-v1"


# ---------------------------------------------------------------------------
# configuration


def flag(default, help: str, **argparse_options):
    """A TrainConfig field: its default, and the line `python train.py --help` prints for it."""
    if isinstance(default, list):  # a mutable default: a fresh copy per TrainConfig
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_options})
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainConfig:
    """Every training setting; each is a command-line flag (`lr` -> `--lr`). The defaults are the
    paper's recipe; a preset departs from them where its recipe says (model.PRESETS)."""

    # what to train
    preset: str = flag("demo", f"model and recipe, one of {', '.join(sorted(PRESETS))}; sets the defaults below")
    clip_weights: str = flag("none", "none (random init), a CLIP name (RN101) or a path to CLIP's weights")
    init_from: str = flag("", "start from this file's weights: CRIS's best_model.pth or a checkpoint (cris.py)")
    deform: bool = flag(True, "eq. 1 + eq. 3: the deformable conv and the residual shortcut")
    se: bool = flag(True, "eq. 2: squeeze-and-excitation")
    input_size: int = flag(0, "training and validation side in pixels; 0: the preset's")
    word_len: int = flag(0, "longest phrase in tokens; 0: the preset's")
    # data
    data: str = flag("", "dir with train.lmdb, val.lmdb (and test.lmdb); empty: synthetic PhraseCut")
    cache_dir: str = flag(".cache/segvlm", "where the synthetic dataset is made once")
    synth_images: int = flag(DEMO_NUM_IMAGES, "synthetic images (all splits) when --data is empty")
    num_workers: int = flag(2, "DataLoader workers per process")
    group_by_image: bool = flag(False, "batches hold the phrases of a few images, each image encoded once a step "
                                       "(data.ImageGroupedSampler); off: tasks shuffled one by one")
    # optimisation (paper §4.2; CRIS's defaults where it is silent)
    epochs: int = flag(50, "epochs to train")
    batch_size: int = flag(64, "global batch, split across processes")
    lr: float = flag(1e-4, "Adam's learning rate")
    backbone_lr_scale: float = flag(0.1, "the CLIP backbone trains at lr x this (CRIS)")
    freeze_token_embedding: bool = flag(False, "keep CLIP's token embedding (49,408 x width) as loaded; "
                                               "the rest of CLIP trains")
    milestones: list[float] = flag([15, 30], "epochs after which every rate is multiplied by --lr-gamma; "
                                             "a fraction (7.5) decays mid-epoch")
    lr_gamma: float = flag(0.1, "the rates' decay at each milestone")
    schedule: str = flag("step", "step: x --lr-gamma after each of --milestones (the paper's); "
                                 "cosine: from the full rate down to 0 over all epochs, every step")
    warmup_epochs: float = flag(0.0, "the rates rise linearly from 0 over this many epochs, every step")
    weight_decay: float = flag(0.0, "Adam's weight decay")
    clip_grad: float = flag(0.0, "max gradient norm; 0: off (the paper's clipnorm 0)")
    amp: bool = flag(True, "mixed precision on CUDA (bf16 where supported); ignored on the CPU")
    channels_last: bool = flag(True, "channels-last tensors (faster convolutions, on CPUs as on GPUs)")
    compile: bool = flag(False, "torch.compile the model (the first steps compile: a slow start)")
    log_every: int = flag(20, "steps between progress-bar updates and non-finite checks (each a host sync)")
    # loss (eq. 4-8)
    loss: str = flag("raf", "raf (eq. 8) or bce (the CRIS baseline: BCE alone, so no --w-* or --dice-weight)")
    w_bce: float = flag(1.0, "RAF's weight of BCE (eq. 4)")
    w_focal: float = flag(1.0, "RAF's weight of the focal loss (eq. 5)")
    w_dice: float = flag(1.0, "RAF's weight of the adaptive Dice loss (eq. 6)")
    dice_weight: str = flag("abs", "the adaptive Dice's pixel weight (eq. 7): abs, focal or none")
    # run
    out: str = flag("", "run dir; empty: --resume's own, else runs/<preset>-<time>")
    resume: str = flag("", "a run's checkpoint.pth to continue from")
    seed: int = flag(0, "seed of every random number generator")
    threshold: float = flag(evaluate.DEFAULT_THRESHOLD, "validation's cut on the sigmoid (CRIS's)",
                            type=evaluate.parse_threshold)
    eval_test: bool = flag(True, "evaluate best.pth on test.lmdb at the end, when there is one")


def preset_defaults(preset: str) -> TrainConfig:
    """The paper's recipe with `preset`'s departures from it (model.PRESETS[preset].recipe)."""
    return dataclasses.replace(TrainConfig(preset=preset), **get_preset(preset).recipe)


class _Parser(argparse.ArgumentParser):
    """argparse that lists every valid flag when it rejects one."""

    def error(self, message):
        flags = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
        self.exit(2, f"{self.prog}: error: {message}\nvalid flags: {' '.join(flags)}\n")


def epoch_number(text: str) -> int | float:
    """--milestones' values: 7 stays the int 7 (MultiStepLR's epochs), 7.5 is a float (a per-batch decay)."""
    value = float(text)  # argparse turns a ValueError into "invalid epoch_number value: 'x'"
    return int(value) if value.is_integer() else value


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags from the TrainConfig fields; defaults come from --preset's recipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=TrainConfig.preset)
    try:
        defaults = preset_defaults(pre.parse_known_args(argv)[0].preset)
    except ValueError as e:
        sys.exit(f"train.py: error: {e}")

    parser = _Parser(prog="train.py", description=__doc__.split("\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        options = {**f.metadata, "default": getattr(defaults, f.name)}
        if f.type == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif f.type == "list[float]":
            options.update(type=epoch_number, nargs="*", metavar="EPOCH")
        else:
            options.setdefault("type", {"int": int, "float": float, "str": str}[f.type])
        parser.add_argument("--" + f.name.replace("_", "-"), **options)
    unset = object()  # argparse leaves a namespace's attribute alone unless its flag is typed
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    typed = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset))))
    given = {name for name, value in typed.items() if value is not unset}
    cfg = dataclasses.replace(defaults, **{name: typed[name] for name in given})
    try:
        if cfg.resume:
            cfg = resumed_config(cfg, given)
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def flag_text(name: str, value) -> str:
    """A setting as the flag that gives it: ('se', False) -> '--no-se', ('lr', 0.001) -> '--lr 0.001'."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"


# What --resume may change: how far the run goes, where its data now is, how fast it runs. Every other
# setting is the checkpoint's (its model, optimizer, schedule and data continue); a typed one that differs
# is refused. --clip-weights and --init-from said how the run started: a resumed run starts from its checkpoint.
RESUME_MAY_CHANGE = {"epochs", "data", "cache_dir", "num_workers", "log_every", "compile", "channels_last",
                     "eval_test", "out", "resume"}
NOT_RESUMED = {"clip_weights", "init_from", "out", "resume"}


def resumed_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """--resume's settings: the checkpoint's own for every flag not typed (not in `given`); a ValueError naming
    each typed flag that contradicts the checkpoint. A file that is no checkpoint is left to read_resume."""
    if "clip_weights" not in given:  # the preset's (paper: RN101) was for the run's start
        cfg = dataclasses.replace(cfg, clip_weights="none")
    try:
        ckpt = torch.load(cfg.resume, map_location="cpu", weights_only=True, mmap=True)  # tensors not read
        saved, model_cfg, done = dict(ckpt["args"]), dict(ckpt["config"]), ckpt["epoch"] + 1
    except Exception:
        return cfg
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in names and k not in NOT_RESUMED}
    # A setting newer than the checkpoint: its run went without it, and a new setting's TrainConfig default
    # is the behaviour from before it existed (the preset's value may differ: demo's --freeze-token-embedding).
    before = TrainConfig()
    saved.update({k: getattr(before, k) for k in names - set(saved) - NOT_RESUMED - RESUME_MAY_CHANGE})
    contradictions = [f"{flag_text(k, getattr(cfg, k))} (the checkpoint's: {flag_text(k, model_cfg.get(k, v))})"
                      for k, v in sorted(saved.items()) if k in given and k not in RESUME_MAY_CHANGE
                      and getattr(cfg, k) not in (v, model_cfg.get(k))]  # --input-size 320 == the preset's 0
    if contradictions:
        raise ValueError(f"--resume {cfg.resume} continues that run's model, optimizer, schedule and data, "
                         f"so these flags contradict it: {', '.join(contradictions)}; drop them, or start a new "
                         f"run from its weights with --init-from {cfg.resume}")
    if "epochs" in given and cfg.epochs < done:
        raise ValueError(f"--epochs {cfg.epochs}: --resume {cfg.resume} has finished epoch {done} already")
    return dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in given})


def validate(cfg: TrainConfig) -> None:
    """Reject bad values before any work starts; each message names the flag."""
    positive = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, log_every=cfg.log_every)
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("backbone_lr_scale", "weight_decay", "clip_grad", "w_bce", "w_focal", "w_dice",
                 "num_workers", "input_size", "word_len"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.lr_gamma <= 1:
        raise ValueError(f"--lr-gamma must be in (0, 1], got {cfg.lr_gamma}")
    if cfg.loss not in ("raf", "bce"):
        raise ValueError(f"--loss must be 'raf' or 'bce', got {cfg.loss!r}")
    if cfg.loss == "bce":  # make_loss ignores RAF's settings: refuse them rather than drop them silently
        recipe = preset_defaults(cfg.preset)
        ignored = [f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in ("w_bce", "w_focal", "w_dice", "dice_weight")
                   if getattr(cfg, n) != getattr(recipe, n)]
        if ignored:
            raise ValueError(f"--loss bce is BCE alone (the CRIS baseline), so {', '.join(ignored)} would be "
                             f"ignored; drop it, or use --loss raf")
    if cfg.schedule not in ("step", "cosine"):
        raise ValueError(f"--schedule must be step or cosine, got {cfg.schedule!r}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise ValueError(f"--warmup-epochs must be between 0 and --epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    if cfg.dice_weight not in ("abs", "focal", "none"):
        raise ValueError(f"--dice-weight must be abs, focal or none, got {cfg.dice_weight!r}")
    if cfg.input_size % 32:
        raise ValueError(f"--input-size must be a multiple of 32, got {cfg.input_size}")
    if cfg.data:
        if not Path(cfg.data).is_dir():
            what = "is not a directory" if Path(cfg.data).exists() else "does not exist"
            raise ValueError(f"--data {cfg.data} {what}: give the directory that holds train.lmdb and val.lmdb")
        for split in ("train", "val"):
            path = Path(cfg.data) / f"{split}.lmdb"
            if not path.exists():
                raise ValueError(f"--data {cfg.data}: missing {path} "
                                 f"(make it with: python data.py build --split {split} --out {path})")
    elif cfg.preset == "paper":
        raise ValueError("--preset paper needs --data DIR holding PhraseCut's train.lmdb and val.lmdb")
    else:  # the synthetic set
        if Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
            raise ValueError(f"--cache-dir {cfg.cache_dir} is a file; a directory is expected")
        if cfg.synth_images < 4:
            raise ValueError(f"--synth-images must be >= 4 (train, val, miniv and test), got {cfg.synth_images}")
    if not all(0 < m < math.inf for m in cfg.milestones):
        raise ValueError(f"--milestones are epochs > 0, got {' '.join(map(str, cfg.milestones))}")
    weights = cfg.clip_weights
    if weights.lower() != "none" and weights not in clip.available_models() and not Path(weights).is_file():
        raise ValueError(f"--clip-weights {weights!r} is neither 'none', a CLIP model name "
                         f"({', '.join(clip.available_models())}) nor an existing file")
    if cfg.resume:
        need_file("--resume", cfg.resume)
    if cfg.clip_weights.lower() != "none" and cfg.resume:
        raise ValueError("--resume restores every weight; leave --clip-weights at none")
    if cfg.out:
        out = Path(cfg.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {cfg.out} is a file; a run directory is expected")
        if cfg.resume and out.resolve() != Path(cfg.resume).resolve().parent:
            raise ValueError(f"--out {cfg.out}: --resume continues the run in its own directory, "
                             f"{Path(cfg.resume).parent}; drop --out")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not cfg.resume:
            raise ValueError(f"--out {cfg.out} already holds a run ({', '.join(found)}); continue it with "
                             f"--resume {out / 'checkpoint.pth'}, or give a new --out (or delete {cfg.out})")
    if cfg.init_from:
        need_file("--init-from", cfg.init_from)
        if cfg.resume:
            raise ValueError("--resume continues a run from its own weights; drop --init-from")
        if weights.lower() != "none" and weights not in clip.available_models():
            raise ValueError(f"--init-from brings its own CLIP weights: --clip-weights may only name the file's "
                             f"backbone (e.g. RN101) or be none, not {weights!r}")


RUN_FILES = ("checkpoint.pth", "best.pth", "metrics.jsonl", "config.json", "test_metrics.json")


def need_file(flag_name: str, path: str) -> None:
    if not Path(path).is_file():
        raise ValueError(f"{flag_name} {path}: {'a directory, not a file' if Path(path).is_dir() else 'no such file'}")


# ---------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Run one training job -> the last epoch's metrics, with the test split's (test_*) when it was scored."""
    rank, world, device = distributed.init()
    try:
        seed_everything(cfg.seed)
        resume = read_resume(cfg.resume) if cfg.resume else None
        model = make_model(cfg, device, resume)
        data_dir = resolve_data(cfg, model.config.input_size)
        loader, val_set = make_loaders(cfg, model.config, data_dir, device)
        optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=len(loader))
        dtype = amp_dtype(device, cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)  # bf16 and fp32 need no scaling
        criterion = make_loss(cfg)
        start, best, history = restore(resume, model, optimizer, scheduler, scaler) if resume else (0, -1.0, [])
        net = wrap_model(model, cfg, device)
        out = make_run_dir(cfg, model.config, data_dir, resume)
        if rank == 0:
            print(f"run dir {out}  |  {world} process(es) on {device}  |  {len(loader.dataset)} train "
                  f"samples, {len(val_set)} val  |  global batch {cfg.batch_size}")

        per_step = steps_the_rate_per_batch(cfg)
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            terms = train_one_epoch(net, loader, criterion, optimizer, scaler, dtype, epoch, cfg,
                                    scheduler if per_step else None)
            if not per_step:
                scheduler.step()
            val = evaluate.evaluate(model, val_set, threshold=cfg.threshold, batch_size=loader.batch_size,
                                    num_workers=cfg.num_workers, device=device, progress=False)
            history.append({"epoch": epoch + 1, **terms, "lr": optimizer.param_groups[-1]["lr"],
                            "lr_backbone": optimizer.param_groups[0]["lr"],
                            **{f"val_{k}": val[k] for k in ("mIoU", "oIoU", "prec@0.5")},
                            "seconds": round(time.time() - t0, 2)})
            improved, best = val["mIoU"] > best, max(best, val["mIoU"])
            if rank == 0:
                log_epoch(out, history, cfg.epochs)
                save_checkpoint(out, model, optimizer, scheduler, scaler, history, best, improved, cfg, data_dir)
            distributed.barrier()

        last = history[-1] if history else {}
        if cfg.eval_test and (data_dir / "test.lmdb").exists():
            test = test_best(model, data_dir / "test.lmdb", out, cfg, loader.batch_size)
            last = {**last, **{f"test_{k}": v for k, v in test.items() if k != "subsets"}}
        return last
    finally:
        distributed.destroy()


# ---------------------------------------------------------------------------
# the steps, in the order train() takes them


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    return ckpt


def make_model(cfg: TrainConfig, device, resume: dict | None = None) -> SegVLM:
    """The preset's model with the flags' overrides (a resumed run: exactly its architecture), on `device`;
    random weights, CLIP's (--clip-weights) or --init-from's. `restore` loads a resumed run's."""
    overrides = dict(deform=cfg.deform, se=cfg.se)
    if cfg.input_size:
        overrides["input_size"] = cfg.input_size
    if cfg.word_len:
        overrides["word_len"] = cfg.word_len
    if resume is not None:
        overrides = resume["config"]
    weights = None if cfg.clip_weights.lower() == "none" else cfg.clip_weights
    if cfg.init_from:  # every tensor from the file; the block (if on) new; --clip-weights only names the backbone
        import cris
        model, note = cris.init_model(cfg.init_from, dataclasses.replace(get_preset(cfg.preset).model, **overrides),
                                      clip_name=weights)
        if distributed.is_main():
            print(note, flush=True)
        return freeze(model, cfg).to(device)
    try:
        model = build_model(cfg.preset, clip_weights=weights, **overrides)
    except RuntimeError as e:  # CLIP weights that could not be had: the message says how to get them
        if weights is None:
            raise
        raise ValueError(str(e)) from e
    return freeze(model, cfg).to(device)


def freeze(model: SegVLM, cfg: TrainConfig) -> SegVLM:
    """--freeze-token-embedding: CLIP's token table gets no gradient, so neither Adam nor DDP touches it.

    The table has a row for each of CLIP's 49,408 tokens; a phrase uses a handful of them, yet its
    gradient is a dense (49,408, width) tensor that DDP all-reduces and Adam updates every step.
    In the demo (width 64, 3.2M of its 5.1M parameters, ~100 distinct tokens in the synthetic
    phrases) that cost 11 % of a training step (docs/measurements.md); there the table stays at its
    random initialisation (CLIP's, N(0, 0.02^2)), which keeps those tokens apart, and the text
    transformer above it learns."""
    model.backbone.token_embedding.weight.requires_grad_(not cfg.freeze_token_embedding)
    return model


def resolve_data(cfg: TrainConfig, input_size: int) -> Path:
    """--data, or the synthetic dataset made once in the cache (rank 0 makes it).

    Its images are square and exactly input_size wide, so no input pixel is letterbox padding
    and none is resampled (PhraseCut's photos vary in shape; `data.py synth` makes 4:3 ones)."""
    if cfg.data:
        return Path(cfg.data)

    def make():
        return data.ensure_synthetic(cfg.cache_dir, num_images=cfg.synth_images, seed=cfg.seed, size=input_size,
                                     aspect=1.0, progress=distributed.is_main())

    if distributed.is_main():
        make()
    distributed.barrier()
    return make()  # made by now: every rank gets the same path at once


def make_loaders(cfg: TrainConfig, model_cfg, data_dir: Path, device) -> tuple[DataLoader, data.PhraseCutLMDB]:
    """The training loader, whose batches are this rank's share of the global batch, and the val set."""
    rank, world, _ = distributed.info()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    sizes = dict(input_size=model_cfg.input_size, word_len=model_cfg.word_len)
    train_set = data.PhraseCutLMDB(data_dir / "train.lmdb", **sizes, train=True)
    val_set = data.PhraseCutLMDB(data_dir / "val.lmdb", **sizes, train=False)
    if cfg.group_by_image:
        sampler = data.ImageGroupedSampler(train_set.image_ids(), cfg.batch_size // world, rank, world, cfg.seed)
    else:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    # Its own generator: the loader's worker seeds then never draw from the global
    # RNG, whose stream (dropout) must be the same in a resumed run.
    loader = DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise ValueError(f"{data_dir / 'train.lmdb'}: {len(train_set)} samples are fewer than "
                         f"one batch of {loader.batch_size} per process")
    return loader, val_set


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int = 1):
    """Adam with two groups: CLIP backbone at lr x backbone_lr_scale, the rest at lr, and the
    rates' schedule: the paper's MultiStepLR, stepped once an epoch; with --schedule cosine or a
    warm-up, a LambdaLR stepped after every batch (lr_factor; steps_the_rate_per_batch).

    CRIS passed the backbone's rate as `initial_lr` only, so Adam started every
    group at the base rate and the backbone trained 10x too fast until the
    first decay. Here each group's `lr` is set, and test_train checks the
    rates the first step actually uses.
    """
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale, "name": "backbone"},
              {"params": head, "lr": cfg.lr, "name": "head"}]
    # fused: one kernel updates every parameter (CPU and CUDA). On a CPU the default per-tensor
    # loop cost a demo step as much as its text encoder: CLIP's token embedding alone has 3.2M
    # entries, updated every step.
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, fused=True)
    if steps_the_rate_per_batch(cfg):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, gamma=cfg.lr_gamma)
    return optimizer, scheduler


def steps_the_rate_per_batch(cfg: TrainConfig) -> bool:
    return cfg.schedule != "step" or cfg.warmup_epochs > 0 or any(m != int(m) for m in cfg.milestones)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The rates' multiplier before batch `step` (0-based): a linear warm-up over --warmup-epochs,
    times either --lr-gamma per milestone passed (as MultiStepLR) or a cosine from 1 to 0."""
    epoch = step / steps_per_epoch
    warm = min(1.0, (step + 1) / (cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs else 1.0
    if cfg.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, epoch / cfg.epochs)))
    return warm * cfg.lr_gamma ** sum(epoch >= m for m in cfg.milestones)


def amp_dtype(device: torch.device, cfg: TrainConfig):
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); None = fp32."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_loss(cfg: TrainConfig) -> RAFLoss:
    if cfg.loss == "bce":  # the CRIS baseline: BCE alone
        return RAFLoss(w_bce=1.0, w_focal=0.0, w_dice=0.0)
    return RAFLoss(w_bce=cfg.w_bce, w_focal=cfg.w_focal, w_dice=cfg.w_dice, dice_weight=cfg.dice_weight)


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


def wrap_model(model: SegVLM, cfg: TrainConfig, device) -> torch.nn.Module:
    """What the training steps call: `model` channels-last, in DDP across processes
    (its BatchNorms synchronised on GPUs), compiled with --compile. `model` itself stays the plain
    module that is validated and saved."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if distributed.info().world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # gradient_as_bucket_view: grads live in DDP's buckets (no copy; also no stride
        # warning for the 1x1 convs whose grads autograd lays out channels-last).
        # broadcast_buffers=False: DDP would send rank 0's BatchNorm running statistics before every
        # forward, a collective that makes the ranks wait for each other twice a step. It changes no
        # result: training normalises with batch statistics, rank 0's running statistics grow from its
        # own batches either way, and train_one_epoch gives them to every rank after the last step.
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True, broadcast_buffers=False)
    if cfg.compile:
        net = torch.compile(net)  # after DDP, so that DDP's optimizer splits the graph at its buckets
    return net


def make_run_dir(cfg: TrainConfig, model_cfg, data_dir: Path, resume: dict | None = None) -> Path:
    """--out, else --resume's dir, else runs/<preset>-<time>; rank 0 writes config.json, command.txt, git.txt.

    A resumed run's config.json says what it changed ("resumed"), its command and commit are added to the
    others, and tidy_resumed_run makes the directory agree with the checkpoint."""
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.resume:  # continue in the run dir the checkpoint came from
        out = Path(cfg.resume).parent
    else:
        out = Path(f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
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
    """`text` as the file's content (after its old content, with append), written whole (data.atomic_path)."""
    if append and path.is_file():
        text = path.read_text() + text
    with data.atomic_path(path) as tmp:
        tmp.write_text(text)


def tidy_resumed_run(out: Path, ckpt: dict) -> None:
    """Make a resumed run's directory agree with its checkpoint, wherever a kill fell: no temporaries of
    killed writes; metrics.jsonl from the checkpoint's history (an epoch logged but not checkpointed runs
    again and is listed once); best.pth from the checkpoint when its last epoch was the best and best.pth
    is not that epoch's (killed between the two writes, save_checkpoint)."""
    for tmp in out.glob(".*.tmp-*"):  # data.atomic_path's names
        tmp.unlink(missing_ok=True)
    history = ckpt["history"]
    write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    if max(history, key=lambda h: h["val_mIoU"]) is history[-1]:  # the first of equals: improvements are strict
        try:
            best = torch.load(out / "best.pth", map_location="cpu", weights_only=True, mmap=True)
            written = (best["epoch"], best["best_metric"])
        except Exception:  # missing or half-written
            written = None
        if written != (ckpt["epoch"], ckpt["best_metric"]):
            print(f"{out / 'best.pth'}: rewritten from the checkpoint's epoch {ckpt['epoch'] + 1}, its best")
            write_best(out, ckpt)


def train_one_epoch(net, loader, criterion, optimizer, scaler, dtype, epoch: int, cfg: TrainConfig,
                    scheduler=None) -> dict:
    """One pass over this rank's shard of the training set -> the loss terms' means over every rank.
    scheduler: stepped after every batch when given (a per-step schedule, make_optimizer).

    Every rank ends the epoch with rank 0's BatchNorm statistics (broadcast_buffers), so that
    validation and the checkpoint see one model. Raises NonFiniteLoss naming the first bad step.
    """
    rank = distributed.info().rank
    device = next(net.parameters()).device
    loader.sampler.set_epoch(epoch)
    net.train()
    monitor = LossMonitor(device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0, dynamic_ncols=True, leave=False)
    for i, batch in enumerate(bar):
        image, index = batch["image"], None
        if cfg.group_by_image:  # each distinct image once, and which image each phrase is about
            image, index = data.unique_images(image, batch["image_id"])
            index = index.to(device, non_blocking=True)
        image = image.to(device, non_blocking=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True)
        if cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        terms = train_step(net, image, tokens, target, criterion, optimizer, scaler, dtype, cfg.clip_grad, index)
        if scheduler is not None:
            scheduler.step()
        monitor.add(terms, epoch * len(loader) + i)
        if (i + 1) % cfg.log_every == 0:  # the only host syncs of the step loop
            monitor.check(epoch, rank)
            bar.set_postfix(loss=f"{float(monitor.last):.4f}")
    bar.close()
    monitor.check(epoch, rank)
    distributed.broadcast_buffers(net)
    return distributed.reduce_mean(monitor.means(len(loader)), device)


class NonFiniteLoss(RuntimeError):
    pass


def train_step(net, image, tokens, target, criterion, optimizer, scaler, dtype, clip_grad=0.0,
               image_index=None) -> dict:
    """One optimisation step -> the loss terms as detached tensors on the device (read none: no host sync).
    image_index: see SegVLM.forward (None: one image per phrase)."""
    with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = net(image, tokens, image_index)
    terms = criterion(logits.float(), target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in terms.items()}


class LossMonitor:
    """Running sums of the loss terms, kept on the device, and the first non-finite step.

    `add` queues only device work; `check` (every log_every steps and at the end of an epoch)
    is the one host sync, and raises NonFiniteLoss naming the first bad step and its terms.
    """

    KEYS = ("loss", "bce", "focal", "dice")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet
        self.bad_terms = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.last = self.sums[0]

    def add(self, terms: dict, step: int) -> None:
        values = torch.stack([terms[k].double() for k in self.KEYS])
        new_bad = ~torch.isfinite(values[0]) & (self.first_bad < 0)
        self.first_bad = torch.where(new_bad, step, self.first_bad)
        self.bad_terms = torch.where(new_bad, values, self.bad_terms)
        self.sums += values
        self.last = values[0]

    def check(self, epoch: int, rank: int) -> None:
        first_bad = int(self.first_bad)
        if first_bad >= 0:
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.KEYS, self.bad_terms.tolist()))
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {first_bad} (rank {rank}): {values}")

    def means(self, steps: int) -> dict:
        return dict(zip(self.KEYS, (self.sums / steps).tolist()))


def log_epoch(out: Path, history: list[dict], epochs: int) -> None:
    """The last epoch's row: appended to metrics.jsonl, drawn into curves.png, printed."""
    last = history[-1]
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(last) + "\n")
    plot_curves(history, out / "curves.png")
    print(f"epoch {last['epoch']}/{epochs}  loss {last['loss']:.4f} (bce {last['bce']:.4f} "
          f"focal {last['focal']:.4f} dice {last['dice']:.4f})  val mIoU {last['val_mIoU']:.4f} "
          f"oIoU {last['val_oIoU']:.4f} P@0.5 {last['val_prec@0.5']:.4f}  {last['seconds']:.0f}s", flush=True)


def plot_curves(history: list[dict], path: Path) -> None:
    """Training curves as a PNG. A bare Figure, so the caller's matplotlib backend
    (a notebook's inline one, say) is left alone."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    for key in ("loss", "bce", "focal", "dice"):
        a.plot(epochs, [h[key] for h in history], marker="o", label=key)
    a.set(xlabel="epoch", ylabel="training loss", title="loss terms (eq. 4-8)")
    a.legend()
    for key in ("val_mIoU", "val_oIoU", "val_prec@0.5"):
        b.plot(epochs, [h[key] for h in history], marker="o", label=key[4:])
    b.set(xlabel="epoch", ylim=(0, 1), title="validation")
    b.legend()
    fig.tight_layout()
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def save_checkpoint(out: Path, model, optimizer, scheduler, scaler, history: list[dict], best: float,
                    improved: bool, cfg: TrainConfig, data_dir: Path) -> None:
    """checkpoint.pth (all --resume needs) every epoch, then best.pth (weights, config) when val mIoU improved;
    plain tensors, numbers and strings (torch.load(weights_only=True) reads them), each written whole.
    A kill between the two leaves a checkpoint whose last epoch is the best: resuming rewrites best.pth from it."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": model.config.to_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "epoch": history[-1]["epoch"] - 1, "best_metric": best,
             "history": history, "rng": rng_state(), "args": dataclasses.asdict(cfg),
             "data_dir": str(data_dir.resolve())}
    with data.atomic_path(out / "checkpoint.pth") as tmp:
        torch.save(state, tmp)
    if improved:
        write_best(out, state)


def write_best(out: Path, state: dict) -> None:
    """best.pth: a checkpoint's weights, config, epoch and metric (no optimizer)."""
    with data.atomic_path(out / "best.pth") as tmp:
        torch.save({k: state[k] for k in ("format", "model", "config", "epoch", "best_metric", "args", "data_dir")},
                   tmp)


def test_best(model: SegVLM, test_path: Path, out: Path, cfg: TrainConfig, batch_size: int) -> dict:
    """Score best.pth's weights on test.lmdb (every rank its share; rank 0 reads the file and broadcasts
    them) -> evaluate's metrics. Rank 0 adds the decoder-grid ceiling of the same tasks ("ceiling"),
    writes them to test_metrics.json, prints both and draws predictions.png (evaluate.prediction_grid)."""
    rank, _, device = distributed.info()
    weights = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["model"] if rank == 0 else None
    model.load_state_dict(distributed.broadcast(weights))
    test_set = data.PhraseCutLMDB(test_path, input_size=model.config.input_size, word_len=model.config.word_len,
                                  train=False)
    test = evaluate.evaluate(model, test_set, threshold=cfg.threshold, batch_size=batch_size,
                             num_workers=cfg.num_workers, device=device, progress=False, per_task=True,
                             ceiling=True)  # "ceiling": a perfect map on the decoder's stride-16 grid, the
    per_task = test.pop("per_task")          # bound CRIS's design sets at this input size
    if rank == 0:
        size = model.config.input_size
        write_text(out / "test_metrics.json", json.dumps(test, indent=2))
        evaluate.prediction_grid(model, test_set, per_task, out / "predictions.png", threshold=cfg.threshold,
                                 device=device)
        ceiling = test["ceiling"]
        print(f"test (best.pth): mIoU {test['mIoU']:.4f}  oIoU {test['oIoU']:.4f}  "
              f"P@0.5 {test['prec@0.5']:.4f}  P@0.9 {test['prec@0.9']:.4f}  n={test['n']}\n"
              f"ceiling at {size} px (a perfect {size // 16}x{size // 16} decoder map): mIoU {ceiling['mIoU']:.4f}  "
              f"oIoU {ceiling['oIoU']:.4f}  P@0.5 {ceiling['prec@0.5']:.4f}  P@0.9 {ceiling['prec@0.9']:.4f}\n"
              f"pictures of typical tasks and failures: {out / 'predictions.png'}")
    return test


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


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ValueError, OSError, NonFiniteLoss) as e:  # OSError: a path that cannot be read or written
        sys.exit(f"train.py: error: {e}")
    except RuntimeError as e:  # a collective that lost a peer (distributed.py); anything else is a bug: raised
        if (message := distributed.peer_failure(e)) is None:
            raise
        sys.exit(f"train.py: error: {message}")


if __name__ == "__main__":
    main()
