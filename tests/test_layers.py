"""Building blocks: deformable conv (eq. 1), SE (eq. 2), positional encodings, CoordConv, decoder layer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import SqueezeExcitation, deform_conv2d

from layers import (
    CoordConv,
    DecoderLayer,
    DeformableConv2d,
    Projector,
    deform_conv2d_sampled,
    sine_position_1d,
    sine_position_2d,
)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("size,kernel", [((7, 9), 3), ((1, 1), 3), ((1, 5), 3), ((4, 1), 3), ((6, 5), 5)])
def test_sampled_deformable_conv_equals_torchvision(size, kernel, dtype, tol):
    """Output and all four gradients equal torchvision's kernel, with offsets of up to a few pixels
    that send many taps outside the map (where both read zeros)."""
    torch.manual_seed(0)
    h, w = size
    x = torch.randn(2, 5, h, w, dtype=dtype, requires_grad=True)
    offset = (3 * torch.randn(2, 2 * kernel * kernel, h, w, dtype=dtype)).requires_grad_()
    weight = torch.randn(4, 5, kernel, kernel, dtype=dtype, requires_grad=True)
    bias = torch.randn(4, dtype=dtype, requires_grad=True)
    pad = kernel // 2
    inputs = (x, offset, weight, bias)
    ref = deform_conv2d(x, offset, weight, bias, padding=(pad, pad))
    out = deform_conv2d_sampled(x, offset, weight, bias, pad)
    assert out.dtype == dtype and out.shape == ref.shape == (2, 4, h, w)
    assert torch.allclose(out, ref, atol=tol, rtol=tol)
    grad_out = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    for name, g, g_ref in zip(("input", "offset", "weight", "bias"), grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=tol * 10, rtol=tol), name
    outside = (offset.detach().abs() > 2).float().mean()
    assert outside > 0.3  # the case where sampling leaves the map is really exercised


def test_deformable_conv_implementations_agree_and_autocast_uses_bf16():
    torch.manual_seed(0)
    sampled = DeformableConv2d(8, 6, 3)
    reference = DeformableConv2d(8, 6, 3, impl="torchvision")
    reference.load_state_dict(sampled.state_dict())
    with torch.no_grad():
        sampled.offset.weight.normal_(0, 0.3)
        reference.offset.weight.copy_(sampled.offset.weight)
    x = torch.randn(2, 8, 6, 7)
    assert torch.allclose(sampled(x), reference(x), atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sampled(x)
    assert low.dtype == torch.bfloat16  # the matmul ran in the autocast dtype
    assert torch.allclose(low.float(), reference(x), atol=0.05 * reference(x).abs().max().item())
    with pytest.raises(ValueError, match="impl must be one of"):
        DeformableConv2d(8, 6, 3, impl="cuda")


@pytest.mark.parametrize("impl", DeformableConv2d.IMPLS)
def test_deformable_conv_with_zero_offsets_is_a_plain_conv(impl):
    torch.manual_seed(0)
    dcn = DeformableConv2d(6, 5, 3, impl=impl)
    x = torch.randn(2, 6, 7, 9)
    assert torch.count_nonzero(dcn.offset(x)) == 0  # zero-initialised offsets
    ref = F.conv2d(x, dcn.weight, dcn.bias, padding=1)
    assert torch.allclose(dcn(x), ref, atol=1e-5)


@pytest.mark.parametrize("impl", DeformableConv2d.IMPLS)
def test_deformable_conv_with_integer_offsets_shifts_the_taps(impl):
    """Offsets of (0, +1) everywhere sample one pixel to the right: a conv of the shifted map."""
    torch.manual_seed(0)
    dcn = DeformableConv2d(3, 4, 3, impl=impl)
    with torch.no_grad():
        dcn.offset.bias[1::2] = 1.0  # channels are (dy, dx) per tap; dx = +1
    x = torch.randn(1, 3, 6, 6)
    shifted = F.pad(x[..., 1:], (0, 1))  # x(i, j + 1), zero beyond the right border
    ref = F.conv2d(shifted, dcn.weight, dcn.bias, padding=1)
    # column 0's left taps read x(i, 0) in the deformable conv but padding in the reference
    assert torch.allclose(dcn(x)[..., 1:], ref[..., 1:], atol=1e-5)


def test_squeeze_excitation_is_eq2():
    """torchvision's SqueezeExcitation = sigma(W2 relu(W1 GAP(x))) * x, computed by hand."""
    torch.manual_seed(0)
    se = SqueezeExcitation(8, 2)
    x = torch.randn(3, 8, 5, 4)
    gap = x.mean(dim=(2, 3))  # (B, C)
    w1, b1 = se.fc1.weight[:, :, 0, 0], se.fc1.bias
    w2, b2 = se.fc2.weight[:, :, 0, 0], se.fc2.bias
    s = torch.sigmoid(torch.relu(gap @ w1.T + b1) @ w2.T + b2)  # (B, C)
    assert torch.allclose(se(x), s[:, :, None, None] * x, atol=1e-6)


