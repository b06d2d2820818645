"""Segmentation losses of HVLFormer on labeled images (paper supplement A.4.1 / eq. 5, l_seg): fixed
query <-> class matching.

Query layout (see the transformer decoder): ``Q = E*K + M``; query ``e*K + k`` is the textual query of
class ``k`` at level ``e``; queries ``>= E*K`` are the optional learned instance queries.

* **Fixed matching.** For every level ``e``, query ``e*K + k`` is assigned to class ``k``. If ``k`` is
  present in the image the query gets label ``k`` and the binary ground-truth mask of ``k``; otherwise it
  gets the "no object" label ``K`` and no mask loss.
* **Instance queries** (if any) are Hungarian-matched (``HungarianMatcher``) against the per-class
  ground-truth masks of the image; unmatched ones get "no object". Without a matcher every instance query
  is "no object".
* ``loss_ce``: cross-entropy over ``K+1`` classes, the no-object class weighted by ``no_object_weight``,
  mean-reduced as ``F.cross_entropy(..., weight=...)`` (weighted mean over all queries of the batch).
* ``loss_mask`` / ``loss_dice``: sigmoid BCE and dice on ``num_points`` importance-sampled points per
  matched pair (PointRend sampling, uncertainty ``-|logit|``), summed over pairs and divided by the number
  of matched pairs in the batch (averaged over the world size when distributed, clamped at >= 1).
* With ``deep_supervision`` the same losses are computed for every ``aux_outputs[i]`` with keys suffixed
  ``_i``. ``forward`` returns UNWEIGHTED losses; ``criterion.weight_dict`` maps every returned key to its
  weight (aux keys get the weight of their base key).

``K`` is read from the outputs (``pred_logits.shape[-1] - 1``), so a new vocabulary works unchanged.
Losses are computed in float32 with autocast disabled.

Target masks must cover the same image extent as ``pred_masks`` (i.e. the padded input image); they are
sampled with normalised coordinates, so their resolution may differ from that of the predictions.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

from .matcher import HungarianMatcher

__all__ = [
    "semantic_to_targets",
    "fixed_matching_indices",
    "sigmoid_ce_loss",
    "dice_loss",
    "HVLSetCriterion",
]

_SUFFIX = re.compile(r"^(.*)_(\d+)$")


def semantic_to_targets(sem_seg: Tensor, num_classes: int, ignore_value: int = 255) -> Dict[str, Tensor]:
    """Per-class binary masks of a semantic label map.

    sem_seg: ``H x W`` integer labels in ``[0, num_classes)`` or ``ignore_value``. Returns
    ``{"labels": (n,) int64 sorted present class ids, "masks": n x H x W float32 in {0, 1}}``; ignore pixels
    are 0 in every mask. Raises ``ValueError`` for any other label value.
    """
    if sem_seg.dim() != 2:
        raise ValueError(f"sem_seg must be H x W, got shape {tuple(sem_seg.shape)}")
    sem = sem_seg.long()
    valid = sem != ignore_value
    values = torch.unique(sem[valid])
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.numel() > 0:
        raise ValueError(f"label values {bad.tolist()} outside [0, {num_classes}) and != ignore {ignore_value}")
    labels = values.sort().values
    masks = (sem[None] == labels[:, None, None]).to(torch.float32)
    return {"labels": labels, "masks": masks}


def fixed_matching_indices(targets: Sequence[Dict[str, Tensor]], num_classes: int,
                           num_query_levels: int) -> List[Tuple[Tensor, Tensor]]:
    """The fixed query <-> class assignment of the textual queries.

    For every image, every present class ``labels[j]`` and every level ``e``, query ``e*K + labels[j]`` is
    matched to target ``j``. Returns per image ``(query_idx, tgt_idx)`` int64 CPU tensors of length
    ``E*n``, sorted by query index.
    """
    out = []
    for tgt in targets:
        labels = tgt["labels"].detach().to("cpu", torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"target labels {labels.tolist()} outside [0, {num_classes})")
        order = torch.argsort(labels)
        q = torch.cat([e * num_classes + labels[order] for e in range(num_query_levels)])
        t = order.repeat(num_query_levels)
        out.append((q, t))
    return out


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """``sum_pairs mean_points BCE(inputs, targets) / num_masks``; inputs logits ``P x N``, targets ``P x N``."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """``sum_pairs [1 - (2 x.y + 1) / (sum x + sum y + 1)] / num_masks`` with ``x = sigmoid(inputs)``."""
    x = inputs.sigmoid()
    numerator = 2.0 * (x * targets).sum(-1)
    denominator = x.sum(-1) + targets.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


def _uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of class-agnostic logits ``R x 1 x P``: ``-|logit|`` (highest near 0)."""
    return -logits.abs()


