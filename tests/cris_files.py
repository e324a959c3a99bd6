"""Files in CRIS's checkpoint format, made from this project's models, for the tests.

The names are written out here on their own (not taken from cris.py), from CRIS's repository
(github.com/DerrickWang005/CRIS.pytorch: model/segmenter.py's backbone/neck/decoder/proj,
model/layers.py's FPN, TransformerDecoderLayer and Projector, model/clip.py's attention pool
with its `connect` residual), so that a wrong map in cris.py fails the tests.
"""

import torch

import model as model_module

# this project's module -> CRIS's; the first match wins
TO_CRIS = [
    ("backbone.c5_residual.", "backbone.visual.attnpool.connect."),
    ("neck.f5_proj.", "neck.f1_v_proj."),
    ("neck.f5_norm.", "neck.norm_layer."),
    ("neck.f4_proj.", "neck.f2_v_proj."),
    ("neck.f4_cat.", "neck.f2_cat."),
    ("neck.f3_proj.", "neck.f3_v_proj."),
    ("neck.out5.", "neck.f4_proj5."),
    ("neck.out4.", "neck.f4_proj4."),
    ("neck.out3.", "neck.f4_proj3."),
    ("neck.aggregate.", "neck.aggr."),
    ("neck.coord.0.conv.", "neck.coordconv.0.conv1."),
    ("neck.coord.1.", "neck.coordconv.1."),
    ("projector.", "proj."),
]

# Small CLIPs shaped like CRIS's two backbones: RN50's embedding is 16x the vision width
# (c5 has as many channels as c4; CRIS's fpn_in 512/1024/1024), RN101's 8x (512/1024/512).
# The text is 64 wide, so CLIP's rule gives it 1 head; the decoder has CRIS's 8 heads and is
# as wide as the text, as in CRIS (its cross-attention has kdim = vdim = d_model).
SMALL = dict(image_resolution=64, vision_width=8, context_length=16, transformer_width=64, transformer_heads=1,
             transformer_layers=1, fpn_out=(16, 64, 96), decoder_layers=2, decoder_dim=64, decoder_heads=8,
             decoder_ffn=96, proj_dim=32, input_size=64, word_len=16, deform=False, se=False)
SHAPES = {
    "RN50": dict(embed_dim=128, vision_layers=(1, 1, 2, 1), **SMALL),
    "RN101": dict(embed_dim=64, vision_layers=(1, 1, 3, 1), **SMALL),
}


def small_model(shape: str, seed: int = 0, **overrides):
    """A CRIS-shaped SegVLM (block off) with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    m = model_module.build_model("paper", **{**SHAPES[shape], **overrides})
    for mod in m.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.num_batches_tracked.fill_(1000)
    return m.eval()


def cris_name(key: str) -> str:
    for ours, cris in TO_CRIS:
        if key.startswith(ours):
            return cris + key[len(ours):]
    parts = key.split(".")
    if parts[0] == "decoder" and len(parts) > 3 and parts[3] == "cross_attn":
        parts[3] = "multihead_attn"
    return ".".join(parts)


def cris_state_dict(model) -> dict:
    """The model's state dict as CRIS's DistributedDataParallel saved it: CRIS's names, "module.",
    and CLIP's logit_scale, which CRIS's backbone keeps."""
    sd = {"module." + cris_name(k): v.clone() for k, v in model.state_dict().items()}
    sd["module.backbone.logit_scale"] = torch.tensor(4.6052)
    return sd


def write_cris_checkpoint(model, path, epoch=50, state_dict=None):
    """CRIS's train.py's dict with a real Adam (one step taken) and MultiStepLR state."""
    params = [p for p in model.parameters() if p.requires_grad]
    backbone = {id(p) for p in model.backbone.parameters()}
    optimizer = torch.optim.Adam([{"params": [p for p in params if id(p) in backbone], "initial_lr": 1e-5},
                                  {"params": [p for p in params if id(p) not in backbone], "initial_lr": 1e-4}],
                                 lr=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[35], gamma=0.1, last_epoch=epoch - 1)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.save({"epoch": epoch, "cur_iou": 0.6243, "best_iou": 0.6211,
                "prec": {"Pr@50": 0.73, "Pr@60": 0.68, "Pr@70": 0.6, "Pr@80": 0.45, "Pr@90": 0.16},
                "state_dict": cris_state_dict(model) if state_dict is None else state_dict,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
    return path
