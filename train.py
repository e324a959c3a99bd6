"""Train SegVLM: one plain torch.distributed loop, from a laptop CPU to several GPUs.

    # the bundled default: synthetic PhraseCut-format data, made once, on a CPU
    torchrun --standalone --nproc_per_node=2 train.py --preset demo
    python train.py --preset demo                      # the same in one process

    # PhraseCut with the paper's recipe (SPEC §5), 1 or 4 GPUs
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
IoU), curves.png and, when test.lmdb exists, test_metrics.json.

The same code runs in one process and under torchrun: `init_distributed` does
nothing without torchrun's environment, only rank 0 prints and writes, and the
global batch is split across ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from data import DEMO_NUM_IMAGES
import evaluate
from loss import RAFLoss
from model import PRESETS as MODEL_PRESETS
from model import build_model

CHECKPOINT_FORMAT = "segvlm-checkpoint-v1"


# ---------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Every training setting; each is a command-line flag (`lr` -> `--lr`)."""

    # what to train
    preset: str = "demo"          # model preset (model.PRESETS) and the recipe below
    clip_weights: str = "none"    # "none" (random init), a CLIP name ("RN101") or a path
    init_from: str = ""           # start from these weights: CRIS's best_model.pth or a checkpoint (cris.py)
    deform: bool = True           # eq. 1 + eq. 3: deformable conv and residual shortcut
    se: bool = True               # eq. 2: squeeze-and-excitation
    input_size: int = 0           # 0: the preset's
    word_len: int = 0             # 0: the preset's
    # data
    data: str = ""                # dir with train.lmdb, val.lmdb (test.lmdb); "" = synthetic
    cache_dir: str = ".cache/segvlm"  # where the synthetic dataset is made once
    synth_images: int = DEMO_NUM_IMAGES  # synthetic images (all splits) when --data is empty
    num_workers: int = 2          # DataLoader workers per process
    # optimisation (SPEC §5)
    epochs: int = 50
    batch_size: int = 64          # global: split across processes
    lr: float = 1e-4
    backbone_lr_scale: float = 0.1  # CLIP backbone at lr x this (CRIS)
    milestones: list[int] = field(default_factory=lambda: [15, 30])
    lr_gamma: float = 0.1
    weight_decay: float = 0.0
    clip_grad: float = 0.0        # max grad norm; 0 = off (the paper's "clipnorm 0")
    amp: bool = True              # mixed precision on CUDA (bf16 where supported); ignored on CPU
    # loss (eq. 4-8)
    loss: str = "raf"             # "raf" or "bce" (the CRIS baseline)
    w_bce: float = 1.0
    w_focal: float = 1.0
    w_dice: float = 1.0
    dice_weight: str = "abs"      # adaptive Dice weight: abs | focal | none
    # run
    out: str = ""                 # run dir; default runs/<preset>-<time>
    resume: str = ""              # checkpoint.pth to continue from
    seed: int = 0
    threshold: float = 0.35       # mask threshold for validation (CRIS's)
    eval_test: bool = True        # evaluate best.pth on test.lmdb at the end


# Where a preset departs from the paper recipe above.
TRAIN_PRESETS: dict[str, dict] = {
    "paper": dict(clip_weights="RN101", num_workers=4),
    # Trained from scratch, so the backbone gets the full rate.
    # Small batches: on a CPU budget more updates beat bigger ones (batch 16 reached a higher
    # val mean IoU after one epoch than 32; lr 2e-3 was worse than 1e-3).
    "demo": dict(epochs=5, batch_size=16, lr=1e-3, backbone_lr_scale=1.0,
                 milestones=[4], num_workers=1),
    "smoke": dict(epochs=1, batch_size=4, lr=1e-3, backbone_lr_scale=1.0,
                  milestones=[100], synth_images=12, num_workers=0),
}


def preset_defaults(preset: str) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return dataclasses.replace(TrainConfig(preset=preset), **TRAIN_PRESETS[preset])


