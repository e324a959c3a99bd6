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
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from helpers import transforms
from helpers.cli import check_output, check_output_dir, check_path, claim_files, positive_int, run_tool, same_file
from helpers.files import atomic_path, temporary_name
from helpers.model_files import read_model_file
from helpers.onnx_model import CONFIG_KEY, TRAINED_ON_KEY, OnnxSegVLM, export_graph
from helpers.safetensors_folder import CONFIG, WEIGHTS, write_folder

MIN_OPSET = 16  # GridSample, the deformable conv's sampling
PHRASES = ("the dog on the left", "red", "a small blue square beside the large circle")  # the check's phrases


def sample_inputs(cfg, batch, seed=0):
    """(image, tokens) of `batch` random normalised images and PHRASES (cycled) at the config's size."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, cfg.input_size, cfg.input_size, generator=g)
    tokens = transforms.tokenize([PHRASES[i % len(PHRASES)] for i in range(batch)], cfg.word_len)
    return image, tokens


def export_onnx(model, path, opset=18, tolerance=1e-3, trained_on=None):
    """Export `model` (a SegVLM) to the ONNX file `path`, check it with onnxruntime at batch 1 and 3 -> the largest
    relative difference. A ValueError (and no file) when it exceeds `tolerance`. trained_on (a provenance record)
    goes into the metadata beside the config. The exporter writes the weights as external data in a private
    folder beside `path`; they are inlined into the one file, and the folder is removed however the export ends."""
    import onnx
    model = model.float().cpu().eval()
    deform = getattr(model.enhance, "deform", None)
    impl = getattr(deform, "impl", None)
    if impl == "torchvision":
        deform.impl = "sampled"  # the same function; onnxruntime has no kernel for ONNX's DeformConv
    work = Path(tempfile.mkdtemp(prefix=f".{Path(path).name}.export-", dir=Path(path).parent))
    try:
        with atomic_path(path) as tmp:
            raw = work / "graph.onnx"  # the exporter's file and its external data (graph.onnx.data), both in `work`
            export_graph(model, raw, sample_inputs(model.config, 2), opset)
            graph = onnx.load(str(raw))  # the external data read in: one self-contained file below
            graph.metadata_props.add(key=CONFIG_KEY, value=json.dumps(model.config.to_dict()))
            if trained_on is not None:
                graph.metadata_props.add(key=TRAINED_ON_KEY, value=json.dumps(trained_on))
            onnx.save(graph, str(tmp))
            worst = compare(model, OnnxSegVLM(str(tmp), model.config, "cpu"))
            if not worst <= tolerance:
                raise ValueError(f"the exported graph differs from the model: largest relative difference {worst:.2e}"
                                 f" > {tolerance:g}; {path} not written")
    except ValueError as e:  # name the file the user asked for, never the hidden temporary one
        raise ValueError(_named(e, path, work)) from None
    except Exception as e:  # noqa: BLE001 - the exporter's own errors (an opset it cannot write, an op it lacks)
        raise ValueError(f"torch.onnx.export could not write {path} at opset {opset} ({type(e).__name__}: "
                         f"{_named(e, path, work)})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if impl == "torchvision":
            deform.impl = impl
    return worst


def _named(error, path, work) -> str:
    """An error's first line (300 characters at most) with the temporary names replaced by `path`."""
    text = str(error).replace(str(temporary_name(path)), str(path)).replace(str(work / "graph.onnx"), str(path))
    return (text.splitlines() or [type(error).__name__])[0][:300]


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


def tolerance(text) -> float:
    """--tolerance: a finite number above 0 (NaN would pass no check and fail after the export; -1 every check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number above 0, e.g. 1e-3, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, e.g. 1e-3, got {text!r}")
    return value


def parse_args(argv=None):
    import onnx
    newest = onnx.defs.onnx_opset_version()  # the newest opset the installed onnx knows
    p = argparse.ArgumentParser(prog="python -m tools.export",
                                description="Export a SegVLM checkpoint to ONNX and/or a safetensors folder.")
    p.add_argument("--ckpt", required=True, help="a checkpoint (train.py's best.pth, CRIS's file, a safetensors folder)")
    p.add_argument("--onnx", metavar="FILE.onnx", help="write the ONNX graph there")
    p.add_argument("--opset", type=positive_int, default=18,
                   help=f"ONNX opset (default 18, from {MIN_OPSET} to {newest}, the newest the installed onnx knows)")
    p.add_argument("--tolerance", type=tolerance, default=1e-3,
                   help="largest relative difference from PyTorch accepted (default 1e-3)")
    p.add_argument("--safetensors", metavar="DIR", help="write DIR/config.json and DIR/model.safetensors")
    args = p.parse_args(argv)
    if not (args.onnx or args.safetensors):
        p.error("give --onnx FILE.onnx and/or --safetensors DIR")
    if args.opset < MIN_OPSET:
        p.error(f"--opset {args.opset}: the deformable conv's sampling needs GridSample, in ONNX from opset {MIN_OPSET}")
    if args.opset > newest:
        p.error(f"--opset {args.opset}: the installed onnx knows opsets up to {newest}; use {MIN_OPSET} to {newest}")
    try:
        check_path(args.ckpt, "--ckpt")
        if args.onnx:
            if not args.onnx.endswith(".onnx"):
                raise ValueError(f"--onnx {args.onnx}: name a .onnx file")
            check_output(args.onnx, "--onnx", [("--ckpt", args.ckpt)], example="model.onnx")
        if args.safetensors:
            if same_file(args.safetensors, args.ckpt):
                raise ValueError(f"--safetensors {args.safetensors} is the --ckpt folder; name a new folder")
            folder = check_output_dir(args.safetensors, "--safetensors", [("--ckpt", args.ckpt)])
            claim_files(folder, [CONFIG, WEIGHTS], "--safetensors")  # a user's own files there are never replaced
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        found = read_model_file(args.ckpt, forms=("checkpoint", "cris", "folder"))
        model = found.build("cpu")
        if args.safetensors:
            folder = write_folder(model, args.safetensors, found.checkpoint, found.trained_on)
            print(f"export: {folder}/config.json and {folder}/model.safetensors ({len(model.state_dict())} tensors)")
        if args.onnx:
            worst = export_onnx(model, args.onnx, args.opset, args.tolerance, found.trained_on)
            print(f"export: {args.onnx} (opset {args.opset}, dynamic batch); onnxruntime against PyTorch at batch 1 "
                  f"and 3: largest relative difference {worst:.2e}")
    except (ValueError, OSError) as e:
        sys.exit(f"export: error: {e}")


if __name__ == "__main__":
    run_tool("export.py", main)
