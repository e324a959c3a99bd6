"""helpers/model_files.py, the one reader of every model file (a .pth, a model folder, an ONNX graph), against
careless and hostile files: a config is bounded and compared with its weights before anything is allocated, a
folder's two files must describe one model (what shapes do not show included), `trained_on` travels through
every form, and an ONNX graph is trusted only as far as its declared and real outputs are checked. ONNX graphs
here are built by hand with onnx.helper (no exporter: fast), with SegVLM's signature or a broken one."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from tooling import one_line_error, run_tool, save_model_checkpoint

from helpers import inference, model_files, provenance, safetensors_folder
from helpers.onnx_model import CONFIG_KEY, TRAINED_ON_KEY
from model import LIMITS, PRESETS, build_model
from tools import export

SMOKE = PRESETS["smoke"].model
RECORD = {"dataset": "synthetic", "name": provenance.NAMES["synthetic"], "preset": "smoke", "epochs": 1,
          "planned_epochs": 1, "best_val_mIoU": 0.25, "units": provenance.UNITS,
          "train": {"split": "train", "tasks": 40, "images": 12}, "val": {"split": "val", "tasks": 8, "images": 3}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_files")
    torch.manual_seed(0)
    net = build_model("smoke").eval()
    save_model_checkpoint(net, root / "best.pth", trained_on=RECORD)
    return net, root / "best.pth"


def photo(folder):
    from PIL import Image
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "p.png")
    return folder / "p.png"


def refuse_building(monkeypatch):
    """Make any SegVLM built by the reader fail the test: the refusal must come before the model is built."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was refused")
    monkeypatch.setattr(model_files, "SegVLM", no_model)


# --------------------------------------------------------------------------- configs are bounded

@pytest.mark.parametrize("field, value, refused", [
    ("input_size", 96000, "input_size"), ("word_len", 10 ** 9, "context_length"), ("transformer_layers", 10 ** 6, None),
    ("decoder_ffn", 3 * 10 ** 5, None), ("vision_layers", [1, 1, 10 ** 30, 1], None)])
def test_a_config_beyond_its_bounds_is_refused_before_any_model_is_built(smoke, tmp_path, monkeypatch, field, value,
                                                                          refused):
    net, _ = smoke
    config = {**net.config.to_dict(), field: value}
    if field == "word_len":
        config["context_length"] = value  # the same edit on both, so that only a bound can refuse it
    save_model_checkpoint(net, tmp_path / "big.pth", config=config)
    refuse_building(monkeypatch)
    refused = refused or field
    with pytest.raises(ValueError, match=rf"big\.pth is not a SegVLM checkpoint: bad config: {refused} must be at most "
                                         rf"{LIMITS[refused]} \(model\.LIMITS\)"):
        model_files.read_model_file(tmp_path / "big.pth")


def test_every_field_of_every_preset_lies_within_the_bounds():
    for preset in PRESETS.values():
        for field, limit in LIMITS.items():
            value = getattr(preset.model, field)
            assert max(value if isinstance(value, tuple) else (value,)) <= limit, (field, value)


def test_a_folder_config_with_an_enormous_or_endless_number_is_one_line(smoke, tmp_path):
    net, _ = smoke
    safetensors_folder.write_folder(net, tmp_path / "folder")
    config_path = tmp_path / "folder" / "config.json"
    text = config_path.read_text()
    for number in ("1" + "0" * 30, "9" * 5000):  # a 10^30 that torch would choke on; more digits than Python reads
        config_path.write_text(text.replace('"input_size": 64', f'"input_size": {number}'))
        proc = run_tool("predict.py", "--ckpt", tmp_path / "folder", "--image", photo(tmp_path), "--phrase", "x",
                        "--out", tmp_path / "o.png")
        err = one_line_error(proc, 1) if proc.returncode == 1 else one_line_error(proc)
        assert "config.json" in err and ("input_size must be at most 1024" in err or "digits" in err), err


# --------------------------------------------------------------------------- model folders

def test_a_folder_whose_config_differs_from_its_weights_on_what_shapes_do_not_show_is_refused(smoke, tmp_path):
    net, _ = smoke
    safetensors_folder.write_folder(net, tmp_path / "folder")
    config_path = tmp_path / "folder" / "config.json"
    config = json.loads(config_path.read_text())
    config["decoder_heads"] = 4  # 32 channels divide by 4 as by 2: the same tensors, another model
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        model_files.read_model_file(tmp_path / "folder")
    message = str(error.value)
    assert "config.json" in message and "model.safetensors" in message
    assert "decoder_heads: 4 in config.json, 2 in the weights" in message


