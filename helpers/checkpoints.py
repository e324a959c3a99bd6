"""Checkpoint files (.pth) read safely, and CRIS's format converted to this project's.

    from helpers.model_files import load_checkpoint      # the reader every tool uses (a .pth, a folder, ONNX)
    model, ckpt = load_checkpoint("runs/demo/best.pth")  # or a best_model.pth of CRIS's training code

A checkpoint of this project (train.py's best.pth and checkpoint.pth, `tools.cris convert`'s output) is a
plain dict {"model": state_dict, "config": SegVLMConfig.to_dict(), ...}, read with
torch.load(weights_only=True) (`read_checkpoint_file`): tensors, numbers, strings and containers, never code.

A best_model.pth written by CRIS's own training code (Wang et al., CVPR 2022,
github.com/DerrickWang005/CRIS.pytorch: your own run of it, or a community-trained file; CRIS's
authors published no checkpoints, see that repository's issue #3, "Pretrained CRIS model") is
recognised (`is_cris_checkpoint`) and converted in memory (`to_segvlm_checkpoint`): with the
enhancement block off, SegVLM is CRIS's architecture (the paper's baseline, Table 2's first row),
so only the parameter names differ. `model_files.init_model` starts a run from either kind of file with the
enhancement block new (train.py --init-from).

CRIS's file, as its train.py writes it: a torch.save dict {epoch, cur_iou, best_iou, prec,
state_dict, optimizer, scheduler}. The model was wrapped in (Distributed)DataParallel, so every
key of state_dict starts with "module.". The scheduler is a MultiStepLR whose `milestones` is a
collections.Counter; `read_checkpoint_file` reads the file with
torch.load(weights_only=True), allowing that one class besides tensors and plain containers.

Names, CRIS's (model/clip.py, model/layers.py, model/segmenter.py) -> this project's:

    backbone.visual.attnpool.connect.*    -> backbone.c5_residual.*
    backbone.logit_scale                  -> dropped
    backbone.* (CLIP's own names)         -> backbone.*
    neck.txt_proj                         -> neck.txt_proj
    neck.f1_v_proj, neck.norm_layer       -> neck.f5_proj, neck.f5_norm
    neck.f2_v_proj, neck.f2_cat           -> neck.f4_proj, neck.f4_cat
    neck.f3_v_proj, neck.f3_cat           -> neck.f3_proj, neck.f3_cat
    neck.f4_proj5, f4_proj4, f4_proj3     -> neck.out5, out4, out3
    neck.aggr                             -> neck.aggregate
    neck.coordconv.0.conv1, coordconv.1   -> neck.coord.0.conv, neck.coord.1
    decoder.layers.N.multihead_attn       -> decoder.layers.N.cross_attn
    decoder.* (the rest)                  -> decoder.*
    proj.*                                -> projector.*

CRIS computes c5 with a modified attention pool that holds the 1x1 conv + BN residual
(`connect`); here CLIP's unmodified pool runs at every position and the residual sits beside it
(`CLIPBackbone.c5_residual`), the same function with the same tensors. `logit_scale` only served
CLIP's contrastive forward; CLIPBackbone deletes it, so it is dropped here.

The architecture is read from the tensors' shapes, as `model.build_model` reads CLIP's. Three
things are not in the file:
- attention heads. CLIP's rule gives the text transformer width // 64 heads (8 for RN50 and
  RN101; at least 1 for the small test models) and CRIS's configs use 8 decoder heads;
  `transformer_heads=` and `decoder_heads=` override them.
- the word length. CRIS trained with 17 tokens (RefCOCO, RefCOCO+) or 22 (RefCOCOg); the
  converted model accepts phrases up to CLIP's context (77 tokens); `word_len=` overrides it.
- the input size: CRIS's configs use 416; `input_size=` overrides it.
"""
import collections
import dataclasses
import math
import os
import pickle
import re

import torch

from helpers.weights import check_finite, check_tensors, compare_state_dict
from model import CLIP_FIELDS, SegVLM, SegVLMConfig, clip_fields_from_state_dict, config_fields

CRIS_REPO = "github.com/DerrickWang005/CRIS.pytorch"
CRIS_DECODER_HEADS = 8  # num_head in every config of CRIS's repository
CRIS_INPUT_SIZE = 416  # input_size in every config of CRIS's repository

