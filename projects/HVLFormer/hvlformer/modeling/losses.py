"""The supervised objective of a labeled batch: the labeled terms of paper eq. 6,
``l_seg + lambda_reg * l_reg + lambda_div * l_div``, plus the SRE's presence BCE.

- ``l_seg`` (supplement eq. 5): :class:`~hvlformer.modeling.criterion.HVLSetCriterion` (fixed query-class
  matching, deep supervision); its own ``weight_dict`` weights CE, mask BCE and dice.
- ``l_reg`` = L^L + L^VL + L^V (supplement eqs. 6-9, :mod:`hvlformer.modeling.regularization`): the learned
  class embeddings against the frozen reference T0, the pixel-text logits of ``clip_dense`` against the
  labels, and f_CLS against the frozen encoder's f_CLS^0.
- ``l_div`` (:func:`hvlformer.modeling.htqg.diversity_loss`) on the unweighted level queries ``Q_hat``.
- the SRE presence BCE (learned SRE modes only).
- the thesis's module losses, when the module ran (its output field of
  :class:`~hvlformer.modeling.outputs.HVLFormerOutput` is set): CAA's affinity BCE and auxiliary coarse CE
  (thesis eqs. 3.9, 3.10), ECAC's re-weighted CE of student and teacher, memory CE, entropy-weighted KL and
  intra-class variance MSE (eqs. 4.13, 4.20, 4.12, 4.19; eq. 4.21 weights them).

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
from .thesis import (
    caa_affinity_loss,
    caa_auxiliary_loss,
    downsample_labels,
    ecac_intra_variance_loss,
    ecac_kl_loss,
    ecac_memory_loss,
    ecac_reweighted_ce,
    reweighting_class_weights,
)
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
        caa_affinity_weight: float = 1.0,
        caa_aux_weight: float = 0.4,
        ecac_student_weight: float = 1.0,
        ecac_teacher_weight: float = 1.0,
        ecac_memory_weight: float = 1.0,
        ecac_kl_weight: float = 1.0,
        ecac_intra_variance_weight: float = 50.0,
        ecac_reweight_rho: float = 0.5,
        ecac_kl_temperature: float = 1.0,
    ) -> None:
        """
        Args:
            seg_criterion: ``l_seg``.
            ignore_value: label of unlabeled pixels.
            reg_language_weight, reg_vision_language_weight, reg_vision_weight: L^L, L^VL, L^V (``lambda_reg``
                split per term; 0 = off). L^V needs the frozen encoder E_I^0.
            div_weight: ``lambda_div``. sre_weight: the SRE presence BCE.
            vl_temperature: temperature of the L^VL pixel-text logits.
            caa_affinity_weight, caa_aux_weight: CAA's lambda_2, lambda_3 (used when ``outputs.caa`` is set).
            ecac_*_weight: ECAC's eq.-4.21 weights (used when ``outputs.ecac`` holds a labeled batch's outputs);
                ecac_reweight_rho: rho of eq. 4.14; ecac_kl_temperature: tau of eq. 4.12.
        """
        super().__init__()
        self.seg_criterion = seg_criterion
        self.ignore_value = ignore_value
        self.loss_weights: Dict[str, float] = {
            "reg_language": reg_language_weight, "reg_vision_language": reg_vision_language_weight,
            "reg_vision": reg_vision_weight, "div": div_weight, "sre": sre_weight,
            "caa_affinity": caa_affinity_weight, "caa_aux": caa_aux_weight,
            "ecac_student": ecac_student_weight, "ecac_teacher": ecac_teacher_weight,
            "ecac_memory": ecac_memory_weight, "ecac_kl": ecac_kl_weight,
            "ecac_intra_variance": ecac_intra_variance_weight,
        }
        self.vl_temperature = vl_temperature
        self.ecac_reweight_rho = ecac_reweight_rho
        self.ecac_kl_temperature = ecac_kl_temperature

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
            "caa_affinity_weight": hv.CAA.AFFINITY_WEIGHT,
            "caa_aux_weight": hv.CAA.AUX_WEIGHT,
            "ecac_student_weight": hv.ECAC.STUDENT_CE_WEIGHT,
            "ecac_teacher_weight": hv.ECAC.TEACHER_CE_WEIGHT,
            "ecac_memory_weight": hv.ECAC.MEMORY_WEIGHT,
            "ecac_kl_weight": hv.ECAC.KL_WEIGHT,
            "ecac_intra_variance_weight": hv.ECAC.INTRA_VARIANCE_WEIGHT,
            "ecac_reweight_rho": hv.ECAC.REWEIGHT_RHO,
            "ecac_kl_temperature": hv.ECAC.KL_TEMPERATURE,
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
            ``loss_reg_language``, ``loss_reg_vision_language``, ``loss_reg_vision``, ``loss_div``, ``loss_sre``;
            with CAA ``loss_caa_affinity``, ``loss_caa_aux``; with ECAC ``loss_ecac_student``,
            ``loss_ecac_teacher``, ``loss_ecac_kl``, ``loss_ecac_intra_variance`` and, once the memory is
            active, ``loss_ecac_memory``.
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
        if outputs.caa is not None:
            losses.update(self.caa_losses(outputs.caa, labels))
        if outputs.ecac is not None and "teacher_logits" in outputs.ecac:
            losses.update(self.ecac_losses(outputs.ecac))
        return losses

    def caa_losses(self, caa: Dict[str, Tensor], labels: Tensor) -> Dict[str, Tensor]:
        """Thesis eq. 3.12's CAA terms: the affinity BCE against the label affinity at the level's grid
        (nearest-neighbour labels, Fig. 3.5) and the coarse CE at the label size."""
        w = self.loss_weights
        losses = {}
        if w["caa_affinity"] > 0:
            level_labels = downsample_labels(labels, caa["coarse_logits"].shape[-2:])
            losses["loss_caa_affinity"] = w["caa_affinity"] * caa_affinity_loss(
                caa["affinity_logits"], level_labels, self.ignore_value)
        if w["caa_aux"] > 0:
            losses["loss_caa_aux"] = w["caa_aux"] * caa_auxiliary_loss(caa["coarse_logits"], labels, self.ignore_value)
        return losses

    def ecac_losses(self, ecac: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Thesis eq. 4.21's terms on a labeled batch's ECAC outputs (labels at the mask-feature stride)."""
        w = self.loss_weights
        labels, student, teacher = ecac["labels"], ecac["student_logits"], ecac["teacher_logits"]
        class_weights = reweighting_class_weights(ecac["class_pixel_counts"], self.ecac_reweight_rho)
        terms = {
            "ecac_student": lambda: ecac_reweighted_ce(student, labels, class_weights, self.ignore_value),
            "ecac_teacher": lambda: ecac_reweighted_ce(teacher, labels, class_weights, self.ignore_value),
            "ecac_kl": lambda: ecac_kl_loss(student, teacher, labels, self.ecac_kl_temperature, self.ignore_value),
            "ecac_intra_variance": lambda: ecac_intra_variance_loss(student, teacher, labels, self.ignore_value),
        }
        if "memory_logits" in ecac:
            terms["ecac_memory"] = lambda: ecac_memory_loss(ecac["memory_logits"], labels, self.ignore_value)
        return {f"loss_{name}": w[name] * term() for name, term in terms.items() if w[name] > 0}
