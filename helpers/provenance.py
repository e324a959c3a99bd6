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
no dataset. `describe` is the line the page, predict.py and the API show; `knows_only_synthetic` says when
SYNTHETIC_NOTE must go with the masks: a model trained on the synthetic set has never seen a photo.
"""
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
    """The record of a loaded checkpoint dict (checkpoints.load_checkpoint's): its own `trained_on`; for CRIS's
    file what the file tells (no dataset); for an older checkpoint of this project what its run settings tell."""
    if isinstance(ckpt.get("trained_on"), dict):
        return dict(ckpt["trained_on"])
    if ckpt.get("source") == "CRIS":
        meta = ckpt.get("cris") or {}
        record = {"dataset": "unknown", "format": "CRIS",
                  "name": "unknown: CRIS's file does not name its dataset (CRIS's paper trains on "
                          "RefCOCO, RefCOCO+ and RefCOCOg)"}
        if "epoch" in meta:
            record["epochs"] = meta["epoch"]
        if "best_iou" in meta:
            record["best_val_IoU"] = meta["best_iou"]
            record["units"] = UNITS
        return record
    args = ckpt.get("args")
    if not isinstance(args, dict) or "preset" not in args:
        return dict(UNKNOWN)
    record = dict(UNKNOWN)
    if not args.get("data") and ckpt.get("data_dir"):  # train.py without --data trained on the synthetic set
        record = {"dataset": "synthetic", "name": NAMES["synthetic"]}
    record.update(preset=str(args["preset"]), epochs=int(ckpt.get("epoch", -1)) + 1,
                  planned_epochs=int(args.get("epochs", 0)), best_val_mIoU=float(ckpt.get("best_metric", 0.0)),
                  units=UNITS)
    return record


def knows_only_synthetic(record: dict) -> bool:
    return record.get("dataset") == "synthetic"


def describe(record: dict) -> str:
    """One line: what the model was trained on, by which preset, how long, and its best validation score."""
    if record.get("format") == "CRIS":
        text = f"a CRIS checkpoint; trained on {record['name']}"
    else:
        text = f"trained on {record.get('name', record.get('dataset', 'unknown'))}"
    train = record.get("train")
    if isinstance(train, dict):
        by = f", {record['split_by']}" if "split_by" in record else ""
        text += f" ({train['split']} split{by}: {train['tasks']:,} phrases on {train['images']:,} images)"
    if record.get("preset"):
        text += f", preset {record['preset']}"
    if "epochs" in record:
        planned = record.get("planned_epochs")
        text += f", {record['epochs']} epoch{'s' if record['epochs'] != 1 else ''}"
        text += f" of {planned}" if planned and planned != record["epochs"] else ""
    if "best_val_mIoU" in record and record["best_val_mIoU"] >= 0:
        text += f", best val mean IoU {percent(record['best_val_mIoU'], 1)} %"
    elif "best_val_IoU" in record:
        text += f", best val IoU {percent(record['best_val_IoU'])} % (CRIS's figure)"
    return text
