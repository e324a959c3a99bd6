"""SegVLM: shapes, CRIS's structure counted by hand, agreement with CLIP's own modules,
padding, switches, bad input, weights and checkpoints, and two small learning runs."""

import json
import math
import os
import shutil
import urllib.error

import clip
import clip.model
import pytest
import torch
import torch.nn.functional as F

import model as model_module
from helpers import checkpoints
from helpers.model_files import load_checkpoint
from loss import RAFLoss
from model import (
    PRESETS,
    EnhancementBlock,
    SegVLMConfig,
    attention_pool_tokens,
    build_model,
    dense_attention_pool,
    parameter_counts,
)

PHRASES = ["cap", "the black baseball cap on the wooden table by the window"]


def tokens_for(cfg, phrases=PHRASES, length=None):
    return clip.tokenize(phrases, context_length=length or cfg.word_len, truncate=True)


def clip_reference(cfg):
    """clip.model.CLIP with the same architecture as the config."""
    return clip.model.CLIP(cfg.embed_dim, cfg.image_resolution, tuple(cfg.vision_layers), cfg.vision_width, None,
                           cfg.context_length, cfg.vocab_size, cfg.transformer_width, cfg.transformer_heads,
                           cfg.transformer_layers)


@pytest.fixture(scope="module")
def paper_models():
    torch.manual_seed(0)
    return {"off": build_model("paper", deform=False, se=False), "on": build_model("paper")}


@pytest.fixture
def smoke():
    torch.manual_seed(0)
    return build_model("smoke").eval()


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_output_shape_small_presets(preset):
    torch.manual_seed(0)
    m = build_model(preset)
    s = m.config.input_size
    out = m(torch.randn(2, 3, s, s), tokens_for(m.config))  # train mode, phrases of different lengths
    assert out.shape == (2, 1, s // 4, s // 4)
    out = m(torch.randn(2, 3, s + 32, s + 64), tokens_for(m.config))  # any multiple of 32
    assert out.shape == (2, 1, (s + 32) // 4, (s + 64) // 4)


def test_output_shape_paper_preset(paper_models):
    m = paper_models["on"].eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 416, 416), tokens_for(m.config))
    assert out.shape == (2, 1, 104, 104)
    assert torch.isfinite(out).all()


