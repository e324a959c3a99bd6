"""One reader for every model file: a checkpoint, CRIS's best_model.pth, a model folder or an ONNX graph.

    from helpers.model_files import read_model_file, load_checkpoint
    found = read_model_file("runs/demo/best.pth")   # or "segvlm-demo/", "segvlm.onnx", CRIS's best_model.pth
    found.form          # "checkpoint", "cris", "folder" or "onnx"
    found.config        # the SegVLMConfig, every size within model.LIMITS
    found.weights       # the state dict, in this project's names (None for ONNX: the graph holds its weights)
    found.trained_on    # what the model was trained on (provenance.of_checkpoint's record)
    model = found.build()                           # a SegVLM with those weights, in eval mode
    model, ckpt = load_checkpoint("runs/demo/best.pth")   # the same, and the checkpoint dict (train.py's fields)

A model reaches the tools in three forms, and this is the one place that reads them:
- a .pth (train.py's best.pth, `tools.cris convert`'s output; checkpoints.read_checkpoint_file: torch.load
  with weights_only=True), or a best_model.pth of CRIS's training code, converted in memory
  (checkpoints.to_segvlm_checkpoint; a one-line note on stderr says so);
- a model folder, config.json + model.safetensors (safetensors_folder.read_folder: no pickle);
- an ONNX graph, .onnx (onnx_model.read_graph: its header; onnxruntime or OpenVINO run it).

Every form is checked in the same order, before the model is built: the config (SegVLMConfig.from_dict: every
field, each size within model.LIMITS), then the weights against the architecture the config describes, on
the meta device (shapes only, no memory), then the tensors themselves (dense, floating, finite). So an edited
config that asks for a model of a million layers, or an input of 96,000 pixels, is refused in a line before
anything is allocated, and no tool builds a model its file does not fill exactly.
"""
import dataclasses
import os
import sys

import torch

from helpers import distributed, provenance
from helpers.checkpoints import (
    BACKBONES,
    SHAPE_FIELDS,
    backbone_name,
    clip_label,
    cris_name,
    fit_to_config,
    is_cris_checkpoint,
    listing,
    read_checkpoint_file,
    show_value,
    summary,
    to_segvlm_checkpoint,
)
from helpers.onnx_model import read_graph
from helpers.safetensors_folder import is_folder, read_folder
from helpers.weights import check_finite, check_tensors, state_dict_misfit
from model import CLIP_FIELDS, SegVLM, SegVLMConfig

FORMS = ("checkpoint", "cris", "folder", "onnx")
ONNX_SUFFIX = ".onnx"


@dataclasses.dataclass
class ModelFile:
    """What read_model_file found: the file's form, its checked config, weights and provenance."""
    path: str
    form: str                       # one of FORMS
    config: SegVLMConfig
    weights: dict | None            # state dict in this project's names; None for an ONNX graph
    trained_on: dict                # provenance.of_checkpoint's record ("unknown" where the file does not tell)
    checkpoint: dict = dataclasses.field(default_factory=dict)  # the file's dict: "model", "config", data_dir, ...

    def build(self, device="cpu") -> SegVLM:
        """The SegVLM this file describes, its weights loaded, in eval mode on `device` (not for an ONNX graph,
        whose engine runs the graph itself: inference.load_model)."""
        if self.weights is None:
            raise ValueError(f"{self.path} is an ONNX graph: it runs through onnxruntime or OpenVINO "
                             f"(predict.py --onnx, inference.load_model), not as a PyTorch model")
        model = SegVLM(self.config)
        model.load_state_dict(self.weights, strict=True)
        model.trained_on = self.trained_on
        return model.to(device).eval()


def form_of(path) -> str:
    """"folder" for a model folder, "onnx" for a .onnx file, else "checkpoint" (a .pth; CRIS's is told by content)."""
    if is_folder(path):
        return "folder"
    return "onnx" if os.fspath(path).lower().endswith(ONNX_SUFFIX) and not os.path.isdir(path) else "checkpoint"


