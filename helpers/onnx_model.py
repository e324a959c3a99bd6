"""The model exported to ONNX (tools/export.py --onnx): its header read and checked, and the graph run through
onnxruntime as if it were SegVLM.

    from helpers.model_files import read_model_file
    found = read_model_file("model.onnx")       # config, trained_on and the declared shapes, checked
    model = OnnxSegVLM("model.onnx", found.config)   # model(image, tokens) -> logits (torch)

The file holds one graph, (normalised image (B, 3, S, S) float32, tokens (B, L) int64) -> logits
(B, 1, S/4, S/4), with a dynamic batch axis, and two metadata entries (JSON): "segvlm_config", the model's config
(SegVLMConfig.to_dict()), so that predict.py letterboxes and tokenizes as for the checkpoint, and
"segvlm_trained_on", what the model was trained on. The graph has no image_index input: for several phrases on
one image, the image is repeated (it is encoded once per phrase, where the PyTorch model encodes it once).

A graph is trusted only as far as it is checked: `read_graph` compares its declared inputs and output with the
config (names, element types, S, L, S/4, a batch axis that is not fixed) before any session is made, and every run
checks the real output's shape, so a graph that returns one mask for six phrases, or maps of another size, is
refused instead of giving masks without a word.

Providers: CUDA's when onnxruntime has it and device is CUDA (or not given and a GPU is there), else the CPU's.
"""
import contextlib
import io
import logging
import os
import warnings

import torch

from helpers.files import metadata_json
from helpers.inputs import check_inputs
from model import SegVLMConfig

CONFIG_KEY, TRAINED_ON_KEY = "segvlm_config", "segvlm_trained_on"  # the metadata entries (JSON)
INPUTS, OUTPUT = ("image", "tokens"), "logits"
FLOAT, INT64 = 1, 7  # ONNX's TensorProto element types


def providers(device=None) -> list:
    """onnxruntime's execution providers for `device`: CUDA's first where it is there and wanted, then the CPU's."""
    import onnxruntime as ort
    want_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    cuda = want_cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


