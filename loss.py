"""The Referring-Aware Fusion (RAF) loss, eq. (4)-(8) of the paper.

    L_RAF = w_bce * L_bce + w_focal * L_focal + w_dice * L_dice          eq. (8)

    from loss import RAFLoss
    loss_fn = RAFLoss()                        # lambda = (1, 1, 1), alpha 0.25, gamma 2, alpha_i = |p - y|
    terms = loss_fn(logits, mask)              # {"bce", "focal", "dice", "loss"}
    terms["loss"].backward()

RAFLoss(w_bce=1, w_focal=0, w_dice=0) is the CRIS baseline's BCE.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

DICE_WEIGHTS = ("abs", "focal", "none")


class RAFLoss(nn.Module):
    """BCE + focal + adaptive Dice, each returned by name with their weighted sum.

    logits: (B, 1, h, w) float, unnormalised; p = sigmoid(logits).
    target: (B, 1, H, W) in {0, 1}; resized to (h, w), nearest, when the sizes differ.
    Returns {"bce", "focal", "dice", "loss"}, each a float32 scalar tensor.

    - L_bce (eq. 4): binary cross-entropy from logits, **mean** over pixels
      (the paper writes a sum; a mean keeps the lambdas independent of image size).
    - L_focal (eq. 5): alpha-balanced focal loss (Lin et al. 2017), mean over
      pixels; torchvision.ops.sigmoid_focal_loss computes exactly eq. 5.
    - L_dice (eq. 6-7): 1 - (2 sum a_i p_i y_i + eps) / (sum a_i p_i + sum a_i y_i + eps),
      sums over one sample's pixels, then the mean over the batch; eps = 1.
      The pixel weight a_i is `dice_weight`:
        "abs"   a_i = |p_i - y_i|      (default: uncertain and wrong pixels count most)
        "focal" a_i = (1 - p_i)^gamma
        "none"  a_i = 1                (plain soft Dice)
      a_i is treated as a weight: it is detached, so no gradient flows through
      it; the gradient only pushes p towards y inside the Dice ratio.

    Everything is computed in float32 from the logits, so it stays finite for
    logits of +-100 and under autocast.
    """

    def __init__(self, w_bce=1.0, w_focal=1.0, w_dice=1.0, alpha=0.25, gamma=2.0, dice_weight="abs", eps=1.0):
        super().__init__()
        if dice_weight not in DICE_WEIGHTS:
            raise ValueError(f"dice_weight must be one of {DICE_WEIGHTS}, got {dice_weight!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.w_bce, self.w_focal, self.w_dice = float(w_bce), float(w_focal), float(w_dice)
        self.alpha, self.gamma, self.dice_weight, self.eps = alpha, gamma, dice_weight, eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        if logits.dim() != 4 or logits.shape[1] != 1:
            raise ValueError(f"logits must be (B, 1, h, w), got {tuple(logits.shape)}")
        if target.dim() != 4 or target.shape[:2] != logits.shape[:2]:
            raise ValueError(f"target must be (B, 1, H, W) with B = {logits.shape[0]}, got {tuple(target.shape)}")
        logits = logits.float()
        target = target.float()
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")

        bce = F.binary_cross_entropy_with_logits(logits, target)  # eq. (4), mean
        focal = sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="mean")  # eq. (5)
        dice = self.adaptive_dice(logits, target)  # eq. (6)-(7)
        loss = self.w_bce * bce + self.w_focal * focal + self.w_dice * dice  # eq. (8)
        return {"bce": bce, "focal": focal, "dice": dice, "loss": loss}

    def adaptive_dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. (6) with the weights of eq. (7); logits and target (B, 1, h, w) float -> scalar."""
        p = torch.sigmoid(logits)
        if self.dice_weight == "abs":
            a = (p - target).abs().detach()
        elif self.dice_weight == "focal":
            a = (1 - p).pow(self.gamma).detach()
        else:
            a = torch.ones_like(p)
        p, y, a = p.flatten(1), target.flatten(1), a.flatten(1)  # (B, h*w) each
        numerator = 2 * (a * p * y).sum(1) + self.eps  # (B,)
        denominator = (a * p).sum(1) + (a * y).sum(1) + self.eps  # (B,)
        return (1 - numerator / denominator).mean()
