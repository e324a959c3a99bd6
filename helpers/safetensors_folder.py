"""A model as a folder in Hugging Face's layout: config.json (the model's config) + model.safetensors (the weights).

    python -m tools.export --ckpt best.pth --safetensors segvlm-demo/     # write_folder
    python predict.py --ckpt segvlm-demo/ --image dog.jpg --phrase "the dog"   # read_folder, via load_checkpoint

safetensors holds tensors only (a JSON header and the raw bytes, no pickle), and is read memory-mapped:
loading such a folder runs no code of the file's. config.json is `SegVLMConfig.to_dict()`. The safetensors
header's metadata keeps the checkpoint's plain string fields that tools read (data_dir: evaluate.py's default
data), nothing else of the training state.

Every tool that takes --ckpt reads a folder through checkpoints.load_checkpoint / read_checkpoint_file
(evaluate.py, predict.py, app.py, train.py --init-from). A folder whose two files disagree (a tensor
missing, unexpected or of another shape for the config's architecture) is refused, naming both files.
"""
import json
import os
from pathlib import Path

import torch

from helpers.files import atomic_path, read_json
from model import SegVLM, SegVLMConfig

CONFIG, WEIGHTS = "config.json", "model.safetensors"
KEPT = ("data_dir", "source")  # the checkpoint's string fields kept in the weights' metadata


def is_folder(path) -> bool:
    """Whether `path` is a folder holding config.json or model.safetensors (then read_folder reads it)."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG).exists() or (path / WEIGHTS).exists())


def read_folder(path) -> dict:
    """A safetensors folder -> a checkpoint dict {"model": state dict, "config": config dict, "source", ...}, as
    torch.load gives one of this project's files. A ValueError naming the file that is missing or unreadable,
    or both files when the weights do not fit the config's architecture."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    path = Path(path)
    config_path, weights_path = path / CONFIG, path / WEIGHTS
    for file in (config_path, weights_path):
        if not file.is_file():
            raise ValueError(f"checkpoint folder {path} has no {file.name}: a model folder holds {CONFIG} and {WEIGHTS} "
                             f"(python -m tools.export --safetensors)")
    config = read_json(config_path, dict)
    try:
        cfg = SegVLMConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path} is not a SegVLM config: {e}") from None
    try:
        state_dict = load_file(weights_path)  # memory-mapped; no code runs
        with safe_open(weights_path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} cannot be read as safetensors (truncated or corrupt?): {e}") from None
    misfit = fit(state_dict, cfg)
    if misfit:
        raise ValueError(f"{config_path} and {weights_path} disagree: the weights do not fit the architecture the "
                         f"config describes ({misfit}); export the folder again from one checkpoint")
    return {"model": state_dict, "config": cfg.to_dict(), **{k: meta[k] for k in KEPT if k in meta},
            "folder": os.fspath(path)}


def fit(state_dict, cfg, show=3) -> str:
    """'' when state_dict is exactly SegVLM(cfg)'s tensors and shapes; else what differs (the first `show` of each
    kind). The model is built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SegVLM(cfg).state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} where the config gives {s}" for k, s in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != s]
    return "; ".join(f"{len(keys)} tensor(s) {what}, e.g. {', '.join(keys[:show])}" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys)


def write_folder(model, folder, ckpt=None) -> Path:
    """Write `model` (a SegVLM) as folder/config.json + folder/model.safetensors, each atomically; `ckpt`'s
    KEPT string fields go into the weights' metadata. -> the folder."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{k: str(ckpt[k]) for k in KEPT if ckpt and isinstance(ckpt.get(k), str)}}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}  # no shared memory
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    with atomic_path(folder / CONFIG) as tmp:
        tmp.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return folder
