"""Every training setting (TrainConfig), its command-line flag, its checks and what --resume keeps.

    python train.py --help          # every field, with the preset's default

A field `lr` is the flag `--lr`; the defaults are the paper's recipe (paper §4.2, CRIS's defaults
where it is silent) and a preset departs from them where its recipe says (model.PRESETS).
`validate` refuses bad values before any work starts, naming the flag; `resumed_config` gives a
resumed run the checkpoint's own settings and refuses typed flags that contradict it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.cli import check_path, check_writable, parse_threshold
from helpers.clip_weights import clip
from helpers.files import dir_holder
from helpers.safetensors_folder import is_folder
from model import DEFAULT_THRESHOLD, PRESETS, ConfigError, SegVLMConfig, get_preset
from sources.synthetic import DEMO_NUM_IMAGES

DESCRIPTION = "Train SegVLM: one plain torch.distributed loop, from a laptop CPU to several GPUs."

class Switch(argparse.BooleanOptionalAction):
    """A switch's two flags, --NAME (on) and --no-NAME (off). Python 3.11's BooleanOptionalAction tells them apart by
    the prefix "--no-", so the switch no_target_head's own flag, --no-target-head, turned it off: here the flag
    itself decides (BooleanOptionalAction lists each name, then its --no- form)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, self.option_strings.index(option_string) % 2 == 0)


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
    init_from: str = flag("", "start from this file's weights: a best_model.pth of CRIS's training code or a checkpoint")
    deform: bool = flag(True, "eq. 1 + eq. 3: the deformable conv and the residual shortcut")
    se: bool = flag(True, "eq. 2: squeeze-and-excitation")
    no_target_head: bool = flag(False, "the model may answer that a phrase names nothing (an empty mask): "
                                       "layers.NoTargetHead, trained on no-target tasks (gRefCOCO's, demo-gres's)")
    input_size: int = flag(0, "training and validation side in pixels; 0: the preset's")
    word_len: int = flag(0, "longest phrase in tokens; 0: the preset's")
    # data
    data: list[str] = flag([], "a dir with train.lmdb, val.lmdb (and test.lmdb); more dirs or LMDB files after it "
                               "add their training tasks, mixed (data.MixedTasks); none: synthetic PhraseCut")
    cache_dir: str = flag(".cache/segvlm", "where the synthetic dataset is made once")
    synth_images: int = flag(DEMO_NUM_IMAGES, "synthetic images (all splits) when --data is empty")
    synth_no_target: float = flag(0.0, "share of the synthetic phrases that name nothing in their image "
                                       "(no target, an empty mask; data.py synth --no-target-rate), 0 to 0.5")
    num_workers: int = flag(2, "DataLoader workers per process")
    group_by_image: bool = flag(False, "batches hold the phrases of a few images, each image encoded once a step "
                                       "(datasets.ImageGroupedSampler); off: tasks shuffled one by one")
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
    w_no_target: float = flag(1.0, "weight of the no-target BCE added to the loss (models with no_target_head)")
    # run
    out: str = flag("", "run dir; empty: --resume's own, else runs/<preset> (a rerun there is refused: --resume it)")
    resume: str = flag("", "a run's checkpoint.pth to continue from")
    seed: int = flag(0, "seed of every random number generator")
    threshold: float = flag(DEFAULT_THRESHOLD, "validation's cut on the sigmoid (CRIS's)",
                            type=parse_threshold)
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


def help_description(preset: str) -> str:
    """The head of `train.py --help`: whose defaults the flags show (they change with --preset)."""
    others = ", ".join(name for name in sorted(PRESETS) if name != preset)
    return (f"{__doc__.splitlines()[0]} The defaults shown are preset {preset}'s; "
            f"`python train.py --preset NAME --help` shows another preset's ({others}).")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags from the TrainConfig fields; defaults come from --preset's recipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=TrainConfig.preset)
    try:
        defaults = preset_defaults(pre.parse_known_args(argv)[0].preset)
    except ValueError as e:
        sys.exit(f"train.py: error: {e}")

    parser = _Parser(prog="train.py", description=help_description(defaults.preset),
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        options = {**f.metadata, "default": getattr(defaults, f.name)}
        if f.type == "bool":
            options["action"] = Switch
        elif f.type == "list[float]":
            options.update(type=epoch_number, nargs="*", metavar="EPOCH")
        elif f.type == "list[str]":
            options.update(type=str, nargs="+", metavar="PATH")
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
    late = [m for m in cfg.milestones if m >= cfg.epochs]
    if late and given & {"milestones", "epochs"}:  # a resumed run may yet go further: a note, not an error
        print(f"note: --milestones {' '.join(map(str, late))} is not before --epochs {cfg.epochs}: the rates never "
              f"decay there", file=sys.stderr)
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
    if not Path(cfg.resume).is_file():  # missing, a directory, a FIFO (a read would wait): validate says so
        return cfg
    try:
        ckpt = torch.load(cfg.resume, map_location="cpu", weights_only=True, mmap=True)  # tensors not read
        saved, model_cfg, done = dict(ckpt["args"]), dict(ckpt["config"]), ckpt["epoch"] + 1
    except Exception:
        return cfg
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in names and k not in NOT_RESUMED}
    if isinstance(saved.get("data"), str):  # a checkpoint from when --data took one folder
        saved["data"] = [saved["data"]] if saved["data"] else []
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
    check_numbers(cfg)
    check_loss(cfg)
    check_schedule(cfg)
    check_data(cfg)
    check_files(cfg)