def test_sine_positions():
    pe = sine_position_1d(5, 8)
    assert pe.shape == (5, 8)
    # position 3, channel pair 1: frequency 10000^(-2/8)
    assert math.isclose(pe[3, 2].item(), math.sin(3 * 10000 ** (-2 / 8)), rel_tol=1e-5)
    assert math.isclose(pe[3, 3].item(), math.cos(3 * 10000 ** (-2 / 8)), rel_tol=1e-5)
    pe2 = sine_position_2d(3, 4, 16)  # row-major tokens: token = row * 4 + col
    assert pe2.shape == (12, 16)
    token = 2 * 4 + 1  # row 2, column 1
    assert torch.allclose(pe2[token, :8], sine_position_1d(4, 8)[1])  # first half: x (column)
    assert torch.allclose(pe2[token, 8:], sine_position_1d(3, 8)[2])  # second half: y (row)


def test_coordconv_sees_position():
    conv = CoordConv(1, 2).eval()
    x = torch.zeros(1, 1, 4, 6)
    out = conv(x)
    assert out.shape == (1, 2, 4, 6)
    assert not torch.allclose(out[..., 0], out[..., -1])  # a constant input still gives a varying map


def test_decoder_layer_ignores_padded_words():
    torch.manual_seed(0)
    layer = DecoderLayer(d_model=16, nhead=2, dim_ffn=32, dropout=0.1, word_dim=16).eval()
    vis = torch.randn(2, 12, 16)
    words = torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, False, True, True], [False, False, False, False, True]])
    out = layer(vis, words, sine_position_2d(3, 4, 16), sine_position_1d(5, 16), pad)
    words2 = words.clone()
    words2[pad] = torch.randn(int(pad.sum()), 16) * 100
    out2 = layer(vis, words2, sine_position_2d(3, 4, 16), sine_position_1d(5, 16), pad)
    assert torch.allclose(out, out2, atol=1e-5)


@pytest.mark.parametrize("kernel,size", [(3, (7, 5)), (1, (4, 4)), (5, (6, 3)), (3, (1, 1))])
def test_text_to_pixel_equals_crises_grouped_conv(kernel, size):
    """text_to_pixel sums channels first; CRIS convolves with groups=B. Same outputs and gradients."""
    torch.manual_seed(0)
    b, c = 3, 4
    proj = Projector(in_dim=8, proj_dim=c, state_dim=6, kernel_size=kernel).double()
    v = torch.randn(b, c, *size, dtype=torch.float64, requires_grad=True)
    state = torch.randn(b, 6, dtype=torch.float64, requires_grad=True)

    def crises(v, state):
        params = proj.txt(state)
        weight = params[:, :-1].reshape(b, c, kernel, kernel)
        out = F.conv2d(v.reshape(1, b * c, *size), weight, params[:, -1], padding=kernel // 2, groups=b)
        return out.transpose(0, 1)

    ours, ref = proj.text_to_pixel(v, state), crises(v, state)
    assert ours.shape == ref.shape == (b, 1, *size)
    assert torch.allclose(ours, ref, atol=1e-12)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(ours, [v, state, proj.txt.weight], grad)
    want = torch.autograd.grad(ref, [v, state, proj.txt.weight], grad)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)
