"""predict.py: a mask at the image's size from the Python API and the CLI, and a clean refusal
of each bad input (not an image, a directory, a URL, a decompression bomb, an empty phrase, a foreign
or truncated checkpoint, an unknown device) and of each output that would destroy an input or cannot
be written, before the model runs. Photos are read upright (EXIF orientation)."""
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import save_model_checkpoint, smoke_checkpoint

import predict
from helpers import engines, inference

ROOT = Path(__file__).resolve().parents[1]


def png_header(width, height):
    """A PNG that declares width x height but holds almost no data: PIL checks the size on open."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return smoke_checkpoint(tmp_path_factory.mktemp("predict"), "photo.jpg", (37, 53))


def test_predict_returns_a_mask_at_the_image_size(files):
    model = predict.load_model(files / "best.pth", device="cpu")
    image = predict.open_image(files / "photo.jpg")
    mask = predict.predict(model, image, "red circle")
    assert mask.dtype == bool and mask.shape == (37, 53)
    prob = inference.predict_proba(model, image, "red circle")
    assert prob.shape == (37, 53) and 0 <= prob.min() <= prob.max() <= 1
    assert np.array_equal(mask, prob > inference.DEFAULT_THRESHOLD)
    assert inference.overlay(image, mask, "red circle").size == (53, 37)


def test_overlay_tints_the_mask_alone():
    image = Image.new("RGB", (6, 4), (0, 0, 255))
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    out = np.asarray(inference.overlay(image, mask)).astype(int)  # no phrase: no text box
    assert (out[~mask] == (0, 0, 255)).all()
    blend = 0.45 * np.array([0, 0, 255]) + 0.55 * np.array([230, 30, 30])  # (1 - alpha) image + alpha red
    assert np.abs(out[mask] - blend).max() < 1  # rounded to uint8


def test_cli_writes_overlay_and_mask(files, tmp_path):
    run = subprocess.run([sys.executable, "predict.py", "--ckpt", str(files / "best.pth"),
                          "--image", str(files / "photo.jpg"), "--phrase", "blue square",
                          "--out", str(tmp_path / "overlay.png"), "--mask", str(tmp_path / "mask.png")],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "overlay.png") as im:
        assert im.size == (53, 37) and im.mode == "RGB"
    with Image.open(tmp_path / "mask.png") as im:
        assert im.size == (53, 37) and set(np.unique(np.asarray(im))) <= {0, 255}


def test_open_image_refuses_bombs(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (11, 11)).save(tmp_path / "warn.png")  # 121 > 100: PIL only warns; we refuse
    Image.new("RGB", (15, 15)).save(tmp_path / "error.png")  # 225 > 2 x 100: PIL raises
    for name in ("warn.png", "error.png"):
        with pytest.raises(ValueError, match=f"{name}: image too large"):
            predict.open_image(tmp_path / name)


def test_bad_inputs_exit_cleanly(files, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))  # 400 M pixels, a few bytes
    raw = (files / "best.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth")
    good = ["--ckpt", str(files / "best.pth"), "--image", str(files / "photo.jpg"), "--phrase", "a shape"]
    cases = {
        "not an image": ["--image", str(tmp_path / "notes.jpg")],
        "too large to decode safely": ["--image", str(tmp_path / "bomb.png")],
        "image not found": ["--image", str(tmp_path / "missing.jpg")],
        "is a directory": ["--image", str(tmp_path)],
        "URLs are not supported, download it first": ["--image", "https://example.com/dog.jpg"],
        "phrase is empty": ["--phrase", "   "],
        "truncated or corrupt": ["--ckpt", str(tmp_path / "truncated.pth")],
        "not a SegVLM checkpoint": ["--ckpt", str(tmp_path / "foreign.pth")],
    }
    for message, change in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            predict.main(good + change)  # argparse keeps the last of a repeated flag
        assert str(exit_info.value.code).startswith("predict.py: error: ") and message in str(exit_info.value.code)


@pytest.fixture
def no_model(monkeypatch):
    """predict.load_model fails the test: the checks under test must come before it."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")
    monkeypatch.setattr(predict, "load_model", fail)


def usage_error(argv, capsys):
    """predict.main(argv)'s stderr, asserting an argparse-style usage error: exit 2, `predict.py: error:`."""
    with pytest.raises(SystemExit) as exit_info:
        predict.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "predict.py: error: " in err
    return err


def test_outputs_that_would_overwrite_an_input_are_refused(files, tmp_path, no_model, capsys):
    photo, ckpt = tmp_path / "photo.jpg", tmp_path / "best.pth"
    photo.write_bytes((files / "photo.jpg").read_bytes())
    ckpt.write_bytes(b"stands in for a checkpoint")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jpg").symlink_to(photo)
    os.link(photo, tmp_path / "hard.jpg")
    original = photo.read_bytes()
    base = ["--ckpt", str(ckpt), "--image", str(photo), "--phrase", "a shape"]
    cases = [(["--out", str(photo)], "--out"), (["--mask", str(photo)], "--mask"),
             (["--out", str(tmp_path / "sub" / ".." / "photo.jpg")], "--out"),  # another path, the same file
             (["--mask", str(tmp_path / "link.jpg")], "--mask"), (["--out", str(tmp_path / "hard.jpg")], "--out")]
    for change, flag in cases:
        assert f"{flag} {change[1]} is the --image file" in usage_error(base + change, capsys)
    assert "is the --ckpt file" in usage_error(base + ["--out", str(ckpt)], capsys)
    same = ["--out", str(tmp_path / "a.png"), "--mask", str(tmp_path / "sub" / ".." / "a.png")]
    assert "are the same file" in usage_error(base + same, capsys)
    assert photo.read_bytes() == original and ckpt.read_bytes() == b"stands in for a checkpoint"


