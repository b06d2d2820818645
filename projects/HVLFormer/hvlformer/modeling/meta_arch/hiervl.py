"""HierVL, the earlier version of the method (HierVL Sec. 3; the v2 of the same arXiv entry), as a variant of
:class:`~hvlformer.modeling.meta_arch.hvlformer.HVLFormer` registered as ``"HierVL"``
(``MODEL.META_ARCHITECTURE: "HierVL"``, options under ``MODEL.HIERVL``).

What HierVL adds or replaces (each an override of one HVLFormer step):

- **instance queries** (DQTD): ``NUM_INSTANCE_QUERIES`` learned queries after the E*K textual ones,
  Hungarian-matched by the criterion;
- **text cross-attention in the pixel decoder** (``TEXT_CROSS_ATTENTION``): pixel tokens attend to textual
  cluster centres, a linear projection of the relevance-weighted level queries (one set per pixel-decoder level
  when there are three query levels, otherwise their mean);
- **zero-shot relevance** (``MODEL.HVLFORMER.SRE.MODE clip_zero_shot``, which only this variant accepts):
  ground-truth class presence on labeled images, zero-shot presence of the frozen pretrained encoder E_I^0 on
  unlabeled and test images (so E_I^0 is built also for evaluation);
- **L_prompt** = L_topo + L_anchor on the learned class embeddings (``PROMPT_WEIGHT``);
- **masked vision-language regularisation** (``MASKED_VL_WEIGHT``): all pixels of one random present class
  are hidden; L_align of the masked image's dense embedding + ``MASK_CONSISTENCY_WEIGHT`` * L_mask against
  E_I^0's embedding of the unmasked image;
- **entropy minimisation** on unlabeled images instead of CMCR (``UNLABELED_LOSS``, ``ENTROPY_WEIGHT``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.logger import log_first_n
from torch import Tensor, nn

from ..clip_loader import has_pretrained_reference
from ..cmcr import CMCRLoss
from ..criterion import HVLSetCriterion
from ..label_maps import downsample_labels
from ..outputs import HVLFormerOutput
from ..pixel_decoder import build_pixel_decoder
from ..regularization import (
    class_presence,
    masked_alignment_loss,
    masked_consistency_loss,
    prompt_anchor_loss,
    prompt_topology_loss,
)
from ..transformer_decoder import build_transformer_decoder
from .hvlformer import HVLFormer

__all__ = ["HierVL"]


@META_ARCH_REGISTRY.register()
class HierVL(HVLFormer):
    """HVLFormer with HierVL's options; see the module docstring."""

    zero_shot_relevance = True

    @configurable
    def __init__(self, *, hidden_dim: int, text_cross_attention: bool = True, prompt_weight: float = 1.0,
                 masked_vl_weight: float = 1.0, masked_vl_mask_weight: float = 1.0, **kwargs: Any) -> None:
        """
        Args:
            hidden_dim: D, width of the level queries and of the pixel decoder's text centres.
            text_cross_attention: the pixel decoder was built with text cross-attention (the centres are made).
            prompt_weight: L_prompt. masked_vl_weight: the masked vision-language regularisation.
            masked_vl_mask_weight: lambda of its L_mask (0 without a pretrained E_I^0).
            kwargs: :class:`HVLFormer`'s arguments.
        """
        super().__init__(**kwargs)
        self.prompt_weight = prompt_weight
        self.masked_vl_weight = masked_vl_weight
        self.masked_vl_mask_weight = masked_vl_mask_weight
        # projection of the level queries to the K textual cluster centres of the pixel decoder
        self.text_center_proj = nn.Linear(hidden_dim, hidden_dim) if text_cross_attention else None

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        ret = super().from_config(cfg)
        hiervl = cfg.MODEL.HIERVL
        ret.update({
            "hidden_dim": cfg.MODEL.HVLFORMER.HIDDEN_DIM,
            "text_cross_attention": hiervl.TEXT_CROSS_ATTENTION,
            "prompt_weight": hiervl.PROMPT_WEIGHT,
            "masked_vl_weight": hiervl.MASKED_VL_WEIGHT,
            # L_mask compares with E_I^0, which exists only with pretrained weights (see HVLFormer)
            "masked_vl_mask_weight": (hiervl.MASK_CONSISTENCY_WEIGHT
                                      if has_pretrained_reference(cfg.MODEL.HVLFORMER.CLIP) else 0.0),
        })
        return ret

    @classmethod
    def warn_without_reference(cls, cfg, reference: bool) -> None:
        hv, hiervl = cfg.MODEL.HVLFORMER, cfg.MODEL.HIERVL
        if hv.SRE.MODE == "clip_zero_shot" and not hv.CLIP.PRETRAINED:
            log_first_n(logging.WARNING, "SRE.MODE clip_zero_shot without pretrained CLIP weights "
                        "(MODEL.HVLFORMER.CLIP.PRETRAINED is empty): there is no zero-shot CLIP, so every class "
                        "keeps its queries on unlabeled and test images.", n=1, name="hvlformer")
        if not reference and hv.CLIP.FROZEN_REFERENCE and not hv.CLIP.WEIGHTS_FROM_CHECKPOINT and (
                hv.REG_VISION_WEIGHT > 0 or (hiervl.MASKED_VL_WEIGHT > 0 and hiervl.MASK_CONSISTENCY_WEIGHT > 0)):
            log_first_n(logging.WARNING, "L^V (MODEL.HVLFORMER.REG_VISION_WEIGHT) and HierVL's masked L_mask are "
                        "SWITCHED OFF: MODEL.HVLFORMER.CLIP.PRETRAINED is empty, so there is no pretrained CLIP "
                        "encoder E_I^0 to anchor f_CLS to (a copy of a random initialisation would anchor to "
                        "noise). Set PRETRAINED to the encoder's pretrained tag or file, also when training "
                        "from MODEL.WEIGHTS.", n=1, name="hvlformer")

    @classmethod
    def build_pixel_decoder(cls, cfg, input_shape) -> nn.Module:
        return build_pixel_decoder(cfg, input_shape, text_cross_attention=cfg.MODEL.HIERVL.TEXT_CROSS_ATTENTION)

    @classmethod
    def build_transformer_decoder(cls, cfg, in_channels: int, num_classes: int, text_dim: int) -> nn.Module:
        return build_transformer_decoder(cfg, in_channels, num_classes, text_dim,
                                         num_instance_queries=cfg.MODEL.HIERVL.NUM_INSTANCE_QUERIES)

    @classmethod
    def build_seg_criterion(cls, cfg, num_classes: int) -> HVLSetCriterion:
        return HVLSetCriterion(cfg, num_classes, num_instance_queries=cfg.MODEL.HIERVL.NUM_INSTANCE_QUERIES)

    @classmethod
    def build_unlabeled_criterion(cls, cfg, num_classes: int) -> CMCRLoss:
        for key, action, on in (("CLIP_RELABEL_OBJECTS", "renames", cfg.SEMI.CLIP_RELABEL_OBJECTS),
                                ("ORACLE_LABELS", "replaces", cfg.SEMI.ORACLE_LABELS),
                                ("LABEL_REFINEMENT_ITERATIONS", "refines", cfg.SEMI.LABEL_REFINEMENT_ITERATIONS > 0)):
            # all act on CMCR's teacher targets; entropy minimisation has none, so they would do nothing
            if cfg.MODEL.HIERVL.UNLABELED_LOSS == "entropy" and on:
                raise ValueError(f"SEMI.{key} {action} the teacher's CMCR targets, and MODEL.HIERVL.UNLABELED_LOSS "
                                 f"'entropy' has no teacher targets: use UNLABELED_LOSS 'cmcr' or switch {key} off")
        return CMCRLoss(cfg, num_classes, mode=cfg.MODEL.HIERVL.UNLABELED_LOSS)

    @classmethod
    def unlabeled_weight_from_config(cls, cfg) -> float:
        hiervl = cfg.MODEL.HIERVL
        return cfg.SEMI.CMCR_WEIGHT if hiervl.UNLABELED_LOSS == "cmcr" else hiervl.ENTROPY_WEIGHT

    # ------------------------------------------------------------------ network steps
    def relevance_inputs(self, images: Tensor, text_embeddings: Tensor,
                         presence: Optional[Tensor]) -> Dict[str, Optional[Tensor]]:
        """Zero-shot relevance: ``presence`` on labeled images, else E_I^0's image embedding."""
        zero_shot_embedding = None
        if self.htqg.sre_mode == "clip_zero_shot" and presence is None:
            # unlabeled and test images: zero-shot CLIP = the FROZEN pretrained encoder's image embedding
            if self.backbone.reference_tower is not None:
                zero_shot_embedding = self.backbone.reference_global_embedding(images)
            else:  # no pretrained CLIP (warned when built): every class keeps its queries
                presence = images.new_ones(images.shape[0], text_embeddings.shape[0])
        return {"global_embedding": zero_shot_embedding, "presence": presence}

    def labeled_presence(self, labels: Tensor) -> Optional[Tensor]:
        if self.htqg.sre_mode != "clip_zero_shot":
            return None
        return class_presence(list(labels), self.num_classes, self.ignore_value)

    def decode_pixels(self, pixel_features: Dict[str, Tensor], weighted_queries: Tensor,
                      level_hook: Optional[Callable[[List[Tensor]], List[Tensor]]] = None) -> Tuple[Tensor, List[Tensor]]:
        text_centers = None
        if self.text_center_proj is not None:
            # textual cluster centres c_t^(l) (B x 3 x K x D) when there is one query level per pixel-decoder
            # level, otherwise one shared set from the mean of the levels (B x K x D)
            centers = self.text_center_proj(weighted_queries)
            text_centers = centers if centers.shape[1] == 3 else centers.mean(dim=1)
        if level_hook is None:
            return self.pixel_decoder.forward_features(pixel_features, text_centers)
        return self.pixel_decoder.forward_features(pixel_features, text_centers, level_hook=level_hook)

    # ------------------------------------------------------------------ losses
    def supervised_losses(self, outputs: HVLFormerOutput, labels: Tensor, text_embeddings: Tensor,
                          images: Tensor) -> Dict[str, Tensor]:
        """HVLFormer's terms, then ``loss_prompt`` and ``loss_masked_vl``."""
        losses = super().supervised_losses(outputs, labels, text_embeddings, images)
        if self.prompt_weight > 0:
            reference = self.reference_text()
            losses["loss_prompt"] = self.prompt_weight * (prompt_topology_loss(text_embeddings, reference)
                                                          + prompt_anchor_loss(text_embeddings, reference))
        if self.masked_vl_weight > 0:
            losses["loss_masked_vl"] = self.masked_vl_weight * self.masked_vision_language_loss(
                images, labels, text_embeddings)
        return losses

    def masked_vision_language_loss(self, images: Tensor, labels: Tensor, text_embeddings: Tensor) -> Tensor:
        """Hide all pixels of one random present class per image; L_align + lambda * L_mask.

        images: ``B x 3 x H x W`` normalised; labels ``B x H x W``. The masked image goes through the trained
        encoder, the unmasked one through the frozen E_I^0.
        """
        stride = self.backbone.token_stride
        hidden = torch.zeros_like(labels, dtype=torch.bool)
        for i, label in enumerate(labels):
            present = torch.unique(label[label != self.ignore_value])
            if present.numel():
                chosen = present[torch.randint(present.numel(), (1,), device=present.device)]
                hidden[i] = label == chosen
        masked_images = images.masked_fill(hidden[:, None], 0.0)  # 0 = the mean colour after normalisation
        masked_dense = self.backbone(masked_images)["clip_dense"]
        size = masked_dense.shape[-2:]
        # a patch counts as hidden when most of its pixels are
        region = F.avg_pool2d(hidden[:, None].float(), stride)[:, 0][..., : size[0], : size[1]] > 0.5
        patch_labels = downsample_labels(labels, size)  # the label at each patch's centre
        region = region & (patch_labels != self.ignore_value)
        loss = masked_alignment_loss(masked_dense, text_embeddings, patch_labels.clamp_max(self.num_classes - 1),
                                     region, self.criterion.vl_temperature)
        if self.masked_vl_mask_weight > 0:  # 0 without a pretrained E_I^0 (see from_config)
            reference_dense = self.backbone.reference_dense_embedding(images)
            loss = loss + self.masked_vl_mask_weight * masked_consistency_loss(masked_dense, reference_dense, region)
        return loss
