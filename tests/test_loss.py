"""RAF loss (eq. 4-8): each term against a reference, hand-worked Dice cases, stability."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from loss import RAFLoss


def logit(p):
    return math.log(p / (1 - p))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g) * 3
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    return logits, target


def test_terms_match_references(batch):
    logits, target = batch
    terms = RAFLoss(w_bce=0.5, w_focal=2.0, w_dice=3.0)(logits, target)
    assert set(terms) == {"bce", "focal", "dice", "loss"}
    assert torch.allclose(terms["bce"], F.binary_cross_entropy_with_logits(logits, target))
    assert torch.allclose(terms["focal"], sigmoid_focal_loss(logits, target, 0.25, 2.0, reduction="mean"))
    assert torch.allclose(terms["loss"], 0.5 * terms["bce"] + 2.0 * terms["focal"] + 3.0 * terms["dice"])


def test_focal_term_is_eq5_by_hand(batch):
    logits, target = batch
    p, y, a, g = torch.sigmoid(logits), target, 0.25, 2.0
    eq5 = -(a * y * (1 - p) ** g * torch.log(p) + (1 - a) * (1 - y) * p ** g * torch.log(1 - p))
    assert torch.allclose(RAFLoss()(logits, target)["focal"], eq5.mean(), atol=1e-6)


def test_baseline_weights_give_bce(batch):
    logits, target = batch
    terms = RAFLoss(w_bce=1.0, w_focal=0.0, w_dice=0.0)(logits, target)
    assert torch.allclose(terms["loss"], F.binary_cross_entropy_with_logits(logits, target))


@pytest.mark.parametrize("dice_weight", ["abs", "focal", "none"])
def test_dice_of_perfect_prediction_is_zero(dice_weight):
    target = torch.zeros(2, 1, 6, 6)
    target[:, :, 1:4, 2:5] = 1
    logits = (target * 2 - 1) * 30  # p within 1e-13 of y
    assert RAFLoss(dice_weight=dice_weight)(logits, target)["dice"].item() == pytest.approx(0, abs=1e-6)


# 2x2 case worked by hand: p = [[0.8, 0.4], [0.2, 0.5]], y = [[1, 0], [0, 1]], eps = 1.
HAND_DICE = {
    # a = |p - y| = [[0.2, 0.4], [0.2, 0.5]]
    # sum a p y = 0.2*0.8 + 0.5*0.5 = 0.41; sum a p = 0.16 + 0.16 + 0.04 + 0.25 = 0.61; sum a y = 0.2 + 0.5 = 0.7
    "abs": 1 - (2 * 0.41 + 1) / (0.61 + 0.7 + 1),
    # a = (1 - p)^2 = [[0.04, 0.36], [0.64, 0.25]]
    # sum a p y = 0.04*0.8 + 0.25*0.5 = 0.157; sum a p = 0.032 + 0.144 + 0.128 + 0.125 = 0.429; sum a y = 0.29
    "focal": 1 - (2 * 0.157 + 1) / (0.429 + 0.29 + 1),
    # a = 1: sum p y = 1.3; sum p = 1.9; sum y = 2
    "none": 1 - (2 * 1.3 + 1) / (1.9 + 2 + 1),
}


@pytest.mark.parametrize("dice_weight", ["abs", "focal", "none"])
def test_dice_hand_worked_2x2(dice_weight):
    logits = torch.tensor([[logit(0.8), logit(0.4)], [logit(0.2), logit(0.5)]]).reshape(1, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    dice = RAFLoss(dice_weight=dice_weight)(logits, target)["dice"]
    assert dice.item() == pytest.approx(HAND_DICE[dice_weight], abs=1e-6)


def test_dice_is_per_sample_mean_over_batch():
    """Sums run over one sample's pixels: a batch of two is the mean of the two alone."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 4, 4, generator=g)
    target = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    fn = RAFLoss()
    both = fn(logits, target)["dice"]
    alone = (fn(logits[:1], target[:1])["dice"] + fn(logits[1:], target[1:])["dice"]) / 2
    assert torch.allclose(both, alone)


def test_dice_weight_is_detached():
    """The gradient equals the one with a_i fed in as a constant."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 1, 3, 3, generator=g, requires_grad=True)
    target = (torch.rand(1, 1, 3, 3, generator=g) > 0.5).float()
    RAFLoss()(logits, target)["dice"].backward()
    x = logits.detach().clone().requires_grad_(True)
    p = torch.sigmoid(x)
    a = (p - target).abs().detach()
    ref = 1 - (2 * (a * p * target).sum() + 1) / ((a * p).sum() + (a * target).sum() + 1)
    ref.backward()
    assert torch.allclose(logits.grad, x.grad, atol=1e-6)


def test_target_resized_nearest():
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1
    logits = torch.randn(1, 1, 4, 4)
    small = F.interpolate(target, size=(4, 4), mode="nearest")
    fn = RAFLoss()
    assert torch.allclose(fn(logits, target)["loss"], fn(logits, small)["loss"])


def test_finite_for_extreme_logits():
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0]).reshape(1, 1, 2, 2).requires_grad_(True)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 2, 2)  # two right, two badly wrong
    for dice_weight in ["abs", "focal", "none"]:
        terms = RAFLoss(dice_weight=dice_weight)(logits, target)
        assert all(torch.isfinite(v) for v in terms.values())
        logits.grad = None
        terms["loss"].backward()
        assert torch.isfinite(logits.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="dice_weight"):
        RAFLoss(dice_weight="cubic")
    with pytest.raises(ValueError, match="target"):
        RAFLoss()(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
