"""What a checkpoint says its model was trained on (its `trained_on` record), and how the tools show it.

train.py writes the record into checkpoint.pth and best.pth (helpers/runs.save_checkpoint), plain
strings and numbers that torch.load(weights_only=True) reads:

    {"dataset": "synthetic",            # synthetic, phrasecut, refcoco, refcoco+, refcocog, coco, voc or unknown
     "name": "synthetic shapes and colours (sources/synthetic.py)",
     "train": {"split": "train", "tasks": 5776, "images": 1280},      # the LMDB headers' counts
     "val": {"split": "val", "tasks": 718, "images": 128},
     "preset": "demo", "epochs": 8, "planned_epochs": 8,              # epochs behind these weights, of the run's
     "best_val_mIoU": 0.705, "units": UNITS}                          # the score is a fraction

`of_checkpoint` reads it back from any checkpoint: this project's (an older one, written before the record,
is described from its run settings where they tell, else "unknown"), or a file written by CRIS's training code, which names
no dataset. The record a file holds may be anything: `checked` keeps the fields that are what this docstring says
and names the others as unreadable, so that no record stops a tool. `describe` is the line the page, predict.py
and the API show; `knows_only_synthetic` says when SYNTHETIC_NOTE must go with the masks: a model trained on the
synthetic set has never seen a photo.
"""
import json
from pathlib import Path

# The `units` field of every JSON file with scores (trained_on, metrics.jsonl, test_metrics.json, evaluate --json).
UNITS = "fractions (0 to 1); printed in percent: 0.7069 is 70.69"

# The LMDB header's "dataset" (refcoco: its refer "dataset") -> what a person reads.
NAMES = {"synthetic": "synthetic shapes and colours (sources/synthetic.py)", "phrasecut": "PhraseCut",
         "refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg",
         "coco": "COCO categories as phrases", "voc": "PASCAL VOC categories as phrases"}

SYNTHETIC_NOTE = ("This model was trained on the synthetic dataset only: it knows six kinds of shapes in six "
                  "colours on plain backgrounds, nothing else. Its masks on a photo mean nothing. For photos, use a "
                  "checkpoint trained on real data: train one (PhraseCut, RefCOCO; docs list the commands), or load "
                  "one written by CRIS's training code (docs/cris.md; CRIS's authors published no checkpoints).")

UNKNOWN = {"dataset": "unknown", "name": "unknown (the checkpoint does not record it)"}


def percent(fraction: float, decimals: int = 2) -> str:
    """A score kept as a fraction (0.7069) as the tools print it: percent, two decimals ("70.69")."""
    return f"{100 * fraction:.{decimals}f}"


def is_synthetic_data(header: dict, data_dir=None) -> bool:
    """An LMDB of the synthetic set: its header says so (data.py build of a `data.py synth` folder), or it lies
    in the folder train.py makes the synthetic set in (sources/synthetic.ensure_synthetic's, with COMPLETE)."""
    if header.get("synthetic"):
        return True
    return data_dir is not None and (Path(data_dir) / "COMPLETE").is_file() and Path(data_dir).name.startswith(
        "synthetic_")


def dataset_key(header: dict, data_dir=None) -> str:
    """synthetic, phrasecut, refcoco, refcoco+, refcocog, coco, voc (from the LMDB header), or unknown."""
    if is_synthetic_data(header, data_dir):
        return "synthetic"
    dataset = header.get("dataset", "unknown")
    if dataset == "refcoco":  # which of the three: the refer layout's own name
        return str((header.get("refer") or {}).get("dataset", "refcoco"))
    return str(dataset)


def split_counts(header: dict) -> dict:
    """{split, tasks, images} of one LMDB's header."""
    return {"split": str(header.get("split", "unknown")), "tasks": int(header.get("num_tasks", 0)),
            "images": int(header.get("num_images", 0))}


