"""What evaluate.py reads and writes besides the metrics: the data a checkpoint is scored on, and its output
flags, checked before any work (a ValueError naming the flag), and its command line (parse_args)."""
import argparse
from pathlib import Path

from helpers import distributed
from helpers.cli import check_output, check_output_dir, check_path, claim_files, parse_device, parse_threshold, same_file
from helpers.engines import CHOICES, open_engine
from helpers.files import mask_path
from helpers.model_files import read_model_file
from helpers.visualize import overlay_name
from model import DEFAULT_THRESHOLD


def open_model(args, device):
    """--ckpt as evaluate.py runs it -> (model, model_files.ModelFile): the PyTorch model in float32 (scores that
    compare across machines), or with --engine that engine, in its own precision for this machine unless
    --precision names one (said once)."""
    found = read_model_file(args.ckpt)
    if not args.engine:
        return found.build(device), found
    net = open_engine(found, device, args.engine, args.precision or ("bf16" if args.amp else "auto"))
    if distributed.is_main():
        print(f"evaluate: engine {net.engine} ({net.precision})", flush=True)
    return net, found


def resolve_data_path(ckpt, data_arg=None):
    """--data if given, else <checkpoint's data_dir>/test.lmdb; a clear error when neither exists."""
    if data_arg:
        path = Path(data_arg)
        if not path.exists():
            raise FileNotFoundError(f"--data {path} does not exist")
        if path.is_dir():
            raise ValueError(f"--data {path} is a directory; pass the LMDB file itself, e.g. {path / 'test.lmdb'}")
        return path
    data_dir = ckpt.get("data_dir") or ""
    if not data_dir:
        raise ValueError("the checkpoint does not say which data it was trained beside (no 'data_dir'); "
                         "pass --data PATH.lmdb")
    path = Path(data_dir) / "test.lmdb"
    if not path.exists():
        raise FileNotFoundError(f"{path} (the checkpoint's data_dir/test.lmdb) does not exist; pass --data PATH.lmdb")
    return path


def check_outputs(args):
    """Refuse, before any work, inputs that are not files (a FIFO, a device, a symlink loop) and outputs that
    cannot be written or would overwrite an input (a ValueError naming the flag).

    --save-masks and --vis must be directories (created here), --json a file in a directory
    that exists or can be created, and no output may be the checkpoint or the data."""
    inputs = [("--ckpt", args.ckpt), ("--data", args.data)]
    for flag, path in inputs:
        if path:
            check_path(path, flag)
    for flag in ("save_masks", "vis"):
        if getattr(args, flag):
            check_output_dir(getattr(args, flag), "--" + flag.replace("_", "-"), inputs)
    if args.json:
        if getattr(args, "pred_masks", None) and same_file(Path(args.json).parent, args.pred_masks) \
                and Path(args.json).suffix == ".png":
            raise ValueError(f"--json {args.json} is inside --pred-masks, where it would replace a mask; name another file")
        check_output(args.json, "--json", inputs, example="metrics.json")


def claim_outputs(args, dataset):
    """Before the evaluation: every task id makes a safe file name, and no file --save-masks or --vis would
    write is one this project did not write there (cli.claim_files; rank 0 records them)."""
    task_ids = dataset.task_ids() if args.save_masks or args.vis else []
    if args.save_masks:
        names = [mask_path(args.save_masks, task_id).name for task_id in task_ids]
        claim_files(args.save_masks, names, "--save-masks", record=distributed.is_main())
    if args.vis:
        names = [overlay_name(k, task_id) for k, task_id in enumerate(task_ids[:args.num])]
        claim_files(args.vis, names, "--vis", record=distributed.is_main())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py",
                                description="Evaluate a SegVLM checkpoint on PhraseCut (official metrics).")
    p.add_argument("--ckpt", help="checkpoint written by train.py, or by CRIS's training code (docs/cris.md); "
                                  "the model is rebuilt from it alone")
    p.add_argument("--pred-masks", metavar="DIR", help="score these saved <task_id>.png masks instead of a model "
                                                       "(needs --data)")
    p.add_argument("--data", help="eval LMDB (default: <checkpoint's data_dir>/test.lmdb)")
    p.add_argument("--threshold", type=parse_threshold, default=DEFAULT_THRESHOLD,
                   help=f"cut on the sigmoid probability (default {DEFAULT_THRESHOLD}, CRIS's)")
    p.add_argument("--batch-size", type=int, default=8, help="per process (default 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", type=parse_device, help="cpu, cuda, cuda:N or mps (default: this rank's GPU if "
                                                        "there is one, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="fp32 (the default: scores comparable across machines) or bf16 autocast (CUDA or CPU); "
                        "with --engine, default that engine's choice for this machine")
    p.add_argument("--amp", action="store_true", help="the same as --precision bf16")
    p.add_argument("--json", metavar="OUT.json", help="write the metrics there")
    p.add_argument("--save-masks", metavar="DIR", help="write <task_id>.png per task, 0/255 at the original size")
    p.add_argument("--vis", metavar="DIR", help="write --num overlay figures there")
    p.add_argument("--num", type=int, default=8, help="how many figures --vis writes (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ceiling", action="store_true",
                   help="also score a perfect prediction made at the decoder's stride-16 grid (decoder_grid_ceiling)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA graphs on CUDA (engines.FastSegVLM); no effect on the CPU (default on)")
    p.add_argument("--engine", choices=CHOICES,
                   help="for speed: the engine that runs the model (auto: the fastest here, OpenVINO on a CPU where "
                        "installed, in bf16 where the CPU computes it natively unless --precision fp32); default: "
                        "the PyTorch model in float32, so that scores compare across machines")
    args = p.parse_args(argv)
    if args.engine and args.pred_masks:
        p.error("--engine needs a model (--ckpt); --pred-masks only scores saved masks")
    if bool(args.ckpt) == bool(args.pred_masks):
        p.error("give --ckpt (a model to run) or --pred-masks DIR (saved masks to score), one of the two")
    if args.pred_masks:
        if not args.data:
            p.error("--pred-masks needs --data, the LMDB whose tasks the masks answer")
        model_only = [f for f in ("--save-masks", "--vis", "--ceiling", "--amp")
                      if getattr(args, f[2:].replace("-", "_"))]
        if args.precision == "bf16":  # named as given: --amp is only its other spelling
            model_only.append("--precision bf16")
        if model_only:
            p.error(f"{', '.join(model_only)} need{'s' * (len(model_only) == 1)} a model (--ckpt); --pred-masks only "
                    "scores saved masks")
    args.amp = args.amp or args.precision == "bf16"
    for name, least in (("batch_size", 1), ("num", 1), ("workers", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}")
    try:
        check_outputs(args)
    except ValueError as e:
        p.error(str(e))
    return args
