"""The HVLFormer meta-architecture (paper Sec. 3 and Fig. 2), registered in detectron2's ``META_ARCH_REGISTRY``.

Data flow for a padded batch ``B x 3 x H x W``::

    CLIP ViT (E_I) -> res2..res5, f_CLS (B x C), dense embedding (B x C x H/16 x W/16)
    text tower (E_T) + learnable context -> t (K x C), once per step
    HTQG: t -> Q_hat (E x K x D); SRE(res3..res5, t) -> s (B x K) (clip_zero_shot: GT presence on labeled
          images, zero-shot presence of the frozen E_I^0 on unlabeled and test images); Q~ = s * Q_hat
    pixel decoder (MSDeformAttn) -> mask_features (B x D x H/4 x W/4), [z^1, z^2, z^3] (strides 32/16/8)
    PTRM(Q~, z) -> refined queries Q (B x E x K x D), z_out
    transformer decoder(z_out, mask_features, Q level-major (B x E*K x D)) -> class logits, masks, attention
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils.logger import log_first_n
from torch import Tensor, nn

from .modeling.backbone import CLIPViTBackbone
from .modeling.clip_loader import build_clip_model, has_pretrained_reference
from .modeling.criterion import HVLSetCriterion, semantic_to_targets
from .modeling.htqg import HTQG, diversity_loss
from .modeling.matcher import HungarianMatcher
from .modeling.pixel_decoder import build_pixel_decoder
from .modeling.cmcr import CMCRLoss
from .modeling.ptrm import PTRM
from .modeling.regularization import (
    class_presence,
    language_regularization,
    masked_alignment_loss,
    masked_consistency_loss,
    prompt_anchor_loss,
    prompt_topology_loss,
    relevance_loss,
    vision_language_regularization,
    vision_regularization,
)
from .modeling.text import CLIPTextEncoder, load_class_descriptions, reference_prompts, resolve_descriptions_path
from .modeling.transformer_decoder import build_transformer_decoder

logger = logging.getLogger("hvlformer")

# CLIP's normalisation, in 0-255 pixel units.
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)


def _dataset_classes(cfg) -> Tuple[List[str], Optional[str]]:
    """Class names and descriptions name of the first training (or test) dataset."""
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    labeled = getattr(cfg.DATASETS, "TRAIN_LABELED", None)
    if labeled:
        names = list(labeled) + names
    if not names:
        raise ValueError("DATASETS.TRAIN (or DATASETS.TEST) must name a registered dataset to get the class list")
    metadata = MetadataCatalog.get(names[0])
    classes = getattr(metadata, "stuff_classes", None)
    if not classes:
        raise ValueError(f"dataset {names[0]!r} has no 'stuff_classes' metadata; is it registered?")
    return list(classes), getattr(metadata, "descriptions_name", None)


@META_ARCH_REGISTRY.register()
class HVLFormer(nn.Module):
    """Semi-supervised semantic segmentation with language anchors.

    ``forward`` follows detectron2: a list of dicts with ``"image"`` (``3 x H x W`` uint8, RGB) and, in
    training, ``"sem_seg"`` (``H x W`` long); it returns a dict of weighted losses in training and
    ``[{"sem_seg": K x height x width}]`` (class scores at the original size) in inference.
    Lower-level methods (``encode_text``, ``predict``, ``supervised_losses``) are what the
    semi-supervised trainer uses.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: CLIPViTBackbone,
        text_encoder: CLIPTextEncoder,
        pixel_decoder: nn.Module,
        htqg: HTQG,
        ptrm: PTRM,
        transformer_decoder: nn.Module,
        criterion: HVLSetCriterion,
        class_names: List[str],
        class_prompts: List[List[str]],
        reference_class_prompts: List[str],
        num_query_levels: int,
        pixel_mean: Tuple[float, ...] = CLIP_PIXEL_MEAN,
        pixel_std: Tuple[float, ...] = CLIP_PIXEL_STD,
        size_divisibility: int = 32,
        ignore_value: int = 255,
        loss_weights: Optional[Dict[str, float]] = None,
        vl_temperature: float = 0.07,
        text_cross_attention: bool = False,
        masked_vl_mask_weight: float = 1.0,
        unlabeled_criterion: Optional[CMCRLoss] = None,
        unlabeled_weight: float = 5.0,
        sliding_window: bool = False,
        window_size: int = 512,
        window_stride: int = 341,
        pixel_text_alignment: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.pixel_decoder = pixel_decoder
        self.htqg = htqg
        self.ptrm = ptrm
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.num_query_levels = num_query_levels
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        weights = {"reg_language": 1.0, "reg_vision_language": 1.0, "reg_vision": 1.0, "div": 1.0, "sre": 1.0,
                   "prompt": 0.0, "masked_vl": 0.0}
        unknown = set(loss_weights or {}) - set(weights)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}")
        weights.update(loss_weights or {})
        self.loss_weights = weights
        self.vl_temperature = vl_temperature
        self.masked_vl_mask_weight = masked_vl_mask_weight
        self.sliding_window = sliding_window
        self.window_size = window_size
        self.window_stride = window_stride
        # loss on unlabeled views (CMCR or entropy); used by the semi-supervised trainer
        self.unlabeled_criterion = unlabeled_criterion if unlabeled_criterion is not None else CMCRLoss()
        self.unlabeled_weight = unlabeled_weight
        # TEST.PIXEL_TEXT_ALIGNMENT: inference outputs also carry the eq.-10 pixel-text alignment (E values).
        self.pixel_text_alignment = pixel_text_alignment
        # HierVL: projection of the level queries to the K textual cluster centres of the pixel decoder.
        hidden_dim = htqg.hidden_dim
        self.text_center_proj = nn.Linear(hidden_dim, hidden_dim) if text_cross_attention else None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        # Frozen T0 reference embeddings: computed lazily on the model's device, never saved.
        self.register_buffer("reference_text_embeddings", None, persistent=False)
        self.set_vocabulary(class_names, class_prompts, reference_class_prompts)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        hv = cfg.MODEL.HVLFORMER
        class_names, descriptions_name = _dataset_classes(cfg)
        num_classes = len(class_names)
        if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES not in (num_classes, 0):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} but the dataset "
                             f"has {num_classes} classes")
        # HierVL's zero-shot relevance needs the pretrained E_I^0 at inference too (not in checkpoints)
        zero_shot = hv.SRE.MODE == "clip_zero_shot"
        from_checkpoint = hv.CLIP.WEIGHTS_FROM_CHECKPOINT and not zero_shot
        clip_model, tokenizer = build_clip_model(hv.CLIP.MODEL_NAME, hv.CLIP.PRETRAINED,
                                                 weights_from_checkpoint=from_checkpoint)
        # E_I^0 = the pretrained encoder only (copied right after PRETRAINED was loaded, before any
        # MODEL.WEIGHTS); without pretrained weights L^V and HierVL's L_mask have nothing to anchor to.
        reference = has_pretrained_reference(hv.CLIP)
        if zero_shot and not hv.CLIP.PRETRAINED:
            log_first_n(logging.WARNING, "SRE.MODE clip_zero_shot without pretrained CLIP weights "
                        "(MODEL.HVLFORMER.CLIP.PRETRAINED is empty): there is no zero-shot CLIP, so every class "
                        "keeps its queries on unlabeled and test images.", n=1, name="hvlformer")
        if not reference and hv.CLIP.FROZEN_REFERENCE and not hv.CLIP.WEIGHTS_FROM_CHECKPOINT and (
                hv.REG_VISION_WEIGHT > 0 or (hv.HIERVL.MASKED_VL_WEIGHT > 0 and hv.HIERVL.MASK_CONSISTENCY_WEIGHT > 0)):
            log_first_n(logging.WARNING, "L^V (MODEL.HVLFORMER.REG_VISION_WEIGHT) and HierVL's masked L_mask are "
                        "SWITCHED OFF: MODEL.HVLFORMER.CLIP.PRETRAINED is empty, so there is no pretrained CLIP "
                        "encoder E_I^0 to anchor f_CLS to (a copy of a random initialisation would anchor to "
                        "noise). Set PRETRAINED to the encoder's pretrained tag or file, also when training "
                        "from MODEL.WEIGHTS.", n=1, name="hvlformer")
        backbone = CLIPViTBackbone(
            visual=clip_model.visual,
            out_indices=list(hv.CLIP.OUT_INDICES),
            pyramid_norm=hv.CLIP.PYRAMID_NORM,
            gradient_checkpointing=hv.CLIP.GRADIENT_CHECKPOINTING,
            frozen_reference=has_pretrained_reference(hv.CLIP, zero_shot),
        )
        text_encoder = CLIPTextEncoder(clip_model, tokenizer, num_context=hv.TEXT.NUM_CONTEXT)
        descriptions = load_class_descriptions(
            resolve_descriptions_path(hv.TEXT.DESCRIPTIONS, descriptions_name), class_names,
            num_descriptions=hv.TEXT.NUM_DESCRIPTIONS, fallback_template=hv.TEXT.FALLBACK_TEMPLATE)
        logger.info("class prompts: %s (%d per class)", descriptions.source, len(descriptions.prompts[0]))
        shapes = backbone.output_shape()
        pixel_decoder = build_pixel_decoder(cfg, {k: v for k, v in shapes.items()
                                                  if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES})
        hidden_dim = hv.HIDDEN_DIM
        if cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM != hidden_dim:
            raise ValueError("MODEL.SEM_SEG_HEAD.CONVS_DIM must equal MODEL.HVLFORMER.HIDDEN_DIM (PTRM mixes them)")
        htqg = HTQG(text_encoder.embed_dim, hidden_dim, hv.NUM_QUERY_LEVELS,
                    [shapes[k].channels for k in ("res3", "res4", "res5")],
                    sre_mode=hv.SRE.MODE, sre_threshold=hv.SRE.THRESHOLD, sre_temperature=hv.SRE.TEMPERATURE,
                    query_source=hv.QUERY_SOURCE, num_classes=num_classes)
        ptrm = PTRM(hidden_dim, hv.NUM_QUERY_LEVELS, num_pixel_levels=3, mode=hv.PTRM.MODE,
                    kernel_size=hv.PTRM.KERNEL_SIZE, hidden_channels=hv.PTRM.HIDDEN_CHANNELS, num_heads=hv.NHEADS)
        transformer_decoder = build_transformer_decoder(cfg, hidden_dim, num_classes, text_encoder.embed_dim)
        matcher = (HungarianMatcher(cost_class=hv.CLASS_WEIGHT, cost_mask=hv.MASK_WEIGHT, cost_dice=hv.DICE_WEIGHT,
                                    num_points=hv.TRAIN_NUM_POINTS) if hv.NUM_INSTANCE_QUERIES > 0 else None)
        criterion = HVLSetCriterion(
            num_classes=num_classes,
            num_query_levels=hv.NUM_QUERY_LEVELS,
            num_instance_queries=hv.NUM_INSTANCE_QUERIES,
            matcher=matcher,
            weight_dict={"loss_ce": hv.CLASS_WEIGHT, "loss_mask": hv.MASK_WEIGHT, "loss_dice": hv.DICE_WEIGHT},
            no_object_weight=hv.NO_OBJECT_WEIGHT,
            num_points=hv.TRAIN_NUM_POINTS,
            oversample_ratio=hv.OVERSAMPLE_RATIO,
            importance_sample_ratio=hv.IMPORTANCE_SAMPLE_RATIO,
            deep_supervision=hv.DEEP_SUPERVISION,
        )
        return {
            "backbone": backbone,
            "text_encoder": text_encoder,
            "pixel_decoder": pixel_decoder,
            "htqg": htqg,
            "ptrm": ptrm,
            "transformer_decoder": transformer_decoder,
            "criterion": criterion,
            "class_names": class_names,
            "class_prompts": descriptions.prompts,
            "reference_class_prompts": reference_prompts(class_names, descriptions.attributes,
                                                         template=hv.TEXT.REFERENCE_TEMPLATE),
            "num_query_levels": hv.NUM_QUERY_LEVELS,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "size_divisibility": hv.SIZE_DIVISIBILITY,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss_weights": {
                "reg_language": hv.REG_LANGUAGE_WEIGHT,
                "reg_vision_language": hv.REG_VISION_LANGUAGE_WEIGHT,
                "reg_vision": hv.REG_VISION_WEIGHT if reference else 0.0,
                "div": hv.DIV_WEIGHT,
                "sre": hv.SRE_WEIGHT,
                "prompt": hv.HIERVL.PROMPT_WEIGHT,
                "masked_vl": hv.HIERVL.MASKED_VL_WEIGHT,
            },
            "vl_temperature": hv.REG_VL_TEMPERATURE,
            "text_cross_attention": cfg.MODEL.SEM_SEG_HEAD.TEXT_CROSS_ATTENTION,
            "masked_vl_mask_weight": hv.HIERVL.MASK_CONSISTENCY_WEIGHT if reference else 0.0,
            "sliding_window": cfg.TEST.SLIDING_WINDOW.ENABLED,
            "window_size": cfg.TEST.SLIDING_WINDOW.CROP_SIZE,
            "window_stride": cfg.TEST.SLIDING_WINDOW.STRIDE,
            "unlabeled_criterion": CMCRLoss(
                confidence_threshold=cfg.SEMI.CONFIDENCE_THRESHOLD, weak_weight=cfg.SEMI.MASK_WEIGHT_WEAK,
                strong_weight=cfg.SEMI.MASK_WEIGHT_STRONG, use_mask=cfg.SEMI.MASK_CONSISTENCY,
                use_class=cfg.SEMI.CLASS_CONSISTENCY, use_align=cfg.SEMI.ALIGN_CONSISTENCY,
                mode=cfg.SEMI.UNLABELED_LOSS,
                distribution_alignment_classes=(len(class_names) if cfg.SEMI.DISTRIBUTION_ALIGNMENT else 0),
                distribution_alignment_momentum=cfg.SEMI.DISTRIBUTION_ALIGNMENT_MOMENTUM),
            "unlabeled_weight": (cfg.SEMI.CMCR_WEIGHT if cfg.SEMI.UNLABELED_LOSS == "cmcr"
                                 else cfg.SEMI.ENTROPY_WEIGHT),
            "pixel_text_alignment": cfg.TEST.PIXEL_TEXT_ALIGNMENT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_vocabulary(self, class_names: List[str], class_prompts: List[List[str]],
                       reference_class_prompts: List[str]) -> None:
        """Replace the class list (K names, K lists of prompts, K reference prompts).

        A new K at inference needs the ``text`` classifier (the ``linear`` one has K+1 fixed outputs).
        """
        if not (len(class_names) == len(class_prompts) == len(reference_class_prompts)):
            raise ValueError("class_names, class_prompts and reference_class_prompts must have the same length")
        self.class_names = list(class_names)
        self.class_prompts = [list(p) for p in class_prompts]
        self.reference_class_prompts = list(reference_class_prompts)
        self.reference_text_embeddings = None

    # ------------------------------------------------------------------ building blocks
    def encode_text(self) -> Tensor:
        """t: ``K x C`` normalised class embeddings (one batched text pass; cached by the encoder in eval)."""
        return self.text_encoder(self.class_prompts)

    def reference_text(self) -> Tensor:
        """T0: ``K x C`` frozen reference embeddings, computed lazily on the model's device."""
        if self.reference_text_embeddings is None or self.reference_text_embeddings.device != self.device:
            self.reference_text_embeddings = self.text_encoder.reference_embeddings(self.reference_class_prompts)
        return self.reference_text_embeddings

    def preprocess_images(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalise and pad the images of a batch to a multiple of ``size_divisibility``."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def pad_labels(self, batched_inputs: List[Dict[str, Any]], padded_size: Tuple[int, int]) -> Tensor:
        """Stack the ``sem_seg`` labels into ``B x H x W``, padding with the ignore value."""
        labels = []
        for x in batched_inputs:
            if "sem_seg" not in x:
                raise KeyError("training inputs need a 'sem_seg' label map")
            sem_seg = x["sem_seg"].to(self.device).long()
            pad_h, pad_w = padded_size[0] - sem_seg.shape[0], padded_size[1] - sem_seg.shape[1]
            labels.append(F.pad(sem_seg, (0, pad_w, 0, pad_h), value=self.ignore_value))
        return torch.stack(labels)

    def predict(self, images: Tensor, text_embeddings: Tensor, presence: Optional[Tensor] = None) -> Dict[str, Any]:
        """Run the whole network on a normalised, padded batch ``B x 3 x H x W``.

        Returns the transformer-decoder outputs (``pred_logits`` ``B x Q x (K+1)``, ``pred_masks``
        ``B x Q x H/4 x W/4``, ``attn_maps``, ``aux_outputs``) plus ``features`` (backbone dict incl.
        ``clip_global`` and ``clip_dense``), ``level_queries`` (``E x K x D``), ``htqg`` extras
        (``relevance`` ``B x K``, ``sre_logits``) and ``ptrm_affinity``.
        """
        features = self.backbone(images)
        zero_shot_embedding = None
        if self.htqg.sre_mode == "clip_zero_shot" and presence is None:
            # unlabeled and test images: zero-shot CLIP = the FROZEN pretrained encoder's image embedding
            if self.backbone.reference_tower is not None:
                zero_shot_embedding = self.backbone.reference_global_embedding(images)
            else:  # no pretrained CLIP (warned when built): every class keeps its queries
                presence = images.new_ones(images.shape[0], text_embeddings.shape[0])
        weighted_queries, level_queries, htqg_extras = self.htqg(
            text_embeddings, [features["res3"], features["res4"], features["res5"]],
            global_embedding=zero_shot_embedding, presence=presence)
        text_centers = None
        if self.text_center_proj is not None:
            # HierVL's per-level textual cluster centres c_t^(l) (B x 3 x K x D) when there is one query
            # level per pixel-decoder level, otherwise one shared set from the mean of the levels (B x K x D).
            centers = self.text_center_proj(weighted_queries)
            text_centers = centers if centers.shape[1] == 3 else centers.mean(dim=1)
        pixel_features = {k: v for k, v in features.items() if k in ("res2", "res3", "res4", "res5")}
        mask_features, multi_scale_features = self.pixel_decoder.forward_features(pixel_features, text_centers)
        queries, refined_features, affinity = self.ptrm(weighted_queries, multi_scale_features)
        batch, levels, num_classes, dim = queries.shape
        outputs = self.transformer_decoder(refined_features, mask_features,
                                           queries.reshape(batch, levels * num_classes, dim),
                                           class_embeddings=text_embeddings)
        outputs["features"] = features
        outputs["level_queries"] = level_queries
        outputs["htqg"] = htqg_extras
        outputs["ptrm_affinity"] = affinity
        outputs["mask_features"] = mask_features
        outputs["refined_queries"] = queries  # B x E x K x D (PTRM output), e.g. for the eq.-10 alignment
        return outputs

    # ------------------------------------------------------------------ training
    def supervised_losses(self, outputs: Dict[str, Any], labels: Tensor, text_embeddings: Tensor,
                          images: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Weighted L_seg + L_reg + L_div + SRE BCE (+ HierVL options) for a labeled batch.

        labels: ``B x H x W`` long with the ignore value; images: the normalised batch (needed by L^V
        and the masked vision-language option).
        """
        targets = [semantic_to_targets(label, self.num_classes, self.ignore_value) for label in labels]
        seg_losses = self.criterion(outputs, targets)
        losses = {k: v * self.criterion.weight_dict[k] for k, v in seg_losses.items() if k in self.criterion.weight_dict}
        w = self.loss_weights
        features = outputs["features"]
        if w["reg_language"] > 0:
            losses["loss_reg_language"] = w["reg_language"] * language_regularization(
                text_embeddings, self.reference_text())
        if w["reg_vision_language"] > 0:
            losses["loss_reg_vision_language"] = w["reg_vision_language"] * vision_language_regularization(
                features["clip_dense"], text_embeddings, labels, self.vl_temperature, self.ignore_value)
        if w["reg_vision"] > 0:
            if images is None:
                raise ValueError("L^V needs the input images")
            losses["loss_reg_vision"] = w["reg_vision"] * vision_regularization(
                features["clip_global"], self.backbone.reference_global_embedding(images))
        if w["div"] > 0:
            losses["loss_div"] = w["div"] * diversity_loss(outputs["level_queries"])
        if w["sre"] > 0 and "sre_logits" in outputs["htqg"]:
            presence = class_presence(list(labels), self.num_classes, self.ignore_value)
            losses["loss_sre"] = w["sre"] * relevance_loss(outputs["htqg"]["sre_logits"], presence)
        if w["prompt"] > 0:
            reference = self.reference_text()
            losses["loss_prompt"] = w["prompt"] * (prompt_topology_loss(text_embeddings, reference)
                                                   + prompt_anchor_loss(text_embeddings, reference))
        if w["masked_vl"] > 0:
            if images is None:
                raise ValueError("the masked vision-language regularisation needs the input images")
            losses["loss_masked_vl"] = w["masked_vl"] * self.masked_vision_language_loss(
                images, labels, text_embeddings)
        return losses

    def masked_vision_language_loss(self, images: Tensor, labels: Tensor, text_embeddings: Tensor) -> Tensor:
        """HierVL: hide all pixels of one random present class per image; L_align + lambda * L_mask.

        The masked image goes through the trained encoder, the unmasked one through the frozen E_I^0.
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
        patch_labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        region = region & (patch_labels != self.ignore_value)
        loss = masked_alignment_loss(masked_dense, text_embeddings, patch_labels.clamp_max(self.num_classes - 1),
                                     region, self.vl_temperature)
        if self.masked_vl_mask_weight > 0:  # 0 without a pretrained E_I^0 (see from_config)
            reference_dense = self.backbone.reference_dense_embedding(images)
            loss = loss + self.masked_vl_mask_weight * masked_consistency_loss(masked_dense, reference_dense, region)
        return loss

    def normalize(self, images: Tensor) -> Tensor:
        """``B x 3 x H x W`` uint8/float 0-255 images -> normalised float (on the model's device)."""
        return (images.to(self.device).float() - self.pixel_mean) / self.pixel_std

    def unlabeled_losses(self, unlabeled: Dict[str, Any], text_embeddings: Tensor) -> Dict[str, Tensor]:
        """Weighted losses of the weak and strong views of a batch of unlabeled images.

        ``unlabeled`` holds ``"image_weak"`` and ``"image_strong"`` (``B x 3 x H x W``, the strong one
        already CutMix-ed), ``"padding"`` and ``"cutmix_box"`` (``B x H x W`` bool), ``"mix_order"``
        (``B``) and either ``"targets"`` (an EMA teacher's per-layer targets of the original view, from
        ``unlabeled_criterion.targets``) or ``"image_original"`` (``B x 3 x H x W``: the model itself is
        the teacher, without gradient). The two views go through the network as one batch.
        """
        if "targets" not in unlabeled and self.unlabeled_criterion.mode == "cmcr":
            with torch.no_grad():
                original = self.predict(self.normalize(unlabeled["image_original"]), text_embeddings.detach())
                unlabeled = {**unlabeled, "targets": self.unlabeled_criterion.targets(original, unlabeled["padding"])}
        weak = self.normalize(unlabeled["image_weak"])
        strong = self.normalize(unlabeled["image_strong"])
        batch = weak.shape[0]
        outputs = self.predict(torch.cat([weak, strong]), text_embeddings)

        def half(out: Dict[str, Any], part: slice) -> Dict[str, Any]:
            keys = ("pred_logits", "pred_masks", "attn_maps")
            return {**{k: out[k][part] for k in keys},
                    "aux_outputs": [{k: (a[k][part] if a.get(k) is not None else None) for k in keys}
                                    for a in out["aux_outputs"]]}

        weak_out, strong_out = half(outputs, slice(0, batch)), half(outputs, slice(batch, 2 * batch))
        padding = unlabeled["padding"].to(self.device)
        criterion = self.unlabeled_criterion
        if criterion.mode == "entropy":
            terms = criterion.entropy(weak_out, strong_out, padding)
        else:
            terms = criterion(unlabeled["targets"], weak_out, strong_out, padding,
                              unlabeled["cutmix_box"].to(self.device), unlabeled["mix_order"].to(self.device))
        stats = {k: v for k, v in terms.items() if k.startswith("stat_")}
        if "relevance" in outputs["htqg"]:
            stats["stat_sre_mean_unlabeled"] = outputs["htqg"]["relevance"].detach().float().mean()
        losses = {k: self.unlabeled_weight * v for k, v in terms.items() if k.startswith("loss")}
        return {**losses, **stats}

    def forward(self, batched_inputs: List[Dict[str, Any]], unlabeled: Optional[Dict[str, Any]] = None):
        """Training: weighted supervised losses of the labeled batch (plus, when ``unlabeled`` is given,
        the unlabeled losses and ``stat_*`` statistics, which are not losses). Inference: per image
        ``{"sem_seg": K x height x width}``."""
        images = self.preprocess_images(batched_inputs)
        text_embeddings = self.encode_text()  # once per step, shared by every view
        if self.training:
            labels = self.pad_labels(batched_inputs, tuple(images.tensor.shape[-2:]))
            presence = None
            if self.htqg.sre_mode == "clip_zero_shot":
                presence = class_presence(list(labels), self.num_classes, self.ignore_value)
            outputs = self.predict(images.tensor, text_embeddings, presence)
            losses = self.supervised_losses(outputs, labels, text_embeddings, images.tensor)
            if unlabeled is not None:
                self.unlabeled_criterion.observe_labels(labels, self.ignore_value)  # distribution alignment
                losses.update(self.unlabeled_losses(unlabeled, text_embeddings))
                if "relevance" in outputs["htqg"]:
                    losses["stat_sre_mean_labeled"] = outputs["htqg"]["relevance"].detach().float().mean()
            return losses
        return self.inference(batched_inputs, images, text_embeddings)

    # ------------------------------------------------------------------ inference
    @staticmethod
    def semantic_scores(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
        """``B x Q x (K+1)`` logits, ``B x Q x h x w`` mask logits -> ``B x K x h x w`` class scores.

        All queries of a class (its E levels) add up: ``einsum("qc,qhw->chw", softmax[:, :K], sigmoid)``.
        """
        probs = pred_logits.float().softmax(dim=-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", probs, pred_masks.float().sigmoid())

    def _scores_for(self, images: Tensor, text_embeddings: Tensor) -> Tensor:
        """Class scores ``B x K x H x W`` at the (padded) input resolution of a normalised batch."""
        return self._scores_and_alignment(images, text_embeddings)[0]

    def _scores_and_alignment(self, images: Tensor, text_embeddings: Tensor,
                              valid_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Class scores ``B x K x H x W`` of a normalised batch ``B x 3 x H x W``, and, when ``valid_sizes``
        (the unpadded ``(h, w)`` of each image) is given, the pixel-text alignment ``B x E`` (supplement
        eq. 10) of the PTRM queries and ``mask_features`` over each image's unpadded cells."""
        outputs = self.predict(images, text_embeddings)
        masks = F.interpolate(outputs["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        scores = self.semantic_scores(outputs["pred_logits"], masks)
        if valid_sizes is None:
            return scores, None
        from .evaluation.alignment import pixel_text_alignment, valid_cells

        mask_features = outputs["mask_features"]
        cells = [valid_cells(size, tuple(images.shape[-2:]), mask_features.shape[-2:]) for size in valid_sizes]
        return scores, pixel_text_alignment(outputs["refined_queries"], mask_features, cells)

    def sliding_window_scores(self, image: Tensor, text_embeddings: Tensor) -> Tensor:
        """Sliding-window class scores for one normalised image ``3 x H x W`` -> ``K x H x W``.

        Windows of ``window_size`` with ``window_stride``; the last window of a row/column is aligned to
        the image border; images smaller than a window are padded (with 0, the mean colour). The
        per-pixel scores are averaged over the windows that cover the pixel (count matrix).
        """
        return self._sliding_window(image, text_embeddings, with_alignment=False)[0]

    def _sliding_window(self, image: Tensor, text_embeddings: Tensor,
                        with_alignment: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``sliding_window_scores`` and, with ``with_alignment``, the pixel-text alignment ``E``
        averaged over the windows (each window's unpadded part)."""
        size, stride = self.window_size, self.window_stride
        height, width = image.shape[-2:]
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        padded = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        full_h, full_w = padded.shape[-2:]
        tops = list(range(0, max(full_h - size, 0) + 1, stride))
        lefts = list(range(0, max(full_w - size, 0) + 1, stride))
        if tops[-1] + size < full_h:
            tops.append(full_h - size)
        if lefts[-1] + size < full_w:
            lefts.append(full_w - size)
        scores = padded.new_zeros(self.num_classes, full_h, full_w)
        counts = padded.new_zeros(1, full_h, full_w)
        # the image part of a window; the rest is the padding of an image smaller than a window
        valid_sizes = [(min(height, size), min(width, size))] if with_alignment else None
        alignments = []
        for top in tops:
            for left in lefts:
                window = padded[:, top: top + size, left: left + size]
                window_batch = ImageList.from_tensors([window], self.size_divisibility).tensor
                if with_alignment:
                    window_scores, alignment = self._scores_and_alignment(window_batch, text_embeddings, valid_sizes)
                    alignments.append(alignment[0])
                else:
                    window_scores = self._scores_for(window_batch, text_embeddings)
                scores[:, top: top + size, left: left + size] += window_scores[0, :, :size, :size]
                counts[:, top: top + size, left: left + size] += 1
        alignment = torch.stack(alignments).mean(dim=0) if with_alignment else None
        return (scores / counts)[:, :height, :width], alignment

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict[str, Any]], images: ImageList,
                  text_embeddings: Tensor) -> List[Dict[str, Tensor]]:
        """Per image ``{"sem_seg": K x height x width}`` at the original size (``height``/``width`` keys),
        plus ``"pixel_text_alignment"`` (``E`` values, supplement eq. 10) when ``pixel_text_alignment`` is
        on: computed from the same forward pass as the scores, over each image's unpadded part; with
        sliding windows, the windows of an image are averaged (see :mod:`hvlformer.evaluation.alignment`).
        """
        from .evaluation.alignment import ALIGNMENT_KEY

        with_alignment = self.pixel_text_alignment
        if self.sliding_window:
            per_image, alignment = zip(*(self._sliding_window(images.tensor[i, :, :h, :w], text_embeddings,
                                                              with_alignment)
                                         for i, (h, w) in enumerate(images.image_sizes)))
        else:
            batch_scores, batch_alignment = self._scores_and_alignment(
                images.tensor, text_embeddings, list(images.image_sizes) if with_alignment else None)
            per_image = [batch_scores[i, :, :h, :w] for i, (h, w) in enumerate(images.image_sizes)]
            alignment = list(batch_alignment) if with_alignment else [None] * len(per_image)
        results = []
        for scores, value, inputs, image_size in zip(per_image, alignment, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            result = {"sem_seg": sem_seg_postprocess(scores, image_size, height, width)}
            if with_alignment:
                result[ALIGNMENT_KEY] = value
            results.append(result)
        return results
