"""SegVLM: CRIS (CLIP-driven referring image segmentation) plus the
deformable-attentive visual enhancement block of the paper (eq. 1-3).

    image (B, 3, H, W) + tokens (B, L)  ->  logits (B, 1, H/4, W/4)

Data flow, shapes for the "paper" preset at 416x416 (paper §3, CRIS's code):

    CLIPBackbone.encode_image  c3 (B, 512, 52, 52), c4 (B, 1024, 26, 26), c5 (B, 512, 13, 13)
    CLIPBackbone.encode_text   words (B, L, 512), state (B, 512)
    FPN (neck)                 (B, 512, 26, 26), text-conditioned at c5
    Decoder                    (B, 512, 26, 26), visual tokens attend to the words
    EnhancementBlock (eq. 1-3) deformable conv -> SE -> projector's upsampling -> + residual
    Projector                  (B, 256, 104, 104) -> text-to-pixel dynamic conv -> (B, 1, 104, 104)

With `deform=False, se=False` the enhancement block is the identity (no
parameters) and the model is exactly the CRIS baseline.

    from model import build_model
    model = build_model("demo")                     # random weights, small, CPU-trainable
    model = build_model("paper", clip_weights="RN101", deform=False, se=False)
    python model.py --preset demo                   # parameter counts; timing: python -m tools.benchmark
A model file (a checkpoint, CRIS's best_model.pth, a model folder, an ONNX graph) is read by helpers/model_files.py.
"""

import argparse
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

from helpers.clip_weights import clip, clip_fields_from_state_dict, load_clip_state_dict  # clip, without its import's warning
from helpers.inputs import check_inputs
from layers import (
    FPN,
    Decoder,
    DeformableConv2d,
    NoTargetHead,
    Projector,
    answer_nothing,
    attention_pool_tokens,  # noqa: F401  (CLIP's pool at every position: model's c5, and the tests')
    dense_attention_pool,
    up,
)

# --------------------------------------------------------------------------- config

CLIP_VOCAB_SIZE = 49408  # the ids clip.tokenize gives

DEFAULT_THRESHOLD = 0.35  # the mask is sigmoid(logits) > 0.35, CRIS's cut (its test script); evaluate.py

# Each size field's largest value (a tuple's every entry): an edited config cannot make a tool allocate GBs (docs/choices.md)
LIMITS = dict(embed_dim=4096, image_resolution=1024, vision_layers=64, vision_width=512, context_length=512,
              vocab_size=262144, transformer_width=4096, transformer_heads=64, transformer_layers=48, fpn_out=4096,
              decoder_layers=24, decoder_dim=4096, decoder_heads=64, decoder_ffn=16384, proj_dim=4096, kernel_size=15,
              se_reduction=4096, input_size=1024, word_len=512)


