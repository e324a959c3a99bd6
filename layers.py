"""Building blocks of SegVLM: the small layers that model.py assembles.

- `conv_bn_relu`, `linear_bn_relu`: CRIS's basic units (no bias, BN, ReLU).
- `CoordConv`: a conv that also sees the pixel's (x, y) position (CRIS's FPN).
- `sine_position_1d`, `sine_position_2d`: fixed positional encodings of the
  vision-language decoder, computed on the fly for any sequence length or map
  size.
- `DecoderLayer`, `Decoder`: CRIS's vision-language transformer decoder.
- `FPN`: CRIS's text-conditioned feature pyramid (the neck).
- `Projector`: CRIS's text-to-pixel dynamic convolution.
- `DeformableConv2d`: eq. (1) of the paper, an offset-predicting conv and
  `deform_conv2d_sampled` (bilinear sampling of the shifted taps, then one
  matmul), tested equal to torchvision's `deform_conv2d`.
- `NoTargetHead`, `query_pool`, `answer_nothing`: the optional "no target" answer (a
  phrase that names nothing gets an empty mask; docs/choices.md).
- `dense_attention_pool`, `attention_pool_tokens`: CLIP's attention pool applied at
  every position (CRIS's c5).

Each is small on purpose; read it beside the paper's §3 and CRIS's code
(github.com/DerrickWang005/CRIS.pytorch, model/layers.py), whose names helpers/checkpoints.py maps.
"""

import math
from functools import partial

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
    """One layer of CRIS's vision-language decoder (CRIS's model/layers.py), pre-norm with extra LayerNorms.

    norm -> self-attention over the visual tokens -> LayerNorm -> dropout -> residual;
    norm -> cross-attention (visual queries, word keys/values) -> LayerNorm -> dropout -> residual;
    norm -> FFN (Linear, ReLU, dropout, LayerNorm, Linear) -> dropout -> residual.
    Positional encodings are added to queries and keys, never to values.
    The dropout after the FFN is CRIS's, besides the FFN's inner one.
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


class FPN(nn.Module):
    """CRIS's text-conditioned feature pyramid: (c3, c4, c5, state) -> (B, fpn_out[1], H/16, W/16).

    The sentence state multiplies c5 once (f5 = BN-ReLU(conv(c5) * state)); f5, f4, f3 are
    fused top-down at stride 16, aggregated, and given coordinates (CoordConv).
    """

    def __init__(self, in_ch: tuple, out_ch: tuple, state_dim: int):
        super().__init__()
        c3, c4, c5 = in_ch
        o3, o4, o5 = out_ch
        self.txt_proj = linear_bn_relu(state_dim, o5)
        self.f5_proj = conv_bn_relu(c5, o5, 1)
        self.f5_norm = nn.Sequential(nn.BatchNorm2d(o5), nn.ReLU(inplace=True))
        self.f4_proj = conv_bn_relu(c4, o4, 3)
        self.f4_cat = conv_bn_relu(o5 + o4, o4, 1)
        self.f3_proj = conv_bn_relu(c3, o3, 3)
        self.f3_cat = conv_bn_relu(o3 + o4, o4, 1)
        self.out5 = conv_bn_relu(o5, o4, 3)
        self.out4 = conv_bn_relu(o4, o4, 3)
        self.out3 = conv_bn_relu(o4, o4, 3)
        self.aggregate = conv_bn_relu(3 * o4, o4, 1)
        self.coord = nn.Sequential(CoordConv(o4, o4), conv_bn_relu(o4, o4, 3))

    def forward(self, c3, c4, c5, state, image_index=None):
        """c3, c4, c5: one map per phrase, or with image_index (B,) one per image, phrase b reading
        image image_index[b]. The projections of c5, c4, c3 do not depend on the phrase, so they
        run once per image and are then indexed; in eval mode the result equals indexing first."""
        p5, p4, p3 = self.f5_proj(c5), self.f4_proj(c4), F.avg_pool2d(self.f3_proj(c3), 2)  # c3: to H/16
        if image_index is not None:
            p5, p4, p3 = p5[image_index], p4[image_index], p3[image_index]
        state = self.txt_proj(state)[:, :, None, None]  # (B, o5) -> (B, o5, 1, 1)
        f5 = self.f5_norm(p5 * state)  # (B, o5, H/32, W/32)
        f4 = self.f4_cat(torch.cat([p4, up(f5, 2)], dim=1))  # (B, o4, H/16, W/16)
        f3 = self.f3_cat(torch.cat([p3, f4], dim=1))  # (B, o4, H/16, W/16)
        fused = torch.cat([self.out3(f3), self.out4(f4), up(self.out5(f5), 2)], dim=1)  # (B, 3*o4, H/16, W/16)
        return self.coord(self.aggregate(fused))  # (B, o4, H/16, W/16)


class Decoder(nn.Module):
    """Vision-language transformer decoder (CRIS's model/layers.py): visual tokens attend to each other and to the words."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float, word_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_ffn, dropout, word_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis, words, pad_mask):
        """vis (B, C, h, w); words (B, L, D); pad_mask (B, L) True at padding -> (B, C, h, w)."""
        b, c, h, w = vis.shape
        vis_pos = sine_position_2d(h, w, c, vis.device).to(vis.dtype)  # (hw, C)
        word_pos = sine_position_1d(words.shape[1], words.shape[2], words.device).to(words.dtype)  # (L, D)
        x = vis.flatten(2).transpose(1, 2)  # (B, C, hw) -> (B, hw, C)
        for layer in self.layers:
            x = layer(x, words, vis_pos, word_pos, pad_mask)
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)  # (B, hw, C) -> (B, C, hw) -> (B, C, h, w)