class HVLSetCriterion(nn.Module):
    """Fixed-matching Mask2Former losses for textual queries (+ Hungarian matching for instance queries)."""

    @configurable
    def __init__(
        self,
        num_classes: int,
        num_query_levels: int,
        num_instance_queries: int,
        matcher: Optional[HungarianMatcher],
        weight_dict: Dict[str, float],
        no_object_weight: float,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        deep_supervision: bool = True,
        num_aux_outputs: Optional[int] = None,
    ) -> None:
        """
        Args:
            num_classes: K of the training vocabulary (the losses read K from the outputs).
            num_query_levels: E. num_instance_queries: M (queries after the E*K textual ones).
            matcher: Hungarian matcher for the instance queries, or None (they are all "no object").
            weight_dict: weights of the base keys ``loss_ce``, ``loss_mask``, ``loss_dice`` (keys with a
                ``_i`` suffix may be given explicitly; missing ones inherit the base key's weight).
            no_object_weight: CE class weight of the no-object class.
            num_points, oversample_ratio, importance_sample_ratio: PointRend point sampling.
            deep_supervision: also compute the losses of ``outputs["aux_outputs"]``.
            num_aux_outputs: if given, ``weight_dict`` is expanded for that many aux outputs right away
                (otherwise it is expanded by the first ``forward``).
        """
        super().__init__()
        self.num_classes = num_classes
        self.num_query_levels = num_query_levels
        self.num_instance_queries = num_instance_queries
        self.matcher = matcher
        self.no_object_weight = float(no_object_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.weight_dict: Dict[str, float] = dict(weight_dict)
        for key in ("loss_ce", "loss_mask", "loss_dice"):
            if key not in self.weight_dict:
                raise ValueError(f"weight_dict needs {key!r}")
        if num_aux_outputs is not None and deep_supervision:
            self.expand_weight_dict(num_aux_outputs)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.no_object_weight
        # Not persistent: a checkpoint must load under a different vocabulary size.
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @classmethod
    def from_config(cls, cfg, num_classes: int, num_instance_queries: int = 0) -> Dict[str, Any]:
        """``MODEL.HVLFORMER`` loss keys; the Hungarian matcher is built only for ``num_instance_queries > 0``."""
        hv = cfg.MODEL.HVLFORMER
        matcher = (HungarianMatcher(cost_class=hv.CLASS_WEIGHT, cost_mask=hv.MASK_WEIGHT, cost_dice=hv.DICE_WEIGHT,
                                    num_points=hv.TRAIN_NUM_POINTS) if num_instance_queries > 0 else None)
        return {
            "num_classes": num_classes,
            "num_query_levels": hv.NUM_QUERY_LEVELS,
            "num_instance_queries": num_instance_queries,
            "matcher": matcher,
            "weight_dict": {"loss_ce": hv.CLASS_WEIGHT, "loss_mask": hv.MASK_WEIGHT, "loss_dice": hv.DICE_WEIGHT},
            "no_object_weight": hv.NO_OBJECT_WEIGHT,
            "num_points": hv.TRAIN_NUM_POINTS,
            "oversample_ratio": hv.OVERSAMPLE_RATIO,
            "importance_sample_ratio": hv.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": hv.DEEP_SUPERVISION,
        }

    # ------------------------------------------------------------------ weights
    def expand_weight_dict(self, num_aux_outputs: int) -> Dict[str, float]:
        """Add ``<key>_<i>`` for ``i < num_aux_outputs`` for each base loss key (existing entries kept)."""
        for base in ("loss_ce", "loss_mask", "loss_dice"):
            for i in range(num_aux_outputs):
                self.weight_dict.setdefault(f"{base}_{i}", self.weight_dict[base])
        return self.weight_dict

    def _register_weights(self, losses: Dict[str, Tensor]) -> None:
        for key in losses:
            if key in self.weight_dict:
                continue
            m = _SUFFIX.match(key)
            if m is None or m.group(1) not in self.weight_dict:
                raise KeyError(f"no weight for loss {key!r}")
            self.weight_dict[key] = self.weight_dict[m.group(1)]

    # ------------------------------------------------------------------ matching
    def _split(self, outputs: Dict[str, Tensor]) -> Tuple[int, int]:
        """(K, M) of the outputs, checked against E and num_instance_queries."""
        q, c = outputs["pred_logits"].shape[1:]
        k = c - 1
        m = q - self.num_query_levels * k
        if m != self.num_instance_queries:
            raise ValueError(
                f"outputs have {q} queries and {k} classes, expected E*K + M = "
                f"{self.num_query_levels}*{k} + {self.num_instance_queries}")
        return k, m

    def match(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Per image ``(query_idx, tgt_idx)``: the fixed textual matches, then the Hungarian instance ones."""
        k, m = self._split(outputs)
        indices = fixed_matching_indices(targets, k, self.num_query_levels)
        if m > 0 and self.matcher is not None:
            start = self.num_query_levels * k
            inst = self.matcher({"pred_logits": outputs["pred_logits"][:, start:],
                                 "pred_masks": outputs["pred_masks"][:, start:]}, targets)
            indices = [(torch.cat([q, qi + start]), torch.cat([t, ti]))
                       for (q, t), (qi, ti) in zip(indices, inst)]
        return indices

    @staticmethod
    def target_classes(indices: Sequence[Tuple[Tensor, Tensor]], targets: Sequence[Dict[str, Tensor]],
                       num_queries: int, num_classes: int, device=None) -> Tensor:
        """``B x Q`` int64 class targets: matched queries get their target's label, the rest ``K``."""
        out = torch.full((len(targets), num_queries), num_classes, dtype=torch.int64, device=device)
        for b, ((q, t), tgt) in enumerate(zip(indices, targets)):
            if q.numel():
                out[b, q.to(out.device)] = tgt["labels"].to(out.device, torch.int64)[t.to(out.device)]
        return out

    # ------------------------------------------------------------------ losses
    def loss_labels(self, outputs: Dict[str, Tensor], targets, indices) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        b, q, c = logits.shape
        k = c - 1
        tgt = self.target_classes(indices, targets, q, k, device=logits.device)
        if self.empty_weight.numel() == c:
            weight = self.empty_weight.to(logits.device)
        else:
            weight = torch.ones(c, device=logits.device)
            weight[-1] = self.no_object_weight
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), tgt, weight)}

    def loss_masks(self, outputs: Dict[str, Tensor], targets, indices, num_masks: float) -> Dict[str, Tensor]:
        pred_masks = outputs["pred_masks"]
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        src_idx = torch.cat([q for q, _ in indices])
        if src_idx.numel() == 0:
            zero = pred_masks.sum().float() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        dev = pred_masks.device
        src = pred_masks[batch_idx.to(dev), src_idx.to(dev)].float()[:, None]  # P x 1 x H x W
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src.detach(), _uncertainty, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio)  # P x num_points x 2
            labels_pts = []
            start = 0
            for (q, t), tgt in zip(indices, targets):
                n = q.numel()
                if n == 0:
                    continue
                tm = tgt["masks"].to(device=dev, dtype=torch.float32)[t.to(dev)][:, None]
                labels_pts.append(point_sample(tm, coords[start:start + n], align_corners=False).squeeze(1))
                start += n
            point_labels = torch.cat(labels_pts)
        point_logits = point_sample(src, coords, align_corners=False).squeeze(1)
        return {"loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
                "loss_dice": dice_loss(point_logits, point_labels, num_masks)}

    def _num_masks(self, indices, device) -> float:
        n = torch.tensor([float(sum(q.numel() for q, _ in indices))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return torch.clamp(n / world, min=1).item()

    def _losses(self, outputs, targets, indices, num_masks: float) -> Dict[str, Tensor]:
        losses = self.loss_labels(outputs, targets, indices)
        losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: the decoder's dict (``pred_logits`` ``B x Q x (K+1)``, ``pred_masks`` ``B x Q x H x W``,
                optional ``aux_outputs`` list of dicts with the same keys).
            targets: per image ``{"labels": (n,), "masks": n x H' x W'}`` (see ``semantic_to_targets``).

        Returns UNWEIGHTED float32 losses ``loss_ce, loss_mask, loss_dice`` and, with deep supervision,
        ``loss_ce_i, loss_mask_i, loss_dice_i`` for ``aux_outputs[i]``.
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        device_type = outputs["pred_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
            indices = self.match(main, targets)
            # The number of matched pairs is the same for every output (fixed matching + min(M, n)).
            num_masks = self._num_masks(indices, outputs["pred_logits"].device)
            losses = self._losses(main, targets, indices, num_masks)
            if self.deep_supervision:
                for i, aux in enumerate(outputs.get("aux_outputs") or []):
                    aux_losses = self._losses(aux, targets, self.match(aux, targets), num_masks)
                    losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        self._register_weights(losses)
        return losses
