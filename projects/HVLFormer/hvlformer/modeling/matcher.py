"""Hungarian matcher (Mask2Former style) for the optional learned instance queries.

The textual queries of HVLFormer use a *fixed* query <-> class matching (see ``criterion.py``); only the
M instance queries of the HierVL variant are matched with this module. The cost of assigning prediction
``i`` to target ``j`` is

    cost_class * (-p_i(label_j)) + cost_mask * BCE(m_i, g_j) + cost_dice * dice(m_i, g_j)

with ``p_i`` the softmax class probabilities and BCE / dice evaluated on ``num_points`` random points
shared by all predictions and targets of an image (bilinear sampling, so prediction and target may have
different resolutions as long as they cover the same image extent).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.projects.point_rend.point_features import point_sample

__all__ = ["HungarianMatcher", "pairwise_sigmoid_ce", "pairwise_dice"]


def pairwise_sigmoid_ce(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE between every prediction and every target.

    inputs: ``N x P`` logits; targets: ``T x P`` in [0, 1]. Returns ``N x T``.
    """
    p = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1.0 - targets).T) / p


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss ``1 - (2|x.y| + 1) / (|x| + |y| + 1)`` between every prediction and target.

    inputs: ``N x P`` logits (sigmoid applied here); targets: ``T x P``. Returns ``N x T``.
    """
    x = inputs.sigmoid()
    numerator = 2.0 * (x @ targets.T)
    denominator = x.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground-truth masks (``scipy.optimize.linear_sum_assignment``)."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` ``B x Qi x (K+1)``, ``pred_masks`` ``B x Qi x H x W`` (logits).
            targets: per image ``labels`` ``(n,)`` int64 in [0, K) and ``masks`` ``n x H' x W'``.

        Returns: per image ``(pred_idx, tgt_idx)``, int64 CPU tensors of length ``min(Qi, n)``; ``pred_idx``
        is sorted ascending.
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        indices = []
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            for b, tgt in enumerate(targets):
                labels = tgt["labels"].to(pred_logits.device).long()
                n = labels.numel()
                if n == 0 or pred_logits.shape[1] == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                prob = pred_logits[b].float().softmax(-1)  # Qi x (K+1)
                cost_class = -prob[:, labels]  # Qi x n

                out_mask = pred_masks[b].float()[:, None]  # Qi x 1 x H x W
                tgt_mask = tgt["masks"].to(device=out_mask.device, dtype=torch.float32)[:, None]
                coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
                out_pts = point_sample(out_mask, coords.expand(out_mask.shape[0], -1, -1),
                                       align_corners=False).squeeze(1)
                tgt_pts = point_sample(tgt_mask, coords.expand(tgt_mask.shape[0], -1, -1),
                                       align_corners=False).squeeze(1)
                cost = (self.cost_class * cost_class
                        + self.cost_mask * pairwise_sigmoid_ce(out_pts, tgt_pts)
                        + self.cost_dice * pairwise_dice(out_pts, tgt_pts))
                cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy()
                row, col = linear_sum_assignment(cost)
                indices.append((torch.as_tensor(np.asarray(row), dtype=torch.int64),
                                torch.as_tensor(np.asarray(col), dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
