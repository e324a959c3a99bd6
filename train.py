"""Train SegVLM: one plain torch.distributed loop, from a laptop CPU to several GPUs.

    # the bundled default: synthetic PhraseCut-format data, made once, on a CPU
    torchrun --standalone --nproc_per_node=2 train.py --preset demo
    python train.py --preset demo                      # the same in one process

    # PhraseCut with the paper's recipe (paper §4.2), 1 or 4 GPUs
    python train.py --preset paper --data lmdb/ --clip-weights RN101
    torchrun --standalone --nproc_per_node=4 train.py --preset paper --data lmdb/

    # from a checkpoint of CRIS's training code (best_model.pth; docs/cris.md): every CRIS tensor copied, the block new
    python train.py --preset paper --init-from best_model.pth --data lmdb/

    # several nodes: the same command on each node, torchrun's usual flags
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \
        --master_addr=HOST --master_port=29500 train.py --preset paper --data lmdb/

    python train.py --help                             # every field, with the preset's default

`--data DIR` holds `train.lmdb` and `val.lmdb` (and `test.lmdb`, evaluated at the
end), as `python data.py build --out DIR/<split>.lmdb` writes them. More folders or
LMDB files after it (`--data grefcoco/ refcoco/`) add their training tasks, mixed
(data.MixedTasks: every task of every source once an epoch, in one shuffle);
validation, best.pth and the test stay on the first folder's. Validation
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
(helpers/distributed.py).

`train` reads as the recipe, one named step per line. The same code runs in
one process and under torchrun: `distributed.init` does nothing without
torchrun's environment, only rank 0 prints and writes, and the global batch is
split across ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import evaluate
from data import ImageGroupedSampler, MixedTasks, PhraseCutLMDB, unique_images
from helpers import distributed
from helpers.cli import run_tool
from helpers.figures import prediction_grid
from helpers.model_files import init_model
from helpers.provenance import UNITS, percent
from helpers.runs import hold_run_dir, log_epoch, make_run_dir, read_resume, restore, run_dir, save_checkpoint, write_text
from helpers.train_config import TrainConfig, check_new_run_dir, out_dir, parse_args
from loss import RAFLoss
from model import SegVLM, build_model, get_preset
from sources.synthetic import ensure_synthetic

# ---------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Run one training job -> the last epoch's metrics, with the test split's (test_*) when it was scored."""
    rank, world, device = distributed.init()
    held = contextlib.ExitStack()
    try:
        out = run_dir(cfg)
        if rank == 0:  # for the life of the run: a second run on `out` is refused, naming this one
            held.enter_context(hold_run_dir(cfg, out))
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
        make_run_dir(cfg, model.config, data_dir, resume, out)
        if rank == 0:
            print(f"run dir {out}  |  {world} process(es) on {device}  |  {len(loader.dataset)} train "
                  f"samples, {len(val_set)} val  |  global batch {cfg.batch_size}")

        per_step = steps_the_rate_per_batch(cfg)
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            terms = train_one_epoch(net, loader, criterion, optimizer, scaler, dtype, epoch, cfg,
                                    scheduler if per_step else None, model.config.no_target_head)
            if not per_step:
                scheduler.step()
            val = evaluate.evaluate(model, val_set, threshold=cfg.threshold, batch_size=loader.batch_size,
                                    num_workers=cfg.num_workers, device=device, progress=False)
            history.append({"epoch": epoch + 1, **terms, "lr": optimizer.param_groups[-1]["lr"],
                            "lr_backbone": optimizer.param_groups[0]["lr"],
                            **{f"val_{k}": val[k] for k in ("mIoU", "oIoU", "prec@0.5", *GRES_LOGGED) if k in val},
                            "seconds": round(time.time() - t0, 2)})
            score = val.get("gIoU", val["mIoU"])  # with no-target phrases in val: GRES's mean (it scores them)
            improved, best = score > best, max(best, score)
            if rank == 0:
                log_epoch(out, history, cfg.epochs)
                save_checkpoint(out, model, optimizer, scheduler, scaler, history, best, improved, cfg, data_dir,
                                (loader.dataset.header, val_set.header))
            distributed.barrier()

        last = history[-1] if history else {}
        if cfg.eval_test and (data_dir / "test.lmdb").exists():
            test = test_best(model, data_dir / "test.lmdb", out, cfg, loader.batch_size)
            last = {**last, **{f"test_{k}": v for k, v in test.items() if k not in ("subsets", "categories")}}
        return last
    finally:
        held.close()
        distributed.destroy()


