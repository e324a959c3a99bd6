"""A model as a folder in Hugging Face's layout: config.json (the model's config) + model.safetensors (the weights).

    python -m tools.export --ckpt best.pth --safetensors segvlm-demo/     # write_folder
    python predict.py --ckpt segvlm-demo/ --image dog.jpg --phrase "the dog"   # read_folder, via model_files

safetensors holds tensors only (a JSON header and the raw bytes, no pickle), and is read memory-mapped:
loading such a folder runs no code of the file's. config.json is `SegVLMConfig.to_dict()`. The safetensors
header's metadata (strings only) keeps:
- "segvlm_config": the same config, as JSON. The two files are written one after the other, so a kill between
  them, or a hand edit of config.json, could pair a config with weights it does not describe; a field shapes do
  not show (the heads of an attention, the word length) would then give other masks without a word. A folder
  whose config.json differs from its weights' own copy is refused, naming both files and the fields.
- "segvlm_trained_on": what the model was trained on (the checkpoint's `trained_on` record, JSON), so that a
  model folder says so as its checkpoint did;
- "data_dir" and "source": the checkpoint's plain string fields that tools read (evaluate.py's default data).

`read_folder` reads the header first (names, shapes, metadata: no tensor data) and compares it with the config
on the meta device, so a folder whose config asks for an enormous model is refused before anything is allocated.
A folder written before the header held its config (no "segvlm_config") is compared by shapes only.
"""
import json
import os
import stat
from pathlib import Path

import torch

from helpers.checkpoints import fit_to_config, listing, show_value
from helpers.files import atomic_path, metadata_json, read_json
from model import SegVLMConfig

CONFIG, WEIGHTS = "config.json", "model.safetensors"
CONFIG_KEY, TRAINED_ON_KEY = "segvlm_config", "segvlm_trained_on"  # the weights' metadata entries (JSON)
KEPT = ("data_dir", "source")  # the checkpoint's string fields kept in the weights' metadata
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def is_folder(path) -> bool:
    """Whether `path` is a folder holding config.json or model.safetensors (then read_folder reads it)."""
    path = Path(path)
    return path.is_dir() and (os.path.lexists(path / CONFIG) or os.path.lexists(path / WEIGHTS))


def _regular_file(file: Path, folder: Path):
    """A ValueError unless `file` (followed if a link) is a regular file: a link to /dev/zero would be read forever."""
    if not os.path.lexists(file):
        raise ValueError(f"model folder {folder} has no {file.name}: a model folder holds {CONFIG} and {WEIGHTS} "
                         f"(python -m tools.export --safetensors)")
    try:
        mode = os.stat(file).st_mode
    except OSError as e:
        raise ValueError(f"{file} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, a FIFO or a socket"
        raise ValueError(f"{file} is not a regular file but {kind}; a model folder holds the files {CONFIG} and "
                         f"{WEIGHTS}")


def read_header(weights_path: Path) -> tuple:
    """(metadata dict, {name: meta tensor of the stored shape and dtype}) of a safetensors file: its header only."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(weights_path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {}
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key] = torch.empty(piece.get_shape(), dtype=DTYPES.get(piece.get_dtype(), torch.float32),
                                          device="meta")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights_path} cannot be read as safetensors (truncated or corrupt?): {e}") from None
    return meta, shapes


def read_folder(path) -> dict:
    """A model folder -> a checkpoint dict {"model": state dict, "config": config dict, "trained_on"?, "data_dir"?,
    "source"?, "folder"}, as torch.load gives one of this project's files. The config is checked (every field
    within model.LIMITS), compared with the weights' own copy and with the header's shapes on the meta device,
    and only then are the tensors read. A ValueError naming the file that is missing or unreadable, or both files
    when they disagree."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    config_path, weights_path = path / CONFIG, path / WEIGHTS
    for file in (config_path, weights_path):
        _regular_file(file, path)
    try:
        cfg = SegVLMConfig.from_dict(read_json(config_path, dict))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path} is not a SegVLM config: {e}") from None
    meta, header = read_header(weights_path)
    where = f"{weights_path}"
    own = metadata_json(meta, CONFIG_KEY, where)
    if own is not None:
        try:
            own = SegVLMConfig.from_dict(own)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: its own copy of the config is not a SegVLM config: {e}") from None
        differ = [f"{k}: {show_value(v)} in {CONFIG}, {show_value(getattr(own, k))} in the weights"
                  for k, v in vars(cfg).items() if v != getattr(own, k)]
        if differ:
            raise ValueError(f"{config_path} and {weights_path} disagree: the weights were written for another "
                             f"config ({listing(differ, 4)}); export the folder again from one checkpoint")
    missing, unexpected, wrong = fit_to_config(header, cfg)
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} tensor(s) {what}, e.g. {listing(keys, 3)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]
        raise ValueError(f"{config_path} and {weights_path} disagree: the weights do not fit the architecture the "
                         f"config describes ({'; '.join(problems)}); export the folder again from one checkpoint")
    try:
        state_dict = load_file(weights_path)  # memory-mapped; no code runs
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights_path} cannot be read as safetensors (truncated or corrupt?): {e}") from None
    ckpt = {"model": state_dict, "config": cfg.to_dict(), **{k: meta[k] for k in KEPT if k in meta},
            "folder": os.fspath(path)}
    record = metadata_json(meta, TRAINED_ON_KEY, where)
    if record is not None:
        ckpt["trained_on"] = record
    return ckpt


def write_folder(model, folder, ckpt=None, trained_on=None) -> Path:
    """Write `model` (a SegVLM) as folder/model.safetensors, then folder/config.json, each atomically; the weights'
    metadata holds the config, `trained_on` (a record, provenance.of_checkpoint's) and `ckpt`'s KEPT string fields.
    -> the folder. The caller has checked the folder (the tool's claim_files: no file of a user's overwritten)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    meta = {"format": "pt", CONFIG_KEY: json.dumps(config),
            **{k: str(ckpt[k]) for k in KEPT if ckpt and isinstance(ckpt.get(k), str)}}
    if trained_on is not None:
        meta[TRAINED_ON_KEY] = json.dumps(trained_on)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}  # no shared memory
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    with atomic_path(folder / CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder
