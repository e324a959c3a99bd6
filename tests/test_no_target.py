"""The no-target option: the head (off = today's model exactly), its empty answer, its loss term, RAF on an empty
mask, and the synthetic phrases that name nothing."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import data
import evaluate
import train
from helpers import train_config
from layers import NOTHING, answer_nothing, query_pool
from loss import RAFLoss
from model import PRESETS, SegVLM, SegVLMConfig, build_model, parameter_counts
from sources import phrasecut, synthetic


def inputs(cfg, batch=3):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, cfg.input_size, cfg.input_size, generator=g)
    tokens = torch.zeros(batch, cfg.word_len, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, torch.randint(1, 4000, (batch, 3), generator=g), 49407
    return image, tokens


def test_off_in_every_existing_preset_and_off_is_todays_model():
    assert [name for name, p in PRESETS.items() if p.model.no_target_head] == ["demo-gres"]
    assert dataclasses.replace(PRESETS["demo-gres"].model, no_target_head=False) == PRESETS["demo"].model
    torch.manual_seed(0)
    off = build_model("smoke")
    torch.manual_seed(0)
    on = build_model("smoke", no_target_head=True)
    assert off.no_target is None and not any("no_target" in k for k in off.state_dict())
    extra = {k for k in on.state_dict()} - set(off.state_dict())
    assert extra and all(k.startswith("no_target.") for k in extra)
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off.state_dict().items())  # same draws, same weights
    assert "no_target" not in parameter_counts(off) and parameter_counts(on)["no_target"] > 0
    off.eval(), on.eval()
    image, tokens = inputs(off.config)
    with torch.no_grad():
        plain = off(image, tokens)
        assert torch.equal(off(image, tokens, return_no_target=True)[0], plain)
        assert off(image, tokens, return_no_target=True)[1] is None
        logits, nt = on(image, tokens, return_no_target=True)
    assert torch.equal(logits, plain) and nt.shape == (3,)  # the head reads the mask path, never changes it
    saved = off.config.to_dict()
    del saved["no_target_head"]  # a config written before the field existed
    assert SegVLMConfig.from_dict(saved) == off.config


def test_a_no_target_answer_is_an_empty_mask():
    torch.manual_seed(0)
    model = build_model("smoke", no_target_head=True).eval()
    image, tokens = inputs(model.config)
    bias = model.no_target.mlp[-1].bias
    with torch.no_grad():
        raw, _ = model(image, tokens, return_no_target=True)
        bias.fill_(1e3)  # the head says "nothing" for every phrase
        assert torch.all(model(image, tokens) == NOTHING) and not (model(image, tokens).sigmoid() > 0.35).any()
        bias.fill_(-1e3)  # ... for none
        assert torch.equal(model(image, tokens), raw)
    mixed = answer_nothing(raw, torch.tensor([1.0, -1.0, 0.0]))
    assert torch.all(mixed[0] == NOTHING) and torch.equal(mixed[1:], raw[1:])  # a logit of 0 is "target"


def test_gradients_flow_through_the_head_and_its_loss_term():
    torch.manual_seed(0)
    model = build_model("smoke", no_target_head=True).train()
    image, tokens = inputs(model.config, batch=4)
    target = torch.zeros(4, 1, model.config.input_size, model.config.input_size)
    target[:2, :, 8:30, 8:30] = 1
    flags = torch.tensor([False, False, True, True])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(5)  # the same dropout draws for the reference below
    terms = train.train_step(model, image, tokens, target, RAFLoss(), optimizer, scaler, None, 0.0, None, flags, 0.5)
    assert set(terms) == {"loss", "bce", "focal", "dice", "no_target"}
    assert terms["loss"] == pytest.approx(float(terms["bce"] + terms["focal"] + terms["dice"] + 0.5 * terms["no_target"]))
    torch.manual_seed(5)
    with torch.no_grad():
        _, nt = model(image, tokens, return_no_target=True)  # lr 0: the same weights
    assert float(terms["no_target"]) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(
        nt, flags.float())), rel=1e-5)
    for name, p in model.no_target.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.decoder.layers[0].cross_attn.in_proj_weight.grad.abs().sum() > 0


def test_the_head_reads_the_picture_itself_each_phrase_with_its_image():
    """The second query reads c5 (the image encoder's own map): it changes the answer, and with phrases grouped by
    image (image_index) each phrase reads its own image's c5, as when every phrase brings its image."""
    torch.manual_seed(0)
    model = build_model("smoke", no_target_head=True).eval()
    image, tokens = inputs(model.config, batch=4)
    index = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        _, grouped = model(image[:2], tokens, index, return_no_target=True)
        _, each = model(image[index], tokens, return_no_target=True)
        torch.testing.assert_close(grouped, each)
        c3, c4, c5 = model.backbone.encode_image(image[index])
        words, state = model.backbone.encode_text(tokens)
        x = model.decoder(model.neck(c3, c4, c5, state), words, pad_mask=tokens == 0)
        logits = model.projector.text_to_pixel(model.enhance(x, model.projector.visual), state)
        torch.testing.assert_close(model.no_target(x, state, logits, c5), each)
        assert not torch.allclose(model.no_target(x, state, logits, c5.flip(0)), each)  # other pictures, other answers
    q, c = torch.randn(2, 5), torch.randn(2, 5, 3, 4)  # query_pool against a loop over positions
    pooled, best = query_pool(q, c)
    for b in range(2):
        scores = torch.tensor([float(q[b] @ c[b, :, i, j]) / 5 ** 0.5 for i in range(3) for j in range(4)])
        weights = scores.softmax(0)
        expect = sum(w * c[b, :, n // 4, n % 4] for n, w in enumerate(weights))
        torch.testing.assert_close(pooled[b], expect)
        assert float(best[b, 0]) == pytest.approx(float(scores.max()), rel=1e-5)


def test_raf_is_finite_and_sensible_on_an_empty_mask():
    loss = RAFLoss()
    empty = torch.zeros(2, 1, 16, 16)
    quiet, loud = loss(torch.full((2, 1, 16, 16), -12.0), empty), loss(torch.full((2, 1, 16, 16), 12.0), empty)
    assert all(bool(torch.isfinite(v)) for v in [*quiet.values(), *loud.values()])
    assert quiet["loss"] < 1e-3 and quiet["dice"] < 1e-3  # an empty answer to an empty mask costs ~nothing
    # eq. 6 with eps 1 on an empty target: 1 - 1 / (sum a_i p_i + 1), a_i = p_i = sigmoid(12) on every pixel
    p = float(torch.sigmoid(torch.tensor(12.0)))
    assert float(loud["dice"]) == pytest.approx(1 - 1 / (256 * p * p + 1), rel=1e-5)
    logits = torch.zeros(2, 1, 16, 16, requires_grad=True)
    loss(logits, empty)["loss"].backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).all()  # every pixel pushed towards "off"


def scene():
    """A red circle on the left, a blue square on the right, far apart, in a 100 x 100 image."""
    return [{"kind": "circle", "colour": "red", "size": "small", "r": 10, "cx": 20.0, "cy": 50.0},
            {"kind": "square", "colour": "blue", "size": "small", "r": 10, "cx": 80.0, "cy": 50.0}]


def test_the_absent_phrases_name_nothing():
    cands = {k: {p for p, _ in v} for k, v in synthetic._absent_phrases(scene(), 100, 100).items()}
    assert "red circle" not in cands["pair"] and "blue square" not in cands["pair"]
    assert {"blue circle", "red square", "green circle"} <= cands["pair"]
    assert cands["shape"] == {"triangle", "star", "diamond", "hexagon"}
    assert cands["relation"] == set()  # one shape of each kind: no relation is needed, as in the phrases that hold
    two = scene() + [{"kind": "circle", "colour": "green", "size": "large", "r": 12, "cx": 50.0, "cy": 20.0}]
    relations = {p for p, _ in synthetic._absent_phrases(two, 100, 100)["relation"]}
    # worded as the relations that hold (_phrases): both circles are clearly left of the square, so none is right
    assert {"circle right of the blue square", "circle right of the square"} <= relations
    assert "circle left of the square" not in relations  # it holds for both
    assert not any("above" in p or "below" in p for p in relations)  # one circle level with the square: too close
    assert not any("red circle" in p.split(" of ")[0] for p in relations)  # one red circle: no relation needed


class Empty(torch.nn.Module):
    """A stand-in model whose every mask is empty (the answer "no target" to every phrase)."""

    def forward(self, image, tokens):
        return torch.full((len(image), 1, image.shape[-2] // 4, image.shape[-1] // 4), -20.0)


def test_synth_adds_no_target_phrases_and_the_lmdb_keeps_the_flag(tmp_path):
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    synthetic.synthesize(plain, 24, seed=3, size=64)
    synthetic.synthesize(mixed, 24, seed=3, size=64, no_target_rate=0.3)
    for split in ("train", "val", "test"):
        a = json.loads((plain / f"refer_{split}.json").read_text())
        b = json.loads((mixed / f"refer_{split}.json").read_text())
        assert [t for t in b if not t.get("no_target")] == a  # the other phrases stay as they were
    assert all((plain / "images" / p.name).read_bytes() == p.read_bytes() for p in (mixed / "images").iterdir())
    tasks = [t for s in ("train", "val", "test", "miniv") for t in json.loads((mixed / f"refer_{s}.json").read_text())]
    nt = [t for t in tasks if t.get("no_target")]
    assert 0.1 < len(nt) / len(tasks) < 0.5 and {t["no_target_kind"] for t in nt} == set(synthetic.NO_TARGET_KINDS)
    assert all(t["Polygons"] == [] and t["instance_boxes"] == [] for t in nt)
    stats = phrasecut.build_lmdb(mixed, "train", tmp_path / "train.lmdb", progress=False)
    ds = data.PhraseCutLMDB(tmp_path / "train.lmdb", input_size=64, train=False)
    flags = ds.no_target_flags()
    assert sum(flags) == stats["no_target_tasks"] == sum(t.get("no_target", False) for t in
                                                         json.loads((mixed / "refer_train.json").read_text()))
    kinds = ds.no_target_kinds()  # the kind each no-target phrase is of, "" for the others, as evaluate reads it
    assert [bool(k) for k in kinds] == flags and set(kinds) - {""} <= set(synthetic.NO_TARGET_KINDS)
    nothing = evaluate.evaluate(Empty(), ds, device="cpu", progress=False)
    assert nothing["N_acc_by_kind"] == {k: [kinds.count(k), 1.0] for k in set(kinds) - {""}}  # every mask empty
    first = flags.index(True)
    assert ds[first]["no_target"] and not ds[first]["gt_mask"].any() and stats["empty_tasks"] == 0
    with pytest.raises(ValueError, match="no_target_rate must be between 0 and 0.5"):
        synthetic.synthesize(tmp_path / "bad", 8, no_target_rate=0.7)


def test_demo_gres_recipe():
    cfg = train_config.preset_defaults("demo-gres")
    assert cfg.synth_no_target == 0.2 and cfg.no_target_head and not train_config.TrainConfig().no_target_head
    assert dataclasses.replace(cfg, synth_no_target=0.0, preset="demo", no_target_head=False) == \
        train_config.preset_defaults("demo")
    assert SegVLM(PRESETS["demo-gres"].model).no_target is not None
    assert np.isclose(train_config.TrainConfig().w_no_target, 1.0)


def test_predict_and_predict_py_say_not_found(tmp_path):
    from PIL import Image
    from tooling import run_tool, save_model_checkpoint

    from helpers import inference
    torch.manual_seed(0)
    net = build_model("smoke", no_target_head=True)
    with torch.no_grad():
        net.no_target.mlp[-1].bias.fill_(1e3)  # every phrase names nothing
    save_model_checkpoint(net, tmp_path / "gres.pth")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    model = inference.load_model(tmp_path / "gres.pth", "cpu")
    mask = inference.predict(model, tmp_path / "p.png", "the purple star")
    assert mask.shape == (30, 40) and not mask.any()
    run = run_tool("predict.py", "--ckpt", tmp_path / "gres.pth", "--image", tmp_path / "p.png", "--phrase",
                   "the purple star", "--out", tmp_path / "o.png", "--mask", tmp_path / "m.png")
    assert run.returncode == 0, run.stderr
    assert "'the purple star': not found in the picture; overlay" in run.stdout
    assert not np.asarray(Image.open(tmp_path / "m.png")).any()


def test_a_switch_named_no_something_is_turned_on_by_its_own_flag():
    """--no-target-head turns the head on (Python 3.11's BooleanOptionalAction read its "--no-" as off), and
    --no-no-target-head off; the other switches keep their two flags."""
    assert train.parse_args(["--preset", "smoke", "--no-target-head"]).no_target_head is True
    assert train.parse_args(["--preset", "demo-gres", "--no-no-target-head"]).no_target_head is False
    assert train_config.flag_text("no_target_head", True) == "--no-target-head"
    cfg = train.parse_args(["--preset", "smoke", "--no-deform", "--se"])
    assert cfg.deform is False and cfg.se is True