def test_batch_is_independent_in_eval_mode(smoke):
    """Each sample's output is its own: a batch of two equals each alone (grouped dynamic conv, B = 1 and 2)."""
    torch.manual_seed(1)
    image = torch.randn(2, 3, 64, 64)
    tokens = tokens_for(smoke.config)
    with torch.no_grad():
        both = smoke(image, tokens)
        alone = torch.cat([smoke(image[i:i + 1], tokens[i:i + 1]) for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)


# --------------------------------------------------------------------------- padding

def test_padding_is_hidden(smoke, monkeypatch):
    """Word features at padded positions (token 0) change nothing: randomise them and compare."""
    torch.manual_seed(2)
    image = torch.randn(2, 3, 64, 64)
    tokens = tokens_for(smoke.config)
    assert (tokens == 0).any()
    with torch.no_grad():
        ref = smoke(image, tokens)
        encode_text = smoke.backbone.encode_text

        def noisy_padding(t):
            words, state = encode_text(t)
            words = words.clone()
            words[t == 0] = torch.randn_like(words[t == 0]) * 100
            return words, state

        monkeypatch.setattr(smoke.backbone, "encode_text", noisy_padding)
        assert torch.allclose(smoke(image, tokens), ref, atol=1e-5)


def test_padding_length_changes_nothing(smoke):
    """The same phrase padded to 6 or to word_len (10) gives the same mask."""
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        short = smoke(image, tokens_for(smoke.config, ["red cap"], length=6))
        full = smoke(image, tokens_for(smoke.config, ["red cap"]))
    assert torch.allclose(short, full, atol=1e-5)


# --------------------------------------------------------------------------- CRIS structure, counted by hand

def bottleneck(inplanes, planes, downsample):
    """CLIP's Bottleneck: 1x1, 3x3, 1x1 (x4) convs without bias, each with BN (2 params per channel)."""
    n = inplanes * planes + 2 * planes + planes * planes * 9 + 2 * planes + planes * 4 * planes + 2 * 4 * planes
    if downsample:
        n += inplanes * 4 * planes + 2 * 4 * planes
    return n


def resnet_layer(inplanes, planes, blocks):
    return bottleneck(inplanes, planes, True) + (blocks - 1) * bottleneck(4 * planes, planes, False)


def conv_bn(cin, cout, k):
    return cin * cout * k * k + 2 * cout


def attention_block(width):
    return (3 * width * width + 3 * width) + (width * width + width) + 2 * width \
        + (width * 4 * width + 4 * width) + (4 * width * width + width) + 2 * width


def test_paper_preset_has_cris_structure(paper_models):
    counts = parameter_counts(paper_models["off"])
    stem = conv_bn(3, 32, 3) + conv_bn(32, 32, 3) + conv_bn(32, 64, 3)
    layers = resnet_layer(64, 64, 3) + resnet_layer(256, 128, 4) + resnet_layer(512, 256, 23) + resnet_layer(1024, 512, 3)
    attnpool = (7 * 7 + 1) * 2048 + 3 * (2048 * 2048 + 2048) + (2048 * 512 + 512)  # pos, q/k/v, c_proj
    text = 49408 * 512 + 77 * 512 + 12 * attention_block(512) + 2 * 512 + 512 * 512  # tokens, pos, blocks, ln, proj
    c5_residual = 2048 * 512 + 2 * 512  # new conv1x1 + BN; CLIP's logit_scale is dropped
    assert counts["backbone"] == stem + layers + attnpool + text + c5_residual

    neck = (512 * 1024 + 2 * 1024  # state: linear + BN1d
            + conv_bn(512, 1024, 1) + 2 * 1024  # f5: conv1x1 c5 + BN-ReLU after the product
            + conv_bn(1024, 512, 3) + conv_bn(1024 + 512, 512, 1)  # f4
            + conv_bn(512, 256, 3) + conv_bn(256 + 512, 512, 1)  # f3
            + conv_bn(1024, 512, 3) + conv_bn(512, 512, 3) + conv_bn(512, 512, 3)  # f5, f4, f3 -> 512
            + conv_bn(1536, 512, 1) + conv_bn(514, 512, 3) + conv_bn(512, 512, 3))  # aggregate, CoordConv, conv
    assert counts["neck"] == neck

    layer = (2 * (4 * 512 * 512 + 4 * 512)  # self- and cross-attention: q, k, v, out with biases
             + (512 * 2048 + 2048) + 2 * 2048 + (2048 * 512 + 512)  # FFN with its LayerNorm(2048)
             + 5 * 2 * 512)  # norm1-3 and the two extra LayerNorms
    assert counts["decoder"] == 3 * layer + 2 * 512  # + final LayerNorm

    projector = conv_bn(512, 512, 3) + conv_bn(512, 256, 3) + (256 * 256 + 256) + 512 * (256 * 3 * 3 + 1) + (256 * 9 + 1)
    assert counts["projector"] == projector
    assert counts["enhancement"] == 0
    assert counts["total"] == counts["backbone"] + neck + 3 * layer + 2 * 512 + projector


def test_block_adds_only_its_parameters(paper_models):
    off, on = parameter_counts(paper_models["off"]), parameter_counts(paper_models["on"])
    block = ((512 * 18 * 9 + 18)  # offset conv3x3 -> 2*3*3 offsets
             + (512 * 512 * 9 + 512)  # deformable conv3x3 with bias
             + (512 * 32 + 32) + (32 * 512 + 512)  # SE: 512 -> 512/16 -> 512, with biases
             + (512 * 256 + 2 * 256))  # residual conv1x1 + BN
    assert on["enhancement"] == block
    for part in ["backbone", "neck", "decoder", "projector"]:
        assert on[part] == off[part]
    assert on["total"] - off["total"] == block


@pytest.mark.parametrize("deform,se", [(False, False), (True, False), (False, True), (True, True)])
def test_every_parameter_gets_a_gradient(deform, se):
    """DDP fails on parameters without gradients: none in any switch combination (logit_scale is dropped)."""
    torch.manual_seed(0)
    m = build_model("smoke", deform=deform, se=se)
    assert not hasattr(m.backbone, "logit_scale")
    m(torch.randn(2, 3, 64, 64), tokens_for(m.config)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    if not deform:  # the deformable conv and its shortcut are absent, not merely unused
        assert isinstance(m.enhance.deform, torch.nn.Identity) and m.enhance.residual_conv is None


def test_enhancement_forward_is_eq1_to_eq3():
    torch.manual_seed(0)
    block = EnhancementBlock(16, 8, deform=True, se=True, se_reduction=4)
    stack = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4, mode="bilinear"), torch.nn.Conv2d(16, 8, 1))
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        block.deform.offset.bias.normal_()  # non-zero offsets
        for mode in ["train", "eval"]:
            getattr(block, mode)()
            x_dcf = block.deform(x)  # eq. 1
            x_se = block.se(x_dcf)  # eq. 2
            upsampled = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
            x_res = block.residual_bn(block.residual_conv(upsampled))  # eq. 3 in its literal order
            assert torch.allclose(block(x, stack), stack(x_se) + x_res, atol=1e-5)


def test_both_switches_off_is_cris_forward(smoke):
    m = build_model("smoke", deform=False, se=False).eval()
    image, tokens = torch.randn(2, 3, 64, 64), tokens_for(m.config)
    with torch.no_grad():
        c3, c4, c5 = m.backbone.encode_image(image)
        words, state = m.backbone.encode_text(tokens)
        x = m.decoder(m.neck(c3, c4, c5, state), words, tokens == 0)
        assert torch.equal(m(image, tokens), m.projector(x, state))


# --------------------------------------------------------------------------- agreement with CLIP

def test_image_encoder_matches_clip(smoke):
    ref = clip_reference(smoke.config).eval()
    missing, unexpected = ref.load_state_dict(smoke.backbone.state_dict(), strict=False)
    assert missing == ["logit_scale"] and all(k.startswith("c5_residual.") for k in unexpected)
    seen = {}
    for name in ["layer2", "layer3", "layer4"]:
        getattr(ref.visual, name).register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o))
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = ref.encode_image(image)
        c3, c4, c5 = smoke.backbone.encode_image(image)
        assert torch.allclose(c3, seen["layer2"], atol=1e-5)
        assert torch.allclose(c4, seen["layer3"], atol=1e-5)
        assert torch.allclose(smoke.backbone.visual.layer4(c4), seen["layer4"], atol=1e-5)
        # CLIP's pool is our per-position attention with the mean token as the only query
        x = seen["layer4"]
        seq = torch.cat([x.flatten(2).mean(2, keepdim=True), x.flatten(2)], dim=2).permute(2, 0, 1)  # (1+HW, B, C)
        seq = seq + ref.visual.attnpool.positional_embedding[:, None, :]
        assert torch.allclose(attention_pool_tokens(smoke.backbone.visual.attnpool, seq)[0], pooled, atol=1e-5)


