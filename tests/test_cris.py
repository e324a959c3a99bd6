"""tools/cris.py: checkpoints written by CRIS's training code load with the source model's logits, predict, evaluate,
convert and fine-tune; a mismatched, truncated, foreign or code-carrying file is refused clearly.

CRIS-format files are made from this project's models by tests/cris_files.py, whose name map is
written out independently of cris.py's.
"""

import dataclasses
import json
import pathlib
from pathlib import Path

import clip
import numpy as np
import pytest
import torch
from cris_files import SHAPES, cris_state_dict, small_model, write_cris_checkpoint
from PIL import Image
from tooling import run_tool

import evaluate
import predict
import train
from helpers import (
    checkpoints,
    inference,
    model_files,
)
from helpers.model_files import load_checkpoint
from model import PRESETS, SegVLM, SegVLMConfig, build_model
from sources import synthetic
from tools import cris

REPO = Path(__file__).resolve().parents[1]

PHRASES = ["cap", "the black baseball cap on the wooden table by the window"]


def run(args, cwd=REPO, timeout=600):
    return run_tool(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{shape: (source model, CRIS-format file)} for an RN50- and an RN101-shaped small CLIP."""
    out = tmp_path_factory.mktemp("cris")
    models = {shape: small_model(shape, seed=i) for i, shape in enumerate(SHAPES)}
    return {shape: (m, write_cris_checkpoint(m, out / f"cris_{shape}.pth")) for shape, m in models.items()}


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory):
    return synthetic.ensure_synthetic(tmp_path_factory.mktemp("synth"), num_images=12)


def logits(m, size=(64, 64), phrases=PHRASES, length=16):
    torch.manual_seed(1)
    with torch.no_grad():
        return m(torch.randn(len(phrases), 3, *size), clip.tokenize(phrases, context_length=length, truncate=True))


# --------------------------------------------------------------------------- names

def test_the_test_files_use_cris_names(files):
    """The names the issue and CRIS's code give, present in the files the other tests use."""
    sd = torch.load(files["RN101"][1], weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in sd)
    for key in ["backbone.visual.attnpool.connect.0.weight", "backbone.visual.attnpool.connect.1.running_var",
                "backbone.visual.attnpool.connect.1.num_batches_tracked", "backbone.logit_scale",
                "backbone.token_embedding.weight", "backbone.text_projection", "neck.txt_proj.1.weight",
                "neck.f1_v_proj.0.weight", "neck.norm_layer.0.weight", "neck.f2_v_proj.0.weight", "neck.f2_cat.0.weight",
                "neck.f3_v_proj.0.weight", "neck.f3_cat.0.weight", "neck.f4_proj5.0.weight", "neck.f4_proj4.0.weight",
                "neck.f4_proj3.0.weight", "neck.aggr.0.weight", "neck.coordconv.0.conv1.0.weight",
                "neck.coordconv.0.conv1.1.bias", "neck.coordconv.1.0.weight", "neck.coordconv.1.1.weight",
                "decoder.layers.1.self_attn_norm.weight", "decoder.layers.1.cross_attn_norm.bias",
                "decoder.layers.0.self_attn.in_proj_weight", "decoder.layers.0.multihead_attn.in_proj_weight",
                "decoder.layers.0.multihead_attn.out_proj.bias", "decoder.layers.0.ffn.0.weight",
                "decoder.layers.0.ffn.3.weight", "decoder.layers.0.ffn.4.bias", "decoder.layers.1.norm3.weight",
                "decoder.norm.weight", "proj.vis.1.0.weight", "proj.vis.1.1.running_mean", "proj.vis.3.0.weight",
                "proj.vis.4.weight", "proj.vis.4.bias", "proj.txt.weight"]:
        assert "module." + key in sd, key
    assert {k.split(".")[1] for k in sd} == {"backbone", "neck", "decoder", "proj"}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_names_map_back_to_this_projects(files, shape):
    source, path = files[shape]
    cris_sd = torch.load(path, weights_only=True)["state_dict"]
    ours = checkpoints.convert_state_dict(cris_sd)
    expected = source.state_dict()
    assert set(ours) == set(expected)  # logit_scale dropped, nothing else lost or added
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    assert all("module." + checkpoints.cris_name(k) in cris_sd for k in expected)  # and the inverse, for messages


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_cris_file_gives_the_source_models_logits(files, shape, capfd):
    source, path = files[shape]
    m, ckpt = load_checkpoint(path)
    note = capfd.readouterr().err
    assert "a CRIS checkpoint" in note and "enhancement block off" in note and str(path) in note
    assert f"embed_dim {SHAPES[shape]['embed_dim']}" in note and "epoch 50" in note
    assert len(note.strip().splitlines()) == 1
    src, got = source.config, m.config
    for field in checkpoints.SHAPE_FIELDS + ("transformer_heads", "decoder_heads"):
        assert getattr(got, field) == getattr(src, field), field
    assert (got.deform, got.se, got.input_size, got.word_len) == (False, False, 416, src.context_length)
    assert not list(m.enhance.parameters()) and not m.training  # the block off: CRIS's own model
    assert ckpt["source"] == "CRIS" and ckpt["cris"]["epoch"] == 50 and ckpt["cris"]["prec"]["Pr@50"] == 0.73
    for size in [(64, 64), (96, 128)]:
        assert torch.equal(logits(m, size), logits(source, size))


def test_backbones_are_read_from_the_shapes_at_full_size():
    """CRIS's RN101 and RN50 models, built on the meta device (shapes, no memory): the config read
    from a CRIS-format state dict is the paper preset's, with the block off."""
    rn50 = dict(embed_dim=1024, vision_layers=(3, 4, 6, 3))
    for name, fields in [("RN101", {}), ("RN50", rn50)]:
        cfg = dataclasses.replace(PRESETS["paper"].model, deform=False, se=False, **fields)
        with torch.device("meta"):
            sd = cris_state_dict(SegVLM(cfg))
        ckpt = checkpoints.to_segvlm_checkpoint({"state_dict": sd, "epoch": 50, "cur_iou": 0.6}, "best_model.pth")
        got = SegVLMConfig.from_dict(ckpt["config"])
        assert got == dataclasses.replace(cfg, input_size=416, word_len=77)
        assert checkpoints.backbone_name(got) == name
        assert f"backbone CLIP {name};" in checkpoints.summary(ckpt, "best_model.pth")
    with torch.device("meta"):  # CRIS's RN50 config: fpn_in 512/1024/1024, word_dim 1024
        rn50_model = SegVLM(dataclasses.replace(PRESETS["paper"].model, deform=False, se=False, **rn50))
    assert rn50_model.neck.f5_proj[0].in_channels == 1024 and rn50_model.projector.txt.in_features == 1024
    assert rn50_model.neck.f3_proj[0].in_channels == 512 and rn50_model.neck.f4_proj[0].in_channels == 1024


def test_overrides_set_what_the_file_does_not_store(files):
    _, path = files["RN50"]
    obj = torch.load(path, weights_only=True)
    ckpt = checkpoints.to_segvlm_checkpoint(obj, path, input_size=64, word_len=12, decoder_heads=4)
    assert {k: ckpt["config"][k] for k in ("input_size", "word_len", "decoder_heads")} == \
        {"input_size": 64, "word_len": 12, "decoder_heads": 4}
    with pytest.raises(ValueError, match="override embed_dim=64 contradicts the weights, which have embed_dim=128"):
        checkpoints.to_segvlm_checkpoint(obj, path, embed_dim=64)


# --------------------------------------------------------------------------- predict, evaluate, convert

def test_predict_and_evaluate_run_on_a_cris_file(files, lmdbs, tmp_path):
    source, path = files["RN101"]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    proc = run(["predict.py", "--ckpt", str(path), "--image", str(tmp_path / "photo.jpg"),
                "--phrase", "man in the red shirt", "--out", str(tmp_path / "overlay.png")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a CRIS checkpoint" in proc.stderr and "pixels" in proc.stdout
    assert Image.open(tmp_path / "overlay.png").size == (70, 45)

    # the same probabilities as the source model run at CRIS's 416 px
    image = predict.open_image(tmp_path / "photo.jpg")
    src = dataclasses.replace(source.config, input_size=416, word_len=16)
    ref = SegVLM(src).eval()
    ref.load_state_dict(source.state_dict())
    got = inference.predict_proba(predict.load_model(path, device="cpu", precision="fp32"), image, "red shirt")
    assert np.array_equal(got, inference.predict_proba(ref, image, "red shirt"))

    out = tmp_path / "test.json"
    evaluate.main(["--ckpt", str(path), "--data", str(lmdbs / "test.lmdb"), "--json", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert result["n"] > 0 and 0.0 <= result["mIoU"] <= 1.0


@pytest.mark.slow
def test_converter_writes_a_plain_checkpoint_of_this_project(files, tmp_path):
    source, path = files["RN50"]
    out = tmp_path / "converted" / "cris_rn50.pth"
    proc = run(["cris.py", "convert", str(path), str(out), "--input-size", "64", "--word-len", "12"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a CRIS checkpoint" in proc.stdout and f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["cris_rn50.pth"]  # no temporary file left
    ckpt = torch.load(out, weights_only=True)  # plain tensors, numbers and strings: no allow-list needed
    assert set(ckpt) == {"model", "config", "source", "cris", "data_dir"}
    assert set(ckpt["model"]) == set(source.state_dict())
    assert (ckpt["config"]["input_size"], ckpt["config"]["word_len"]) == (64, 12)
    assert ckpt["cris"]["file"] == path.name and ckpt["cris"]["cur_iou"] == 0.6243
    m, _ = load_checkpoint(out)
    assert torch.equal(logits(m, length=12), logits(source, length=12))

    assert run(["cris.py", "convert", str(path), str(path)]).stderr.strip().endswith(
        "the output would replace the CRIS file; choose another name")
    proc = run(["cris.py", "convert", str(out), str(tmp_path / "again.pth")])
    assert proc.returncode == 1 and "is not a CRIS checkpoint" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- fine-tuning

@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fine_tuning_starts_from_every_cris_tensor(files, shape):
    source, path = files[shape]
    run_cfg = dataclasses.replace(source.config, deform=True, se=True)
    torch.manual_seed(7)
    m, note = model_files.init_model(path, run_cfg)
    torch.manual_seed(7)
    fresh = SegVLM(run_cfg)
    assert m.config == run_cfg and list(m.enhance.parameters())
    got, src, new = m.state_dict(), source.state_dict(), fresh.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.items())  # every CRIS tensor copied
    block = [k for k in got if k.startswith("enhance.")]
    assert block and set(got) == set(src) | set(block)
    assert all(torch.equal(got[k], new[k]) for k in block)  # the block as a new run initialises it
    assert torch.count_nonzero(m.enhance.deform.offset.weight) == 0
    assert f"{len(src)} tensors copied" in note and f"{len(block)} tensors of the enhancement block are new" in note

    m.train()  # one step of SegVLM's training reaches the block and the backbone
    image, tokens = torch.randn(2, 3, 64, 64), clip.tokenize(PHRASES, context_length=16, truncate=True)
    m(image, tokens).sigmoid().mean().backward()
    assert m.enhance.se.fc1.weight.grad.abs().sum() > 0 and m.backbone.c5_residual[0].weight.grad.abs().sum() > 0


def test_train_cli_fine_tunes_from_a_cris_file(tmp_path):
    torch.manual_seed(0)
    source = build_model("smoke", deform=False, se=False).eval()
    path = write_cris_checkpoint(source, tmp_path / "best_model.pth")
    out = tmp_path / "run"
    proc = run(["train.py", "--preset", "smoke", "--init-from", str(path), "--out", str(out),
                "--cache-dir", str(tmp_path / "cache"), "--no-eval-test"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"initialised from {path} (CRIS" in proc.stdout and "enhancement block are new" in proc.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["deform"] and ckpt["config"]["se"] and ckpt["args"]["init_from"] == str(path)
    # Adam leaves a token embedding row no phrase used exactly as it was: it came from the file
    row = ckpt["model"]["backbone.token_embedding.weight"][40000]
    assert torch.equal(row, source.backbone.token_embedding.weight[40000])
    assert not torch.equal(ckpt["model"]["projector.txt.weight"], source.projector.txt.weight)  # and it trained


# --------------------------------------------------------------------------- refusals

def test_mismatches_are_errors_listing_what_differs(files, tmp_path):
    rn50, path50 = files["RN50"]
    rn101, path101 = files["RN101"]
    with pytest.raises(ValueError, match=r"does not fit the run's architecture: embed_dim: file 128, run 64; "
                                         r"vision_layers: file \(1, 1, 2, 1\), run \(1, 1, 3, 1\)"):
        model_files.init_model(path50, rn101.config)
    with pytest.raises(ValueError, match="holds a CLIP ResNet with embed_dim 64.*not the CLIP RN101 this run names"):
        model_files.init_model(path101, rn101.config, clip_name="RN101")

    sd = cris_state_dict(rn101)
    del sd["module.neck.f4_proj5.0.weight"], sd["module.decoder.layers.1.multihead_attn.in_proj_bias"]
    missing = write_cris_checkpoint(rn101, tmp_path / "missing.pth", state_dict=sd)
    for call in (lambda: load_checkpoint(missing), lambda: model_files.init_model(missing, rn101.config)):
        with pytest.raises(ValueError, match=r"missing\.pth.*missing tensor\(s\) decoder\.layers\.1\.multihead_attn"
                                             r"\.in_proj_bias, neck\.f4_proj5\.0\.weight"):
            call()

    sd = cris_state_dict(rn101)
    sd["module.neck.f5_extra.weight"] = torch.zeros(1)
    extra = write_cris_checkpoint(rn101, tmp_path / "extra.pth", state_dict=sd)
    with pytest.raises(ValueError, match=r"extra\.pth: tensors CRIS's model does not have: neck\.f5_extra\.weight"):
        load_checkpoint(extra)


def test_naming_the_files_backbone_takes_its_clip_fields(files, monkeypatch):
    """train.py --clip-weights RN50 --init-from an RN50 file: the run's CLIP is the file's. Here the
    small test shapes stand in for CLIP's RN50 and RN101."""
    monkeypatch.setattr(checkpoints, "BACKBONES", {name: {k: SHAPES[name][k] for k in ("embed_dim", "vision_layers")}
                                            for name in SHAPES})
    rn50, path50 = files["RN50"]
    rn101, _ = files["RN101"]
    with pytest.raises(ValueError, match=r"The file's backbone is CLIP RN50, the run's CLIP RN101; to fine-tune "
                                         r"on the file's, name it \(train.py --clip-weights RN50\)"):
        model_files.init_model(path50, rn101.config)
    m, note = model_files.init_model(path50, rn101.config, clip_name="RN50")
    assert m.config == rn50.config and "backbone CLIP RN50" in note and "nothing new" in note
    assert torch.equal(logits(m.eval()), logits(rn50))


def test_train_flags_for_init_from(files, tmp_path, capsys):
    _, path = files["RN101"]
    for argv, message in [
        (["--init-from", "/no/such/best_model.pth"], "--init-from /no/such/best_model.pth: no such file"),
        (["--init-from", str(path), "--resume", str(path)], "drop --init-from"),
        (["--init-from", str(path), "--clip-weights", str(path)], "--clip-weights may only name the file's backbone"),
    ]:
        with pytest.raises(SystemExit):
            train.parse_args(["--preset", "smoke", *argv])
        assert message in capsys.readouterr().err
    converted = tmp_path / "converted.pth"
    cris.convert(path, converted)
    cfg = train.parse_args(["--preset", "smoke", "--resume", str(converted)])
    with pytest.raises(ValueError, match="not a checkpoint.pth written by train.py.*use --init-from"):
        train.train(cfg)


class RunsCode:
    """Unpickling this calls Path.touch: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_truncated_foreign_and_code_carrying_files_are_refused(files, tmp_path):
    _, path = files["RN101"]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth cannot be read \(truncated or corrupt\?\)"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"module.encoder.weight": torch.zeros(2)}, "epoch": 3}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pth is not a SegVLM checkpoint.*CRIS's best_model\.pth"):
        load_checkpoint(foreign)
    with pytest.raises(ValueError, match=r"foreign\.pth is not a SegVLM checkpoint.*CRIS's best_model\.pth"):
        model_files.init_model(foreign, PRESETS["smoke"].model)  # the one reader's message, whatever the tool

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    obj = torch.load(path, weights_only=True)
    obj["scheduler"]["hook"] = RunsCode(marker)
    torch.save(obj, evil)
    for call in (lambda: load_checkpoint(evil), lambda: model_files.init_model(evil, PRESETS["smoke"].model),
                 lambda: cris.convert(evil, tmp_path / "out.pth")):
        with pytest.raises(ValueError, match=r"evil\.pth is refused: loading it needs `getattr`.*could run code"):
            call()
    Image.new("RGB", (32, 32)).save(tmp_path / "x.jpg")
    proc = run([str(REPO / "predict.py"), "--ckpt", str(evil), "--image", "x.jpg", "--phrase", "cap"], cwd=tmp_path)
    assert proc.returncode == 1 and "could run code" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_tensors_of_the_wrong_kind_or_name_are_refused_by_name(files, tmp_path):
    """An integer weight would load truncated to whole numbers, a sparse one fail inside torch, an extra one be
    taken for a foreign file: each is named, whether the file is CRIS's or this project's."""
    rn50, _ = files["RN50"]
    key, shown = "module.neck.f1_v_proj.0.weight", "neck.f1_v_proj.0.weight"
    cases = [(lambda sd: sd.__setitem__(key, sd[key].to(torch.int64)),
              f"the weight {shown} is of type torch.int64, expected a floating type"),
             (lambda sd: sd.__setitem__(key, sd[key] > 0), f"the weight {shown} is of type torch.bool"),
             (lambda sd: sd.__setitem__(key, sd[key].to_sparse()), f"the tensor {shown} is sparse"),
             (lambda sd: sd.__setitem__(key, 3), f"the entry {shown} is a int, not a tensor"),
             (lambda sd: sd.__setitem__("module.extra.weight", torch.zeros(1)),
              "tensors CRIS's model does not have: extra.weight")]
    for k, (edit, message) in enumerate(cases):
        sd = cris_state_dict(rn50)
        edit(sd)
        path = write_cris_checkpoint(rn50, tmp_path / f"case{k}.pth", state_dict=sd)
        calls = [lambda p=path: load_checkpoint(p)] + [lambda p=path: model_files.init_model(p, rn50.config),
                                                       lambda p=path: cris.convert(p, tmp_path / "out.pth")] * (k == 0)
        for call in calls:
            with pytest.raises(ValueError, match=rf"case{k}\.pth: {message}"):
                call()
    own, (ours,) = rn50.state_dict(), checkpoints.convert_state_dict({key: None})  # this project's name of key
    own[ours] = own[ours].to(torch.int32)
    torch.save({"model": own, "config": rn50.config.to_dict()}, tmp_path / "own.pth")
    with pytest.raises(ValueError, match=rf"own\.pth: the weight {ours} is of type torch.int32"):
        load_checkpoint(tmp_path / "own.pth")


@pytest.mark.slow
def test_cris_convert_exits_with_one_line_for_a_sparse_tensor(files, tmp_path):
    rn50, _ = files["RN50"]
    sd = cris_state_dict(rn50)
    sd["module.neck.f1_v_proj.0.weight"] = sd["module.neck.f1_v_proj.0.weight"].to_sparse()
    path = write_cris_checkpoint(rn50, tmp_path / "sparse.pth", state_dict=sd)
    proc = run(["cris.py", "convert", str(path), str(tmp_path / "out.pth")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "is sparse" in proc.stderr
    assert not (tmp_path / "out.pth").exists()