# (CRIS's name, this project's), as the start of a key; {n} is a layer number; the first match wins.
KEY_MAP = (
    ("backbone.visual.attnpool.connect.", "backbone.c5_residual."),
    ("backbone.", "backbone."),
    ("neck.txt_proj.", "neck.txt_proj."),
    ("neck.f1_v_proj.", "neck.f5_proj."),
    ("neck.norm_layer.", "neck.f5_norm."),
    ("neck.f2_v_proj.", "neck.f4_proj."),
    ("neck.f2_cat.", "neck.f4_cat."),
    ("neck.f3_v_proj.", "neck.f3_proj."),
    ("neck.f3_cat.", "neck.f3_cat."),
    ("neck.f4_proj5.", "neck.out5."),
    ("neck.f4_proj4.", "neck.out4."),
    ("neck.f4_proj3.", "neck.out3."),
    ("neck.aggr.", "neck.aggregate."),
    ("neck.coordconv.0.conv1.", "neck.coord.0.conv."),
    ("neck.coordconv.1.", "neck.coord.1."),
    ("decoder.layers.{n}.multihead_attn.", "decoder.layers.{n}.cross_attn."),
    ("decoder.", "decoder."),
    ("proj.", "projector."),
)
DROPPED = ("backbone.logit_scale",)  # CLIP's contrastive temperature; CLIPBackbone has none
CRIS_TOP = ("backbone.", "neck.", "decoder.", "proj.")  # CRIS's four modules (model/segmenter.py)

# Shapes decide these fields; a run that starts from a file must agree on every one of them.
SHAPE_FIELDS = CLIP_FIELDS + ("fpn_out", "decoder_layers", "decoder_dim", "decoder_ffn", "proj_dim", "kernel_size")
# The CLIP ResNets CRIS's configs train on, by the fields that tell them apart.
BACKBONES = {
    "RN50": dict(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64),
    "RN101": dict(embed_dim=512, vision_layers=(3, 4, 23, 3), vision_width=64),
}


def _compile(src: str, dst: str):
    pattern = re.compile(re.escape(src).replace(re.escape("{n}"), r"(\d+)"))
    return pattern, dst.replace("{n}", r"\1")


_TO_OURS = [_compile(cris, ours) for cris, ours in KEY_MAP]
_TO_CRIS = [_compile(ours, cris) for cris, ours in KEY_MAP]


def _rename(key: str, rules):
    for pattern, repl in rules:
        m = pattern.match(key)
        if m:
            return m.expand(repl) + key[m.end():]
    return None


def cris_name(key: str) -> str:
    """This project's parameter name -> CRIS's (for messages about a CRIS file)."""
    return _rename(key, _TO_CRIS) or key


def _strip_module(state_dict: dict) -> dict:
    """CRIS saved its (Distributed)DataParallel wrapper, so keys start with "module."; a bare model's do not."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _cris_state_dict(obj):
    """The CRIS state dict inside a loaded file, or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    sd = obj.get("state_dict", obj)  # CRIS's checkpoint dict, or a bare state dict saved from its model
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd):
        return None
    keys = list(_strip_module(sd))
    if not all(any(k.startswith(top) for k in keys) for top in ("backbone.", "neck.", "proj.")):
        return None
    return sd  # a key outside CRIS's modules is named by convert_state_dict


def is_cris_checkpoint(obj) -> bool:
    """True for what torch.load returns from CRIS's best_model.pth (or from a bare CRIS state dict).

    Recognised by its names: after "module.", keys of CRIS's modules backbone., neck. and proj. are
    present (decoder. besides); a key of any other name is then refused by name on loading.
    A checkpoint of this project has "model" and "config" and a "projector." module instead.
    """
    return _cris_state_dict(obj) is not None


def convert_state_dict(cris_state_dict: dict, source: str = "the CRIS checkpoint") -> dict:
    """CRIS's state dict (with or without "module.") -> this project's names; logit_scale dropped.

    A name the map does not know is an error listing it: the file is then not CRIS's model.
    """
    out, unknown = {}, []
    for key, value in _strip_module(cris_state_dict).items():
        if key in DROPPED:
            continue
        ours = _rename(key, _TO_OURS)
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = value
    if unknown:
        raise ValueError(f"{source}: tensors CRIS's model does not have: {listing(unknown)}")
    return out


