"""What evaluate.py reads and writes besides the metrics: the data a checkpoint is scored on, and its output
flags, checked before any work (a ValueError naming the flag)."""
from pathlib import Path

from helpers import distributed
from helpers.cli import check_output, check_output_dir, check_path, claim_files, same_file
from helpers.files import mask_path
from helpers.visualize import overlay_name


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
