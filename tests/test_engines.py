"""helpers/engines.py: which engine "auto" picks on each kind of CPU (native bf16 or not, OpenVINO installed or
not: simulated, whatever this CPU is), and that every engine runs the model as the PyTorch model does: OpenVINO
against eager float32, with grouped phrases and the no-target answer, its conversion cached only in a folder of
the user's own. Speed is benchmark's to measure (docs/measurements.md), never a test's."""
import os
import stat

import numpy as np
import pytest
import torch
from tooling import save_model_checkpoint

import predict
from helpers import engines, inference, transforms
from model import SegVLM, build_model


def pretend_cpu(monkeypatch, native_bf16, openvino):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(engines, "openvino_available", lambda: openvino)
    monkeypatch.delenv(engines.ENGINE_VARIABLE, raising=False)  # "auto" as a user's process has it


@pytest.fixture(params=[(True, True), (True, False), (False, True), (False, False)],
                ids=["bf16-openvino", "bf16-no-openvino", "avx2-openvino", "avx2-no-openvino"])
def cpu_kind(request, monkeypatch):
    """Each kind of CPU this project meets: native bf16 (AVX512-BF16 or AMX) or not, OpenVINO installed or not."""
    native, openvino = request.param
    pretend_cpu(monkeypatch, native, openvino)
    return native, openvino


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("smoke")
    with torch.no_grad():  # offsets away from zero: the deformable sampling is not a plain conv
        net.enhance.deform.offset.bias.uniform_(-1.5, 1.5)
    return save_model_checkpoint(net.eval(), tmp_path_factory.mktemp("engines") / "best.pth")


def inputs(cfg, images=2, phrases=("red circle", "small blue square", "all green shapes")):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(images, 3, cfg.input_size, cfg.input_size, generator=g)
    tokens = transforms.tokenize(list(phrases), cfg.word_len)
    return image, tokens, torch.tensor([i % images for i in range(len(phrases))])


def test_auto_picks_the_fastest_engine_each_kind_of_cpu_has(cpu_kind, ckpt):
    native, openvino = cpu_kind
    for form in ("checkpoint", "cris", "folder"):
        assert engines.choose_engine(form, "cpu") == ("openvino" if openvino else "torch")
        assert engines.choose_engine(form, "cpu", quick_start=True) == "torch"  # one image: nothing to convert
        assert engines.choose_engine(form, "cuda") == "torch"  # CUDA graphs (the choice needs no GPU to test)
    assert engines.choose_engine("onnx", "cpu") == ("openvino" if openvino else "onnxruntime")
    assert engines.choose_engine("onnx", "cpu", quick_start=True) == ("openvino" if openvino else "onnxruntime")
    assert engines.amp_for("cpu") == native and engines.amp_for("cpu", "fp32") is False
    one_image = inference.load_model(ckpt, "cpu", quick_start=True)  # what predict.py --image runs
    assert one_image.engine == "torch" and one_image.precision == ("bf16" if native else "fp32")
    assert isinstance(one_image, engines.FastSegVLM) and one_image.channels_last == native


def test_the_engine_variable_and_bad_names(monkeypatch, ckpt):
    monkeypatch.setenv(engines.ENGINE_VARIABLE, "eager")
    assert engines.choose_engine("checkpoint", "cpu") == "eager"
    assert engines.choose_engine("onnx", "cpu") in ("openvino", "onnxruntime")  # not a PyTorch engine's file
    assert type(inference.load_model(ckpt, "cpu", precision="fp32")) is SegVLM
    monkeypatch.setenv(engines.ENGINE_VARIABLE, "tensorrt")
    with pytest.raises(ValueError, match=r"\$SEGVLM_ENGINE='tensorrt': not an engine"):
        engines.choose_engine("checkpoint", "cpu")
    with pytest.raises(ValueError, match="engine must be one of"):
        inference.load_model(ckpt, "cpu", engine="tensorrt")
    with pytest.raises(ValueError, match="the engine onnxruntime runs ONNX graphs"):
        inference.load_model(ckpt, "cpu", engine="onnxruntime")
    with pytest.raises(ValueError, match="contradicts"):
        inference.load_model(ckpt, "cpu", engine="openvino", fast=True)


def test_predict_py_names_its_engine_once(ckpt, tmp_path, capsys):
    from PIL import Image
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "p.png")
    predict.main(["--ckpt", str(ckpt), "--image", str(tmp_path / "p.png"), "--phrase", "red circle", "--out",
                  str(tmp_path / "o.png"), "--engine", "eager", "--precision", "fp32"])
    assert capsys.readouterr().err.count("predict.py: engine eager (fp32)") == 1
    for flags, message in ((["--engine", "torch", "--no-fast"], "contradicts"),
                           (["--engine", "onnxruntime"], "runs an ONNX graph")):
        with pytest.raises(SystemExit):
            predict.main(["--ckpt", str(ckpt), "--image", str(tmp_path / "p.png"), "--phrase", "x", *flags])
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def openvino_fp32(ckpt):
    pytest.importorskip("openvino")
    return inference.load_model(ckpt, "cpu", engine="openvino", precision="fp32")


