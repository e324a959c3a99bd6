"""Engines: the ways a loaded model runs on this machine, and the choice of the fastest (inference.load_model's).

    from helpers.inference import load_model
    model = load_model("runs/demo/best.pth")                    # engine="auto": the fastest engine here
    model.engine, model.precision                               # e.g. "openvino", "bf16"
    model = load_model("best.pth", engine="eager", precision="fp32")   # the PyTorch model itself

Every engine is called as SegVLM is: `model(image, tokens, image_index=None) -> logits`, float32 on the CPU or
the model's device, with SegVLM's input checks, and has `config`, `trained_on`, `engine` and `precision`.

- "eager": the PyTorch model itself (float32; under bf16 autocast when precision is bf16).
- "torch": `FastSegVLM`: on CUDA, CUDA graphs under bf16 autocast; on a CPU, bf16 autocast with channels-last
  weights and images where the CPU computes bf16 natively (AVX512-BF16 or AMX, `native_bf16`), float32 elsewhere.
  No start-up cost beyond the model's.
- "openvino": Intel's OpenVINO runtime (`OpenVINOSegVLM`): the model exported to ONNX and read once per process
  (seconds to a minute, by the model's size; `cache_dir`, or a run's own folder, keeps the conversion for the next
  process), then compiled for this CPU's instructions, in bf16 where the CPU computes it natively (OpenVINO's own
  default there) and float32 elsewhere.
  An ONNX graph (tools/export.py's) is read directly, without conversion.
- "onnxruntime": for an ONNX graph, onnxruntime's CPU provider (CUDA's where installed), float32 only.

"auto" (`choose_engine`) takes, on CUDA, "torch"; on a CPU, "openvino" where it is installed, since it is the
fastest engine measured on every CPU tried (docs/measurements.md), except when `quick_start` asks for no
conversion (predict.py --image runs the model once: converting would cost more than it saves), then "torch";
without OpenVINO, "torch" (or "onnxruntime" for an ONNX graph). docs/choices.md gives the figures behind it.
"""
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import layers
import model as model_module
from helpers import provenance
from helpers.inputs import check_inputs
from helpers.model_files import ModelFile
from helpers.onnx_model import OnnxSegVLM, check_output, export_graph

ENGINES = ("eager", "torch", "openvino", "onnxruntime")
CHOICES = ("auto",) + ENGINES  # the --engine of predict.py, app.py, evaluate.py and benchmark
PRECISIONS = ("auto", "bf16", "fp32")  # the --precision of predict.py and app.py


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, as torch reports it: AVX512-BF16 or AMX tiles (torch.cpu).
    Without either, bf16 on a CPU is emulated and slower than float32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def amp_for(device, precision="auto") -> bool:
    """Whether a model runs in bf16 on `device` for --precision `precision`: "fp32" never, "bf16" always, "auto" on
    CUDA and on a CPU with native bf16 (native_bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and native_bf16())


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


ENGINE_VARIABLE = "SEGVLM_ENGINE"  # set to an engine's name, it is what "auto" means in every tool of this process


def choose_engine(form: str, device, quick_start=False) -> str:
    """The engine "auto" means for a model file of `form` (model_files.FORMS) on `device` (module docstring), or
    $SEGVLM_ENGINE's where it names one that runs this form (the tests set "torch": no conversion per test)."""
    chosen = os.environ.get(ENGINE_VARIABLE, "").strip()
    if chosen:
        if chosen not in ENGINES:
            raise ValueError(f"${ENGINE_VARIABLE}={chosen!r}: not an engine; use one of {ENGINES}, or unset it")
        if (form == "onnx") == (chosen in ("onnxruntime", "openvino")) or chosen == "openvino":
            return chosen
    if torch.device(device).type != "cpu":
        if form == "onnx":
            return "onnxruntime"
        return "torch"
    if openvino_available() and (form == "onnx" or not quick_start):
        return "openvino"
    return "onnxruntime" if form == "onnx" else "torch"