def test_output_names_are_checked_before_the_model_runs(files, tmp_path, no_model, capsys):
    base = ["--ckpt", str(files / "best.pth"), "--image", str(files / "photo.jpg"), "--phrase", "a shape"]
    (tmp_path / "a_file").write_text("")
    cases = {str(tmp_path / "overlay"): "not an image file name PIL can write (extension missing)",
             str(tmp_path / "overlay.txt"): "not an image file name PIL can write (extension .txt)",
             str(tmp_path): "is a directory",
             str(tmp_path / "a_file" / "overlay.png"): "folder " + str(tmp_path / "a_file") + " is an existing file"}
    for path, message in cases.items():
        for flag in ("--out", "--mask"):
            err = usage_error(base + [flag, path], capsys)
            assert flag in err and message in err


def test_device_mistakes_are_reported_before_loading(files, no_model, monkeypatch, capsys):
    base = ["--ckpt", str(files / "best.pth"), "--image", str(files / "photo.jpg"), "--phrase", "a shape"]
    assert "--device: 'banana' is not a device" in usage_error(base + ["--device", "banana"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no usable CUDA GPU" in usage_error(base + ["--device", "cuda"], capsys)


def test_photos_are_read_upright_and_the_mask_fits_them(files, tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # stored 40 wide and 20 high, the left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: display the stored pixels turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    image = np.asarray(predict.open_image(tmp_path / "phone.jpg")).astype(int)
    assert image.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    assert image[:18, :, 0].min() > 200 and image[22:, :, 0].max() < 50  # the left half is now on top
    predict.main(["--ckpt", str(files / "best.pth"), "--image", str(tmp_path / "phone.jpg"), "--phrase", "red",
                  "--out", str(tmp_path / "o.png"), "--mask", str(tmp_path / "m.png"), "--device", "cpu"])
    for name in ("o.png", "m.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (20, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "o.png", "phone.jpg"]  # no temporary left


def test_cli_error_has_no_traceback(files, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    run = subprocess.run([sys.executable, "predict.py", "--ckpt", str(files / "best.pth"),
                          "--image", str(tmp_path / "notes.png"), "--phrase", "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "predict.py: error:" in run.stderr and "notes.png" in run.stderr


def _smoke_inputs(batch, size, phrase="a big red circle"):
    import clip
    return torch.randn(batch, 3, size, size), clip.tokenize([phrase] * batch, context_length=10)


def test_fast_model_on_the_cpu_is_the_eager_model_and_rejects_what_it_rejects():
    import model
    torch.manual_seed(0)
    net = model.build_model("smoke").eval()
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        fast = engines.FastSegVLM(net, amp=False, cuda_graphs=True)  # asked for explicitly on a CPU: said once
    with torch.no_grad():
        for batch, size in [(2, 64), (3, 96), (2, 64)]:
            image, tokens = _smoke_inputs(batch, size)
            assert torch.equal(fast(image, tokens), net(image, tokens))
    bad = [(torch.randn(1, 3, 60, 64), _smoke_inputs(1, 64)[1]),  # side not a multiple of 32
           (torch.randn(1, 3, 64, 64), torch.zeros(1, 5, dtype=torch.long)),  # all padding
           (torch.randn(2, 3, 64, 64), _smoke_inputs(1, 64)[1])]  # batches differ
    for image, tokens in bad:
        with pytest.raises(ValueError) as eager_error:
            net(image, tokens)
        with pytest.raises(ValueError) as fast_error:
            fast(image, tokens)
        assert str(fast_error.value) == str(eager_error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_follow_every_shape_and_never_return_a_stale_result():
    import model
    torch.manual_seed(0)
    net = model.build_model("smoke").cuda().eval()
    fast = engines.FastSegVLM(net)
    with torch.no_grad():
        for batch, size in [(2, 64), (2, 64), (2, 64), (3, 64), (3, 64), (2, 96), (2, 96), (2, 64)]:
            image, tokens = (t.cuda() for t in _smoke_inputs(batch, size, phrase=f"shape {batch} {size}"))
            out = fast(image, tokens)
            with torch.autocast("cuda", dtype=fast.dtype):
                ref = net(image, tokens)
            assert out.shape == (batch, 1, size // 4, size // 4)
            assert torch.allclose(out.float(), ref.float(), atol=0.05, rtol=0.05)  # bf16 tolerance
    assert fast.cuda_graphs and len(fast.graphs) == 3  # (2, 64), (3, 64), (2, 96) captured and replayed


def test_a_model_trained_on_synthetic_data_says_so_once(files, tmp_path, capsys):
    from helpers import provenance
    header = {"dataset": "phrasecut", "split": "train", "num_tasks": 40, "num_images": 10, "synthetic": {"seed": 0}}
    net = predict.load_model(files / "best.pth", device="cpu", engine="eager", precision="fp32")  # the plain model
    synthetic = save_model_checkpoint(net, tmp_path / "synthetic.pth",
                                      trained_on=provenance.run_record("smoke", 1, 1, 0.2, header, header))
    argv = ["--image", str(files / "photo.jpg"), "--phrase", "red circle", "--out", str(tmp_path / "o.png"),
            "--device", "cpu"]
    predict.main(["--ckpt", str(synthetic), *argv])
    err = capsys.readouterr().err
    assert err.count(provenance.SYNTHETIC_NOTE) == 1 and "predict.py: note:" in err
    predict.main(["--ckpt", str(files / "best.pth"), *argv])  # a checkpoint that does not say: no note
    assert provenance.SYNTHETIC_NOTE not in capsys.readouterr().err