class _Parser(argparse.ArgumentParser):
    """argparse that lists every valid flag when it rejects one."""

    def error(self, message):
        flags = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
        self.exit(2, f"{self.prog}: error: {message}\nvalid flags: {' '.join(flags)}\n")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags from the TrainConfig fields; defaults come from --preset's recipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="demo")
    known, _ = pre.parse_known_args(argv)
    if known.preset not in TRAIN_PRESETS:
        sys.exit(f"train.py: error: unknown preset {known.preset!r}; "
                 f"choose one of {sorted(TRAIN_PRESETS)}")
    defaults = preset_defaults(known.preset)

    parser = _Parser(prog="train.py", description=__doc__.split("\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.type == "list[int]":
            parser.add_argument(flag, type=int, nargs="*", default=default, metavar="EPOCH")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=default)
    ns = parser.parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    try:
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject bad values before any work starts; each message names the flag."""
    if cfg.preset not in MODEL_PRESETS:
        raise ValueError(f"--preset {cfg.preset!r} has no model preset; choose one of {sorted(MODEL_PRESETS)}")
    positive = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr)
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("backbone_lr_scale", "weight_decay", "clip_grad", "w_bce", "w_focal", "w_dice",
                 "num_workers", "input_size", "word_len"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.lr_gamma <= 1:
        raise ValueError(f"--lr-gamma must be in (0, 1], got {cfg.lr_gamma}")
    if not 0 < cfg.threshold < 1:
        raise ValueError(f"--threshold must be in (0, 1), got {cfg.threshold}")
    if cfg.loss not in ("raf", "bce"):
        raise ValueError(f"--loss must be 'raf' or 'bce', got {cfg.loss!r}")
    if cfg.dice_weight not in ("abs", "focal", "none"):
        raise ValueError(f"--dice-weight must be abs, focal or none, got {cfg.dice_weight!r}")
    if cfg.input_size % 32:
        raise ValueError(f"--input-size must be a multiple of 32, got {cfg.input_size}")
    if cfg.data:
        for split in ("train", "val"):
            path = Path(cfg.data) / f"{split}.lmdb"
            if not path.exists():
                raise ValueError(f"--data {cfg.data}: missing {path} "
                                 f"(make it with: python data.py build --split {split} --out {path})")
    elif cfg.preset == "paper":
        raise ValueError("--preset paper needs --data DIR holding PhraseCut's train.lmdb and val.lmdb")
    weights = cfg.clip_weights
    if weights.lower() != "none" and weights not in clip.available_models() and not Path(weights).is_file():
        raise ValueError(f"--clip-weights {weights!r} is neither 'none', a CLIP model name "
                         f"({', '.join(clip.available_models())}) nor an existing file")
    if cfg.resume and not Path(cfg.resume).is_file():
        raise ValueError(f"--resume {cfg.resume}: no such file")
    if cfg.clip_weights.lower() != "none" and cfg.resume:
        raise ValueError("--resume restores every weight; leave --clip-weights at none")
    if cfg.init_from:
        if not Path(cfg.init_from).is_file():
            raise ValueError(f"--init-from {cfg.init_from}: no such file")
        if cfg.resume:
            raise ValueError("--resume continues a run from its own weights; drop --init-from")
        if weights.lower() != "none" and weights not in clip.available_models():
            raise ValueError(f"--init-from brings its own CLIP weights: --clip-weights may only name the file's "
                             f"backbone (e.g. RN101) or be none, not {weights!r}")


# ---------------------------------------------------------------------------
# distributed helpers: no-ops in one process (after DETR's util/misc.py)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins torchrun's process group as evaluate.py does."""
    evaluate.init_distributed()
    rank, world = evaluate.dist_info()
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    """Average a dict of floats over ranks (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Without SyncBatchNorm (on CPU, gloo) each rank updates its running stats
    from its own shard; DDP copies rank 0's at the next forward, but after the
    last step of an epoch they differ. Validation and the checkpoint must see
    one model, so rank 0's are sent to all, as DDP itself would.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------------------
# checkpoints: plain tensors, numbers and strings; load with weights_only=True


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary name, then rename: a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


# ---------------------------------------------------------------------------
# the pieces of a run


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """Adam with two groups: CLIP backbone at lr x backbone_lr_scale, the rest at lr.

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
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, gamma=cfg.lr_gamma)
    return optimizer, scheduler