def test_dense_attention_pool_by_hand():
    """Every position attends to every position: an independent einsum computation."""
    torch.manual_seed(0)
    pool = clip.model.AttentionPool2d(3, 16, 4, 8)  # 3x3 grid, 16 channels, 4 heads, 8 out
    x = torch.randn(2, 16, 3, 3)
    tokens = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:]  # (B, 9, 16), no mean token
    def heads(t):
        return t.reshape(2, 9, 4, 4).transpose(1, 2)  # (B, heads, 9, 4)

    q, k, v = (heads(lin(tokens)) for lin in (pool.q_proj, pool.k_proj, pool.v_proj))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)  # (B, heads, 9, 9)
    out = pool.c_proj((att @ v).transpose(1, 2).reshape(2, 9, 16))  # (B, 9, 8)
    expected = out.transpose(1, 2).reshape(2, 8, 3, 3)
    with torch.no_grad():
        assert torch.allclose(dense_attention_pool(pool, x), expected, atol=1e-5)
        assert dense_attention_pool(pool, torch.randn(2, 16, 5, 4)).shape == (2, 8, 5, 4)  # resized grid


@pytest.mark.parametrize("length", [77, 10])
def test_text_encoder_matches_clip(length):
    torch.manual_seed(0)
    m = build_model("smoke", context_length=77, word_len=77).eval()
    ref = clip_reference(m.config).eval()
    ref.load_state_dict(m.backbone.state_dict(), strict=False)
    tokens = clip.tokenize(PHRASES, context_length=length, truncate=True)
    with torch.no_grad():
        words, state = m.backbone.encode_text(tokens)
        expected = ref.encode_text(tokens)
        assert words.shape == (2, length, m.config.transformer_width)
        assert torch.allclose(state, expected, atol=1e-5)
        eot = tokens.argmax(-1)
        assert torch.allclose(words[torch.arange(2), eot] @ ref.text_projection, expected, atol=1e-5)


def test_every_tensor_moves_with_the_model():
    """No tensor the forward reads may stay behind on the CPU after .to(device): on a GPU it
    would be copied over on every forward, and CUDA-graph capture (inference.FastSegVLM) fails on
    that copy. CLIP's text blocks keep their causal mask as a plain attribute; the backbone makes
    it a buffer, outside the state dict, with CLIP's values."""
    m = build_model("smoke")
    ref = clip_reference(m.config)
    assert "transformer.resblocks.0.attn_mask" not in m.backbone.state_dict()
    assert torch.equal(m.backbone.transformer.resblocks[0].attn_mask, ref.transformer.resblocks[0].attn_mask)
    m = m.to("meta")
    left = [f"{name}.{attr}" for name, mod in m.named_modules() for attr, value in vars(mod).items()
            if torch.is_tensor(value) and value.device.type != "meta"]
    left += [name for name, t in list(m.named_parameters()) + list(m.named_buffers()) if t.device.type != "meta"]
    assert not left


# --------------------------------------------------------------------------- config, input checks, autocast

def test_config_round_trip_through_json():
    for cfg in (p.model for p in PRESETS.values()):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert isinstance(d["vision_layers"], list)
        assert SegVLMConfig.from_dict(d) == cfg


def test_unknown_fields_are_errors():
    with pytest.raises(ValueError, match="valid fields.*deform"):
        build_model("smoke", defrom=False)
    with pytest.raises(ValueError, match="valid fields"):
        SegVLMConfig.from_dict({**PRESETS["smoke"].model.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match=r"21 of SegVLMConfig's 23 fields missing: \['embed_dim'"):
        SegVLMConfig.from_dict({"input_size": 64})  # not silently the paper preset's other fields
    with pytest.raises(ValueError, match="preset"):
        build_model("huge")
    with pytest.raises(ValueError, match="decoder_dim"):
        build_model("smoke", decoder_dim=64)


@pytest.mark.parametrize("image_shape,tokens,match", [
    ((1, 3, 64, 48), None, "multiples of 32"),
    ((1, 1, 64, 64), None, r"\(B, 3, H, W\)"),
    ((1, 3, 64, 64), torch.ones(1, 11, dtype=torch.long), "word_len=10"),
    ((1, 3, 64, 64), torch.ones(1, 5), "torch.long"),
    ((2, 3, 64, 64), torch.ones(1, 5, dtype=torch.long), "batch"),
    ((1, 3, 64, 64), torch.zeros(1, 5, dtype=torch.long), "all padding"),
])
def test_bad_input_is_a_clear_error(smoke, image_shape, tokens, match):
    tokens = tokens_for(smoke.config, ["cap"]) if tokens is None else tokens
    with pytest.raises(ValueError, match=match):
        smoke(torch.randn(image_shape), tokens)
    with pytest.raises(ValueError, match="float"):
        smoke(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), tokens_for(smoke.config, ["cap"]))