def run_record(preset: str, epochs: int, planned_epochs: int, best_val_mIoU: float, train_header: dict,
               val_header: dict, data_dir=None) -> dict:
    """The `trained_on` record of a run's checkpoint (module docstring)."""
    key = dataset_key(train_header, data_dir)
    record = {"dataset": key, "name": NAMES.get(key, key), "train": split_counts(train_header),
              "val": split_counts(val_header), "preset": str(preset), "epochs": int(epochs),
              "planned_epochs": int(planned_epochs), "best_val_mIoU": float(best_val_mIoU), "units": UNITS}
    if key == "refcoco" or key.startswith("refcoco"):
        record["split_by"] = str((train_header.get("refer") or {}).get("split_by", "unknown"))
    return record


def of_checkpoint(ckpt: dict) -> dict:
    """The record of a loaded checkpoint dict (model_files.read_model_file's): its own `trained_on`; for CRIS's
    file what the file tells (no dataset); for an older checkpoint of this project what its run settings tell.
    Whatever the file holds, the record is `checked`: it never raises, and says what it could not read."""
    if ckpt.get("trained_on") is not None:
        return checked(ckpt["trained_on"])
    if ckpt.get("source") == "CRIS":
        meta = ckpt["cris"] if isinstance(ckpt.get("cris"), dict) else {}
        record = {"dataset": "unknown", "format": "CRIS",
                  "name": "unknown: CRIS's file does not name its dataset (CRIS's paper trains on "
                          "RefCOCO, RefCOCO+ and RefCOCOg)"}
        if "epoch" in meta:
            record["epochs"] = meta["epoch"]
        if "best_iou" in meta:
            record["best_val_IoU"] = meta["best_iou"]
            record["units"] = UNITS
        return checked(record)
    args = ckpt.get("args")
    if not isinstance(args, dict) or "preset" not in args:
        return dict(UNKNOWN)
    record = dict(UNKNOWN)
    data, data_dir = args.get("data"), ckpt.get("data_dir")
    if isinstance(data, (str, list, type(None))) and not data and isinstance(data_dir, str) and data_dir:
        record = {"dataset": "synthetic", "name": NAMES["synthetic"]}  # train.py without --data: the synthetic set
    epoch = ckpt.get("epoch", -1)
    record.update(preset=args["preset"], epochs=epoch + 1 if type(epoch) is int else epoch,
                  planned_epochs=args.get("epochs", 0), best_val_mIoU=ckpt.get("best_metric", 0.0), units=UNITS)
    return checked(record)


# ----------------------------------------------------------------------------- a record read from a file

MAX_TEXT = 200  # characters of one text field kept: a file's field may be megabytes, and the page shows it
MAX_COUNT = 10 ** 12  # phrases, images, epochs: no run counts more


def _text(value):
    """A string, cut to at most MAX_TEXT characters (its length said at the cut); None for anything else."""
    if not isinstance(value, str):
        return None
    return value if len(value) <= MAX_TEXT else f"{value[:MAX_TEXT - 40]}... ({len(value):,} characters)"


def _count(value):
    """A whole number from 0 to MAX_COUNT (not a bool, which Python counts as a number); None otherwise."""
    return value if type(value) is int and 0 <= value <= MAX_COUNT else None


def _fraction(value):
    """A score as a fraction: a real number from -1 (none yet) to 1 (NaN and infinities fail); None otherwise."""
    return float(value) if type(value) in (int, float) and -1 <= value <= 1 else None


def _split(value):
    """A split's counts, {split: text, tasks: count, images: count}, all three; None otherwise."""
    if not isinstance(value, dict):
        return None
    split, tasks, images = _text(value.get("split")), _count(value.get("tasks")), _count(value.get("images"))
    return None if split is None or tasks is None or images is None else {"split": split, "tasks": tasks,
                                                                          "images": images}


# Every field a record may hold (the module docstring's, and the CRIS file's best_val_IoU and format), and its reader.
FIELDS = {"dataset": _text, "name": _text, "format": _text, "train": _split, "val": _split, "split_by": _text,
          "preset": _text, "epochs": _count, "planned_epochs": _count, "best_val_mIoU": _fraction,
          "best_val_IoU": _fraction, "units": _text}