class ConfigError(ValueError):
    """A bad SegVLMConfig value; `field` names it, so that a tool can name the flag or file it came from."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class SegVLMConfig:
    """Every size of SegVLM. `to_dict()` / `from_dict()` make it a plain, JSON-able dict,
    so a checkpoint can rebuild its own model. Defaults are the "paper" preset."""

    # CLIP vision (ModifiedResNet); its attention pool has vision_width*32//64 heads, CLIP's rule
    embed_dim: int = 512              # CLIP's joint embedding: c5 channels and sentence state size
    image_resolution: int = 224       # CLIP's pretraining size: sets the attention pool's 7x7 grid
    vision_layers: tuple = (3, 4, 23, 3)
    vision_width: int = 64            # c3 has vision_width*8 channels, c4 vision_width*16
    # CLIP text
    context_length: int = 77          # length of CLIP's positional embedding (>= word_len)
    vocab_size: int = 49408           # CLIP's BPE vocabulary; clip.tokenize needs it
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    # neck (FPN); its inputs are c3, c4, c5, so CRIS's fpn_in follows from the CLIP fields
    fpn_out: tuple = (256, 512, 1024)
    # decoder
    decoder_layers: int = 3
    decoder_dim: int = 512            # must equal fpn_out[1], the FPN's output channels
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    decoder_dropout: float = 0.1
    # projector
    proj_dim: int = 256               # channels of the map the dynamic kernel convolves
    kernel_size: int = 3              # dynamic kernel size
    # enhancement (Table 2's switches)
    deform: bool = True               # deformable conv (eq. 1) with the residual shortcut (eq. 3)
    se: bool = True                   # squeeze-and-excitation (eq. 2)
    se_reduction: int = 16            # SE squeeze: channels // 16, as in Hu et al. 2018
    # generalized referring segmentation (off in the paper's presets: exactly the paper's, CRIS's model)
    no_target_head: bool = False      # a phrase may name nothing: layers.NoTargetHead, its mask then empty
    # input
    input_size: int = 416             # training/eval side; forward accepts any multiple of 32
    word_len: int = 22                # longest token sequence accepted

    def __post_init__(self):
        """Every field checked where it is defined, so that each path into a config (a preset's overrides,
        a checkpoint's dict, train.py's and tools/cris.py's flags) is: a ConfigError names the field."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, self.check_field(f.name, getattr(self, f.name)))
        if self.decoder_dim != self.fpn_out[1]:
            raise ConfigError("decoder_dim", f"decoder_dim ({self.decoder_dim}) must equal fpn_out[1] ({self.fpn_out[1]})")
        if self.word_len > self.context_length:
            raise ConfigError("word_len", f"word_len ({self.word_len}) exceeds CLIP's context_length "
                                          f"({self.context_length})")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ConfigError("decoder_heads", f"decoder_dim ({self.decoder_dim}) must divide by decoder_heads "
                                               f"({self.decoder_heads}) and by 4")
        if self.transformer_width % self.transformer_heads:
            raise ConfigError("transformer_heads", f"transformer_width ({self.transformer_width}) must divide by "
                                                   f"transformer_heads ({self.transformer_heads})")
        if self.se_reduction > self.decoder_dim:
            raise ConfigError("se_reduction", f"se_reduction ({self.se_reduction}) must be at most decoder_dim "
                                              f"({self.decoder_dim}): SE squeezes to decoder_dim // se_reduction")

    @classmethod
    def check_field(cls, name: str, value):
        """One field's value on its own (its type, its range) -> the value, tuples as tuples; a ConfigError
        naming the field otherwise. The checks between fields are __post_init__'s."""
        kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]

        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        if kind in ("bool", bool):
            if not isinstance(value, bool):
                raise ConfigError(name, f"{name} must be true or false, got {value!r}")
        elif kind in ("tuple", tuple):
            size = len(getattr(cls, name))
            if not isinstance(value, (tuple, list)) or len(value) != size or not all(map(count, value)):
                raise ConfigError(name, f"{name} must be {size} positive integers, got {value!r}")
            value = tuple(value)
        elif kind in ("float", float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(name, f"{name} must be in [0, 1), got {value!r}")  # decoder_dropout, a rate
        elif not count(value):
            raise ConfigError(name, f"{name} must be a positive integer, got {value!r}")
        if name in LIMITS and any(v > LIMITS[name] for v in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(name, f"{name} must be at most {LIMITS[name]} (model.LIMITS), got {value!r}")
        elif name in ("input_size", "image_resolution") and value % 32:
            raise ConfigError(name, f"{name} must be a multiple of 32 (the image encoder's stride), got {value}")
        elif name == "word_len" and value < 3:
            raise ConfigError(name, f"word_len must be at least 3 (a start token, one word, an end token), got "
                                    f"{value}: a shorter one leaves no room for the phrase")
        elif name == "kernel_size" and value % 2 == 0:
            raise ConfigError(name, f"kernel_size must be odd (a centred dynamic kernel), got {value}")
        elif name == "vision_width" and value % 2:
            raise ConfigError(name, f"vision_width must be at least 2 and even (CLIP's attention pool has "
                                    f"vision_width / 2 heads of 64 channels), got {value}")
        elif name == "vocab_size" and value < CLIP_VOCAB_SIZE:
            raise ConfigError(name, f"vocab_size must be at least {CLIP_VOCAB_SIZE} (CLIP's tokenizer's ids), "
                                    f"got {value}")
        return value

    def to_dict(self) -> dict:
        """Plain dict of ints, floats, bools and lists (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SegVLMConfig":
        """Inverse of `to_dict` (lists back to tuples): every field, no other key, else a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a dict of SegVLMConfig's fields, got {type(d).__name__}")
        unknown = sorted(set(d) - set(config_fields()))
        if unknown:
            raise ValueError(f"unknown SegVLMConfig field(s) {unknown}; valid fields: {config_fields()}")
        d = {**LATER_FIELDS, **d}  # a config saved before a field existed ran without it
        missing = [k for k in config_fields() if k not in d]
        if missing:
            raise ValueError(f"{len(missing)} of SegVLMConfig's {len(config_fields())} fields missing: {missing}")
        return cls(**d)  # __post_init__ turns lists back into tuples


LATER_FIELDS = {"no_target_head": False}  # fields newer than saved configs, at the value that means "as before"


def config_fields() -> list:
    return [f.name for f in dataclasses.fields(SegVLMConfig)]


@dataclass(frozen=True)
class Preset:
    """A named model and the recipe that trains it, in one place (as nanoGPT's config files)."""
    model: SegVLMConfig
    recipe: dict  # train_config.TrainConfig fields where it departs from the paper's recipe (TrainConfig's defaults)


# CLIP's architecture scaled down to train on a CPU in minutes, from scratch (so the backbone gets the full
# rate), on the synthetic set; why each value: docs/measurements.md, "The demo preset".
DEMO_MODEL = SegVLMConfig(
    embed_dim=64, image_resolution=192, vision_layers=(1, 1, 1, 1), vision_width=16,
    context_length=16, transformer_width=64, transformer_heads=2, transformer_layers=2,
    fpn_out=(32, 48, 96), decoder_layers=2, decoder_dim=48, decoder_heads=4, decoder_ffn=144,
    proj_dim=32, se_reduction=8, input_size=192, word_len=16, decoder_dropout=0.0)
DEMO_RECIPE = dict(epochs=8, batch_size=16, lr=1e-3, backbone_lr_scale=1.0, milestones=[7.5], num_workers=1,
                   group_by_image=True, freeze_token_embedding=True)

PRESETS = {
    # CRIS with CLIP RN101 at 416x416, trained by the paper's recipe (§4.2).
    "paper": Preset(SegVLMConfig(), recipe=dict(clip_weights="RN101", num_workers=4)),
    # the CPU demo (DEMO_MODEL above)
    "demo": Preset(DEMO_MODEL, recipe=DEMO_RECIPE),
    # The demo with phrases that name nothing (a share of the synthetic phrases) and the no-target head on:
    # generalized referring segmentation (gRefCOCO's task, docs/choices.md), on a CPU.
    "demo-gres": Preset(dataclasses.replace(DEMO_MODEL, no_target_head=True),
                        recipe=dict(DEMO_RECIPE, synth_no_target=0.2, no_target_head=True)),
    # CRIS's own recipe on RefCOCO/RefCOCO+ (its config/refcoco*/cris_r101.yaml): CLIP RN101 at 416 px,
    # word length 17, 50 epochs, lr 1e-4 x 0.1 at epoch 35, backbone at 0.1x, batch 64, BCE, and CRIS's
    # model (no deformable conv, no SE). `--deform --se --loss raf` trains SegVLM by the same recipe.
    "cris-refcoco": Preset(SegVLMConfig(word_len=17, deform=False, se=False),
                           recipe=dict(clip_weights="RN101", num_workers=4, milestones=[35], loss="bce",
                                       deform=False, se=False)),
    # The same for RefCOCOg (G-Ref), whose expressions are longer: word length 22.
    "cris-refcocog": Preset(SegVLMConfig(word_len=22, deform=False, se=False),
                            recipe=dict(clip_weights="RN101", num_workers=4, milestones=[35], loss="bce",
                                        deform=False, se=False)),
    # The smallest that still exercises every part, for tests.
    "smoke": Preset(
        SegVLMConfig(
            embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
            context_length=12, transformer_width=32, transformer_heads=2, transformer_layers=1,
            fpn_out=(16, 32, 64), decoder_layers=1, decoder_dim=32, decoder_heads=2, decoder_ffn=64,
            proj_dim=16, se_reduction=4, input_size=64, word_len=10),
        recipe=dict(epochs=1, batch_size=4, lr=1e-3, backbone_lr_scale=1.0, milestones=[100], synth_images=12,
                    num_workers=0)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------- CLIP encoders

class CLIPBackbone(clip.model.CLIP):
    """CLIP's image and text encoders, returning maps and word features instead of one vector each.

    This *is* `clip.model.CLIP` (ModifiedResNet, AttentionPool2d, Transformer),
    so OpenAI's state dict loads into it under the same key names, with two changes:

    - `logit_scale` is deleted: only CLIP's contrastive forward uses it, and a
      parameter that never gets a gradient makes DistributedDataParallel fail.
      It is dropped, not frozen, so it is neither trained nor saved.
    - `c5_residual` (conv1x1 + BN, 2048 -> embed_dim for RN101) is new. It
      lives here, as in CRIS's code, so it trains at the backbone's learning rate.

    c5 path (CRIS's model/clip.py): CLIP's attention pool is applied at every position
    instead of once. Each of the H*W tokens queries all tokens; there is no mean
    token; the pool's positional embedding without its first row (the mean
    token's) is resized bicubically from CLIP's 7x7 grid to the map size; then
    c_proj, plus `c5_residual` on the raw layer4 map, and ReLU. This is what
    CRIS's modified AttentionPool2d computes; here it reuses CLIP's unmodified
    module and its weights.
    """

    def __init__(self, cfg: SegVLMConfig):
        super().__init__(
            embed_dim=cfg.embed_dim,
            image_resolution=cfg.image_resolution, vision_layers=tuple(cfg.vision_layers),
            vision_width=cfg.vision_width, vision_patch_size=None,
            context_length=cfg.context_length, vocab_size=cfg.vocab_size,
            transformer_width=cfg.transformer_width, transformer_heads=cfg.transformer_heads,
            transformer_layers=cfg.transformer_layers)
        del self.logit_scale
        # CLIP keeps the text encoder's causal mask as a plain attribute, which .to(device) leaves on
        # the CPU: every forward on a GPU then copies it over, and a CUDA-graph capture of the model
        # fails on that copy. As a non-persistent buffer it moves with the model and stays out of
        # state dicts (OpenAI's weights have no such key).
        for block in self.transformer.resblocks:
            mask = block.attn_mask
            del block.attn_mask
            block.register_buffer("attn_mask", mask, persistent=False)
        self.c5_residual = nn.Sequential(nn.Conv2d(cfg.vision_width * 32, cfg.embed_dim, 1, bias=False),
                                         nn.BatchNorm2d(cfg.embed_dim))

    def encode_image(self, image: torch.Tensor):
        """image (B, 3, H, W) -> c3 (B, 8w, H/8, W/8), c4 (B, 16w, H/16, W/16), c5 (B, embed_dim, H/32, W/32),
        w = vision_width."""
        v = self.visual
        x = v.relu1(v.bn1(v.conv1(image)))  # CLIP's 3-conv stem, then avgpool: stride 4
        x = v.relu2(v.bn2(v.conv2(x)))
        x = v.relu3(v.bn3(v.conv3(x)))
        x = v.avgpool(x)
        x = v.layer1(x)
        c3 = v.layer2(x)
        c4 = v.layer3(c3)
        x = v.layer4(c4)  # (B, 32w, H/32, W/32)
        c5 = F.relu(dense_attention_pool(v.attnpool, x) + self.c5_residual(x))
        return c3, c4, c5

    def encode_text(self, tokens: torch.Tensor):
        """tokens (B, L) -> words (B, L, width) after ln_final, not projected; state (B, embed_dim).

        CLIP's causal mask means a word only sees the words before it, so the
        padding after the end-of-text (EOT) token changes no real word's
        feature. state = the EOT token's feature @ text_projection; EOT has the
        largest id, hence argmax, as in CLIP's encode_text.
        """
        L = tokens.shape[1]
        # The positional embedding keeps CLIP's 77 rows (as in CRIS) and is sliced to L; the
        # causal mask is sliced to L x L by clip-anytorch's ResidualAttentionBlock.
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, width)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # (B, L, width) -> (L, B, width) -> back
        words = self.ln_final(x)  # (B, L, width)
        eot = words[torch.arange(words.shape[0], device=words.device), tokens.argmax(dim=-1)]  # (B, width)
        return words, eot @ self.text_projection  # (B, L, width), (B, embed_dim)


class EnhancementBlock(nn.Module):
    """Deformable-attentive visual enhancement (paper §3.3, eq. 1-3), wrapped around the projector's visual branch.

        x_dcf   = phi(x, F_offset(x))                     eq. (1)  deformable 3x3 conv
        x_se    = sigma(W2 delta(W1 GAP(x_dcf))) * x_dcf   eq. (2)  squeeze-and-excitation
        x_fused = P(x_se) + F_residual(U(x))               eq. (3)  P: projector's upsampling stack

    x is the decoder's output (B, 512, 26, 26 at 416 px). The paper gives no
    resolution; at 26x26 the deformable conv is cheap (docs/choices.md). U is a x4 bilinear
    upsampling and F_residual a conv1x1 + BN to the projector's width, so the
    shortcut meets P(x_se) at (B, 256, 104, 104). F_residual(U(x)) is computed as
    BN(U(conv(x))): a 1x1 conv without bias commutes with bilinear upsampling
    (both are linear, and bilinear weights sum to one), so this is the same
    function with 16x fewer multiplications; tests check the equality.

    Switches (Table 2):
    - `deform` turns on the deformable conv *and* the residual shortcut, as the
      ablation's "+ Deformable + Residual" row adds them together.
    - `se` turns on SE (torchvision.ops.SqueezeExcitation is eq. 2 exactly;
      squeeze = channels // se_reduction, 16 by default as in Hu et al. 2018).
    A part switched off is the identity (the shortcut: nothing added), not a
    plain 3x3 conv (another reading of Table 2): a plain conv would add a layer
    CRIS lacks, and "both off == the CRIS baseline exactly" wins. Both off, the
    block has no parameters and is P(x). No switch combination leaves a
    parameter unused.
    """

    def __init__(self, in_dim: int, out_dim: int, deform: bool, se: bool, se_reduction: int):
        super().__init__()
        self.deform = DeformableConv2d(in_dim, in_dim, 3) if deform else nn.Identity()
        self.se = SqueezeExcitation(in_dim, max(1, in_dim // se_reduction)) if se else nn.Identity()
        self.residual_conv = nn.Conv2d(in_dim, out_dim, 1, bias=False) if deform else None
        self.residual_bn = nn.BatchNorm2d(out_dim) if deform else None

    def forward(self, x, visual_stack):
        """x (B, C, h, w); visual_stack (P) maps (B, C, h, w) -> (B, out_dim, 4h, 4w)."""
        x_dcf = self.deform(x)  # eq. (1)
        x_se = self.se(x_dcf)  # eq. (2)
        x_fused = visual_stack(x_se)  # eq. (3): P(x_se), (B, out_dim, 4h, 4w) ...
        if self.residual_conv is not None:  # ... + F_residual(U(x)), as BN(U(conv(x)))
            x_fused = x_fused + self.residual_bn(up(self.residual_conv(x), 4))
        return x_fused


# --------------------------------------------------------------------------- the model

class SegVLM(nn.Module):
    """image (B, 3, H, W) CLIP-normalised float, tokens (B, L) long from clip.tokenize
    -> logits (B, 1, H/4, W/4), unnormalised (sigmoid gives the mask probability).

    H and W may be any multiples of 32 (positional encodings are computed per
    call); L may be anything up to word_len. Token id 0 is padding: hidden from
    the decoder by its key padding mask.

    Parts: `backbone` (every CLIP parameter, plus the new c5 residual; trained at
    lr x 0.1), `neck`, `decoder`, `projector`, `enhance` (without parameters when
    both switches are off). All convolutions outside CLIP are Kaiming-normal
    initialised with zero biases (paper §4.2), except the zero-initialised
    offset conv; linear layers keep PyTorch's default.

    In training mode a batch needs at least two samples: the FPN normalises
    the sentence state with BatchNorm1d, as CRIS does.
    """

    def __init__(self, cfg: SegVLMConfig):
        super().__init__()
        self.config = cfg
        w = cfg.vision_width
        self.backbone = CLIPBackbone(cfg)
        self.neck = FPN((8 * w, 16 * w, cfg.embed_dim), cfg.fpn_out, cfg.embed_dim)
        self.decoder = Decoder(cfg.decoder_layers, cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_ffn,
                               cfg.decoder_dropout, cfg.transformer_width)
        self.projector = Projector(cfg.decoder_dim, cfg.proj_dim, cfg.embed_dim, cfg.kernel_size)
        self.enhance = EnhancementBlock(cfg.decoder_dim, cfg.proj_dim, cfg.deform, cfg.se, cfg.se_reduction)
        head_convs = [self.backbone.c5_residual[0], *self.neck.modules(), *self.projector.modules(),
                      *(m for n, m in self.enhance.named_modules() if n != "deform.offset")]
        for m in head_convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # last, so that the other parts draw the same random numbers with the head on or off
        self.no_target = NoTargetHead(cfg.decoder_dim, cfg.embed_dim) if cfg.no_target_head else None

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, image_index=None, return_no_target=False):
        """image (B, 3, H, W), tokens (B, L) -> mask logits (B, 1, H/4, W/4).

        With config.no_target_head, a phrase judged to name nothing gets an empty mask (answer_nothing);
        return_no_target=True gives (logits before that, no-target logits (B,) or None) for the loss.

        With image_index (B,), image holds each distinct image once, (U, 3, H, W), and phrase i is
        about image[image_index[i]]: the image encoder, and the neck's projections of its maps,
        run U times instead of B (training with several phrases per image,
        data.ImageGroupedSampler). The result is the same as passing image[image_index], except
        that BatchNorm in train mode sees each image once in those parts."""
        self.check_inputs(image, tokens, image_index)
        return self.segment(image, tokens, image_index, return_no_target)

    def segment(self, image: torch.Tensor, tokens: torch.Tensor, image_index=None, return_no_target=False):
        """The forward pass without `check_inputs`: no Python decision depends on tensor values, so
        it can be captured in a CUDA graph (helpers/inference.FastSegVLM checks the inputs first)."""
        c3, c4, c5 = self.backbone.encode_image(image)  # one map per image
        words, state = self.backbone.encode_text(tokens)
        x = self.neck(c3, c4, c5, state, image_index)  # (B, C, H/16, W/16): each phrase with its image
        x = self.decoder(x, words, pad_mask=tokens == 0)  # (B, C, H/16, W/16)
        v = self.enhance(x, self.projector.visual)  # eq. (1)-(3): (B, proj_dim, H/4, W/4)
        logits = self.projector.text_to_pixel(v, state)  # (B, 1, H/4, W/4)
        no_target = None if self.no_target is None else self.no_target(
            x, state, logits, c5 if image_index is None else c5[image_index])  # (B,)
        if return_no_target:
            return logits, no_target
        return logits if no_target is None else answer_nothing(logits, no_target)

    def check_inputs(self, image, tokens, image_index=None):
        """What forward checks first (helpers/inputs.py): shapes, dtypes, lengths, a ValueError otherwise."""
        check_inputs(image, tokens, image_index, self.config.input_size, self.config.word_len)


def parameter_counts(model: SegVLM) -> dict:
    """Number of parameters in each part, and the total."""
    def count(m):
        return sum(p.numel() for p in m.parameters())
    parts = {name: count(getattr(model, attr)) for name, attr in
             [("backbone", "backbone"), ("neck", "neck"), ("decoder", "decoder"),
              ("projector", "projector"), ("enhancement", "enhance"), ("no_target", "no_target")]
             if getattr(model, attr) is not None}
    parts["total"] = count(model)
    return parts


# --------------------------------------------------------------------------- building and loading

CLIP_FIELDS = ("embed_dim", "image_resolution", "vision_layers", "vision_width",
               "context_length", "vocab_size", "transformer_width", "transformer_layers")


def build_model(preset: str = "paper", clip_weights=None, **overrides) -> SegVLM:
    """Build SegVLM from a preset ("paper", "demo", "smoke") and config overrides.

    clip_weights:
      None        random weights: the architecture only, to train from scratch;
      "RN101" ... a CLIP model name, through clip.load(name, jit=False) (downloads when online);
      a path      OpenAI's .pt (a TorchScript archive) or a plain CLIP state dict.
    With weights, CLIP's architecture fields are read from the state dict (as
    clip.model.build_model does); overriding one to a different value is an
    error. transformer_heads cannot be read from weights: CLIP's rule width // 64
    is used unless overridden.
    """
    base = get_preset(preset).model
    unknown = sorted(set(overrides) - set(config_fields()))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {config_fields()}")
    state_dict = None
    if clip_weights is not None:
        state_dict = load_clip_state_dict(clip_weights)
        from_weights = clip_fields_from_state_dict(state_dict)
        for k, v in from_weights.items():
            given = overrides.get(k, v)
            if (tuple(given) if k == "vision_layers" else given) != v:
                raise ValueError(f"override {k}={overrides[k]} contradicts the CLIP weights {clip_weights!r}, "
                                 f"which have {k}={v}")
        overrides.setdefault("transformer_heads", from_weights["transformer_width"] // 64)
        overrides = {**overrides, **from_weights}
    model = SegVLM(dataclasses.replace(base, **overrides))
    if state_dict is not None:
        missing, unexpected = model.backbone.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("c5_residual.")]
        if missing or unexpected:
            raise ValueError(f"CLIP weights {clip_weights!r} do not fit: missing {missing}, unexpected {unexpected}")
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Parameter counts of a preset (timing: python -m tools.benchmark).")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    args = parser.parse_args()
    for name, n in parameter_counts(build_model(args.preset)).items():
        print(f"{name:12s} {n:>12,d}")
