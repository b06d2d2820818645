"""The supervised objective of a labeled batch: the labeled terms of paper eq. 6,
``l_seg + lambda_reg * l_reg + lambda_div * l_div``, plus the SRE's presence BCE.

- ``l_seg`` (supplement eq. 5): :class:`~hvlformer.modeling.criterion.HVLSetCriterion` (fixed query-class
  matching, deep supervision); its own ``weight_dict`` weights CE, mask BCE and dice.
- ``l_reg`` = L^L + L^VL + L^V (supplement eqs. 6-9, :mod:`hvlformer.modeling.regularization`): the learned
  class embeddings against the frozen reference T0, the pixel-text logits of ``clip_dense`` against the
  labels, and f_CLS against the frozen encoder's f_CLS^0.
- ``l_div`` (:func:`hvlformer.modeling.htqg.diversity_loss`) on the unweighted level queries ``Q_hat``.
- the SRE presence BCE (learned SRE modes only).

The unlabeled term ``lambda_cmcr * l_CMCR`` is :mod:`hvlformer.modeling.unlabeled_objective`.
Each term is returned weighted and under its own key (``loss_reg_language``, ...), a weight of 0 leaves
the term out.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from detectron2.config import configurable
from torch import Tensor, nn

from .criterion import HVLSetCriterion, semantic_to_targets
from .htqg import diversity_loss
from .outputs import HVLFormerOutput
from .regularization import (
    class_presence,
    language_regularization,
    relevance_loss,
    vision_language_regularization,
    vision_regularization,
)

__all__ = ["HVLFormerLoss"]


class HVLFormerLoss(nn.Module):
    """Weighted ``l_seg`` + L^L + L^VL + L^V + ``l_div`` + SRE BCE of a labeled batch (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        seg_criterion: HVLSetCriterion,
        ignore_value: int = 255,
        reg_language_weight: float = 1.0,
        reg_vision_language_weight: float = 1.0,
        reg_vision_weight: float = 1.0,
        div_weight: float = 1.0,
        sre_weight: float = 1.0,
        vl_temperature: float = 0.07,
    ) -> None:
        """
        Args:
            seg_criterion: ``l_seg``.
            ignore_value: label of unlabeled pixels.
            reg_language_weight, reg_vision_language_weight, reg_vision_weight: L^L, L^VL, L^V (``lambda_reg``
                split per term; 0 = off). L^V needs the frozen encoder E_I^0.
            div_weight: ``lambda_div``. sre_weight: the SRE presence BCE.
            vl_temperature: temperature of the L^VL pixel-text logits.
        """
        super().__init__()
        self.seg_criterion = seg_criterion
        self.ignore_value = ignore_value
        self.loss_weights: Dict[str, float] = {
            "reg_language": reg_language_weight, "reg_vision_language": reg_vision_language_weight,
            "reg_vision": reg_vision_weight, "div": div_weight, "sre": sre_weight,
        }
        self.vl_temperature = vl_temperature

    @classmethod
    def from_config(cls, cfg, seg_criterion: HVLSetCriterion, has_reference: bool) -> Dict[str, Any]:
        """``has_reference``: whether the model holds a pretrained E_I^0 (without one L^V is off)."""
        hv = cfg.MODEL.HVLFORMER
        return {
            "seg_criterion": seg_criterion,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "reg_language_weight": hv.REG_LANGUAGE_WEIGHT,
            "reg_vision_language_weight": hv.REG_VISION_LANGUAGE_WEIGHT,
            "reg_vision_weight": hv.REG_VISION_WEIGHT if has_reference else 0.0,
            "div_weight": hv.DIV_WEIGHT,
            "sre_weight": hv.SRE_WEIGHT,
            "vl_temperature": hv.REG_VL_TEMPERATURE,
        }

    @property
    def needs_reference_text(self) -> bool:
        """Whether :meth:`forward` needs T0 (L^L)."""
        return self.loss_weights["reg_language"] > 0

    @property
    def needs_reference_image(self) -> bool:
        """Whether :meth:`forward` needs f_CLS^0 of the frozen encoder (L^V)."""
        return self.loss_weights["reg_vision"] > 0

    def forward(self, outputs: HVLFormerOutput, labels: Tensor, text_embeddings: Tensor,
                reference_text: Optional[Tensor] = None, reference_global: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """
        Args:
            outputs: the network's pass over the labeled batch.
            labels: ``B x H x W`` long, with the ignore value.
            text_embeddings: ``K x C`` class embeddings t_k of this step.
            reference_text: ``K x C`` frozen reference embeddings T0 (when :attr:`needs_reference_text`).
            reference_global: ``B x C`` f_CLS^0 of the frozen encoder (when :attr:`needs_reference_image`).
        Returns:
            weighted losses: ``loss_ce``, ``loss_mask``, ``loss_dice`` (and ``_i`` per auxiliary prediction),
            ``loss_reg_language``, ``loss_reg_vision_language``, ``loss_reg_vision``, ``loss_div``, ``loss_sre``.
        """
        num_classes = text_embeddings.shape[0]
        targets = [semantic_to_targets(label, num_classes, self.ignore_value) for label in labels]
        seg_losses = self.seg_criterion(outputs.decoder_outputs(), targets)
        weight_dict = self.seg_criterion.weight_dict
        losses = {k: v * weight_dict[k] for k, v in seg_losses.items() if k in weight_dict}
        w = self.loss_weights
        if w["reg_language"] > 0:
            if reference_text is None:
                raise ValueError("L^L needs the reference text embeddings T0")
            losses["loss_reg_language"] = w["reg_language"] * language_regularization(text_embeddings, reference_text)
        if w["reg_vision_language"] > 0:
            losses["loss_reg_vision_language"] = w["reg_vision_language"] * vision_language_regularization(
                outputs.features["clip_dense"], text_embeddings, labels, self.vl_temperature, self.ignore_value)
        if w["reg_vision"] > 0:
            if reference_global is None:
                raise ValueError("L^V needs f_CLS^0 of the frozen encoder (the input images)")
            losses["loss_reg_vision"] = w["reg_vision"] * vision_regularization(
                outputs.features["clip_global"], reference_global)
        if w["div"] > 0:
            losses["loss_div"] = w["div"] * diversity_loss(outputs.level_queries)
        if w["sre"] > 0 and outputs.sre_logits is not None:
            presence = class_presence(list(labels), num_classes, self.ignore_value)
            losses["loss_sre"] = w["sre"] * relevance_loss(outputs.sre_logits, presence)
        return losses