class Projector(nn.Module):
    """Text-to-pixel dynamic convolution (CRIS): the sentence becomes a 3x3 kernel that scores every pixel.

    visual(x): up x2 -> conv3x3 -> up x2 -> conv3x3 -> conv1x1, (B, C, h, w) -> (B, proj_dim, 4h, 4w)
    text_to_pixel(v, state): Linear(state) gives each sample its own kernel (1 output
    channel, proj_dim inputs, k x k) and bias, and convolves that sample's map with it.
    """

    def __init__(self, in_dim: int, proj_dim: int, state_dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_bn_relu(in_dim, in_dim, 3),
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_bn_relu(in_dim, proj_dim, 3),
            nn.Conv2d(proj_dim, proj_dim, 1))
        self.txt = nn.Linear(state_dim, proj_dim * kernel_size * kernel_size + 1)

    def visual(self, x):
        return self.vis(x)

    def text_to_pixel(self, v, state):
        """v (B, C, h, w), state (B, state_dim) -> (B, 1, h, w): sample b's map convolved with its own kernel.

        CRIS computes this as one grouped convolution (groups = B):
            F.conv2d(v.reshape(1, B*C, h, w), weight, bias, padding=k//2, groups=B)
        Here the same sum, out(p) = bias + sum_{c,i,j} weight[c,i,j] * v[c, p + (i,j) - k//2], is
        taken channels first: one batched matmul gives k*k tap maps, (B, k*k, h, w), then the
        k*k maps are shifted and added. The result is the grouped convolution's (a test checks
        outputs and gradients in float64); on a CPU it is 6x faster forward and backward, whose
        grouped convolution takes a slow path.
        """
        b, c, h, w = v.shape
        k, pad = self.kernel_size, self.kernel_size // 2
        params = self.txt(state)  # (B, C*k*k + 1)
        weight = params[:, :-1].reshape(b, c, k * k)  # (B, C, k*k): one k x k kernel over C channels per sample
        bias = params[:, -1]  # (B,)
        taps = torch.einsum("bchw,bct->bthw", v, weight)  # (B, k*k, h, w): tap t's contribution, unshifted
        taps = F.pad(taps, (pad, pad, pad, pad))  # zero padding, as the convolution's
        out = sum(taps[:, i * k + j, i:i + h, j:j + w] for i in range(k) for j in range(k))  # (B, h, w)
        return (out + bias.view(b, 1, 1)).unsqueeze(1)  # (B, 1, h, w)

    def forward(self, x, state):
        return self.text_to_pixel(self.visual(x), state)