# ---------------------------------------------------------------------------
# the steps, in the order train() takes them

GRES_LOGGED = ("gIoU", "cIoU", "N_acc", "T_acc")  # logged per epoch when val holds no-target phrases


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(cfg: TrainConfig, device, resume: dict | None = None) -> SegVLM:
    """The preset's model with the flags' overrides (a resumed run: exactly its architecture), on `device`;
    random weights, CLIP's (--clip-weights) or --init-from's. `restore` loads a resumed run's."""
    overrides = dict(deform=cfg.deform, se=cfg.se, no_target_head=cfg.no_target_head)
    if cfg.input_size:
        overrides["input_size"] = cfg.input_size
    if cfg.word_len:
        overrides["word_len"] = cfg.word_len
    if resume is not None:
        overrides = resume["config"]
    weights = None if cfg.clip_weights.lower() == "none" else cfg.clip_weights
    if cfg.init_from:  # every tensor from the file; the block (if on) new; --clip-weights only names the backbone
        model, note = init_model(cfg.init_from, dataclasses.replace(get_preset(cfg.preset).model, **overrides),
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
        return Path(cfg.data[0])

    def make():
        return ensure_synthetic(cfg.cache_dir, num_images=cfg.synth_images, seed=cfg.seed, size=input_size,
                                aspect=1.0, progress=distributed.is_main(), no_target_rate=cfg.synth_no_target)

    if distributed.is_main():
        make()
    distributed.barrier()
    return make()  # made by now: every rank gets the same path at once


def make_loaders(cfg: TrainConfig, model_cfg, data_dir: Path, device) -> tuple[DataLoader, PhraseCutLMDB]:
    """The training loader, whose batches are this rank's share of the global batch, and the val set."""
    rank, world, _ = distributed.info()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    sizes = dict(input_size=model_cfg.input_size, word_len=model_cfg.word_len)
    sources = [data_dir / "train.lmdb"] + [Path(e) / "train.lmdb" if Path(e).is_dir() else Path(e) for e in cfg.data[1:]]
    sets = [PhraseCutLMDB(path, **sizes, train=True) for path in sources]
    train_set = sets[0] if len(sets) == 1 else MixedTasks(sets)
    val_set = PhraseCutLMDB(data_dir / "val.lmdb", **sizes, train=False)
    if cfg.group_by_image:
        sampler = ImageGroupedSampler(train_set.image_ids(), cfg.batch_size // world, rank, world, cfg.seed)
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


def train_one_epoch(net, loader, criterion, optimizer, scaler, dtype, epoch: int, cfg: TrainConfig,
                    scheduler=None, gres=False) -> dict:
    """One pass over this rank's shard of the training set -> the loss terms' means over every rank.
    scheduler: stepped after every batch when given (a per-step schedule, make_optimizer).
    gres: the model has the no-target head (config.no_target_head): its BCE term is trained too (train_step).

    Every rank ends the epoch with rank 0's BatchNorm statistics (broadcast_buffers), so that
    validation and the checkpoint see one model. Raises NonFiniteLoss naming the first bad step.
    """
    rank = distributed.info().rank
    device = next(net.parameters()).device
    loader.sampler.set_epoch(epoch)
    net.train()
    monitor = LossMonitor(device, LossMonitor.KEYS + ("no_target",) * gres)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0, dynamic_ncols=True, leave=False)
    for i, batch in enumerate(bar):
        image, index = batch["image"], None
        if cfg.group_by_image:  # each distinct image once, and which image each phrase is about
            image, index = unique_images(image, batch["image_id"])
            index = index.to(device, non_blocking=True)
        image = image.to(device, non_blocking=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True)
        if cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        no_target = batch["no_target"].to(device, non_blocking=True) if gres else None
        terms = train_step(net, image, tokens, target, criterion, optimizer, scaler, dtype, cfg.clip_grad, index,
                           no_target, cfg.w_no_target)
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
               image_index=None, no_target=None, w_no_target=1.0) -> dict:
    """One optimisation step -> the loss terms as detached tensors on the device (read none: no host sync).
    image_index: see SegVLM.forward (None: one image per phrase). no_target: (B,) bools, the phrases that
    name nothing, for a model with the no-target head: the term "no_target", BCE of its logits against
    them, joins the loss times w_no_target (the mask loss still sees every phrase, an empty target included)."""
    with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if no_target is None:
            logits = net(image, tokens, image_index)
        else:
            logits, no_target_logits = net(image, tokens, image_index, return_no_target=True)
    terms = criterion(logits.float(), target)
    if no_target is not None:
        terms["no_target"] = F.binary_cross_entropy_with_logits(no_target_logits.float(), no_target.float())
        terms["loss"] = terms["loss"] + w_no_target * terms["no_target"]
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

    def __init__(self, device, keys=KEYS):
        self.KEYS = tuple(keys)
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


