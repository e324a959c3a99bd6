"""The model exported to ONNX (tools/export.py --onnx), run through onnxruntime as if it were SegVLM.

    from helpers.onnx_model import load_onnx
    model = load_onnx("model.onnx")            # an OnnxSegVLM: model(image, tokens) -> logits (torch)
    masks = inference.predict(model, "dog.jpg", ["black dog", "the ball"])

The file holds one graph, (normalised image (B, 3, S, S) float32, tokens (B, L) int64) -> logits
(B, 1, S/4, S/4), with a dynamic batch axis, and the model's config as the metadata entry "segvlm_config"
(JSON, SegVLMConfig.to_dict()), so that predict.py letterboxes and tokenizes as for the checkpoint.
The graph has no image_index input: for several phrases on one image, the image is repeated (it is encoded
once per phrase, where the PyTorch model encodes it once).

Providers: CUDA's when onnxruntime has it and device is CUDA (or not given and a GPU is there), else the CPU's.
"""
import json
import os

import torch

from helpers.inputs import check_inputs
from model import SegVLMConfig

CONFIG_KEY = "segvlm_config"  # the metadata entry with the model's config (JSON)
INPUTS, OUTPUT = ("image", "tokens"), "logits"


def providers(device=None) -> list:
    """onnxruntime's execution providers for `device`: CUDA's first where it is there and wanted, then the CPU's."""
    import onnxruntime as ort
    want_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    cuda = want_cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


def load_onnx(path, device=None) -> "OnnxSegVLM":
    """An OnnxSegVLM on `path`; a ValueError naming the file when it is missing, not ONNX, or not SegVLM's graph."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--onnx {path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
    return OnnxSegVLM(path, device)


class OnnxSegVLM(torch.nn.Module):
    """An onnxruntime session with SegVLM's call: (image, tokens, image_index=None) -> logits, torch float32 on
    the CPU. The inputs are checked as SegVLM checks them (the same ValueErrors); config is the file's."""

    def __init__(self, path, device=None):
        super().__init__()
        import onnxruntime as ort
        try:
            self.session = ort.InferenceSession(path, providers=providers(device))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types: any is a file it cannot run
            raise ValueError(f"--onnx {path}: onnxruntime cannot load it ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        names = tuple(i.name for i in self.session.get_inputs())
        if CONFIG_KEY not in meta or names != INPUTS:
            raise ValueError(f"--onnx {path}: not a SegVLM graph written by tools/export.py (inputs {names}, "
                             f"metadata {sorted(meta)}; expected inputs {INPUTS} and the metadata {CONFIG_KEY!r})")
        try:
            self.config = SegVLMConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--onnx {path}: bad {CONFIG_KEY} metadata: {e}") from None
        self.path = path

    def forward(self, image, tokens, image_index=None):
        check_inputs(image, tokens, image_index, self.config.input_size, self.config.word_len)
        size = self.config.input_size
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"the ONNX graph takes {size}x{size} images, got {image.shape[-2]}x{image.shape[-1]}")
        if image_index is not None:
            image = image[image_index]  # the graph takes one image per phrase
        length = self.config.word_len
        if tokens.shape[1] < length:  # the graph's token axis is word_len long: pad, as tokenize would
            tokens = torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]))
        feeds = {"image": image.detach().float().cpu().numpy(), "tokens": tokens.detach().long().cpu().numpy()}
        return torch.from_numpy(self.session.run([OUTPUT], feeds)[0])
