"""The model outside this repository: an ONNX graph for onnxruntime, or a safetensors folder.

    python -m tools.export --ckpt runs/demo-.../best.pth --onnx segvlm.onnx [--opset 18]
    python -m tools.export --ckpt runs/demo-.../best.pth --safetensors segvlm-demo/
    python predict.py --onnx segvlm.onnx --image dog.jpg --phrase "the dog"      # through onnxruntime
    python predict.py --ckpt segvlm-demo/ --image dog.jpg --phrase "the dog"     # the folder, as any --ckpt

--onnx: the graph takes the normalised, letterboxed image (B, 3, S, S) float32 and the tokens (B, L) int64
(transforms.letterbox and transforms.tokenize at the checkpoint's input size and word length) and returns the
logits (B, 1, S/4, S/4); B is a dynamic axis. It is exported with torch.onnx.export's default exporter
(torch.export + onnxscript). The model's config goes into the file's metadata ("segvlm_config"), so predict.py
knows S, L and the architecture. The deformable conv exports as its "sampled" implementation (GridSample, from
opset 16, and a MatMul; layers.deform_conv2d_sampled): torchvision's deform_conv2d exports as ONNX's DeformConv,
which onnxruntime cannot run (no kernel for it), so a model built with impl="torchvision" is exported through
"sampled", the same function with the same weights. Before the file takes its name, onnxruntime runs it at
batch 1 and 3 against PyTorch in float32, and the largest relative difference, max |ort - torch| / max |torch|
over the logits, is printed; above --tolerance the file is not kept.

--safetensors DIR: DIR/config.json (SegVLMConfig.to_dict()) and DIR/model.safetensors (the weights), Hugging
Face's folder layout, read without pickle and memory-mapped (helpers/safetensors_folder.py). Every tool that
takes --ckpt takes such a folder.
"""
import argparse
import contextlib
import io
import json
import logging
import sys
import warnings

import numpy as np
import torch

from helpers import transforms
from helpers.checkpoints import load_checkpoint
from helpers.cli import check_output, check_output_dir, check_path, positive_int, run_tool, same_file
from helpers.files import atomic_path
from helpers.onnx_model import CONFIG_KEY, INPUTS, OUTPUT, OnnxSegVLM
from helpers.safetensors_folder import write_folder

MIN_OPSET = 16  # GridSample, the deformable conv's sampling
PHRASES = ("the dog on the left", "red", "a small blue square beside the large circle")  # the check's phrases


class Segment(torch.nn.Module):
    """SegVLM's forward without image_index, as the graph's signature: (image, tokens) -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image, tokens):
        return self.model.segment(image, tokens)


def sample_inputs(cfg, batch, seed=0):
    """(image, tokens) of `batch` random normalised images and PHRASES (cycled) at the config's size."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, cfg.input_size, cfg.input_size, generator=g)
    tokens = transforms.tokenize([PHRASES[i % len(PHRASES)] for i in range(batch)], cfg.word_len)
    return image, tokens


def export_onnx(model, path, opset=18, tolerance=1e-3):
    """Export `model` (a SegVLM) to the ONNX file `path`, check it with onnxruntime at batch 1 and 3 -> the largest
    relative difference. A ValueError (and no file) when it exceeds `tolerance`."""
    import onnx
    model = model.float().cpu().eval()
    deform = getattr(model.enhance, "deform", None)
    impl = getattr(deform, "impl", None)
    if impl == "torchvision":
        deform.impl = "sampled"  # the same function; onnxruntime has no kernel for ONNX's DeformConv
    try:
        with atomic_path(path) as tmp:
            batch = torch.export.Dim("batch", min=1, max=1024)
            with warnings.catch_warnings(), quiet():
                warnings.simplefilter("ignore")  # the exporter's notes on its own internals
                torch.onnx.export(Segment(model), sample_inputs(model.config, 2), str(tmp), dynamo=True,
                                  input_names=list(INPUTS), output_names=[OUTPUT], opset_version=opset,
                                  dynamic_shapes={"image": {0: batch}, "tokens": {0: batch}}, verbose=False)
            graph = onnx.load(str(tmp))
            graph.metadata_props.add(key=CONFIG_KEY, value=json.dumps(model.config.to_dict()))
            onnx.save(graph, str(tmp))
            worst = compare(model, OnnxSegVLM(str(tmp), "cpu"))
            if not worst <= tolerance:
                raise ValueError(f"the exported graph differs from the model: largest relative difference {worst:.2e}"
                                 f" > {tolerance:g}; {path} not written")
    finally:
        if impl == "torchvision":
            deform.impl = impl
    return worst


@contextlib.contextmanager
def quiet():
    """The exporter's progress lines ("[torch.onnx] ...") and its optimizer's log kept off the terminal: the tool
    says what it did in one line."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


@torch.no_grad()
def compare(model, runtime, batches=(1, 3)) -> float:
    """max |runtime - model| / max |model| over the logits of random inputs at each batch size."""
    worst = 0.0
    for b in batches:
        image, tokens = sample_inputs(model.config, b, seed=b)
        ref = model.segment(image, tokens).numpy()
        got = runtime(image, tokens).numpy()
        if got.shape != ref.shape:
            raise ValueError(f"the exported graph returns {got.shape} at batch {b}, the model {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return worst


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.export",
                                description="Export a SegVLM checkpoint to ONNX and/or a safetensors folder.")
    p.add_argument("--ckpt", required=True, help="a checkpoint (train.py's best.pth, CRIS's file, a safetensors folder)")
    p.add_argument("--onnx", metavar="FILE.onnx", help="write the ONNX graph there")
    p.add_argument("--opset", type=positive_int, default=18, help=f"ONNX opset (default 18, at least {MIN_OPSET})")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest relative difference from PyTorch accepted (default 1e-3)")
    p.add_argument("--safetensors", metavar="DIR", help="write DIR/config.json and DIR/model.safetensors")
    args = p.parse_args(argv)
    if not (args.onnx or args.safetensors):
        p.error("give --onnx FILE.onnx and/or --safetensors DIR")
    if args.opset < MIN_OPSET:
        p.error(f"--opset {args.opset}: the deformable conv's sampling needs GridSample, in ONNX from opset {MIN_OPSET}")
    try:
        check_path(args.ckpt, "--ckpt")
        if args.onnx:
            if not args.onnx.endswith(".onnx"):
                raise ValueError(f"--onnx {args.onnx}: name a .onnx file")
            check_output(args.onnx, "--onnx", [("--ckpt", args.ckpt)], example="model.onnx")
        if args.safetensors:
            if same_file(args.safetensors, args.ckpt):
                raise ValueError(f"--safetensors {args.safetensors} is the --ckpt folder; name a new folder")
            check_output_dir(args.safetensors, "--safetensors", [("--ckpt", args.ckpt)])
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model, ckpt = load_checkpoint(args.ckpt, map_location="cpu")
        if args.safetensors:
            folder = write_folder(model, args.safetensors, ckpt)
            print(f"export: {folder}/config.json and {folder}/model.safetensors ({len(model.state_dict())} tensors)")
        if args.onnx:
            worst = export_onnx(model, args.onnx, args.opset, args.tolerance)
            print(f"export: {args.onnx} (opset {args.opset}, dynamic batch); onnxruntime against PyTorch at batch 1 "
                  f"and 3: largest relative difference {worst:.2e}")
    except (ValueError, OSError) as e:
        sys.exit(f"export: error: {e}")


if __name__ == "__main__":
    run_tool("export.py", main)