def net_device(model):
    """The device of a model's parameters; the CPU for a model without any (an ONNX or OpenVINO runtime)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def open_engine(found: ModelFile, device, engine="auto", precision="auto", quick_start=False, cache_dir=None):
    """The model of `found` (model_files.read_model_file's) running on `engine` -> a module called as SegVLM is,
    with `engine`, `precision`, `config` and `trained_on`. A ValueError naming the engine when it cannot run this
    form here (an ONNX graph on "torch", "openvino" when it is not installed, ...)."""
    if engine not in CHOICES:
        raise ValueError(f"engine must be one of {CHOICES}, got {engine!r}")
    device = torch.device(device)
    if engine == "auto":
        engine = choose_engine(found.form, device, quick_start)
    bf16 = amp_for(device, precision)
    if found.form == "onnx":
        if engine not in ("onnxruntime", "openvino"):
            raise ValueError(f"{found.path} is an ONNX graph: it runs on the engine onnxruntime or openvino, not {engine}")
        if engine == "onnxruntime":
            if precision == "bf16":
                raise ValueError("onnxruntime's CPU provider computes float32 only; --precision bf16 needs the engine "
                                 "openvino")
            run = OnnxSegVLM(found.path, found.config, device)
            bf16 = False
        else:
            run = OpenVINOSegVLM(found.path, found.config, bf16, device)
    elif engine == "onnxruntime":
        raise ValueError(f"the engine onnxruntime runs ONNX graphs (python -m tools.export --onnx); {found.path} "
                         f"is a PyTorch {found.form}")
    else:
        net = found.build(device)
        if engine == "eager":  # the model itself (with its own checks and modules), or under bf16 autocast
            run = EagerSegVLM(net, bf16) if bf16 else net
        elif engine == "torch":
            run = FastSegVLM(net, amp=bf16, cuda_graphs=device.type == "cuda")
        else:
            run = OpenVINOSegVLM(net, found.config, bf16, device, cache_dir=cache_dir or run_cache(found.path))
    run.engine, run.precision = engine, "bf16" if bf16 else "fp32"
    run.trained_on = found.trained_on
    return run


class EagerSegVLM(torch.nn.Module):
    """The PyTorch model itself, under bf16 autocast when asked (`bf16`), float32 otherwise: --engine eager."""

    def __init__(self, model, bf16=False):
        super().__init__()
        self.model, self.config, self.bf16 = model, model.config, bf16
        self.trained_on = getattr(model, "trained_on", dict(provenance.UNKNOWN))

    def forward(self, image, tokens, image_index=None):
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(image, tokens, image_index).float()


class FastSegVLM(torch.nn.Module):
    """The engine "torch": SegVLM's forward under the fastest PyTorch settings of its device.

    On CUDA: CUDA graphs. At batch 1 a forward pass is hundreds of small kernels, and launching them costs more
    than running them; a replayed graph launches them all at once. Each input shape is captured on its second
    call (its first runs eagerly, so the odd last batch of an evaluation costs no capture) and kept; at most
    `max_graphs` shapes, the oldest dropped. A new shape never reuses another shape's graph, and the output is
    copied out of the graph's memory, so no result is stale or wrong-shaped. If a capture fails (with one
    warning), it runs the eager model from then on.

    On a CPU: bf16 autocast where `amp` (default on CUDA and on a CPU with native bf16: amp_for's "auto"), with the
    weights and the image channels-last (oneDNN's blocked bf16 convolutions read them without a reorder: 1.6x on a
    Xeon with AMX, docs/measurements.md); float32 otherwise. In train mode it runs the eager model.

    The inputs are checked first with SegVLM.check_inputs: the same errors as the eager model. `dtype` is the
    autocast's (None: float32); the logits come out float32.
    """

    def __init__(self, model, amp=None, cuda_graphs=True, max_graphs=4):
        super().__init__()
        self.model = model
        self.config = model.config
        self.trained_on = getattr(model, "trained_on", dict(provenance.UNKNOWN))  # load_model's record
        cuda = net_device(model).type == "cuda"
        amp = amp_for(net_device(model)) if amp is None else amp
        self.dtype = (torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16) if amp else None
        if cuda_graphs and not cuda:
            warnings.warn("CUDA graphs need a CUDA device; running the model eagerly", stacklevel=2)
        self.cuda_graphs = cuda_graphs and cuda
        self.channels_last = not cuda and self.dtype is not None
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # the 4-D weights; the values are the same
        self.max_graphs = max_graphs
        self.graphs = {}  # shape key -> (graph, static image, static tokens, static index, static logits)
        self.seen = set()

    def _eager(self, image, tokens, image_index=None):
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(image.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model.segment(image, tokens, image_index).float()

    def forward(self, image, tokens, image_index=None):
        self.model.check_inputs(image, tokens, image_index)
        key = (tuple(image.shape), image.dtype, tuple(tokens.shape), image.device, image_index is None)
        if not (self.cuda_graphs and image.is_cuda and not self.model.training and not torch.is_grad_enabled()):
            return self._eager(image, tokens, image_index)
        if key not in self.graphs:
            if key not in self.seen:
                self.seen.add(key)
                return self._eager(image, tokens, image_index)
            try:
                self._capture(key, image, tokens, image_index)
            except Exception as e:  # noqa: BLE001 - any capture failure: eager from now on, said once
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running the model eagerly",
                              stacklevel=2)
                self.cuda_graphs = False
                self.graphs.clear()
                return self._eager(image, tokens, image_index)
        graph, static_image, static_tokens, static_index, static_out = self.graphs[key]
        static_image.copy_(image)
        static_tokens.copy_(tokens)
        if image_index is not None:
            static_index.copy_(image_index)
        graph.replay()
        return static_out.clone().float()

    def _capture(self, key, image, tokens, image_index=None):
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))  # the oldest shape; its memory goes with it
        static_image, static_tokens = image.clone(), tokens.clone()
        static_index = None if image_index is None else image_index.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up passes on a side stream, as torch.cuda.graph requires
            for _ in range(2):
                self._eager(static_image, static_tokens, static_index)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # autocast's cast cache must be off while capturing (PyTorch's CUDA graphs notes)
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype=self.dtype or torch.float32,
                                                      enabled=self.dtype is not None, cache_enabled=False):
            static_out = self.model.segment(static_image, static_tokens, static_index)
        self.graphs[key] = (graph, static_image, static_tokens, static_index, static_out)


def code_digest() -> str:
    """SHA-256 of the code a converted graph comes from (model.py, layers.py): a converted model cached by an older
    version of that code is never reused."""
    digest = hashlib.sha256()
    for module in (model_module, layers):
        digest.update(Path(inspect.getsourcefile(module)).read_bytes())
    return digest.hexdigest()


def model_key(net, precision: str) -> str:
    """The cache key of a converted model: its config, every weight's bytes, the code, torch's and OpenVINO's
    versions and the precision; two models share a key only if all of these are equal."""
    import openvino
    digest = hashlib.sha256(json.dumps([net.config.to_dict(), torch.__version__, openvino.__version__, precision,
                                        code_digest()]).encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def private_cache(cache_dir) -> Path:
    """`cache_dir`, created (mode 0700) if need be, refused (a ValueError naming it) unless this user owns it and
    nobody else can write in it: a converted model read from a folder another user can write would run their graph."""
    folder = Path(cache_dir)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as e:
        raise ValueError(f"--engine-cache {folder}: cannot create it ({e.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"--engine-cache {folder} is not a folder")
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise ValueError(f"--engine-cache {folder} can be written by other users (owner uid {info.st_uid}, mode "
                         f"{stat.filemode(info.st_mode)}); name a folder of your own that only you can write")
    return folder


RUN_CACHE = "engine-cache"  # in a run's own folder (train.py's), where the default engine keeps its conversion


def run_cache(path):
    """The default cache of a model file's conversion: RUN_CACHE in the folder of a checkpoint that train.py wrote
    (it holds config.json and command.txt), when this user owns that folder and nobody else can write in it; else
    None (no cache: a user's download folder gets nothing written into it)."""
    folder = Path(path).resolve().parent
    try:
        info = folder.stat()
    except OSError:
        return None
    ours = not hasattr(os, "getuid") or (info.st_uid == os.getuid() and not info.st_mode & 0o022)
    run = (folder / "config.json").is_file() and (folder / "command.txt").is_file()
    return folder / RUN_CACHE if ours and run and os.access(folder, os.W_OK) else None


def convert(net, work, cache_dir=None, precision="fp32") -> Path:
    """The file OpenVINO reads `net` (a SegVLM, in eval mode) from: its conversion in `cache_dir` where an earlier
    process left it, else the model exported to ONNX in the folder `work` (onnx_model.export_graph: tools/export.py's
    exporter, with image_index; the images and the phrases axes free). The ONNX route gives OpenVINO a graph it
    runs faster than a traced one (1.8x on the paper preset, docs/measurements.md), in less time."""
    import openvino as ov
    cfg = net.config
    target = None
    if cache_dir is not None:
        target = private_cache(cache_dir) / f"openvino-{model_key(net, precision)}"
        if (target / "model.xml").is_file():
            return target / "model.xml"
    example = (torch.zeros(2, 3, cfg.input_size, cfg.input_size), torch.ones(3, cfg.word_len, dtype=torch.long),
               torch.tensor([0, 1, 1]))  # two images, three phrases
    export_graph(net.eval(), Path(work) / "graph.onnx", example)
    if target is not None:  # written under a temporary name, then renamed: a reader never sees half of it
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            ov.save_model(ov.Core().read_model(str(Path(work) / "graph.onnx")), str(tmp / "model.xml"),
                          compress_to_fp16=False)
            os.replace(tmp, target)
        except OSError:
            pass  # another process cached it first, or the disk is full: this process has its model anyway
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Path(work) / "graph.onnx"


class OpenVINOSegVLM(torch.nn.Module):
    """The engine "openvino": the model compiled by OpenVINO for this CPU, called as SegVLM is.

    source: a SegVLM (converted: `convert`) or the path of an ONNX graph of tools/export.py (read directly; its
    graph takes one image per phrase, so several phrases on one image repeat the image). bf16: OpenVINO's
    INFERENCE_PRECISION_HINT bf16 (its default on a CPU with native bf16), else f32. PERFORMANCE_HINT LATENCY:
    one request at a time uses every core, as a person waiting for one picture wants. Each run's output is
    checked (onnx_model.check_output): logits (N, 1, S/4, S/4) float32 for N phrases."""

    def __init__(self, source, config, bf16=False, device="cpu", cache_dir=None):
        super().__init__()
        import openvino as ov
        if torch.device(device).type != "cpu":
            raise ValueError(f"the engine openvino runs on the CPU here, not {device}; use --engine torch")
        self.config, self.bf16 = config, bf16
        self.graph_file = None if isinstance(source, torch.nn.Module) else os.fspath(source)
        core = ov.Core()
        properties = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if cache_dir is not None:  # OpenVINO's own cache of compiled models, beside the conversions
            properties["CACHE_DIR"] = str(private_cache(cache_dir) / "compiled")
        self.single = None  # the compiled model for one image and one phrase, shapes fixed (not for a file's graph)
        try:
            with tempfile.TemporaryDirectory(prefix="segvlm-openvino-") as work:  # the exported graph, until compiled
                path = self.graph_file or convert(source, work, cache_dir, "bf16" if bf16 else "fp32")
                self.compiled = core.compile_model(core.read_model(str(path)), "CPU", properties)
                if not self.graph_file:  # images and phrases on two free axes cost 1-3 % at batch 1; fixed, nothing
                    fixed = core.read_model(str(path))
                    fixed.reshape({fixed.inputs[0]: [1, 3, config.input_size, config.input_size],
                                   fixed.inputs[1]: [1, config.word_len], fixed.inputs[2]: [1]})
                    self.single = core.compile_model(fixed, "CPU", properties)
        except (RuntimeError, ValueError, TypeError) as e:  # OpenVINO's errors: an op it lacks, a graph it refuses
            where = self.graph_file or "the model"
            raise ValueError(f"OpenVINO cannot compile {where} ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}); use --engine torch"
                             f"{' or onnxruntime' if self.graph_file else ''}") from None
        self.request = self.compiled.create_infer_request()
        self.single_request = self.single.create_infer_request() if self.single is not None else None

    def forward(self, image, tokens, image_index=None):
        check_inputs(image, tokens, image_index, self.config.input_size, self.config.word_len)
        size, length = self.config.input_size, self.config.word_len
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"the OpenVINO model takes {size}x{size} images, got {image.shape[-2]}x{image.shape[-1]}")
        if tokens.shape[1] < length:  # the graph's token axis is word_len long: pad, as tokenize would
            tokens = torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]))
        if image_index is None:
            image_index = torch.arange(tokens.shape[0])
        image = image.detach().float().cpu()
        tokens, image_index = tokens.detach().long().cpu(), image_index.detach().long().cpu()
        if self.graph_file:  # the exported graph: one image per phrase
            feeds = [np.ascontiguousarray(image[image_index].numpy()), tokens.numpy()]
        else:
            feeds = [np.ascontiguousarray(image.numpy()), tokens.numpy(), image_index.numpy()]
        one = self.single_request is not None and image.shape[0] == 1 and tokens.shape[0] == 1
        request = self.single_request if one else self.request
        try:
            logits = request.infer(feeds)[0]
        except RuntimeError as e:
            raise ValueError(f"OpenVINO failed to run {self.graph_file or 'the model'} "
                             f"({str(e).strip().splitlines()[0][:300] if str(e).strip() else 'RuntimeError'})") from None
        return check_output(torch.from_numpy(np.array(logits, dtype=np.float32)), tokens.shape[0], size,
                            f"OpenVINO's model of {self.graph_file or 'the checkpoint'}")
