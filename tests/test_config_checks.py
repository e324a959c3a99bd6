"""Settings and files that would give a silently wrong result are refused where they enter: the model
config (every path into it: train flags, a checkpoint, cris.py convert's flags, --init-from), a
checkpoint's weights, a lossy mask format, milestones, training flags that cannot work, an image file
far beyond any real image; and the messages a user meets name what to do, in whole characters."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from cris_files import small_model, write_cris_checkpoint
from PIL import Image
from tooling import run_tool, save_model_checkpoint

from helpers import (
    checkpoints,
    inference,
    model_files,
    train_config,
    transforms,
)
from model import PRESETS, SegVLMConfig, build_model

REPO = Path(__file__).resolve().parents[1]


tool = run_tool


def save(net, path, **config):
    save_model_checkpoint(net, path, config={**net.config.to_dict(), **config})
    return path


SMOKE = PRESETS["smoke"].model


# --- the model config checks itself -----------------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("word_len", 2, "word_len must be at least 3"),
    ("word_len", 1, "word_len must be at least 3"),
    ("input_size", 0, "input_size must be a positive integer"),
    ("input_size", -64, "input_size must be a positive integer"),
    ("input_size", 64.0, "input_size must be a positive integer"),
    ("decoder_heads", 0, "decoder_heads must be a positive integer"),
    ("transformer_layers", True, "transformer_layers must be a positive integer"),
    ("vision_layers", (1, 0, 1, 1), "vision_layers must be 4 positive integers"),
    ("fpn_out", (16, 32, -64), "fpn_out must be 3 positive integers"),
    ("deform", "no", "deform must be true or false"),
    ("se", 1, "se must be true or false"),
    ("decoder_dropout", 1.5, "decoder_dropout must be in [0, 1)"),
    ("decoder_dropout", float("nan"), "decoder_dropout must be in [0, 1)"),
    ("kernel_size", 2, "kernel_size must be odd"),
    ("vision_width", 1, "vision_width must be at least 2"),
    ("vocab_size", 100, "vocab_size must be at least 49408"),
    ("se_reduction", 64, "se_reduction"),
])
def test_a_bad_field_is_refused_by_name(field, value, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        dataclasses.replace(SMOKE, **{field: value})
    with pytest.raises(ValueError, match=field):
        SegVLMConfig.from_dict({**SMOKE.to_dict(), field: value})


def test_every_config_this_project_writes_still_validates(tmp_path):
    for preset in PRESETS.values():
        SegVLMConfig.from_dict(preset.model.to_dict())
    ckpt = checkpoints.to_segvlm_checkpoint(torch.load(write_cris_checkpoint(small_model("RN50"), tmp_path / "c.pth"),
                                                       weights_only=False), tmp_path / "c.pth")
    SegVLMConfig.from_dict(ckpt["config"])


def test_every_path_into_the_config_names_the_field_and_where_it_came_from(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_config.parse_args(["--preset", "smoke", "--word-len", "2"])
    assert exc.value.code == 2 and "--word-len 2: word_len must be at least 3" in capsys.readouterr().err
    net = build_model("smoke")
    bad = save(net, tmp_path / "bad.pth", deform="no")
    with pytest.raises(ValueError, match=f"{bad}.*deform must be true or false"):
        model_files.load_checkpoint(bad)
    with pytest.raises(ValueError, match=f"{bad}.*deform must be true or false"):
        model_files.init_model(bad, SMOKE)
    short = save(net, tmp_path / "short.pth", word_len=2)
    proc = tool("evaluate.py", "--ckpt", short, "--data", tmp_path / "none.lmdb")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{short}" in proc.stderr and "word_len must be at least 3" in proc.stderr


# --- weights ---------------------------------------------------------------------------------------


def test_a_non_finite_weight_is_refused_at_load_naming_the_tensor(tmp_path):
    net = build_model("smoke")
    sd = net.state_dict()
    name = "decoder.layers.0.ffn.0.weight"
    sd[name][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"model": sd, "config": net.config.to_dict()}, path)
    with pytest.raises(ValueError, match=f"{path}: the weight {name} holds NaN or infinite values"):
        model_files.load_checkpoint(path)
    with pytest.raises(ValueError, match=f"{name} holds NaN or infinite values"):
        model_files.init_model(path, SMOKE)
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30)).save(image)
    proc = tool("predict.py", "--ckpt", path, "--image", image, "--phrase", "a cup", "--out", tmp_path / "o.png")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and name in proc.stderr
    assert not (tmp_path / "o.png").exists()
    model = small_model("RN50")
    with torch.no_grad():
        model.projector.txt.weight[0, 0] = float("inf")
    cris_path = write_cris_checkpoint(model, tmp_path / "cris_inf.pth")
    with pytest.raises(ValueError, match="proj.txt.weight holds NaN or infinite values"):
        model_files.load_checkpoint(cris_path)


# --- flags that contradict what a command is for ---------------------------------------------------


@pytest.mark.parametrize("name", ["m.jpg", "m.jpeg", "m.webp"])
def test_a_lossy_mask_format_is_refused(tmp_path, name):
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30)).save(image)
    proc = tool("predict.py", "--ckpt", tmp_path / "any.pth", "--image", image, "--phrase", "a",
                "--out", tmp_path / "o.png", "--mask", tmp_path / name)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--mask {tmp_path / name}" in proc.stderr and "lossy" in proc.stderr and ".png" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--milestones", "30", "15"], "--milestones must be in increasing order, got 30 15"),
    (["--milestones", "5", "5"], "--milestones must be in increasing order, got 5 5"),
])
def test_unsorted_or_repeated_milestones_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_config.parse_args(["--preset", "smoke"] + argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_milestones_beyond_the_last_epoch_are_noted(capsys):
    train_config.parse_args(["--preset", "demo", "--epochs", "4", "--milestones", "2", "6"])
    assert ("note: --milestones 6 is not before --epochs 4: the rates never decay there"
            in capsys.readouterr().err)
    train_config.parse_args(["--preset", "demo", "--epochs", "8", "--milestones", "2", "6"])
    assert "note" not in capsys.readouterr().err


# --- flags that cannot work are refused before the long work ---------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1"], "--batch-size 1: BatchNorm needs at least 2 samples per process"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--w-focal", "nan"], "--w-focal must be a finite number, got nan"),
    (["--w-dice", "inf"], "--w-dice must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--w-bce", "0", "--w-focal", "0", "--w-dice", "0"], "the loss would be 0"),
])
def test_training_flags_that_cannot_work_are_refused_at_once(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_config.parse_args(["--preset", "smoke"] + argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


# --- memory bounded by the real data ----------------------------------------------------------------


def test_an_image_file_far_beyond_any_image_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (8, 8)).save(path)
    with open(path, "r+b") as f:
        f.truncate(Image.MAX_IMAGE_PIXELS * 8 + 1)  # sparse: no disk used
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("the file was opened"))
    with pytest.raises(ValueError, match=f"{path} is .* far beyond any image PIL decodes"):
        inference.open_image(path)


# --- clearer messages -------------------------------------------------------------------------------


def test_a_run_that_died_before_its_first_checkpoint_is_described(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "command.txt", "git.txt"):
        (out / name).write_text("{}")
    with pytest.raises(SystemExit):
        train_config.parse_args(["--preset", "smoke", "--out", str(out)])
    err = capsys.readouterr().err.split("valid flags:")[0]
    assert "--resume" not in err
    assert (f"--out {out} holds a run that stopped before its first checkpoint (config.json); nothing to "
            f"resume: delete {out} or give a new --out") in err


def test_a_cut_phrase_is_whole_characters_and_a_long_one_is_printed_once_and_short(tmp_path):
    kept = transforms.kept_words("日本語の文章です" * 3, 8)
    assert kept and "\ufffd" not in kept and ("日本語の文章です" * 3).startswith(kept)
    net = build_model("smoke")
    path = save(net, tmp_path / "best.pth")
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30)).save(image)
    phrase = "the red cup " * 834  # 10,008 characters
    proc = tool("predict.py", "--ckpt", path, "--image", image, "--phrase", phrase, "--out", tmp_path / "o.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout + proc.stderr
    assert len(printed) < 2000 and "(10,007 characters)" in printed