def test_best(model: SegVLM, test_path: Path, out: Path, cfg: TrainConfig, batch_size: int) -> dict:
    """Score best.pth's weights on test.lmdb (every rank its share; rank 0 reads the file and broadcasts
    them) -> evaluate's metrics. Rank 0 adds the decoder-grid ceiling of the same tasks ("ceiling"),
    writes them to test_metrics.json, prints both and draws predictions.png (prediction_grid)."""
    rank, _, device = distributed.info()
    weights = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["model"] if rank == 0 else None
    model.load_state_dict(distributed.broadcast(weights))
    test_set = PhraseCutLMDB(test_path, input_size=model.config.input_size, word_len=model.config.word_len,
                                  train=False)
    test = evaluate.evaluate(model, test_set, threshold=cfg.threshold, batch_size=batch_size,
                             num_workers=cfg.num_workers, device=device, progress=False, per_task=True,
                             ceiling=True)  # "ceiling": a perfect map on the decoder's stride-16 grid, the
    per_task = test.pop("per_task")          # bound CRIS's design sets at this input size
    if rank == 0:
        size = model.config.input_size
        write_text(out / "test_metrics.json", json.dumps({**test, "units": UNITS}, indent=2))
        prediction_grid(model, test_set, per_task, out / "predictions.png", threshold=cfg.threshold,
                                 device=device)
        ceiling = test["ceiling"]
        print(f"test (best.pth, percent): mIoU {percent(test['mIoU'])}  oIoU {percent(test['oIoU'])}  "
              f"P@0.5 {percent(test['prec@0.5'])}  P@0.9 {percent(test['prec@0.9'])}  n={test['n']}\n"
              f"ceiling at {size} px (a perfect {size // 16}x{size // 16} decoder map): mIoU {percent(ceiling['mIoU'])}  "
              f"oIoU {percent(ceiling['oIoU'])}  P@0.5 {percent(ceiling['prec@0.5'])}  "
              f"P@0.9 {percent(ceiling['prec@0.9'])}\n"
              f"pictures of typical tasks and failures: {out / 'predictions.png'}")
    return test


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if not cfg.out and not cfg.resume:  # runs/<preset>: refused at once if it holds a run, as a given --out is
        try:
            check_new_run_dir(out_dir(cfg))
        except ValueError as e:
            print(f"train.py: error: {e}", file=sys.stderr)
            sys.exit(2)
    try:
        train(cfg)
    except (ValueError, OSError, NonFiniteLoss) as e:  # OSError: a path that cannot be read or written
        sys.exit(f"train.py: error: {e}")
    except RuntimeError as e:  # a collective that lost a peer (helpers/distributed.py); anything else is a bug: raised
        if (message := distributed.peer_failure(e)) is None:
            raise
        sys.exit(f"train.py: error: {message}")


if __name__ == "__main__":
    run_tool("train.py", main)
