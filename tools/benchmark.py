"""Time SegVLM on this device: every speed figure of docs/measurements.md, from one command.

    python -m tools.benchmark                          # the paper preset at 416x416 (meant for a GPU)
    python -m tools.benchmark --preset demo --batch 16 # the CPU demo's model
    python -m tools.benchmark --ckpt best.pth          # a checkpoint's own architecture and input size
    python -m tools.benchmark --deform-impl torchvision  # eq. 1 through torchvision's kernel instead
    python -m tools.benchmark --compile                # torch.compile for the eager and training figures
    python -m tools.benchmark --preset paper --latency-only   # every engine at batch 1, the CPU's floors

Weights are random (speed does not depend on them). Every figure is the
median of --repeats timed passes after --warmup untimed ones, with the device
synchronised around each pass, and with the enhancement block on and off
alternated so that a change in load hits both alike. Printed:

- inference latency at batch 1: the eager model in float32, and the fast path
  (engines.FastSegVLM, the engine "torch": CUDA graphs and bf16 autocast on CUDA; bf16 autocast
  and channels-last on a CPU with native bf16, AVX512-BF16 or AMX; float32 on any other
  CPU; "fast_precision" says which), with the block on/off ratio;
- (--latency-only, and last in a full run) the batch-1 latency of every engine installed
  (helpers/engines.py), alternately in one process, with the model's enhancement block: eager
  float32, torch, openvino (what "auto" picks here is "engine"), onnxruntime and OpenVINO with its
  own defaults on tools.export's ONNX file; this CPU's float32 and bf16 matmul rates, the model's
  FLOPs, the floors they give, and the fraction of its floor the default engine reaches;
- inference images/s at --batch through the fast path;
- training images/s at --batch (train.train_step, train.py's step: forward,
  RAF loss, backward, Adam, fused on CUDA; bf16 autocast and channels-last on
  CUDA, as train.py) on tensors already on the device, and the peak GPU memory
  of a step with the block (the block-less model's weights and Adam state,
  held at the same time, included);
- the LMDB loader's samples/s with --workers processes on synthetic
  PhraseCut-format images of 500x375 (PhraseCut's typical size), the rate that
  training can at most reach with that many workers.

The last line is one JSON object with every figure (`--json FILE` writes it too). At --batch 1 the
training figure is skipped (BatchNorm cannot train on one value per channel) and the JSON says why
("train_skipped"); a --size whose decoder attention alone would not fit the device's memory is refused
before anything is allocated, naming the largest that fits.
"""
import argparse
import copy
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import layers
import train
from data import PhraseCutLMDB, collate
from helpers import distributed, engines, hardware, train_config
from helpers.cli import check_output, check_path, parse_device, run_tool
from helpers.clip_weights import clip
from helpers.engines import PRECISIONS, FastSegVLM, amp_for
from helpers.files import atomic_path
from helpers.model_files import read_model_file
from helpers.onnx_model import OnnxSegVLM
from helpers.safetensors_folder import is_folder
from model import PRESETS, SegVLM
from sources import phrasecut, synthetic


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, device, repeats: int, warmup: int) -> dict:
    """Median seconds of each zero-argument function, run alternately, in a new order each round (seeded): a runtime
    whose threads still spin after its run (OpenMP's, onnxruntime's) slows the one after it, so none always follows
    the same one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in list(order):
            fn = fns[name]
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_models(cfg, device, deform_impl):
    """{True: model with the block, False: without}, random weights, eval mode."""
    models = {}
    for block in (True, False):
        torch.manual_seed(0)
        m = SegVLM(dataclasses.replace(cfg, deform=block, se=block))
        if block:
            m.enhance.deform.impl = deform_impl
        models[block] = m.to(device).eval()
    return models


def inputs(cfg, batch, size, device):
    image = torch.randn(batch, 3, size, size, device=device)
    tokens = clip.tokenize(["a black baseball cap on the table"] * batch, context_length=cfg.word_len).to(device)
    mask = (torch.rand(batch, 1, size // 4, size // 4, device=device) > 0.8).float()
    return image, tokens, mask


def maybe_compile(model, compile):
    return torch.compile(model) if compile else model


@torch.no_grad()
def inference(models, cfg, size, batch, device, repeats, warmup, compile=False, amp=None) -> dict:
    image, tokens, _ = inputs(cfg, batch, size, device)
    out = {}
    if batch == 1:
        eager = timed({b: (lambda m=maybe_compile(m, compile): m(image, tokens)) for b, m in models.items()},
                      device, repeats, warmup)
        out["latency_eager_fp32_ms"] = {b: 1000 * t for b, t in eager.items()}
    fast = {b: FastSegVLM(m, amp=amp, cuda_graphs=device.type == "cuda") for b, m in models.items()}
    # warm-up runs the first (eager) pass of each shape and its capture
    t = timed({b: (lambda f=f: f(image, tokens)) for b, f in fast.items()}, device, repeats, warmup + 2)
    if batch == 1:
        out["latency_fast_ms"] = {b: 1000 * s for b, s in t.items()}
    else:
        out["inference_images_per_s"] = {b: batch / s for b, s in t.items()}
    return out


def engine_latencies(cfg, size, device, repeats, warmup, precision="auto", onnx=True) -> dict:
    """Batch-1 latency of every engine installed (helpers/engines.py), timed alternately in this one process, the
    model with its enhancement block: the eager model in float32 (the reference), "torch", "openvino" (converted
    here; the conversion's seconds in engine_setup_s) and, with `onnx`, the model exported by tools.export and run
    by onnxruntime and by OpenVINO with its defaults ("openvino_onnx_defaults", no setting of this project's).
    onnxruntime's threads are told not to spin between runs: spinning, they took the cores from the engine timed
    next (the demo's eager model measured 2x slower beside it).
    Also what "auto" picks here, for a folder or the page ("engine") and for one image ("engine_one_image"), this
    CPU's matmul rates, the model's FLOPs, the floors they give, and the fraction of its floor "engine" reaches."""
    from tools.export import export_onnx  # tools of one layer; the exporter only when asked for
    torch.manual_seed(0)
    net = SegVLM(dataclasses.replace(cfg, input_size=size)).to(device).eval()
    image, tokens, _ = inputs(net.config, 1, size, device)
    bf16 = amp_for(device, precision)
    setup, runs = {}, {"eager_fp32": net}
    runs["torch"] = engines.FastSegVLM(copy.deepcopy(net), amp=bf16, cuda_graphs=device.type == "cuda")
    if device.type == "cpu" and engines.openvino_available():
        start = time.perf_counter()
        runs["openvino"] = engines.OpenVINOSegVLM(copy.deepcopy(net), net.config, bf16)
        setup["openvino"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        if onnx and device.type == "cpu":
            start = time.perf_counter()
            export_onnx(copy.deepcopy(net), Path(tmp) / "model.onnx")
            setup["onnx_export"] = time.perf_counter() - start
            runs["onnxruntime"] = OnnxSegVLM(Path(tmp) / "model.onnx", net.config, device, spinning=False)
            if engines.openvino_available():
                import openvino as ov
                compiled = ov.Core().compile_model(str(Path(tmp) / "model.onnx"), "CPU")  # OpenVINO's defaults
                feeds = [image.cpu().numpy(), tokens.cpu().numpy()]
                runs["openvino_onnx_defaults"] = lambda *_: compiled(feeds)
        with torch.no_grad():
            ms = {name: 1000 * t for name, t in timed({n: (lambda r=r: r(image, tokens)) for n, r in runs.items()},
                                                      device, repeats, warmup + 1).items()}
    default = engines.choose_engine("checkpoint", device)
    result = {"engine": default, "engine_one_image": engines.choose_engine("checkpoint", device, quick_start=True),
              "engine_precision": "bf16" if bf16 else "fp32", "engine_latency_ms": ms,
              "engine_speedup_over_eager_fp32": {n: ms["eager_fp32"] / t for n, t in ms.items()},
              "engine_setup_s": setup}
    if device.type == "cpu":
        rates = hardware.matmul_rates()
        flops = hardware.count_flops(net, image, tokens)
        floors = {k: 1000 * flops / (rate * 1e9) for k, rate in rates.items()}
        result.update(cpu=hardware.cpu_description(), matmul_gflops=rates, model_gflop=flops / 1e9, floor_ms=floors,
                      default_fraction_of_floor=floors[result["engine_precision"]] / ms[default])
    return result


def print_engines(result) -> None:
    for name, t in result["engine_latency_ms"].items():
        mark = " <- default" if name == result["engine"] else " <- one image" if name == result["engine_one_image"] else ""
        print(f"  engine {name:<24} {t:10.2f} ms   x{result['engine_speedup_over_eager_fp32'][name]:.2f} over eager "
              f"fp32{mark}")
    if "cpu" in result:
        cpu, rates, floors = result["cpu"], result["matmul_gflops"], result["floor_ms"]
        print(f"  cpu {cpu['name']} ({cpu['capability']}, AVX512-BF16 {cpu['avx512_bf16']}, AMX {cpu['amx']}): matmul "
              f"{rates['fp32']:.0f} GFLOP/s fp32, {rates['bf16']:.0f} GFLOP/s bf16; model {result['model_gflop']:.1f} "
              f"GFLOP; floor {floors['fp32']:.1f} ms fp32, {floors['bf16']:.1f} ms bf16; the default "
              f"({result['engine']}, {result['engine_precision']}) reaches {100 * result['default_fraction_of_floor']:.0f} %"
              f" of its floor")


BATCHNORM_AT_1 = "Expected more than 1 value per channel when training"  # torch's BatchNorm, one value a channel


def training(models, cfg, size, batch, device, repeats, warmup, compile=False) -> dict:
    """Training images/s (and, on CUDA, the peak memory of a step). At batch 1 the BatchNorm layers of the
    text projection see one value per channel, which torch refuses in training: the figure is then skipped,
    and {"train_skipped": why} returned instead."""
    try:
        return _training(models, cfg, size, batch, device, repeats, warmup, compile)
    except ValueError as e:
        if BATCHNORM_AT_1 not in str(e):
            raise
        return {"train_skipped": f"not measured at batch {batch}: training mode's BatchNorm needs more than one "
                                 f"value per channel ({e}); use --batch 2 or more"}
    finally:
        for m in models.values():
            m.eval()
            m.zero_grad(set_to_none=True)


def _training(models, cfg, size, batch, device, repeats, warmup, compile=False) -> dict:
    image, tokens, mask = inputs(cfg, batch, size, device)
    recipe = train_config.preset_defaults("paper")
    dtype = train.amp_dtype(device, recipe)
    channels_last = recipe.channels_last
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    steps = {}
    for block, m in models.items():
        m.train()
        net = maybe_compile(m.to(memory_format=torch.channels_last) if channels_last else m, compile)
        optimizer, _ = train.make_optimizer(m, recipe)
        criterion = train.make_loss(recipe)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        steps[block] = lambda n=net, o=optimizer, c=criterion, s=scaler: train.train_step(
            n, image, tokens, mask, c, o, s, dtype, recipe.clip_grad)
    t = timed(steps, device, repeats, warmup)
    result = {"train_images_per_s": {b: batch / s for b, s in t.items()}}
    if device.type == "cuda":  # one step with the block; the other model's weights and Adam state count too
        torch.cuda.reset_peak_memory_stats(device)
        steps[True]()
        result["train_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return result


def loader_rate(size, word_len, workers, batch, n_batches) -> float:
    """Samples/s of the LMDB loader over synthetic 500x375 PhraseCut-format images."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        synthetic.synthesize(root, num_images=max(40, batch * 2), seed=0, size=500)
        phrasecut.build_lmdb(root, "train", Path(tmp) / "train.lmdb", progress=False)
        dataset = PhraseCutLMDB(Path(tmp) / "train.lmdb", input_size=size, word_len=word_len, train=True)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0, collate_fn=collate)
        for _ in loader:  # first pass: workers start, the page cache fills
            pass
        count, t = 0, time.perf_counter()
        while count < n_batches:
            for _ in loader:
                count += 1
                if count == n_batches:
                    break
        return n_batches * batch / (time.perf_counter() - t)


def device_memory(device) -> int:
    """Bytes of memory on `device`: the GPU's total, or this machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def attention_bytes(cfg, size, batch) -> int:
    """A lower bound on one training step's memory at `size`: the decoder's self-attention scores over the
    (size / 16)^2 visual tokens, batch x heads x tokens^2 float32, which one layer holds for its backward.
    It grows as size^4: past a few thousand pixels no device holds it."""
    tokens = (size // 16) ** 2
    return batch * cfg.decoder_heads * tokens * tokens * 4


def check_size(cfg, size, batch, memory) -> None:
    """Refuse, before anything is allocated, a --size (at --batch) whose attention_bytes exceed `memory`,
    naming the largest --size that fits."""
    if attention_bytes(cfg, size, batch) <= memory:
        return
    fits = 32
    while attention_bytes(cfg, fits + 32, batch) <= memory:
        fits += 32
    raise ValueError(f"--size {size} at --batch {batch}: the decoder's self-attention over ({size}/16)^2 visual "
                     f"tokens alone needs {attention_bytes(cfg, size, batch) / 2 ** 30:,.0f} GiB, more than this "
                     f"device's {memory / 2 ** 30:,.0f} GiB; the largest --size that fits is {fits} (or lower --batch)")


def run(args) -> dict:
    device = args.device or distributed.info().device
    if args.ckpt:  # its architecture only: the config, checked against its weights (model_files), no model built
        cfg, name = read_model_file(args.ckpt, forms=("checkpoint", "cris", "folder")).config, args.ckpt
    else:
        cfg, name = PRESETS[args.preset].model, args.preset
    size = args.size or cfg.input_size
    check_size(cfg, size, args.batch, device_memory(device))
    models = make_models(cfg, device, args.deform_impl)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "model": name, "size": size, "batch": args.batch,
              "deform_impl": args.deform_impl, "compile": args.compile, "torch": torch.__version__,
              "fast_precision": "bf16" if amp_for(device, args.precision) else "fp32"}
    print(f"{name} at {size}x{size} on {result['device']} ({result['threads']} threads), "
          f"deformable conv: {args.deform_impl}; fast path in {result['fast_precision']}; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    timing = dict(device=device, repeats=args.repeats, warmup=args.warmup, compile=args.compile)
    amp = amp_for(device, args.precision)
    steps = [("inference, batch 1", lambda: inference(models, cfg, size, 1, amp=amp, **timing)),
             (f"inference, batch {args.batch}", lambda: inference(models, cfg, size, args.batch, amp=amp, **timing)),
             (f"training, batch {args.batch}", lambda: training(models, cfg, size, args.batch, **timing))]
    if args.batch == 1:  # the latency figures are the batch-1 figures
        del steps[1]
    for title, step in steps[:1] if args.latency_only else steps:
        figures = step()
        result.update(figures)
        for key, value in figures.items():
            if isinstance(value, dict):  # the block's cost as a ratio of times, whatever the unit
                cost = value[True] / value[False] if key.endswith("_ms") else value[False] / value[True]
                result[f"{key}_block_cost"] = cost
                print(f"  {title:<22} {key:<24} with block {value[True]:10.2f}   without {value[False]:10.2f}"
                      f"   block costs x{cost:.3f}")
            else:
                print(f"  {title:<22} {key:<24} {value}")
    if args.workers >= 0 and not args.latency_only:
        rate = loader_rate(size, cfg.word_len, args.workers, args.batch, args.loader_batches)
        result["loader_samples_per_s"] = rate
        print(f"  LMDB loader, {args.workers} workers: {rate:.1f} samples/s")
    if args.engines:  # last: onnxruntime and OpenVINO loaded beside torch, a later fork of this process crashed once
        figures = engine_latencies(cfg, size, device, args.repeats, args.warmup, args.precision, onnx=args.onnx)
        result.update(figures)
        print_engines(figures)
    result = {k: ({"with_block": v[True], "without_block": v[False]} if isinstance(v, dict) and True in v else v)
              for k, v in result.items()}
    print(json.dumps(result))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model preset (default paper)")
    p.add_argument("--ckpt", help="time this checkpoint's architecture instead of a preset")
    p.add_argument("--size", type=int, default=0, help="input side (default: the model's input_size)")
    p.add_argument("--batch", type=int, default=32, help="batch for throughput and training (default 32)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per figure (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes first (default 3)")
    p.add_argument("--workers", type=int, default=8,
                   help="DataLoader workers for the loader figure; -1 skips it (default 8)")
    p.add_argument("--loader-batches", type=int, default=20, help="batches timed for the loader figure")
    p.add_argument("--deform-impl", default="sampled", choices=layers.DeformableConv2d.IMPLS,
                   help="eq. 1's implementation (layers.DeformableConv2d)")
    p.add_argument("--compile", action="store_true", help="torch.compile the eager and training models")
    p.add_argument("--device", type=parse_device, help="cpu, cuda, cuda:N or mps (default: cuda if available, "
                                                        "else cpu)")
    p.add_argument("--json", help="also write the figures there")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the fast path's: auto (bf16 on CUDA and on a CPU with native bf16), bf16 or fp32")
    p.add_argument("--latency-only", action="store_true",
                   help="only the batch-1 latencies (eager fp32, the fast path, every engine installed, with this "
                        "CPU's matmul rates and floors); no throughput, training, loader")
    p.add_argument("--engines", action=argparse.BooleanOptionalAction, default=True,
                   help="time every engine installed at batch 1 (default on; OpenVINO converts the model first)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="with --engines, also export the model to ONNX and time onnxruntime and OpenVINO on it")
    args = p.parse_args(argv)
    for name, least in (("batch", 1), ("repeats", 1), ("loader_batches", 1), ("warmup", 0), ("workers", -1),
                        ("size", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.size % 32:
        p.error(f"--size must be a multiple of 32, got {args.size}")
    try:  # before any work: the checkpoint is a file, --json can be written and is not the checkpoint
        if args.ckpt:
            check_path(args.ckpt, "--ckpt")
            if not Path(args.ckpt).is_file() and not is_folder(args.ckpt):
                raise ValueError(f"--ckpt {args.ckpt}: {'a directory' if Path(args.ckpt).is_dir() else 'no such file'}"
                                 f"; name a checkpoint file (.pth) or a model folder (config.json, model.safetensors)")
        if args.json:
            check_output(args.json, "--json", [("--ckpt", args.ckpt)], example="figures.json")
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # the checkpoint's content, a write that failed
        sys.exit(f"benchmark.py: error: {e}")


if __name__ == "__main__":
    run_tool("benchmark.py", main)