def show_value(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def listing(keys, limit=12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def config_from_state_dict(sd: dict, source: str = "the CRIS checkpoint", **overrides) -> SegVLMConfig:
    """SegVLM's config (enhancement block off) read from a converted CRIS state dict's shapes.

    overrides: transformer_heads, decoder_heads, word_len, input_size (what shapes cannot
    tell) or any other field; one that contradicts a shape is an error.
    """
    unknown = sorted(set(overrides) - set(config_fields()))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {config_fields()}")
    needed = ["backbone.visual.attnpool.positional_embedding", "backbone.text_projection",
              "backbone.visual.layer1.0.conv1.weight", "backbone.positional_embedding",
              "backbone.token_embedding.weight", "backbone.ln_final.weight", "neck.f3_proj.0.weight",
              "neck.f4_proj.0.weight", "neck.f5_proj.0.weight", "decoder.norm.weight",
              "decoder.layers.0.ffn.0.weight", "projector.vis.4.weight", "projector.txt.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"{source}: cannot read the architecture, missing tensor(s) "
                         f"{listing(cris_name(k) for k in missing)}")
    fields = clip_fields_from_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    proj_dim = sd["projector.vis.4.weight"].shape[0]
    taps = (sd["projector.txt.weight"].shape[0] - 1) / proj_dim  # the dynamic kernel: proj_dim*k*k weights + 1 bias
    kernel_size = math.isqrt(int(taps)) if taps == int(taps) else 0
    if kernel_size * kernel_size != taps:
        raise ValueError(f"{source}: proj.txt has {sd['projector.txt.weight'].shape[0]} outputs, not "
                         f"{proj_dim}*k*k + 1 for a k x k dynamic kernel")
    fields.update(
        fpn_out=(sd["neck.f3_proj.0.weight"].shape[0], sd["neck.f4_proj.0.weight"].shape[0],
                 sd["neck.f5_proj.0.weight"].shape[0]),
        decoder_layers=len({k.split(".")[2] for k in sd if k.startswith("decoder.layers.")}),
        decoder_dim=sd["decoder.norm.weight"].shape[0],
        decoder_ffn=sd["decoder.layers.0.ffn.0.weight"].shape[0],
        proj_dim=proj_dim, kernel_size=kernel_size)
    for k, v in fields.items():
        given = overrides.get(k, v)
        if (tuple(given) if isinstance(v, tuple) else given) != v:
            raise ValueError(f"{source}: override {k}={given} contradicts the weights, which have {k}={v}")
    defaults = dict(transformer_heads=max(1, fields["transformer_width"] // 64), decoder_heads=CRIS_DECODER_HEADS,
                    word_len=fields["context_length"], input_size=CRIS_INPUT_SIZE, deform=False, se=False)
    try:
        return SegVLMConfig(**{**dataclasses.asdict(SegVLMConfig()), **defaults, **overrides, **fields})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def backbone_name(cfg: SegVLMConfig) -> str:
    """ "RN50" or "RN101" when the config has that CLIP's shape, else a description of it."""
    for name, fields in BACKBONES.items():
        if all(getattr(cfg, k) == v for k, v in fields.items()):
            return name
    return (f"a CLIP ResNet with embed_dim {cfg.embed_dim}, vision_layers {tuple(cfg.vision_layers)}, "
            f"vision_width {cfg.vision_width}")


def clip_label(name: str) -> str:
    """ "CLIP RN101" for a named backbone, the description as it is otherwise."""
    return f"CLIP {name}" if name in BACKBONES else name


def fit_to_config(sd: dict, cfg: SegVLMConfig):
    """(missing, unexpected, wrong shapes as text) of a state dict against SegVLM(cfg), built on the meta
    device (no memory)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SegVLM(cfg).state_dict().items()}
    missing, unexpected, wrong = compare_state_dict(expected, sd)
    return missing, unexpected, [f"{k} {got} vs {want}" for k, got, want in wrong]


def _plain(value):
    """A number from CRIS's metadata as a plain float/int (a tensor's item), else None."""
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def to_segvlm_checkpoint(obj, path, **overrides) -> dict:
    """What torch.load returned from a CRIS file -> a checkpoint dict of this project.

    {"model": state dict in this project's names, "config": the config read from the shapes
    (block off), "source": "CRIS", "cris": {file, backbone, epoch, cur_iou, best_iou, prec},
    "data_dir": ""}: plain tensors, numbers and strings, as `model_files.load_checkpoint` reads them.
    CRIS's optimizer and scheduler states are left out (another recipe's; train.py starts a
    fresh one with --init-from). Every tensor must fit, or the error lists what does not.
    """
    path = os.fspath(path)
    cris_sd = _cris_state_dict(obj)
    if cris_sd is None:
        raise ValueError(f"{path} is not a CRIS checkpoint: expected CRIS's best_model.pth, a dict whose "
                         f"'state_dict' has keys module.backbone.*, module.neck.*, module.decoder.*, module.proj.*")
    source = f"CRIS checkpoint {path}"
    sd = convert_state_dict(cris_sd, source)
    check_tensors(sd, source, cris_name)
    check_finite(sd, source, cris_name)
    cfg = config_from_state_dict(sd, source, **overrides)
    missing, unexpected, wrong = fit_to_config(sd, cfg)
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing tensor(s) {listing(cris_name(k) for k in missing)}")
        if unexpected:
            problems.append(f"unexpected tensor(s) {listing(cris_name(k) for k in unexpected)}")
        if wrong:
            problems.append(f"wrong shape(s) {listing(wrong)}")
        raise ValueError(f"{source} does not hold CRIS's model with the architecture its shapes give "
                         f"({clip_label(backbone_name(cfg))}): " + "; ".join(problems))
    meta = {"file": os.path.basename(path), "backbone": backbone_name(cfg), "repository": CRIS_REPO}
    if isinstance(obj, dict) and "state_dict" in obj:
        for key in ("epoch", "cur_iou", "best_iou"):
            if _plain(obj.get(key)) is not None:
                meta[key] = _plain(obj[key])
        if isinstance(obj.get("prec"), dict):
            meta["prec"] = {str(k): _plain(v) for k, v in obj["prec"].items() if _plain(v) is not None}
    return {"model": sd, "config": cfg.to_dict(), "source": "CRIS", "cris": meta, "data_dir": ""}


def summary(ckpt: dict, path) -> str:
    """The one-line note printed when a CRIS file is loaded or converted."""
    meta, cfg = ckpt["cris"], ckpt["config"]
    trained = f", epoch {meta['epoch']}" if "epoch" in meta else ""
    if "cur_iou" in meta:
        trained += f", its val IoU {100 * meta['cur_iou']:.2f}"
    return (f"{os.fspath(path)}: a CRIS checkpoint ({CRIS_REPO}{trained}), backbone {clip_label(meta['backbone'])}; "
            f"loaded as SegVLM with the enhancement block off (CRIS's own model), {cfg['input_size']} px, phrases "
            f"up to {cfg['word_len']} tokens (CRIS trained with 17 or 22; the file does not say which)")


# --------------------------------------------------------------------------- reading any checkpoint

def newest_run_hint(path) -> str:
    """What to use instead of a missing checkpoint: the newest best.pth among the runs beside it
    (`path`'s grandparent, e.g. runs/ for runs/demo/best.pth) and under ./runs, or how to make one."""
    folders = {os.path.abspath("runs"), os.path.abspath(os.path.dirname(os.path.dirname(os.fspath(path))) or ".")}
    found = [os.path.join(folder, name, "best.pth") for folder in folders if os.path.isdir(folder)
             for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name, "best.pth"))]
    if not found:
        return "no run has written a best.pth under runs/ yet (train one: python train.py --preset demo)"
    newest = max(found, key=os.path.getmtime)
    shown = os.path.relpath(newest) if not os.path.relpath(newest).startswith("..") else newest
    return f"the newest run's checkpoint is {shown}"