def checked(record) -> dict:
    """A `trained_on` record as the tools may show it. Each field of FIELDS that the record holds is kept when it is
    what the module docstring says (text, counts from 0 to MAX_COUNT, scores from -1 to 1; a text longer than
    MAX_TEXT characters cut), else its name is listed in "unreadable"; other keys are dropped, and "dataset" is
    "unknown" when not given. A record that is not a dict is {"dataset": "unknown", "unreadable": ["trained_on"]}.
    Never raises: the record comes from a file, which may hold anything torch.load(weights_only=True) builds.
    Checking a checked record gives it back unchanged."""
    if not isinstance(record, dict):
        return {"dataset": "unknown", "unreadable": ["trained_on"]}
    clean, unreadable = {}, []
    for key, read in FIELDS.items():
        if key in record:
            value = read(record[key])
            if value is None:
                unreadable.append(key)
            else:
                clean[key] = value
    said = record.get("unreadable")  # a checked record's own list
    if isinstance(said, list):
        for key in said:
            if isinstance(key, str) and (key in FIELDS or key == "trained_on") and key not in unreadable:
                unreadable.append(key)
    clean.setdefault("dataset", "unknown")
    if unreadable:
        clean["unreadable"] = unreadable
    return clean


def knows_only_synthetic(record: dict) -> bool:
    return isinstance(record, dict) and record.get("dataset") == "synthetic"


def describe(record: dict) -> str:
    """One line: what the model was trained on, by which preset, how long, and its best validation score; then
    the fields of the record that could not be read (`checked`). Any record, read from any file: never raises.
    The line holds the file's text as it is: print it through helpers.cli.shown, escape it for HTML."""
    record = checked(record)
    name = record.get("name", record["dataset"])
    text = f"a CRIS checkpoint; trained on {name}" if record.get("format") == "CRIS" else f"trained on {name}"
    train = record.get("train")
    if train:
        by = f", {record['split_by']}" if "split_by" in record else ""
        text += f" ({train['split']} split{by}: {train['tasks']:,} phrases on {train['images']:,} images)"
    if record.get("preset"):
        text += f", preset {record['preset']}"
    if "epochs" in record:
        planned = record.get("planned_epochs")
        text += f", {record['epochs']} epoch{'s' if record['epochs'] != 1 else ''}"
        text += f" of {planned}" if planned and planned != record["epochs"] else ""
    if record.get("best_val_mIoU", -1) >= 0:
        text += f", best val mean IoU {percent(record['best_val_mIoU'], 1)} %"
    elif "best_val_IoU" in record:
        text += f", best val IoU {percent(record['best_val_IoU'])} % (CRIS's figure)"
    unreadable = record.get("unreadable")
    if unreadable == ["trained_on"]:
        text += " (the checkpoint's record of it is unreadable)"
    elif unreadable:
        text += f" (unreadable in the checkpoint's record: {', '.join(unreadable)})"
    return text


def test_scores(ckpt_path) -> str:
    """The scores train.py wrote for a run's best.pth on its test split (test_metrics.json beside it), as one line:
    "test mean IoU 70.69 % (718 phrases)", or "test gIoU 58.52 %, N_acc 48.37 %, T_acc 96.52 % (902 phrases)"
    where the split has phrases that name nothing (GRES's figures). "" for a file of another name (train.py
    scores best.pth only), or when test_metrics.json is absent or its figures unreadable: never raises."""
    path = Path(ckpt_path)
    if path.name != "best.pth":
        return ""
    try:
        scores = json.loads((path.parent / "test_metrics.json").read_text())
    except (OSError, ValueError, RecursionError):
        return ""
    if not isinstance(scores, dict):
        return ""
    # with phrases that name nothing, PhraseCut's mean IoU scores every right "no target" 0: GRES's figures then
    keys = (("gIoU", "gIoU"), ("N_acc", "N_acc"), ("T_acc", "T_acc")) if "gIoU" in scores else (("mIoU", "mean IoU"),)
    named = [(label, _fraction(scores.get(key))) for key, label in keys]
    if any(value is None or value < 0 for _, value in named):
        return ""
    count = _count(scores.get("n"))
    return "test " + ", ".join(f"{label} {percent(value)} %" for label, value in named) + (
        f" ({count:,} phrases)" if count else "")