def up(x, factor):
    """Bilinear upsampling (paper §4.2), as CRIS: align_corners=False."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def deform_conv2d_sampled(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          padding: int) -> torch.Tensor:
    """Deformable convolution (eq. 1, stride 1, dilation 1) as bilinear sampling followed by one matmul.

        x_dcf(p) = sum_k  w_k * x(p + p_k + delta_p_k)        x sampled bilinearly, zero outside the map

    x (B, C, H, W); offset (B, 2K, H, W) holding (dy, dx) for each of the K = kh*kw taps, in
    `torchvision.ops.deform_conv2d`'s layout; weight (O, C, kh, kw); bias (O,) -> (B, O, H, W).

    `F.grid_sample` reads all K shifted copies of x at once (one "column" per tap, as im2col
    does for a plain conv) and an einsum contracts channels and taps with the weight. This
    is the same function as torchvision's kernel, output and gradients (tests check both in
    float64, with offsets that leave the map), but:
    - the contraction is an ordinary matmul, so under autocast it runs in bf16/fp16 on
      tensor cores, where torchvision's kernel runs in float32 only;
    - on the CPU it is faster in both directions, most of all backward (docs/measurements.md,
      "Speed": the block's cost in a demo training step falls from x1.27 to x1.07).
    The sampling itself runs in float32 (float64 if x is): pixel coordinates such as 25.3
    need more than bf16's 8 bits of mantissa.
    """
    b, c, h, w = x.shape
    out_ch, _, kh, kw = weight.shape
    k = kh * kw
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 when given float64
    with torch.autocast(x.device.type, enabled=False):
        off = offset.to(dtype).view(b, k, 2, h, w)  # (B, K, [dy, dx], H, W)
        ar = partial(torch.arange, device=x.device, dtype=dtype)
        tap_y = ar(kh).repeat_interleave(kw).view(1, k, 1, 1) - padding  # row of tap k: k // kw - pad
        tap_x = ar(kw).repeat(kh).view(1, k, 1, 1) - padding  # column of tap k: k % kw - pad
        py = ar(h).view(1, 1, h, 1) + tap_y + off[:, :, 0]  # (B, K, H, W) sampling rows, in pixels
        px = ar(w).view(1, 1, 1, w) + tap_x + off[:, :, 1]  # (B, K, H, W) sampling columns
        # pixel -> grid_sample's [-1, 1]; align_corners=False maps pixel i to (2i + 1) / size - 1,
        # and padding_mode="zeros" gives each of the 4 corners outside the map weight 0, as torchvision
        grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)  # (B, K, H, W, 2) as (x, y)
        cols = F.grid_sample(x.to(dtype), grid.view(b, k * h, w, 2), mode="bilinear", padding_mode="zeros",
                             align_corners=False)  # (B, C, K*H, W)
    cols = cols.to(x.dtype).view(b, c, k, h, w)  # (B, C, K, H, W)
    # the contraction over (C, K) is the convolution; under autocast it runs in the low-precision dtype
    out = torch.einsum("bckhw,ock->bohw", cols, weight.reshape(out_ch, c, k))  # (B, O, H, W)
    return out + bias.view(1, -1, 1, 1).to(out.dtype)


class DeformableConv2d(nn.Module):
    """Eq. (1): delta_p = F_offset(x); x_dcf = phi(x, delta_p), a 3x3 deformable convolution.

    F_offset is a plain 3x3 conv predicting 2 offsets (dy, dx) per kernel tap
    (2*3*3 = 18 channels), zero-initialised so that training starts from a
    plain 3x3 conv (Dai et al. 2017). phi samples the input bilinearly at the
    shifted taps. The main weight is Kaiming-normal initialised (paper §4.2)
    with a zero bias.

    impl chooses phi, two implementations of one function:
    - "sampled" (default, every device): `deform_conv2d_sampled`, grid_sample + one matmul;
      faster than torchvision's kernel on the CPU in forward and backward, and on CUDA
      its matmul runs in the autocast dtype on tensor cores.
    - "torchvision": `torchvision.ops.deform_conv2d`, the reference, in float32 (its CPU
      kernel has no bf16/half version and its autocast rule covers CUDA only).
    """

    IMPLS = ("sampled", "torchvision")

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, impl: str = "sampled"):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS}, got {impl!r}")
        self.kernel_size = kernel_size
        self.impl = impl
        self.offset = nn.Conv2d(in_ch, 2 * kernel_size * kernel_size, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = self.offset(x)  # (B, 2*k*k, H, W): (dy, dx) for each tap at each pixel
        pad = self.kernel_size // 2
        if self.impl == "sampled":
            return deform_conv2d_sampled(x, offsets, self.weight, self.bias, pad)  # (B, out, H, W)
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(x.float(), offsets.float(), self.weight.float(), self.bias.float(),
                                padding=(pad, pad))  # (B, out, H, W)
        return out.to(x.dtype)


class NoTargetHead(nn.Module):
    """A "no target" logit per phrase (generalized referring segmentation: a phrase may name nothing).

    What it looks at, from the decoder's output x (B, C, h, w), the sentence state (B, E), the
    mask logits (B, 1, H, W) and the image encoder's c5 (B, E, h5, w5), each phrase with its image:
    - a query made from the sentence, scored against every position of x (scaled dot product): the
      best score says how well the best-matching place answers the phrase, and the softmax over the
      scores pools x into the features of that place (ReLA, CVPR 2023, asks its region queries the
      same question);
    - a second query scored the same way against c5, the image's own features in CLIP's joint
      embedding space before any text has touched them (CLIP's image-text matching at every position,
      as MaskCLIP reads it): whether anything in the picture looks like the phrase, by a path from
      the loss to the image encoder that does not go through the mask;
    - x pooled by the mask itself (sigmoid(logits) averaged down to x's grid): what the model would
      paint, and the mask logits' peak and mean: how strongly any pixel answers;
    - x's mean and max over positions, and the sentence state.
    An MLP (4C + 2E + 4 -> C -> 1) gives a logit whose sigmoid is the probability that the phrase names
    nothing in the image. Trained with BCE on tasks whose ground truth is marked no-target (train.py);
    `answer_nothing` empties the mask where the logit is > 0.
    """

    def __init__(self, dim: int, state_dim: int):
        super().__init__()
        self.query = nn.Linear(state_dim, dim)
        self.image_query = nn.Linear(state_dim, state_dim)
        self.mlp = nn.Sequential(nn.Linear(4 * dim + 2 * state_dim + 4, dim), nn.ReLU(inplace=True),
                                 nn.Linear(dim, 1))

    def forward(self, x: torch.Tensor, state: torch.Tensor, logits: torch.Tensor, c5: torch.Tensor) -> torch.Tensor:
        best, best_score = query_pool(self.query(state), x)  # the decoder's best answer to the phrase
        seen, seen_score = query_pool(self.image_query(state), c5.to(x.dtype))  # the picture's best match
        tokens = x.flatten(2)  # (B, C, h*w)
        paint = F.avg_pool2d(logits.float().sigmoid(), logits.shape[-1] // x.shape[-1]).flatten(1).to(x.dtype)
        painted = torch.einsum("bn,bcn->bc", paint, tokens) / (paint.sum(1, keepdim=True) + 1e-3)  # (B, C)
        flat = logits.flatten(1).float()  # (B, H*W)
        features = [x.mean((2, 3)), x.amax((2, 3)), best, painted, state, seen, best_score, seen_score,
                    flat.amax(1, keepdim=True), flat.mean(1, keepdim=True)]
        return self.mlp(torch.cat([f.to(x.dtype) for f in features], 1))[:, 0]  # (B,)


def query_pool(query: torch.Tensor, x: torch.Tensor):
    """One query (B, C) against every position of x (B, C, h, w), scaled dot product -> (the positions
    pooled by the softmax of the scores (B, C), the best score (B, 1))."""
    tokens = x.flatten(2)  # (B, C, h*w)
    scores = torch.einsum("bc,bcn->bn", query, tokens) / x.shape[1] ** 0.5  # (B, h*w)
    return torch.einsum("bn,bcn->bc", scores.softmax(1), tokens), scores.amax(1, keepdim=True)


NOTHING = -1e4  # the mask logit of a phrase answered "no target": sigmoid 0, representable in bf16 and fp16


def answer_nothing(logits: torch.Tensor, no_target: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, 1, H, W) with every pixel of a phrase whose no-target logit (B,) is > 0 set to NOTHING,
    so its mask is empty at any threshold: the empty mask is the answer "no target" (evaluate.py's GRES
    metrics). No Python decision on values: CUDA graphs and ONNX export take it."""
    return torch.where(no_target.view(-1, 1, 1, 1) > 0, logits.new_full((), NOTHING), logits)


def dense_attention_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's attention pool at every position: (B, C, H, W) -> (B, out_dim, H, W)."""
    b, c, h, w = x.shape
    grid = pool.positional_embedding[1:]  # (g*g, C): drop the mean token's row
    g = round(grid.shape[0] ** 0.5)
    grid = grid.reshape(1, g, g, c).permute(0, 3, 1, 2)  # (1, C, g, g)
    if (g, g) != (h, w):
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
    pos = grid.flatten(2).permute(2, 0, 1)  # (1, C, HW) -> (HW, 1, C)
    seq = x.flatten(2).permute(2, 0, 1) + pos.to(x.dtype)  # (B, C, HW) -> (HW, B, C)
    out = attention_pool_tokens(pool, seq)  # (HW, B, out_dim)
    return out.permute(1, 2, 0).reshape(b, -1, h, w)  # (B, out_dim, HW) -> (B, out_dim, H, W)


def attention_pool_tokens(pool: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with CLIP's pool weights, every token a query: (T, B, C) -> (T, B, out_dim).

    CLIP's own pool is this with the mean token as the only query.
    """
    out, _ = F.multi_head_attention_forward(
        query=seq, key=seq, value=seq, embed_dim_to_check=seq.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    return out