def read_checkpoint_file(path, map_location="cpu"):
    """torch.load(weights_only=True) with clear errors: tensors, numbers, strings and containers, never code.

    collections.Counter is allowed besides (torch.serialization.safe_globals): CRIS's
    best_model.pth holds a MultiStepLR state whose `milestones` is one. A file that needs any
    other object is refused, because unpickling it could run code. A folder is refused here: a model
    folder (config.json + model.safetensors) is read by model_files.read_model_file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory; name the .pth file in it, or a model folder holding "
                         f"config.json and model.safetensors")
    if not os.path.isfile(path):
        if os.path.exists(path):  # a FIFO or a device: torch.load would wait on it, or read forever
            raise ValueError(f"checkpoint {path} is not a regular file")
        raise FileNotFoundError(f"checkpoint {path} does not exist; {newest_run_hint(path)}")
    try:
        with torch.serialization.safe_globals([collections.Counter]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"checkpoint {path} cannot be read (truncated or corrupt?): {e}") from e
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"`{found.group(1)}`" if found else "an object that is not a tensor, number, string or container"
        raise ValueError(f"checkpoint {path} is refused: loading it needs {what}, and unpickling that could run "
                         f"code. Checkpoints of this project and CRIS's best_model.pth hold only tensors, numbers, "
                         f"strings and containers; load a file like this only if you trust its source.") from None
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