@pytest.mark.slow  # OpenVINO converts the model: seconds
def test_openvino_runs_the_model_as_pytorch_does(ckpt, openvino_fp32):
    plain = inference.load_model(ckpt, "cpu", engine="eager", precision="fp32")
    assert openvino_fp32.engine == "openvino" and openvino_fp32.precision == "fp32"
    image, tokens, index = inputs(plain.config)
    with torch.no_grad():
        ref = plain(image, tokens, index)  # two images, three phrases: each phrase with its own image
        got = openvino_fp32(image, tokens, index)
        assert got.dtype == torch.float32 and got.shape == ref.shape == (3, 1, 16, 16)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        one = openvino_fp32(image[:1], tokens[:1])  # image_index left out: one image per phrase
        assert (one - plain(image[:1], tokens[:1])).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match="image batch"):  # SegVLM's own checks, before OpenVINO runs
        openvino_fp32(image, tokens)
    photo = (np.random.default_rng(0).random((41, 57, 3)) * 255).astype(np.uint8)
    for a, b in zip(predict.predict(openvino_fp32, photo, ["red", "blue"]), predict.predict(plain, photo, ["red", "blue"])):
        assert (a != b).mean() < 1e-3  # the same masks, up to a pixel at the threshold


@pytest.mark.slow  # OpenVINO converts the model: seconds
def test_openvino_gives_the_same_no_target_answers(tmp_path):
    pytest.importorskip("openvino")
    torch.manual_seed(3)
    net = build_model("smoke", no_target_head=True).eval()
    with torch.no_grad():  # a head that says "no target" for about half the phrases
        net.no_target.mlp[-1].bias.fill_(0.0)
    path = save_model_checkpoint(net, tmp_path / "gres.pth")
    ov = inference.load_model(path, "cpu", engine="openvino", precision="fp32")
    image, tokens, index = inputs(net.config, phrases=[f"phrase {k}" for k in range(8)])
    with torch.no_grad():
        ref, got = net(image, tokens, index), ov(image, tokens, index)
    empty = lambda logits: (logits.sigmoid() > 0.35).flatten(1).any(1) == 0  # noqa: E731 - the answer "no target"
    assert torch.equal(empty(ref), empty(got))


@pytest.mark.slow  # OpenVINO converts the model: seconds
def test_openvino_in_bf16_where_the_cpu_computes_it(ckpt):
    pytest.importorskip("openvino")
    if not engines.native_bf16():
        pytest.skip("this CPU has no native bf16; OpenVINO runs float32 here (test_auto_picks... covers the choice)")
    ov = inference.load_model(ckpt, "cpu", engine="openvino")
    plain = inference.load_model(ckpt, "cpu", engine="eager", precision="fp32")
    assert ov.precision == "bf16"
    image, tokens, index = inputs(plain.config)
    with torch.no_grad():
        ref, got = plain(image, tokens, index), ov(image, tokens, index)
    assert (got - ref).abs().max() <= 0.1 * ref.abs().max()  # bf16's 8 bits of mantissa, not float32's 24


@pytest.mark.slow  # OpenVINO converts the model: seconds
def test_the_conversion_is_cached_only_in_a_folder_of_ones_own(ckpt, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    calls = []
    real = engines.export_graph
    monkeypatch.setattr(engines, "export_graph", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    first = inference.load_model(ckpt, "cpu", engine="openvino", precision="fp32", cache_dir=cache)
    again = inference.load_model(ckpt, "cpu", engine="openvino", precision="fp32", cache_dir=cache)
    assert len(calls) == 1 and len(list(cache.glob("openvino-*/model.xml"))) == 1  # converted once, read once
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    image, tokens, index = inputs(first.config)
    with torch.no_grad():
        assert torch.equal(first(image, tokens, index), again(image, tokens, index))
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ValueError, match="can be written by other users"):
        inference.load_model(ckpt, "cpu", engine="openvino", cache_dir=shared)


def test_agree_measures_an_engine_against_float32(ckpt, synth, tmp_path):
    from tools import agree
    _, lmdb, _ = synth
    same = agree.main(["--ckpt", str(ckpt), "--data", str(lmdb), "--engine", "eager", "--precision", "fp32",
                       "--limit", "12", "--json", str(tmp_path / "a.json")])
    assert same["tasks"] == 12 and same["mean_iou"] == same["min_iou"] == same["no_target_agree"] == 1.0
    assert same["reference_mIoU"] == same["engine_mIoU"]
    bf16 = agree.main(["--ckpt", str(ckpt), "--data", str(lmdb), "--engine", "torch", "--precision", "bf16",
                       "--limit", "12"])
    assert bf16["precision"] == "bf16" and 0.0 < bf16["min_iou"] <= bf16["mean_iou"] <= 1.0
    assert abs(bf16["engine_mIoU"] - bf16["reference_mIoU"]) <= 1 - bf16["min_iou"]  # each task moves at most that


@pytest.mark.slow  # OpenVINO converts the model: seconds
def test_a_runs_own_folder_keeps_the_conversion_and_a_download_folder_does_not(ckpt, tmp_path):
    pytest.importorskip("openvino")
    import shutil
    run, downloads = tmp_path / "run", tmp_path / "downloads"
    for folder in (run, downloads):
        folder.mkdir()
        shutil.copy(ckpt, folder / "best.pth")
    (run / "config.json").write_text("{}")  # what train.py writes in a run's folder
    (run / "command.txt").write_text("train.py\n")
    inference.load_model(run / "best.pth", "cpu", engine="openvino", precision="fp32")
    inference.load_model(downloads / "best.pth", "cpu", engine="openvino", precision="fp32")
    assert len(list((run / engines.RUN_CACHE).glob("openvino-*/model.xml"))) == 1
    assert sorted(p.name for p in downloads.iterdir()) == ["best.pth"]  # nothing written beside a download