def test_runs_under_bfloat16_autocast():
    torch.manual_seed(0)
    m = build_model("smoke")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 64, 64), tokens_for(m.config))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out.float()).all()
    RAFLoss()(out, torch.ones(2, 1, 64, 64))["loss"].backward()


# --------------------------------------------------------------------------- CLIP weights

@pytest.fixture
def clip_file(tmp_path):
    torch.manual_seed(3)
    ref = clip_reference(PRESETS["smoke"].model)
    path = tmp_path / "clip_smoke.pt"
    torch.save(ref.state_dict(), path)
    return path, ref


def test_loads_clip_state_dict(clip_file):
    path, ref = clip_file
    m = build_model("smoke", clip_weights=str(path), transformer_heads=2)
    for k, v in m.backbone.state_dict().items():
        if not k.startswith("c5_residual."):
            assert torch.equal(v, ref.state_dict()[k]), k


@pytest.mark.filterwarnings("ignore")  # tracing's own deprecation and TracerWarnings
def test_loads_openai_torchscript_archive(clip_file, tmp_path):
    """OpenAI's .pt files are TorchScript archives of the whole CLIP model; a traced small CLIP is one too."""
    _, ref = clip_file
    example = (torch.randn(1, 3, 64, 64), clip.tokenize(["a cap"], context_length=ref.context_length))
    archive = tmp_path / "clip_smoke_jit.pt"
    torch.jit.trace(ref.eval(), example, check_trace=False).save(str(archive))
    m = build_model("smoke", clip_weights=str(archive), transformer_heads=2)
    assert torch.equal(m.backbone.token_embedding.weight, ref.token_embedding.weight)


def test_clip_fields_come_from_the_weights(clip_file):
    path, _ = clip_file
    with pytest.raises(ValueError, match="vision_width"):
        build_model("smoke", clip_weights=str(path), vision_width=16)
    m = build_model("paper", clip_weights=str(path), transformer_heads=2, word_len=10, deform=False, se=False)
    assert m.config.vision_width == PRESETS["smoke"].model.vision_width  # the weights win over the preset