def _dims(value_info) -> list:
    """A graph input's or output's declared shape: an int per fixed axis, None per free (named or unknown) one."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def check_declared(graph, cfg: SegVLMConfig, path) -> None:
    """A ValueError naming the file unless the graph declares SegVLM's signature for `cfg`: inputs image
    (B, 3, S, S) float32 and tokens (B, L) int64, output logits (B, 1, S/4, S/4) float32, B free (or at least
    not fixed to one size), S = input_size, L = word_len; an axis left free passes."""
    s, length = cfg.input_size, cfg.word_len
    want = {"image": (FLOAT, [None, 3, s, s]), "tokens": (INT64, [None, length]),
            OUTPUT: (FLOAT, [None, 1, s // 4, s // 4])}
    declared = {v.name: v for v in list(graph.input) + list(graph.output)}
    for name, (kind, shape) in want.items():
        info = declared.get(name)
        dims = _dims(info) if info is not None else None
        ok = info is not None and info.type.tensor_type.elem_type == kind and len(dims) == len(shape) \
            and all(d is None or w is None or d == w for d, w in zip(dims, shape))
        if ok and dims[0] is not None:
            raise ValueError(f"--onnx {path}: the graph's {name} has a fixed batch of {dims[0]}; SegVLM's graph "
                             f"takes any number of phrases (python -m tools.export writes a dynamic batch axis)")
        if not ok:
            shown = "absent" if info is None else f"{['?' if d is None else d for d in dims]} of element type " \
                                                  f"{info.type.tensor_type.elem_type}"
            raise ValueError(f"--onnx {path}: the graph's {name} is {shown}; for its config (input_size {s}, word_len "
                             f"{length}) SegVLM's is {['B' if w is None else w for w in shape]} of element type "
                             f"{kind} ({'float32' if kind == FLOAT else 'int64'})")


def read_graph(path) -> dict:
    """An ONNX file's header -> {"config": config dict, "trained_on": record (if the file has one), "graph": path},
    the config checked (model.LIMITS) and the declared shapes against it (check_declared). The graph's tensors are
    not read (onnx.load without external data); onnxruntime loads them when it runs the file."""
    import onnx
    path = os.fspath(path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's and onnx's own errors: any is a file that is not ONNX
        raise ValueError(f"--onnx {path}: not an ONNX file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                         if str(e) else f"--onnx {path}: not an ONNX file ({type(e).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    names = tuple(i.name for i in proto.graph.input)
    if CONFIG_KEY not in meta or names != INPUTS:
        raise ValueError(f"--onnx {path}: not a SegVLM graph written by tools/export.py (inputs {names[:4]}, "
                         f"metadata {sorted(meta)[:6]}; expected inputs {INPUTS} and the metadata {CONFIG_KEY!r})")
    try:
        cfg = SegVLMConfig.from_dict(metadata_json(meta, CONFIG_KEY, path))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--onnx {path}: bad {CONFIG_KEY} metadata: {e}") from None
    check_declared(proto.graph, cfg, path)
    found = {"config": cfg.to_dict(), "graph": path}
    record = metadata_json(meta, TRAINED_ON_KEY, path)
    if record is not None:
        found["trained_on"] = record
    return found


class OnnxSegVLM(torch.nn.Module):
    """An onnxruntime session with SegVLM's call: (image, tokens, image_index=None) -> logits, torch float32 on
    the CPU. The inputs are checked as SegVLM checks them (the same ValueErrors); config is the file's
    (read_graph's). A run that fails inside onnxruntime, or returns logits of another shape than
    (N, 1, S/4, S/4) for N phrases, is a ValueError naming the file."""

    def __init__(self, path, config: SegVLMConfig, device=None, spinning=True):
        super().__init__()
        import onnxruntime as ort
        self.path, self.config = os.fspath(path), config
        options = ort.SessionOptions()
        if not spinning:  # its threads sleep between runs instead of spinning (a benchmark alternating with others)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(self.path, options, providers=providers(device))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types: any is a file it cannot run
            raise ValueError(f"--onnx {path}: onnxruntime cannot load it ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None

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
        try:
            logits = self.session.run([OUTPUT], feeds)[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types: the graph failed on this input
            raise ValueError(f"--onnx {self.path}: the graph failed to run ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
        return check_output(torch.from_numpy(logits), tokens.shape[0], size, f"--onnx {self.path}")


def check_output(logits, phrases, size, where):
    """The logits a graph returned, checked: (phrases, 1, size/4, size/4) floating; a ValueError naming `where`
    (e.g. "--onnx model.onnx") otherwise (a graph with a fixed batch, or of another model, would give masks without
    a word)."""
    want = (phrases, 1, size // 4, size // 4)
    if tuple(logits.shape) != want or not logits.is_floating_point():
        raise ValueError(f"{where}: the graph returned {tuple(logits.shape)} {logits.dtype} for {phrases} "
                         f"phrase(s); SegVLM's logits are {want} float32; the file is not this model's graph")
    return logits


class Segment(torch.nn.Module):
    """SegVLM.segment as a graph's signature: (image, tokens) -> logits, the exported file's (tools/export.py), or
    with `image_index` (image, tokens, image_index) -> logits, each image encoded once for all its phrases (the
    graph OpenVINO runs for a checkpoint: helpers/engines.py)."""

    def __init__(self, model, image_index=False):
        super().__init__()
        self.model, self.image_index = model, image_index

    def forward(self, image, tokens, image_index=None):
        return self.model.segment(image, tokens, image_index if self.image_index else None)


def export_graph(model, path, inputs, opset=18):
    """torch.onnx.export's default exporter (torch.export, then onnxscript) of `model` (a SegVLM in eval mode) to
    `path`, its weights as external data beside it (path + ".data"). inputs: (image, tokens) for the file's
    signature, or (image, tokens, image_index) for the indexed one; the batch axes stay free (images and phrases
    each their own axis). The exporter's own lines are kept off the terminal (quiet)."""
    images, phrases = torch.export.Dim("images", min=1, max=1024), torch.export.Dim("phrases", min=1, max=1024)
    indexed = len(inputs) == 3
    names = INPUTS + (("image_index",) if indexed else ())
    shapes = {"image": {0: images if indexed else phrases}, "tokens": {0: phrases}}
    if indexed:
        shapes["image_index"] = {0: phrases}
    with warnings.catch_warnings(), quiet():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(Segment(model, indexed), tuple(inputs), str(path), dynamo=True, input_names=list(names),
                          output_names=[OUTPUT], opset_version=opset, dynamic_shapes=shapes, verbose=False)


@contextlib.contextmanager
def quiet():
    """The exporter's progress lines ("[torch.onnx] ...") and its optimizer's log kept off the terminal: the tools
    say what they did in one line."""
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