def test_a_kill_between_the_two_writes_of_a_folder_leaves_a_folder_that_is_refused(smoke, tmp_path, monkeypatch):
    net, _ = smoke
    safetensors_folder.write_folder(net, tmp_path / "folder")  # an earlier export: heads 2
    other = build_model("smoke", decoder_heads=4)
    real_write_text = type(tmp_path).write_text

    def killed(self, *args, **kwargs):  # the weights are written first; the process dies before config.json
        if self.name.startswith(".config.json.tmp"):
            raise KeyboardInterrupt
        return real_write_text(self, *args, **kwargs)
    monkeypatch.setattr(type(tmp_path), "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        safetensors_folder.write_folder(other, tmp_path / "folder")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="decoder_heads: 2 in config.json, 4 in the weights"):
        model_files.read_model_file(tmp_path / "folder")


def test_a_weights_file_that_is_a_device_is_named_as_such(smoke, tmp_path):
    net, _ = smoke
    safetensors_folder.write_folder(net, tmp_path / "folder")
    (tmp_path / "folder" / "model.safetensors").unlink()
    os.symlink("/dev/zero", tmp_path / "folder" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a regular file but a device"):
        model_files.read_model_file(tmp_path / "folder")


def test_trained_on_travels_through_the_folder_and_says_synthetic(smoke, tmp_path, capsys):
    _, pth = smoke
    export.main(["--ckpt", str(pth), "--safetensors", str(tmp_path / "folder")])
    model = inference.load_model(tmp_path / "folder", "cpu", precision="fp32")
    assert model.trained_on == RECORD and provenance.knows_only_synthetic(model.trained_on)


def test_export_never_replaces_a_users_files_in_the_folder(smoke, tmp_path, capsys):
    _, pth = smoke
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("my own notes")
    with pytest.raises(SystemExit) as stop:
        export.main(["--ckpt", str(pth), "--safetensors", str(folder)])
    assert stop.value.code == 2 and "did not write" in capsys.readouterr().err
    assert (folder / "config.json").read_text() == "my own notes" and not (folder / "model.safetensors").exists()
    export.main(["--ckpt", str(pth), "--safetensors", str(tmp_path / "ours")])  # its own folder: written again
    export.main(["--ckpt", str(pth), "--safetensors", str(tmp_path / "ours")])


@pytest.mark.parametrize("flags, message", [(["--opset", "99999"], "knows opsets up to"),
                                            (["--tolerance", "nan"], "finite number above 0"),
                                            (["--tolerance", "-1"], "finite number above 0")])
def test_export_refuses_flags_that_would_fail_after_the_export(smoke, tmp_path, capsys, flags, message):
    _, pth = smoke
    with pytest.raises(SystemExit) as stop:
        export.main(["--ckpt", str(pth), "--onnx", str(tmp_path / "m.onnx"), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and ".tmp-" not in err
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- ONNX graphs

def graph_file(path, cfg=SMOKE, batch="B", out_batch=None, channels=1, slice_to_one=False, fail=False, meta=None,
               trained_on=None):
    """An ONNX file with SegVLM's signature for `cfg` (image, tokens -> logits) computing a stand-in: the image
    average-pooled by 4 and averaged over its channels. batch: the declared batch (a name: free; a number: fixed);
    out_batch: the output's declared batch (default the same); slice_to_one: the real output keeps the first phrase
    only; fail: a Reshape that cannot succeed at run time; meta: the config entry's text instead of the config."""
    s, length = cfg.input_size, cfg.word_len
    nodes = [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("ReduceMean", ["pooled", "axes"], ["mean"], keepdims=1)]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    last = "mean"
    if channels != 1:
        nodes.append(helper.make_node("Concat", [last] * channels, ["wide"], axis=1))
        last = "wide"
    if slice_to_one:
        inits += [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s0", 0), ("s1", 1), ("ax0", 0))]
        nodes.append(helper.make_node("Slice", [last, "s0", "s1", "ax0"], ["sliced"]))
        last = "sliced"
    if fail:
        inits.append(helper.make_tensor("bad", TensorProto.INT64, [2], [7, 13]))
        nodes.append(helper.make_node("Reshape", [last, "bad"], ["broken"]))
        last = "broken"
    nodes.append(helper.make_node("Identity", [last], ["logits"]))
    graph = helper.make_graph(
        nodes, "stand-in",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, s, s]),
         helper.make_tensor_value_info("tokens", TensorProto.INT64, [batch, length])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       [batch if out_batch is None else out_batch, channels, s // 4, s // 4])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    proto.metadata_props.add(key=CONFIG_KEY, value=meta if meta is not None else json.dumps(cfg.to_dict()))
    if trained_on is not None:
        proto.metadata_props.add(key=TRAINED_ON_KEY, value=json.dumps(trained_on))
    onnx.save(proto, str(path))
    return path


def inputs(n):
    image = torch.randn(n, 3, SMOKE.input_size, SMOKE.input_size)
    return image, torch.ones(n, SMOKE.word_len, dtype=torch.long)


def test_a_graph_with_segvlms_signature_runs_and_says_what_it_was_trained_on(tmp_path):
    path = graph_file(tmp_path / "ok.onnx", trained_on=RECORD)
    image, tokens = inputs(3)
    expected = torch.nn.functional.avg_pool2d(image, 4).mean(1, keepdim=True)
    for engine in ("onnxruntime", "openvino"):
        model = inference.load_model(path, engine=engine, precision="fp32")
        assert model.trained_on == RECORD and model.engine == engine
        logits = model(image, tokens)
        assert logits.shape == (3, 1, 16, 16) and torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("kind, message", [
    (dict(batch=1), "has a fixed batch of 1"),
    (dict(out_batch=1), "logits has a fixed batch of 1"),
    (dict(channels=2), r"logits is \['\?', 2, 16, 16\]"),
    (dict(cfg=SMOKE.__class__(**{**SMOKE.to_dict(), "input_size": 96})), r"image is \['\?', 3, 96, 96\]"),
])
def test_a_graph_that_declares_another_signature_is_refused_at_load(tmp_path, kind, message):
    cfg = kind.pop("cfg", None)
    path = graph_file(tmp_path / "bad.onnx", **kind) if cfg is None else graph_file(tmp_path / "bad.onnx", cfg=cfg)
    if cfg is not None:  # the graph takes 96-pixel images while its metadata says 64
        proto = onnx.load(str(path))
        proto.metadata_props[0].value = json.dumps(SMOKE.to_dict())
        onnx.save(proto, str(path))
    with pytest.raises(ValueError, match=message):
        inference.load_model(path)  # refused by the reader, before any engine


def test_a_graph_whose_real_output_is_not_what_it_declares_is_refused_on_the_run(tmp_path):
    for engine in ("onnxruntime", "openvino"):  # every engine that runs a graph checks what it returns
        model = inference.load_model(graph_file(tmp_path / "liar.onnx", slice_to_one=True), engine=engine)
        with pytest.raises(ValueError, match=r"liar\.onnx.*returned \(1, 1, 16, 16\) .* for 3 phrase\(s\)"):
            model(*inputs(3))
    with pytest.raises(ValueError, match=r"broken\.onnx: the graph failed to run"):
        inference.load_model(graph_file(tmp_path / "broken.onnx", fail=True), engine="onnxruntime")(*inputs(2))
    with pytest.raises(ValueError, match=r"broken\.onnx"):  # OpenVINO sees the impossible shape when it compiles
        inference.load_model(graph_file(tmp_path / "broken.onnx", fail=True), engine="openvino")(*inputs(2))


@pytest.mark.parametrize("meta, message", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                           ("{not json", "is not JSON"),
                                           (json.dumps({**SMOKE.to_dict(), "input_size": 96000}),
                                            "input_size must be at most 1024")])
def test_a_graphs_metadata_is_read_with_bounds(tmp_path, meta, message):
    with pytest.raises(ValueError, match=message):
        inference.load_model(graph_file(tmp_path / "meta.onnx", meta=meta))


def test_the_tools_say_a_bad_graph_in_one_line(tmp_path):
    for name, kind in (("fixed.onnx", dict(batch=1)), ("broken.onnx", dict(fail=True))):
        proc = run_tool("predict.py", "--onnx", graph_file(tmp_path / name, **kind), "--image", photo(tmp_path), "--phrase",
                        "x", "--out", tmp_path / "o.png")
        assert name in one_line_error(proc, 1)
    with pytest.raises(ValueError, match="holds no PyTorch weights"):
        model_files.load_checkpoint(graph_file(tmp_path / "ok.onnx"))