def test_missing_clip_weights_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="clip_weights=None"):
        build_model("smoke", clip_weights=str(tmp_path / "nowhere.pt"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(model_module.clip, "load", offline)
    with pytest.raises(RuntimeError, match=r"clip.load\('RN101'.*clip_weights=None"):
        build_model("paper", clip_weights="RN101")


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_and_failures(tmp_path, smoke):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": smoke.state_dict(), "config": smoke.config.to_dict(), "epoch": 3}, path)
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and not loaded.training
    image, tokens = torch.randn(1, 3, 64, 64), tokens_for(smoke.config, ["cap"])
    with torch.no_grad():
        assert torch.equal(loaded(image, tokens), smoke(image, tokens))

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    shutil.copy(path, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": smoke.state_dict()}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a SegVLM checkpoint"):
        load_checkpoint(foreign)
    odd = tmp_path / "odd.pt"
    torch.save({"model": smoke.state_dict(), "config": {**smoke.config.to_dict(), "colour": 1}}, odd)
    with pytest.raises(ValueError, match="odd.pt.*colour"):
        load_checkpoint(odd)
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path} is a directory"):
        load_checkpoint(tmp_path)


def test_config_fragments_and_misfitting_weights_are_summarised(tmp_path, smoke, monkeypatch):
    sd, cfg = smoke.state_dict(), smoke.config.to_dict()
    torch.save({"model": sd, "config": {"input_size": 64, "word_len": 10}}, tmp_path / "fragment.pt")

    def build(cfg):
        raise AssertionError("a model was built from a fragment of a config")
    monkeypatch.setattr(checkpoints, "SegVLM", build)
    with pytest.raises(ValueError, match=r"fragment.pt is not a SegVLM checkpoint: bad config: 20 of .* "
                                         r"fields missing: \['embed_dim', 'image_resolution'") as error:
        load_checkpoint(tmp_path / "fragment.pt")
    assert len(str(error.value)) < 600
    monkeypatch.undo()
    block = sum(k.startswith("enhance.") for k in sd)
    cases = {"no_block": ({**cfg, "deform": False, "se": False}, sd,  # the weights hold a block the config lacks
                          rf"{block} unexpected \(e.g. enhance\.deform\.weight, "),
             "wider": ({**cfg, "decoder_ffn": 96}, sd, r"\d+ of another shape \(e.g. decoder\.layers\.0\.\S+ "
                                                         r"\(64, 32\) for \(96, 32\)"),
             "partial": (cfg, {k: v for k, v in sd.items() if not k.startswith("backbone.")},
                         rf"{sum(k.startswith('backbone.') for k in sd)} missing \(e.g. backbone\.")}
    for name, (config, weights, message) in cases.items():
        torch.save({"model": weights, "config": config}, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=f"{name}.pt: the weights do not fit the model its config "
                                             f"describes: {message}") as error:
            load_checkpoint(tmp_path / f"{name}.pt")
        assert len(str(error.value)) < 600  # counts and three names, not torch's list of every key


def test_code_carrying_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    torch.save({"model": Payload(), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt is refused: loading it needs `\S*mkdir`.*could run code") as error:
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "weights_only" not in str(error.value)  # torch's hint to turn the protection off is not passed on


# --------------------------------------------------------------------------- learning

def square_scene(left: bool, red_left: bool = True):
    """A grey 64x64 image with a red and a blue square side by side; the mask of the left or right one."""
    red, blue = torch.tensor([1.0, 0.0, 0.0])[:, None, None], torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    image = torch.full((3, 64, 64), 0.5)
    image[:, 20:44, 4:28] = red if red_left else blue
    image[:, 20:44, 36:60] = blue if red_left else red
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:44, 4:28] = 1 if left else 0
    mask[:, 20:44, 36:60] = 0 if left else 1
    return (image - 0.5) / 0.25, mask


def iou(logits, mask):
    """IoU at the logits' resolution (H/4), where the loss sees the mask."""
    pred = logits > 0
    mask = F.interpolate(mask, size=logits.shape[-2:], mode="nearest")
    inter = (pred & (mask > 0.5)).sum((1, 2, 3)).float()
    union = (pred | (mask > 0.5)).sum((1, 2, 3)).float()
    return inter / union


def train(m, images, tokens, masks, steps):
    torch.manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # settles the weights
    loss_fn = RAFLoss()
    m.train()
    for _ in range(steps):
        loss = loss_fn(m(images, tokens), masks)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()


def test_overfits_one_triple():
    """One image-phrase-mask triple. BatchNorm1d needs two samples in training mode, so the batch
    holds the triple twice; IoU is measured in that same training-mode forward (dropout off),
    because BN running statistics over identical samples are degenerate."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = build_model("smoke", decoder_dropout=0.0)
    image, mask = square_scene(left=True)
    images, masks = image.expand(2, -1, -1, -1), mask.expand(2, -1, -1, -1)
    tokens = tokens_for(m.config, ["the red square"] * 2)
    train(m, images, tokens, masks, steps=150)
    with torch.no_grad():
        assert iou(m(images, tokens), masks).min() > 0.9


@pytest.mark.slow
def test_two_phrases_two_masks():
    """The same image, "left square" and "right square": after training, eval mode gives two different masks.

    Training also sees the image with the colours swapped, so that the phrase, not the colour,
    decides, and BatchNorm's running statistics come from more than two samples."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = build_model("smoke")
    scenes = [square_scene(left, red_left) for red_left in (True, False) for left in (True, False)]
    images, masks = torch.stack([s[0] for s in scenes]), torch.stack([s[1] for s in scenes])
    tokens = tokens_for(m.config, ["the left square", "the right square"] * 2)
    train(m, images, tokens, masks, steps=300)
    m.eval()
    with torch.no_grad():
        logits = m(images[:2], tokens[:2])  # one image, two phrases
    assert iou(logits, masks[:2]).min() > 0.9, iou(logits, masks[:2])
    assert not torch.equal(logits[0] > 0, logits[1] > 0)


def test_image_index_equals_repeating_the_images(smoke):
    """Several phrases of one image: the image encoder runs once per distinct image (image_index),
    and in eval mode the result equals the plain forward on the repeated images."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    index = torch.tensor([0, 0, 1, 0, 1])
    tokens = tokens_for(smoke.config, ["red circle", "all circles", "blue star left of the square",
                                       "small shape", "star"])
    calls = []
    hooks = [mod.register_forward_hook(lambda m, args, out, name=name: calls.append((name, len(args[0]))))
             for name, mod in [("conv1", smoke.backbone.visual.conv1), ("f3_proj", smoke.neck.f3_proj),
                               ("f4_cat", smoke.neck.f4_cat)]]
    with torch.no_grad():
        shared = smoke(images, tokens, image_index=index)
        plain = smoke(images[index], tokens)
    for h in hooks:
        h.remove()
    # the image encoder and the neck's projection of its maps once per image; the fusion with the phrase per phrase
    assert calls == [("conv1", 2), ("f3_proj", 2), ("f4_cat", 5), ("conv1", 5), ("f3_proj", 5), ("f4_cat", 5)]
    assert shared.shape == (5, 1, 16, 16)
    assert torch.allclose(shared, plain, atol=1e-5)


def test_image_index_with_one_phrase_per_image_equals_the_plain_forward_in_train_mode(smoke):
    """With each image used once, image_index is only a reordering: BatchNorm's batch statistics are
    the same, so even in train mode the logits and gradients equal the plain forward's."""
    torch.manual_seed(2)
    images = torch.randn(3, 3, 64, 64)
    index = torch.tensor([2, 0, 1])
    tokens = tokens_for(smoke.config, ["red circle", "blue star left of the square", "small shape"])
    smoke.train()
    torch.manual_seed(3)  # the decoder's dropout draws the same masks in both passes
    shared = smoke(images, tokens, image_index=index)
    grads = torch.autograd.grad(shared.square().sum(), smoke.neck.f3_proj[0].weight)
    torch.manual_seed(3)
    plain = smoke(images[index], tokens)
    want = torch.autograd.grad(plain.square().sum(), smoke.neck.f3_proj[0].weight)
    smoke.eval()
    assert torch.allclose(shared, plain, atol=1e-5)
    assert torch.allclose(grads[0], want[0], atol=1e-5 * want[0].abs().max())


@pytest.mark.parametrize("index, match", [
    (torch.tensor([0, 1]), r"must be a \(3,\) torch.long tensor"),
    (torch.tensor([0.0, 1.0, 1.0]), "torch.long"),
    (torch.tensor([0, 2, 1]), r"must lie in \[0, 2\)"),
    (torch.tensor([0, -1, 1]), r"must lie in \[0, 2\)"),
])
def test_bad_image_index_is_a_clear_error(smoke, index, match):
    tokens = tokens_for(smoke.config, ["a", "b", "c"])
    with pytest.raises(ValueError, match=match):
        smoke(torch.zeros(2, 3, 64, 64), tokens, image_index=index)