def check_numbers(cfg: TrainConfig) -> None:
    """Finite floats, positive sizes and rates, the model's fields (SegVLMConfig), a batch BatchNorm can take."""
    for f in dataclasses.fields(TrainConfig):  # inf or nan would surface as a non-finite loss at step 0
        if f.type == "float" and not math.isfinite(getattr(cfg, f.name)):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(cfg, f.name)}")
    positive = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, log_every=cfg.log_every)
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("backbone_lr_scale", "weight_decay", "clip_grad", "w_bce", "w_focal", "w_dice", "w_no_target",
                 "num_workers", "input_size", "word_len"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    check_model_flags(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; distributed.init reads the same
    if cfg.batch_size // world < 2:  # the text projection's BatchNorm1d fails on a batch of one
        raise ValueError(f"--batch-size {cfg.batch_size}: BatchNorm needs at least 2 samples per process in "
                         f"training, and {world} process(es) get {cfg.batch_size // world} each; use --batch-size "
                         f"{2 * world} or more")
    if cfg.loss == "raf" and cfg.w_bce == cfg.w_focal == cfg.w_dice == 0:
        raise ValueError("--w-bce, --w-focal and --w-dice are all 0: the loss would be 0 and nothing would train")
    if not 0 < cfg.lr_gamma <= 1:
        raise ValueError(f"--lr-gamma must be in (0, 1], got {cfg.lr_gamma}")


def check_loss(cfg: TrainConfig) -> None:
    """--loss and RAF's settings (eq. 4-8): bce refuses the RAF flags it would ignore."""
    if cfg.loss not in ("raf", "bce"):
        raise ValueError(f"--loss must be 'raf' or 'bce', got {cfg.loss!r}")
    if cfg.loss == "bce":  # make_loss ignores RAF's settings: refuse them rather than drop them silently
        recipe = preset_defaults(cfg.preset)
        ignored = [f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in ("w_bce", "w_focal", "w_dice", "dice_weight")
                   if getattr(cfg, n) != getattr(recipe, n)]
        if ignored:
            raise ValueError(f"--loss bce is BCE alone (the CRIS baseline), so {', '.join(ignored)} would be "
                             f"ignored; drop it, or use --loss raf")
    if cfg.dice_weight not in ("abs", "focal", "none"):
        raise ValueError(f"--dice-weight must be abs, focal or none, got {cfg.dice_weight!r}")


def check_schedule(cfg: TrainConfig) -> None:
    """--schedule, --warmup-epochs and --milestones."""
    if cfg.schedule not in ("step", "cosine"):
        raise ValueError(f"--schedule must be step or cosine, got {cfg.schedule!r}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise ValueError(f"--warmup-epochs must be between 0 and --epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    if not all(0 < m < math.inf for m in cfg.milestones):
        raise ValueError(f"--milestones are epochs > 0, got {' '.join(map(str, cfg.milestones))}")
    if any(a >= b for a, b in zip(cfg.milestones, cfg.milestones[1:])):
        raise ValueError(f"--milestones must be in increasing order, got {' '.join(map(str, cfg.milestones))}: "
                         f"each decays the rates once, at its epoch")


def check_data(cfg: TrainConfig) -> None:
    """--data's first folder holds train.lmdb and val.lmdb, each later entry is a folder with train.lmdb or an
    LMDB file; or the synthetic set's settings can make one."""
    if cfg.data:
        first, *more = cfg.data
        if not Path(first).is_dir():
            what = "is not a directory" if Path(first).exists() else "does not exist"
            raise ValueError(f"--data {first} {what}: give the directory that holds train.lmdb and val.lmdb "
                             "(first; more folders or LMDB files may follow)")
        for folder, splits in [(first, ("train", "val"))] + [(m, ("train",)) for m in more if Path(m).is_dir()]:
            for split in splits:
                path = check_path(Path(folder) / f"{split}.lmdb", f"--data {folder}:")
                if not path.exists():
                    raise ValueError(f"--data {folder}: missing {path} "
                                     f"(make it with: python data.py build --split {split} --out {path})")
        for entry in more:
            if not Path(check_path(entry, "--data")).exists():
                raise ValueError(f"--data {entry} does not exist: give a folder holding train.lmdb or an LMDB file")
    elif cfg.preset == "paper" or cfg.preset.startswith("cris-"):
        raise ValueError(f"--preset {cfg.preset} needs --data DIR holding train.lmdb and val.lmdb "
                         f"({'PhraseCut' if cfg.preset == 'paper' else 'RefCOCO/+/g'}'s, made by data.py build)")
    else:  # the synthetic set
        if Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
            raise ValueError(f"--cache-dir {cfg.cache_dir} is a file; a directory is expected")
        if not 0 <= cfg.synth_no_target <= 0.5:
            raise ValueError(f"--synth-no-target must be between 0 and 0.5, got {cfg.synth_no_target}")
        if cfg.synth_images < 4:
            raise ValueError(f"--synth-images must be >= 4 (train, val, miniv and test), got {cfg.synth_images}")


def check_files(cfg: TrainConfig) -> None:
    """--clip-weights, --resume, --init-from and --out: they exist, fit together, and --out is free."""
    weights = cfg.clip_weights
    if weights.lower() != "none" and weights not in clip.available_models() and not Path(weights).is_file():
        raise ValueError(f"--clip-weights {weights!r} is neither 'none', a CLIP model name "
                         f"({', '.join(clip.available_models())}) nor an existing file")
    for name in ("resume", "init_from", "clip_weights", "out"):
        if getattr(cfg, name):
            check_path(getattr(cfg, name), "--" + name.replace("_", "-"))
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
    out = out_dir(cfg)
    check_writable(out, "--out")
    if cfg.out or cfg.resume:  # the default, runs/<preset>, is checked as the run takes it (runs.hold_run_dir), so
        holder = dir_holder(out)  # that reading flags (tools.ablation, tests) does not depend on what runs/ holds
        if holder:
            raise ValueError(f"--out {out} is in use by another run ({holder}); wait for it to end, stop it, "
                             f"or give another --out")
        if not cfg.resume:
            check_new_run_dir(out)
    if cfg.init_from:
        if not is_folder(cfg.init_from):  # a model folder (config.json + model.safetensors) is read as a file is
            need_file("--init-from", cfg.init_from)
        if cfg.resume:
            raise ValueError("--resume continues a run from its own weights; drop --init-from")
        if weights.lower() != "none" and weights not in clip.available_models():
            raise ValueError(f"--init-from brings its own CLIP weights: --clip-weights may only name the file's "
                             f"backbone (e.g. RN101) or be none, not {weights!r}")


def out_dir(cfg: TrainConfig) -> Path:
    """The run directory: --out, else --resume's own, else runs/<preset> (the same path on every rank and
    every rerun, so README's next commands find runs/demo/best.pth)."""
    if cfg.out:
        return Path(cfg.out)
    if cfg.resume:  # continue in the run dir the checkpoint came from
        return Path(cfg.resume).parent
    return Path("runs") / cfg.preset


RUN_FILES = ("checkpoint.pth", "best.pth", "metrics.jsonl", "config.json", "test_metrics.json")


def check_new_run_dir(out: Path) -> None:
    """A ValueError when the directory of a new run already holds one (its files would be overwritten),
    saying what it holds and what to do."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and (out / "checkpoint.pth").exists():
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}); continue it with "
                         f"--resume {out / 'checkpoint.pth'}, or give a new --out (or delete {out})")
    if found:
        raise ValueError(f"--out {out} holds a run that stopped before its first checkpoint ({', '.join(found)}); "
                         f"nothing to resume: delete {out} or give a new --out")


def check_model_flags(cfg: TrainConfig) -> None:
    """The flags that set model fields, checked by the model's own config (SegVLMConfig), naming the flag:
    each value alone, then with the preset's other fields when no CLIP weights or file bring their own."""
    overrides = {name: getattr(cfg, name) for name in ("deform", "se", "no_target_head", "input_size", "word_len")
                 if getattr(cfg, name) not in (0, None) or isinstance(getattr(cfg, name), bool)}
    try:
        for name, value in overrides.items():
            SegVLMConfig.check_field(name, value)
        if cfg.clip_weights.lower() == "none" and not cfg.init_from and not cfg.resume:
            dataclasses.replace(get_preset(cfg.preset).model, **overrides)
    except ConfigError as e:
        flag = flag_text(e.field, getattr(cfg, e.field)) if e.field in overrides else f"--preset {cfg.preset}"
        raise ValueError(f"{flag}: {e}") from None


def need_file(flag_name: str, path: str) -> None:
    if not Path(path).is_file():
        raise ValueError(f"{flag_name} {path}: {'a directory, not a file' if Path(path).is_dir() else 'no such file'}")
