"""Building blocks of SegVLM: the small layers that model.py assembles.

- `conv_bn_relu`, `linear_bn_relu`: CRIS's basic units (no bias, BN, ReLU).
- `CoordConv`: a conv that also sees the pixel's (x, y) position (CRIS's FPN).
- `sine_position_1d`, `sine_position_2d`: fixed positional encodings of the
  vision-language decoder, computed on the fly for any sequence length or map
  size.
- `DecoderLayer`: one layer of CRIS's vision-language transformer decoder.
- `DeformableConv2d`: eq. (1) of the paper, an offset-predicting conv and
  torchvision's `deform_conv2d`.

Each is small on purpose; read it beside SPEC §2-3 and the paper's §3.3.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BatchNorm + ReLU: every conv of CRIS's FPN and projector."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def linear_bn_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (no bias) + BatchNorm1d + ReLU: CRIS's projection of the sentence state.

    BatchNorm1d needs more than one sample per batch in training mode, as in CRIS.
    """
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


class CoordConv(nn.Module):
    """Append two maps holding each pixel's x and y in [-1, 1], then conv3x3 + BN + ReLU.

    The decoder's queries come from this map, so the coordinates let a phrase
    such as "on the left" find its place.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = conv_bn_relu(in_ch + 2, out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
        coords = torch.stack([grid_x, grid_y]).expand(b, 2, h, w)  # (B, 2, h, w): x first, then y
        return self.conv(torch.cat([x, coords], dim=1))  # (B, C + 2, h, w) -> (B, out, h, w)


def _sine_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sine table: (N,) positions -> (N, dim), sin on even channels, cos on odd."""
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * freqs[None, :]  # (N, dim/2)
    table = torch.zeros(len(positions), dim, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


def sine_position_1d(length: int, dim: int, device=None) -> torch.Tensor:
    """Fixed positional encoding of the words: (length, dim), float32."""
    return _sine_table(torch.arange(length, device=device), dim)


def sine_position_2d(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D positional encoding of the visual tokens: (height*width, dim), float32.

    The first half of the channels encodes the column (x), the second half the
    row (y), each as a 1-D sine table, as in CRIS. Tokens are in row-major
    order, matching `flatten(2)` of a (B, C, H, W) map.
    """
    if dim % 4:
        raise ValueError(f"2-D sine positions need a dimension divisible by 4, got {dim}")
    half = dim // 2
    pos_x = _sine_table(torch.arange(width, device=device), half)  # (W, dim/2)
    pos_y = _sine_table(torch.arange(height, device=device), half)  # (H, dim/2)
    table = torch.cat([
        pos_x[None, :, :].expand(height, width, half),  # (H, W, dim/2), same for every row
        pos_y[:, None, :].expand(height, width, half),  # (H, W, dim/2), same for every column
    ], dim=-1)  # (H, W, dim)
    return table.reshape(height * width, dim)  # (HW, dim), row-major


class DecoderLayer(nn.Module):
    """One layer of CRIS's vision-language decoder (SPEC §2), pre-norm with extra LayerNorms.

    norm -> self-attention over the visual tokens -> LayerNorm -> dropout -> residual;
    norm -> cross-attention (visual queries, word keys/values) -> LayerNorm -> dropout -> residual;
    norm -> FFN (Linear, ReLU, dropout, LayerNorm, Linear) -> dropout -> residual.
    Positional encodings are added to queries and keys, never to values.
    The dropout after the FFN is CRIS's (SPEC lists only the FFN's inner one).
    """

    def __init__(self, d_model: int, nhead: int, dim_ffn: int, dropout: float, word_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        # kdim/vdim let the text width differ from d_model (small presets); when they are
        # equal, as in CRIS, nn.MultiheadAttention keeps its packed in_proj_weight.
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True,
                                                kdim=word_dim, vdim=word_dim)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_ffn), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.LayerNorm(dim_ffn), nn.Linear(dim_ffn, d_model),
        )
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, vis, words, vis_pos, word_pos, pad_mask):
        """vis (B, HW, d_model); words (B, L, word_dim); vis_pos (HW, d_model);
        word_pos (L, word_dim); pad_mask (B, L) bool, True = padding (ignored)."""
        v = self.norm1(vis)
        q = v + vis_pos  # (B, HW, d_model), position broadcast over the batch
        v = self.self_attn(q, q, v, need_weights=False)[0]
        vis = vis + self.dropout1(self.self_attn_norm(v))

        v = self.norm2(vis)
        v = self.cross_attn(v + vis_pos, words + word_pos, words, key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(v))

        vis = vis + self.dropout3(self.ffn(self.norm3(vis)))
        return vis  # (B, HW, d_model)


class DeformableConv2d(nn.Module):
    """Eq. (1): delta_p = F_offset(x); x_dcf = phi(x, delta_p), a 3x3 deformable convolution.

    F_offset is a plain 3x3 conv predicting 2 offsets (dy, dx) per kernel tap
    (2*3*3 = 18 channels), zero-initialised so that training starts from a
    plain 3x3 conv (Dai et al. 2017). phi is `torchvision.ops.deform_conv2d`,
    which samples the input bilinearly at the shifted taps. The main weight is
    Kaiming-normal initialised (paper §4.2) with a zero bias.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.offset = nn.Conv2d(in_ch, 2 * kernel_size * kernel_size, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = self.offset(x)  # (B, 2*k*k, H, W): (dy, dx) for each tap at each pixel
        pad = self.kernel_size // 2
        # torchvision's CPU kernel has no bfloat16/half version and its autocast rule covers
        # CUDA only, so under autocast it runs in float32, as that rule does on CUDA.
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(x.float(), offsets.float(), self.weight.float(), self.bias.float(),
                                padding=(pad, pad))  # (B, out, H, W)
        return out.to(x.dtype)