def make_loss(cfg: TrainConfig) -> RAFLoss:
    if cfg.loss == "bce":  # the CRIS baseline: BCE alone
        return RAFLoss(w_bce=1.0, w_focal=0.0, w_dice=0.0)
    return RAFLoss(w_bce=cfg.w_bce, w_focal=cfg.w_focal, w_dice=cfg.w_dice, dice_weight=cfg.dice_weight)


def resolve_data(cfg: TrainConfig, rank: int) -> Path:
    """--data, or the synthetic dataset made once in the cache (rank 0 makes it)."""
    if cfg.data:
        return Path(cfg.data)

    def make():
        return data.ensure_synthetic(cfg.cache_dir, num_images=cfg.synth_images, seed=cfg.seed,
                                     progress=rank == 0)

    if rank == 0:
        make()
    barrier()
    return make()  # made by now: every rank gets the same path at once


def amp_dtype(device: torch.device, cfg: TrainConfig):
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); None = fp32."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the last epoch's metrics (rank 0 writes the run dir)."""
    rank, world, local_rank = init_distributed()
    try:
        return _train(cfg, rank, world, local_rank)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, local_rank: int) -> dict:
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    per_rank_batch = cfg.batch_size // world
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    ckpt = None
    if cfg.resume:
        try:
            ckpt = torch.load(cfg.resume, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt or not a torch file at all
            raise ValueError(f"--resume {cfg.resume}: cannot be read as a checkpoint ({e})") from e
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
            raise ValueError(f"--resume {cfg.resume}: not a checkpoint.pth written by train.py (a run's full "
                             f"state); to start a new run from a file's weights (best.pth, CRIS's "
                             f"best_model.pth), use --init-from")

    # model: the preset plus overrides, or exactly the checkpoint's architecture
    overrides = dict(deform=cfg.deform, se=cfg.se)
    if cfg.input_size:
        overrides["input_size"] = cfg.input_size
    if cfg.word_len:
        overrides["word_len"] = cfg.word_len
    if ckpt is not None:
        overrides = ckpt["config"]
    weights = None if cfg.clip_weights.lower() == "none" else cfg.clip_weights
    if cfg.init_from:  # every tensor from the file; the block (if on) new; --clip-weights only names the backbone
        import cris
        model, note = cris.init_model(cfg.init_from, dataclasses.replace(MODEL_PRESETS[cfg.preset], **overrides),
                                      clip_name=weights)
        model = model.to(device)
        if rank == 0:
            print(note, flush=True)
    else:
        try:
            model = build_model(cfg.preset, clip_weights=weights, **overrides).to(device)
        except RuntimeError as e:  # CLIP weights that could not be had: the message says how to get them
            if weights is None:
                raise
            raise ValueError(str(e)) from e
    mcfg = model.config

    data_dir = resolve_data(cfg, rank)
    train_set = data.PhraseCutLMDB(data_dir / "train.lmdb", input_size=mcfg.input_size,
                                   word_len=mcfg.word_len, train=True)
    val_set = data.PhraseCutLMDB(data_dir / "val.lmdb", input_size=mcfg.input_size,
                                 word_len=mcfg.word_len, train=False)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    # Its own generator: the loader's worker seeds then never draw from the global
    # RNG, whose stream (dropout) must be the same in a resumed run.
    loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise ValueError(f"{data_dir / 'train.lmdb'}: {len(train_set)} samples are fewer than "
                         f"one batch of {per_rank_batch} per process")

    optimizer, scheduler = make_optimizer(model, cfg)
    dtype = amp_dtype(device, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = make_loss(cfg)

    start_epoch, best, history = 0, -1.0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt["best_metric"], list(ckpt["history"])
        set_rng_state(ckpt["rng"])

    net = model
    if world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # gradient_as_bucket_view: grads live in DDP's buckets (no copy; also no stride
        # warning for the 1x1 convs whose grads autograd lays out channels-last)
        net = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)

    if cfg.out:
        out = Path(cfg.out)
    elif cfg.resume:  # continue in the run dir the checkpoint came from
        out = Path(cfg.resume).parent
    else:
        out = Path(f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"train": dataclasses.asdict(cfg), "model": mcfg.to_dict(), "world_size": world,
             "data_dir": str(data_dir)}, indent=2))
        (out / "command.txt").write_text(shlex.join([sys.executable] + sys.argv) + "\n")
        (out / "git.txt").write_text(git_commit() + "\n")
        print(f"run dir {out}  |  {world} process(es) on {device}  |  {len(train_set)} train "
              f"samples, {len(val_set)} val  |  global batch {cfg.batch_size}")

    step = start_epoch * len(loader)
    last = history[-1] if history else {}
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        net.train()
        t0 = time.time()
        sums = {"loss": 0.0, "bce": 0.0, "focal": 0.0, "dice": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0,
                   dynamic_ncols=True, leave=False)
        for batch in bar:
            image = batch["image"].to(device, non_blocking=True)
            tokens = batch["tokens"].to(device, non_blocking=True)
            target = batch["mask"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = net(image, tokens)
            terms = criterion(logits.float(), target)
            if not torch.isfinite(terms["loss"]):
                values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {step} "
                                    f"(rank {rank}): {values}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            for k in sums:
                sums[k] += terms[k].item()
            step += 1
            bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
        bar.close()
        scheduler.step()
        broadcast_buffers(model)

        train_terms = reduce_mean({k: v / len(loader) for k, v in sums.items()}, device)
        val = evaluate.evaluate(model, val_set, threshold=cfg.threshold, batch_size=per_rank_batch,
                                num_workers=cfg.num_workers, device=device, progress=False)
        last = {"epoch": epoch + 1, **train_terms,
                "lr": optimizer.param_groups[-1]["lr"],
                "lr_backbone": optimizer.param_groups[0]["lr"],
                **{f"val_{k}": val[k] for k in ("mIoU", "oIoU", "prec@0.5")},
                "seconds": round(time.time() - t0, 2)}
        history.append(last)
        improved = val["mIoU"] > best
        best = max(best, val["mIoU"])
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": mcfg.to_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "best_metric": best,
                     "history": history, "rng": rng_state(), "args": dataclasses.asdict(cfg),
                     "data_dir": str(data_dir.resolve())}
            atomic_save(state, out / "checkpoint.pth")
            if improved:
                atomic_save({k: state[k] for k in ("format", "model", "config", "epoch", "best_metric",
                                                   "args", "data_dir")}, out / "best.pth")
            plot_curves(history, out / "curves.png")
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {last['loss']:.4f} (bce {last['bce']:.4f} "
                  f"focal {last['focal']:.4f} dice {last['dice']:.4f})  val mIoU {val['mIoU']:.4f} "
                  f"oIoU {val['oIoU']:.4f} P@0.5 {val['prec@0.5']:.4f}  {last['seconds']:.0f}s", flush=True)
        barrier()

    test_path = data_dir / "test.lmdb"
    if cfg.eval_test and test_path.exists():
        # every rank scores best.pth's weights; rank 0 reads the file and broadcasts them
        weights = [None]
        if rank == 0:
            weights[0] = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["model"]
        if world > 1:
            dist.broadcast_object_list(weights, src=0)
        model.load_state_dict(weights[0])
        test_set = data.PhraseCutLMDB(test_path, input_size=mcfg.input_size, word_len=mcfg.word_len,
                                      train=False)
        test = evaluate.evaluate(model, test_set, threshold=cfg.threshold, batch_size=per_rank_batch,
                                 num_workers=cfg.num_workers, device=device, progress=False)
        if rank == 0:
            tmp = out / "test_metrics.json.tmp"
            tmp.write_text(json.dumps(test, indent=2))
            os.replace(tmp, out / "test_metrics.json")
            print(f"test (best.pth): mIoU {test['mIoU']:.4f}  oIoU {test['oIoU']:.4f}  "
                  f"P@0.5 {test['prec@0.5']:.4f}  P@0.9 {test['prec@0.9']:.4f}  n={test['n']}")
        last = {**last, **{f"test_{k}": v for k, v in test.items() if k != "subsets"}}
    return last


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
