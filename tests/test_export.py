"""tools/export.py: the ONNX graph (onnxruntime against PyTorch at batch 1 and 3, predict.py --onnx against --ckpt,
the folder mode on it) and the safetensors folder (a round trip through every reader, a folder whose two files
disagree refused naming both)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import run_tool, save_model_checkpoint

import predict
from helpers import batch_predict, inference, model_files
from helpers.transforms import tokenize
from layers import NOTHING
from tools import export


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import model
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = model.build_model("smoke")
    with torch.no_grad():  # offsets away from zero, so that the deformable sampling is not a plain conv
        net.enhance.deform.offset.bias.uniform_(-1.5, 1.5)
    save_model_checkpoint(net, root / "best.pth", data_dir="somewhere/data")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.jpg": (37, 53), "b.png": (70, 45)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


# --------------------------------------------------------------------------- safetensors

def test_safetensors_folder_round_trip(files, tmp_path):
    export.main(["--ckpt", str(files / "best.pth"), "--safetensors", str(tmp_path / "folder")])
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == [".segvlm-written", "config.json",
                                                                        "model.safetensors"]  # and its own record
    original, ckpt = model_files.load_checkpoint(files / "best.pth")
    again, folder_ckpt = model_files.load_checkpoint(tmp_path / "folder")
    assert json.loads((tmp_path / "folder" / "config.json").read_text()) == original.config.to_dict()
    assert folder_ckpt["data_dir"] == ckpt["data_dir"] == "somewhere/data"  # evaluate.py's default data
    a, b = original.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every reader of --ckpt: predict/app (load_model), train --init-from (init_model)
    fp32 = dict(device="cpu", precision="fp32")
    mask_pth = predict.predict(predict.load_model(files / "best.pth", **fp32), files / "a.jpg", "red circle")
    mask_dir = predict.predict(predict.load_model(tmp_path / "folder", **fp32), files / "a.jpg", "red circle")
    assert np.array_equal(mask_pth, mask_dir)
    model, note = model_files.init_model(tmp_path / "folder", original.config)
    assert "nothing new" in note and all(torch.equal(model.state_dict()[k], a[k]) for k in a)
    import train  # train.py --init-from takes the folder as it takes a file; an empty folder is no model
    assert train.parse_args(["--preset", "smoke", "--init-from", str(tmp_path / "folder"),
                             "--out", str(tmp_path / "run")]).init_from == str(tmp_path / "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "smoke", "--init-from", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")])


def test_a_folder_whose_files_disagree_is_refused_naming_both(files, tmp_path):
    export.main(["--ckpt", str(files / "best.pth"), "--safetensors", str(tmp_path / "folder")])
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    config["decoder_layers"] += 1  # the config of another model
    (tmp_path / "folder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        model_files.load_checkpoint(tmp_path / "folder")
    message = str(error.value)
    assert "config.json" in message and "model.safetensors" in message and "decoder_layers: 2 in config.json" in message
    with pytest.raises(SystemExit) as stop:  # a tool says it in one line
        predict.main(["--ckpt", str(tmp_path / "folder"), "--image", str(files / "a.jpg"), "--phrase", "x",
                      "--out", str(tmp_path / "o.png")])
    assert "disagree" in str(stop.value.code) and "model.safetensors" in str(stop.value.code)
    (tmp_path / "folder" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        model_files.load_checkpoint(tmp_path / "folder")
    (tmp_path / "half").mkdir()
    shutil.copy(files / "best.pth", tmp_path / "half" / "model.safetensors")  # not safetensors at all
    (tmp_path / "half" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        model_files.load_checkpoint(tmp_path / "half")


# --------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_file(files):
    proc = run_tool("export.py", "--ckpt", files / "best.pth", "--onnx", files / "model.onnx", timeout=900,
                    check=True)
    assert "largest relative difference" in proc.stdout
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".")) == [], "the exporter's files stayed behind"
    return files / "model.onnx"


@pytest.mark.slow
def test_onnx_graph_equals_the_model_at_batch_1_and_3(files, onnx_file):
    net, _ = model_files.load_checkpoint(files / "best.pth")
    for engine in ("onnxruntime", "openvino"):  # the graph on both runtimes that read it, in float32
        runtime = inference.load_model(onnx_file, engine=engine, precision="fp32")
        assert runtime.config == net.config and runtime.engine == engine
        torch.manual_seed(5)
        for batch in (1, 3):
            image = torch.randn(batch, 3, 64, 64)
            tokens = tokenize(["a cat", "the large square on the right", "x"][:batch], net.config.word_len)
            with torch.no_grad():
                ref = net(image, tokens)
            got = runtime(image, tokens)
            assert got.shape == ref.shape == (batch, 1, 16, 16)
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        with pytest.raises(ValueError, match="multiples of 32"):  # SegVLM's own checks
            runtime(torch.randn(1, 3, 60, 64), tokens[:1])


@pytest.mark.slow
def test_predict_with_onnx_matches_the_checkpoint_in_both_modes(files, onnx_file, tmp_path):
    for name in ("a.jpg", "b.png"):
        for mode in (["--onnx", str(onnx_file), "--precision", "fp32"],
                     ["--ckpt", str(files / "best.pth"), "--precision", "fp32"]):
            predict.main([*mode, "--image", str(files / name), "--phrase", "blue square",
                          "--out", str(tmp_path / "o.png"), "--mask", str(tmp_path / f"{mode[0]}-{name}.png")])
        onnx_mask = np.asarray(Image.open(tmp_path / f"--onnx-{name}.png")) > 0
        ckpt_mask = np.asarray(Image.open(tmp_path / f"--ckpt-{name}.png")) > 0
        assert (onnx_mask != ckpt_mask).mean() < 0.002  # at most a pixel or two where a probability sits at 0.35
    prob_onnx = inference.predict_proba(inference.load_model(onnx_file, precision="fp32"), files / "a.jpg",
                                        ["red", "blue square"])
    prob_ckpt = inference.predict_proba(predict.load_model(files / "best.pth", "cpu", precision="fp32"),
                                        files / "a.jpg", ["red", "blue square"])
    assert all(np.abs(a - b).max() < 1e-4 for a, b in zip(prob_onnx, prob_ckpt))
    out = tmp_path / "folder"
    predict.main(["--onnx", str(onnx_file), "--images", str(files / "a.jpg"), str(files / "b.png"),
                  "--phrase", "red", "--phrase", "blue square", "--out", str(out), "--workers", "0"])
    rows = batch_predict.read_index(out / batch_predict.INDEX)
    assert len(rows) == 4 and all((out / m).is_file() for m in rows)


@pytest.mark.slow
def test_the_no_target_answer_survives_the_export(tmp_path):
    import model
    torch.manual_seed(1)
    net = model.build_model("smoke", no_target_head=True).eval()
    image, tokens = torch.randn(3, 3, 64, 64), tokenize(["a cat", "the large square on the right", "x"], 10)
    with torch.no_grad():
        low, mid, _ = net(image, tokens, return_no_target=True)[1].sort().values
        net.no_target.mlp[-1].bias -= (low + mid) / 2  # two phrases answered "no target", one not
        ref = net(image, tokens)
    answered = (ref.flatten(1) == NOTHING).all(1)
    assert answered.sum() == 2 and not answered.all()
    save_model_checkpoint(net, tmp_path / "gres.pth")
    run_tool("export.py", "--ckpt", tmp_path / "gres.pth", "--onnx", tmp_path / "gres.onnx", timeout=900, check=True)
    for engine in ("onnxruntime", "openvino"):
        got = inference.load_model(tmp_path / "gres.onnx", engine=engine, precision="fp32")(image, tokens)
        assert ((got.flatten(1) == NOTHING).all(1) == answered).all()  # the same phrases answered "no target"
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref[~answered].abs().max().item())


def test_export_refuses_bad_flags(files, tmp_path, capsys):
    for args, message in [(["--ckpt", str(files / "best.pth")], "give --onnx"),
                          (["--ckpt", str(files / "best.pth"), "--onnx", str(tmp_path / "m.onnx"), "--opset", "13"],
                           "GridSample"),
                          (["--ckpt", str(files / "best.pth"), "--onnx", str(tmp_path / "m.txt")], ".onnx file")]:
        with pytest.raises(SystemExit) as stop:
            export.main(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "foreign.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="not an ONNX file|not a SegVLM graph"):
        inference.load_model(tmp_path / "foreign.onnx")