def read_model_file(path, forms=FORMS) -> ModelFile:
    """Read and check any model file (module docstring) -> ModelFile. forms: the forms the caller takes; another
    is refused, naming what the caller needs. A ValueError (FileNotFoundError for a missing .pth) that names the
    file and what was expected; nothing of the model is allocated before the checks pass."""
    path = os.fspath(path)
    form = form_of(path)
    if form == "onnx":
        if "onnx" not in forms:
            raise ValueError(f"{path} is an ONNX graph, which holds no PyTorch weights; give the checkpoint (.pth) "
                             f"or the model folder it was exported from")
        if not os.path.isfile(path):
            raise ValueError(f"--onnx {path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
        ckpt = read_graph(path)
        return ModelFile(path, "onnx", SegVLMConfig.from_dict(ckpt["config"]), None, provenance.of_checkpoint(ckpt),
                         ckpt)
    if form == "folder":
        ckpt = read_folder(path)  # config, its own copy in the weights, shapes: all compared before the tensors load
    else:
        ckpt = read_checkpoint_file(path, "cpu")
        if isinstance(ckpt, dict) and not {"model", "config"} <= set(ckpt) and is_cris_checkpoint(ckpt):
            ckpt, form = to_segvlm_checkpoint(ckpt, path), "cris"  # its config read from its shapes, and checked
            if distributed.is_main():
                print(summary(ckpt, path), file=sys.stderr, flush=True)
        if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
            keys = sorted(map(str, ckpt))[:12] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{path} is not a SegVLM checkpoint: expected a dict with 'model' and 'config' (train.py's, "
                             f"tools.cris convert's) or CRIS's best_model.pth (a dict whose 'state_dict' has keys "
                             f"module.backbone.*, module.neck.*, module.decoder.*, module.proj.*), found {keys}")
    if form not in forms:
        raise ValueError(f"{path} is a {form} file; this tool takes {', '.join(forms)}")
    try:
        cfg = SegVLMConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a SegVLM checkpoint: bad config: {e}") from None
    weights = ckpt["model"]
    with torch.device("meta"):  # the architecture the config describes, shapes only: nothing allocated
        misfit = state_dict_misfit(SegVLM(cfg), weights)
    if misfit:
        raise ValueError(f"{path}: the weights do not fit the model its config describes: {misfit}")
    check_tensors(weights, path)
    check_finite(weights, path)
    return ModelFile(path, form, cfg, weights, provenance.of_checkpoint(ckpt), ckpt)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint, a CRIS file or a model folder and rebuild its model -> (model in eval mode, checkpoint
    dict). The checks are read_model_file's; `model.trained_on` is the file's record."""
    found = read_model_file(path, forms=("checkpoint", "cris", "folder"))
    model = found.build("cpu")
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model, found.checkpoint


def init_model(path, cfg: SegVLMConfig, clip_name=None):
    """A SegVLM of architecture `cfg` whose every tensor comes from `path`, except the enhancement
    block's, which keep SegVLM's own initialisation -> (model in training mode, one-line report).

    path: CRIS's best_model.pth, a checkpoint of this project (`tools.cris convert`'s output,
    a best.pth) or a model folder. cfg: the run's architecture (a preset with its overrides; its deform/se
    switches decide the block). The file must have the same architecture on every field its
    shapes decide (SHAPE_FIELDS) and, for a checkpoint of this project, the same heads; a
    difference is an error listing each field. A CRIS file does not store its heads: cfg's
    are used (the paper preset's are CRIS's: 8 and 8).

    clip_name ("RN50", "RN101", ...): the backbone the run names (train.py --clip-weights).
    The file must hold that CLIP, and the run then takes its CLIP fields from the file, as
    build_model takes them from CLIP's weights; None: cfg's own CLIP fields must match.
    """
    path = os.fspath(path)
    if not os.path.exists(path) and not os.path.islink(path):
        read_checkpoint_file(path)  # its FileNotFoundError names the newest run's checkpoint
    found = read_model_file(path, forms=("checkpoint", "cris", "folder"))
    kind = "CRIS" if found.form == "cris" else "SegVLM"
    compared = SHAPE_FIELDS if kind == "CRIS" else SHAPE_FIELDS + ("transformer_heads", "decoder_heads")
    file_cfg = found.config
    if clip_name is not None:
        if backbone_name(file_cfg) != clip_name:
            raise ValueError(f"{path} holds {clip_label(backbone_name(file_cfg))}, not the CLIP {clip_name} this run "
                             f"names (--clip-weights {clip_name}); name the file's backbone instead")
        take = CLIP_FIELDS + ("transformer_heads",)
        cfg = dataclasses.replace(cfg, **{k: getattr(file_cfg, k) for k in take})
    differ = [f"{k}: file {show_value(getattr(file_cfg, k))}, run {show_value(getattr(cfg, k))}" for k in compared
              if getattr(file_cfg, k) != getattr(cfg, k)]
    if differ:
        hint = ""
        if backbone_name(file_cfg) != backbone_name(cfg):
            hint = (f". The file's backbone is {clip_label(backbone_name(file_cfg))}, the run's "
                    f"{clip_label(backbone_name(cfg))}"
                    + (f"; to fine-tune on the file's, name it (train.py --clip-weights {backbone_name(file_cfg)})"
                       if backbone_name(file_cfg) in BACKBONES else ""))
        raise ValueError(f"{path} ({kind}) does not fit the run's architecture: " + "; ".join(differ) + hint)
    missing, unexpected, wrong = fit_to_config(found.weights, cfg)
    new = [k for k in missing if k.startswith("enhance.")]
    missing = [k for k in missing if not k.startswith("enhance.")]
    if missing or unexpected or wrong:
        name = cris_name if kind == "CRIS" else str
        problems = []
        if missing:
            problems.append(f"missing tensor(s) {listing(name(k) for k in missing)}")
        if unexpected:
            problems.append(f"tensor(s) the run's model lacks {listing(name(k) for k in unexpected)}")
            if any(k.startswith("enhance.") for k in unexpected):
                problems.append("the file has an enhancement block the run switched off (match --deform/--se)")
        if wrong:
            problems.append(f"wrong shape(s) {listing(wrong)}")
        raise ValueError(f"{path} ({kind}) does not fit the run's model: " + "; ".join(problems))
    model = SegVLM(cfg)
    model.load_state_dict(found.weights, strict=False)  # only the block's tensors are missing, checked above
    what = f"CRIS, backbone {clip_label(backbone_name(file_cfg))}" if kind == "CRIS" else "a SegVLM checkpoint"
    block = f"{len(new)} tensors of the enhancement block are new" if new else "nothing new"
    return model, (f"initialised from {path} ({what}): {len(found.weights)} tensors copied, {block}")
