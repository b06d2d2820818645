"""The HVLFormer meta-architecture (paper Sec. 3 and Fig. 2), registered in detectron2's ``META_ARCH_REGISTRY``.

Data flow of :meth:`HVLFormer.predict` for a normalised, padded batch ``B x 3 x H x W``::

    backbone E_I (CLIP ViT)  -> res2..res5, f_CLS (B x C), dense embedding (B x C x H/s x W/s)
    text E_T + context       -> t (K x C), once per step (encode_text)
    HTQG: HQG(t) -> Q_hat (E x K x D); SRE(res3..res5, t) -> s (B x K); Q~ = s * Q_hat
    pixel decoder            -> mask_features (B x D x H/4 x W/4), [z^1, z^2, z^3] (strides 32/16/8)
    PTRM(Q~, z)              -> refined queries Q (B x E x K x D), z_out
    transformer decoder(z_out, mask_features, Q level-major (B x E*K x D)) -> class logits, masks, attention
    losses: HVLFormerLoss (labeled), unlabeled_objective (CMCR)

``predict`` = :meth:`HVLFormer.extract_features` (the backbone step) + :meth:`HVLFormer.decode` (the rest).
The thesis's optional modules (docs/THESIS_MODULES.md; each off by default, and then not even built, so the
paper's model is unchanged) hook in there: LSMSeg's visual fusion after the backbone; LSMSeg's class
refinement on the HTQG queries; CAA on one pixel-decoder level (before the FPN); ECAC on the mask features
after the decoder; LSMSeg's category filter between the two steps at inference.

Inference (:mod:`hvlformer.modeling.inference`) turns the last layer into class scores
(:func:`~hvlformer.modeling.outputs.semantic_scores`), whole-image or with sliding windows, optionally with the
eq.-10 pixel-text alignment (:mod:`hvlformer.modeling.alignment`); the thesis modules are built by
:func:`~hvlformer.modeling.thesis.build_thesis_modules`. HierVL, the earlier variant, is :mod:`.hiervl`, a
subclass.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from detectron2.utils.logger import log_first_n
from torch import Tensor, nn

from ..backbone import CLIPViTBackbone, build_clip_backbone
from ..clip_ensemble import CLIPEnsemble
from ..clip_guidance import CLIPGuidance
from ..clip_loader import build_clip_model, has_pretrained_reference, reference_needed_at_test
from ..cmcr import CMCRLoss
from ..criterion import HVLSetCriterion
from ..htqg import HTQG
from ..inference import semantic_inference
from ..label_refinement import PixelAdaptiveRefinement
from ..losses import HVLFormerLoss
from ..outputs import HVLFormerOutput, semantic_scores
from ..pixel_decoder import build_pixel_decoder
from ..ptrm import PTRM
from ..text import CLIPTextEncoder, load_class_descriptions, reference_prompts, resolve_descriptions_path
from ..thesis import (
    CategoryFilter,
    ClassAwareAffinity,
    ClassLinearAttentionRefinement,
    ExtendedContextAwareClassifier,
    VisualFeatureFusion,
    build_thesis_modules,
    ecac_vocabulary_index,
)
from ..transformer_decoder import build_transformer_decoder
from ..unlabeled_objective import unlabeled_losses

__all__ = ["HVLFormer", "CLIP_PIXEL_MEAN", "CLIP_PIXEL_STD", "dataset_classes"]

logger = logging.getLogger("hvlformer")

# CLIP's normalisation, in 0-255 pixel units.
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)


def dataset_classes(cfg) -> Tuple[List[str], Optional[str]]:
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


def _reset_reference_text_after_load(model: "HVLFormer", incompatible_keys: Any) -> None:
    model.reset_reference_text()  # new text-tower weights: T0 is recomputed on next use


@META_ARCH_REGISTRY.register()
class HVLFormer(nn.Module):
    """Semi-supervised semantic segmentation with language anchors.

    ``forward`` follows detectron2: a list of dicts with ``"image"`` (``3 x H x W`` uint8, RGB) and, in
    training, ``"sem_seg"`` (``H x W`` long); it returns a dict of weighted losses in training and
    ``[{"sem_seg": K x height x width}]`` (class scores at the original size) in inference.
    ``encode_text`` and ``predict`` are what the trainers, the predictor and the tools use.
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
        criterion: HVLFormerLoss,
        class_names: List[str],
        class_prompts: List[List[str]],
        reference_class_prompts: List[str],
        pixel_mean: Tuple[float, ...] = CLIP_PIXEL_MEAN,
        pixel_std: Tuple[float, ...] = CLIP_PIXEL_STD,
        size_divisibility: int = 32,
        ignore_value: int = 255,
        unlabeled_criterion: Optional[CMCRLoss] = None,
        unlabeled_weight: float = 5.0,
        sliding_window: bool = False,
        window_size: int = 512,
        window_stride: int = 341,
        pixel_text_alignment: bool = False,
        caa: Optional[ClassAwareAffinity] = None,
        caa_level: int = 2,
        ecac: Optional[ExtendedContextAwareClassifier] = None,
        ecac_inference_weight: float = 0.5,
        category_filter: Optional[CategoryFilter] = None,
        class_refinement: Optional[ClassLinearAttentionRefinement] = None,
        fusion: Optional[VisualFeatureFusion] = None,
        clip_ensemble: Optional[CLIPEnsemble] = None,
        clip_guidance: Optional[CLIPGuidance] = None,
        label_refinement: Optional[PixelAdaptiveRefinement] = None,
    ) -> None:
        """
        Args:
            backbone, text_encoder, pixel_decoder, htqg, ptrm, transformer_decoder: the network, in data order.
            criterion: the supervised objective. unlabeled_criterion, unlabeled_weight: CMCR and lambda_cmcr.
            class_names, class_prompts, reference_class_prompts: the vocabulary (see :meth:`set_vocabulary`).
            pixel_mean, pixel_std: input normalisation (0-255). size_divisibility: batch padding.
            ignore_value: label of unlabeled pixels.
            sliding_window, window_size, window_stride: sliding-window inference (these and
                ``pixel_text_alignment`` / ``ecac_inference_weight`` are read by :mod:`hvlformer.modeling.inference`).
            pixel_text_alignment: inference outputs also carry the eq.-10 alignment (``E`` values).
            caa, caa_level: the thesis's CAA and the pixel-decoder level it refines (0, 1, 2 = strides 32,
                16, 8). ecac, ecac_inference_weight: ECAC and its share of the inference scores.
            category_filter, class_refinement, fusion: LSMSeg's modules. None = off (the paper's model).
            clip_ensemble: open-vocabulary inference with the frozen CLIP's classification of each mask
                (:mod:`hvlformer.modeling.clip_ensemble`); needs the backbone's E_I^0. None = off.
            clip_guidance: the frozen CLIP's zero-shot labels as a second target of the unlabeled views
                (SemiVL's dense CLIP guidance, :mod:`hvlformer.modeling.clip_guidance`); needs E_I^0. None = off.
            label_refinement: image-guided refinement of the teacher's unlabeled targets
                (:mod:`hvlformer.modeling.label_refinement`). None = off (the paper).
        """
        super().__init__()
        if htqg.sre_mode == "clip_zero_shot" and not self.zero_shot_relevance:
            raise ValueError("MODEL.HVLFORMER.SRE.MODE 'clip_zero_shot' is HierVL's zero-shot relevance: set "
                             "MODEL.META_ARCHITECTURE 'HierVL'")
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.pixel_decoder = pixel_decoder
        self.htqg = htqg
        self.ptrm = ptrm
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.sliding_window = sliding_window
        self.window_size = window_size
        self.window_stride = window_stride
        self.unlabeled_criterion = unlabeled_criterion if unlabeled_criterion is not None else CMCRLoss()
        self.unlabeled_weight = unlabeled_weight
        self.pixel_text_alignment = pixel_text_alignment
        # the thesis's modules (None = off); submodules, so checkpoints and the optimiser see them
        self.caa, self.caa_level = caa, caa_level
        self.ecac, self.ecac_inference_weight = ecac, ecac_inference_weight
        self.category_filter = category_filter
        self.class_refinement = class_refinement
        self.fusion = fusion
        if clip_ensemble is not None and backbone.reference_tower is None:
            raise ValueError("the CLIP ensemble pools the frozen pretrained tower E_I^0's embedding: build the "
                             "backbone with frozen_reference=True (MODEL.HVLFORMER.CLIP.PRETRAINED set)")
        self.clip_ensemble = clip_ensemble
        if clip_guidance is not None and backbone.reference_tower is None:
            raise ValueError("SEMI.CLIP_GUIDANCE_WEIGHT asks the frozen pretrained tower E_I^0 for zero-shot labels: "
                             "build the backbone with frozen_reference=True (MODEL.HVLFORMER.CLIP.PRETRAINED set)")
        self.clip_guidance = clip_guidance
        self.label_refinement = label_refinement
        if category_filter is not None and getattr(transformer_decoder, "classifier", "text") == "linear":
            # the linear classifier's decoder expects the E*K queries of its fixed K classes
            raise ValueError("MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER decodes a subset of the vocabulary per image: "
                             "it needs MODEL.HVLFORMER.CLASSIFIER 'text'")
        self.training_class_names = list(class_names)  # ECAC's memory rows belong to these
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        # T0 (K x C), frozen, computed on first use (the text tower's weights may still be loaded from a
        # checkpoint after construction); empty until then, never saved. A buffer, so it follows .to().
        self.register_buffer("reference_text_embeddings", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_reset_reference_text_after_load)
        self.set_vocabulary(class_names, class_prompts, reference_class_prompts)

    #: Whether the model can gate queries by zero-shot CLIP presence (SRE mode ``clip_zero_shot``; HierVL).
    zero_shot_relevance = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        hv = cfg.MODEL.HVLFORMER
        class_names, descriptions_name = dataset_classes(cfg)
        num_classes = len(class_names)
        if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES not in (num_classes, 0):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} but the dataset "
                             f"has {num_classes} classes")
        hidden_dim = hv.HIDDEN_DIM
        if cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM != hidden_dim:
            raise ValueError("MODEL.SEM_SEG_HEAD.CONVS_DIM must equal MODEL.HVLFORMER.HIDDEN_DIM (PTRM mixes them)")
        # one CLIP model for both towers; E_I^0 = its pretrained vision tower (see clip_loader)
        clip_model, tokenizer = build_clip_model(
            hv.CLIP.MODEL_NAME, hv.CLIP.PRETRAINED,
            weights_from_checkpoint=hv.CLIP.WEIGHTS_FROM_CHECKPOINT and not reference_needed_at_test(cfg))
        reference = has_pretrained_reference(hv.CLIP)
        cls.warn_without_reference(cfg, reference)
        backbone = build_clip_backbone(cfg, clip_model.visual)
        text_encoder = CLIPTextEncoder(clip_model, tokenizer, num_context=hv.TEXT.NUM_CONTEXT)
        text_dim = text_encoder.embed_dim
        descriptions = load_class_descriptions(
            resolve_descriptions_path(hv.TEXT.DESCRIPTIONS, descriptions_name), class_names,
            num_descriptions=hv.TEXT.NUM_DESCRIPTIONS, fallback_template=hv.TEXT.FALLBACK_TEMPLATE,
            style=hv.TEXT.PROMPT_STYLE)
        logger.info("class prompts: %s (%d per class)", descriptions.source, len(descriptions.prompts[0]))
        shapes = backbone.output_shape()
        # the network, in data order (also the order of the random initialisation)
        pixel_decoder = cls.build_pixel_decoder(
            cfg, {k: v for k, v in shapes.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES})
        htqg = HTQG(cfg, text_dim, [shapes[k].channels for k in ("res3", "res4", "res5")], num_classes)
        ptrm = PTRM(cfg, num_pixel_levels=3)
        transformer_decoder = cls.build_transformer_decoder(cfg, hidden_dim, num_classes, text_dim)
        criterion = HVLFormerLoss(cfg, cls.build_seg_criterion(cfg, num_classes), has_reference=reference)
        thesis_modules = build_thesis_modules(cfg, text_dim, num_classes, shapes)
        clip_ensemble = None
        if cfg.TEST.CLIP_ENSEMBLE.ENABLED:
            if not hv.CLIP.PRETRAINED:
                raise ValueError("TEST.CLIP_ENSEMBLE asks the pretrained CLIP to classify each mask: set "
                                 "MODEL.HVLFORMER.CLIP.PRETRAINED (an open_clip tag or a file)")
            clip_ensemble = CLIPEnsemble(cfg, clip_logit_scale=float(clip_model.logit_scale.detach().exp()))
        clip_guidance = None
        # training only: a model whose weights all come from a checkpoint (evaluation, demo, predictor) never
        # sees unlabeled views, and has no E_I^0 unless an inference switch needs it
        if CLIPGuidance.enabled(cfg) and not hv.CLIP.WEIGHTS_FROM_CHECKPOINT:
            if not hv.CLIP.PRETRAINED:
                raise ValueError("SEMI.CLIP_GUIDANCE_WEIGHT / SEMI.CLIP_RELABEL_OBJECTS ask the pretrained CLIP for "
                                 "zero-shot labels: set "
                                 "MODEL.HVLFORMER.CLIP.PRETRAINED (an open_clip tag or a file)")
            clip_guidance = CLIPGuidance(cfg, clip_logit_scale=float(clip_model.logit_scale.detach().exp()))
        return {
            "clip_ensemble": clip_ensemble,
            "clip_guidance": clip_guidance,
            "label_refinement": PixelAdaptiveRefinement(cfg) if PixelAdaptiveRefinement.enabled(cfg) else None,
            **thesis_modules,
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
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "size_divisibility": hv.SIZE_DIVISIBILITY,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "sliding_window": cfg.TEST.SLIDING_WINDOW.ENABLED,
            "window_size": cfg.TEST.SLIDING_WINDOW.CROP_SIZE,
            "window_stride": cfg.TEST.SLIDING_WINDOW.STRIDE,
            "unlabeled_criterion": cls.build_unlabeled_criterion(cfg, num_classes),
            "unlabeled_weight": cls.unlabeled_weight_from_config(cfg),
            "pixel_text_alignment": cfg.TEST.PIXEL_TEXT_ALIGNMENT,
        }

    # Construction steps a variant (HierVL) changes; HVLFormer's are the plain config.
    @classmethod
    def warn_without_reference(cls, cfg, reference: bool) -> None:
        hv = cfg.MODEL.HVLFORMER
        if not reference and hv.CLIP.FROZEN_REFERENCE and not hv.CLIP.WEIGHTS_FROM_CHECKPOINT and hv.REG_VISION_WEIGHT > 0:
            log_first_n(logging.WARNING, "L^V (MODEL.HVLFORMER.REG_VISION_WEIGHT) is SWITCHED OFF: "
                        "MODEL.HVLFORMER.CLIP.PRETRAINED is empty, so there is no pretrained CLIP encoder E_I^0 to "
                        "anchor f_CLS to (a copy of a random initialisation would anchor to noise). Set PRETRAINED to "
                        "the encoder's pretrained tag or file, also when training from MODEL.WEIGHTS.",
                        n=1, name="hvlformer")

    @classmethod
    def build_pixel_decoder(cls, cfg, input_shape) -> nn.Module:
        return build_pixel_decoder(cfg, input_shape)

    @classmethod
    def build_transformer_decoder(cls, cfg, in_channels: int, num_classes: int, text_dim: int) -> nn.Module:
        return build_transformer_decoder(cfg, in_channels, num_classes, text_dim)

    @classmethod
    def build_seg_criterion(cls, cfg, num_classes: int) -> HVLSetCriterion:
        return HVLSetCriterion(cfg, num_classes)

    @classmethod
    def build_unlabeled_criterion(cls, cfg, num_classes: int) -> CMCRLoss:
        return CMCRLoss(cfg, num_classes)

    @classmethod
    def unlabeled_weight_from_config(cls, cfg) -> float:
        return cfg.SEMI.CMCR_WEIGHT

    # ------------------------------------------------------------------ vocabulary and text
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_query_levels(self) -> int:
        """E."""
        return self.ptrm.num_query_levels

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
        self.reset_reference_text()

    def encode_text(self) -> Tensor:
        """t: ``K x C`` normalised class embeddings (one batched text pass; cached by the encoder in eval)."""
        return self.text_encoder(self.class_prompts)

    def reference_text(self) -> Tensor:
        """T0: ``K x C`` frozen reference embeddings, computed on first use."""
        if self.reference_text_embeddings.numel() == 0:
            self.reference_text_embeddings = self.text_encoder.reference_embeddings(self.reference_class_prompts)
        return self.reference_text_embeddings

    def reset_reference_text(self) -> None:
        """Forget T0 (recomputed on next use): after a new vocabulary or new text-tower weights."""
        self.reference_text_embeddings = self.pixel_mean.new_empty(0)
        for frozen_classifier in (self.clip_ensemble, self.clip_guidance):
            if frozen_classifier is not None:
                frozen_classifier.reset()

    # ------------------------------------------------------------------ the network
    def normalize(self, images: Tensor) -> Tensor:
        """``B x 3 x H x W`` uint8/float 0-255 images -> normalised float (on the model's device)."""
        return (images.to(self.device).float() - self.pixel_mean) / self.pixel_std

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

    def predict(self, images: Tensor, text_embeddings: Tensor, presence: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> HVLFormerOutput:
        """Run the whole network on a normalised, padded batch ``B x 3 x H x W`` with class embeddings
        ``K x C``: :meth:`extract_features` then :meth:`decode`. ``presence``: ``B x K`` ground-truth class
        presence of labeled images, for relevance modes that use it (HierVL's ``clip_zero_shot``);
        HVLFormer's SRE ignores it. ``labels``: ``B x H x W`` ground truth of a labeled training batch (ECAC's
        teacher and memory; nothing else reads it)."""
        return self.decode(images, self.extract_features(images), text_embeddings, presence, labels)

    def extract_features(self, images: Tensor) -> Dict[str, Tensor]:
        """The backbone step: ``res2`` .. ``res5``, ``clip_global``, ``clip_dense`` of a normalised batch
        (with LSMSeg's visual fusion, eq. 5.1, on its levels when on)."""
        features = self.backbone(images)
        if self.fusion is not None:
            features = self.fusion(images, features)
        return features

    def decode(self, images: Tensor, features: Dict[str, Tensor], text_embeddings: Tensor,
               presence: Optional[Tensor] = None, labels: Optional[Tensor] = None,
               class_index: Optional[Tensor] = None) -> HVLFormerOutput:
        """Everything after the backbone, for the classes of ``text_embeddings`` (``K x C``).

        Args:
            images: the normalised batch ``B x 3 x H x W`` (HierVL's zero-shot relevance reads it).
            features: :meth:`extract_features` of ``images``.
            presence, labels: see :meth:`predict`.
            class_index: ``K`` indices of these classes in the model's vocabulary when they are a subset of
                it (the category filter); None = the whole vocabulary.
        """
        weighted_queries, level_queries, htqg_extras = self.htqg(
            text_embeddings, [features["res3"], features["res4"], features["res5"]],
            **self.relevance_inputs(images, text_embeddings, presence))
        if self.class_refinement is not None:  # LSMSeg eq. 5.8, over the class dimension of each level
            weighted_queries = self.class_refinement(weighted_queries)
        pixel_features = {k: v for k, v in features.items() if k in ("res2", "res3", "res4", "res5")}
        caa_out: Dict[str, Tensor] = {}
        if self.caa is None:
            mask_features, multi_scale_features = self.decode_pixels(pixel_features, weighted_queries)
        else:
            def refine_level(levels: List[Tensor]) -> List[Tensor]:
                caa_out.update(self.caa(levels[self.caa_level], text_embeddings))
                return [caa_out["features"] if i == self.caa_level else z for i, z in enumerate(levels)]

            mask_features, multi_scale_features = self.decode_pixels(pixel_features, weighted_queries,
                                                                     level_hook=refine_level)
        queries, refined_features, affinity = self.ptrm(weighted_queries, multi_scale_features)
        batch, levels, num_classes, dim = queries.shape
        decoded = self.transformer_decoder(refined_features, mask_features,
                                           queries.reshape(batch, levels * num_classes, dim),
                                           class_embeddings=text_embeddings)
        ecac_out = None
        if self.ecac is not None and (labels is not None or not self.training):
            # soft masks of the mask-classification prediction (not detached: ECAC's losses reach it too)
            soft_masks = semantic_scores(decoded["pred_logits"], decoded["pred_masks"])
            vocabulary_index = None if labels is not None else ecac_vocabulary_index(
                self.training_class_names, self.class_names, class_index, self.device)
            ecac_out = self.ecac(mask_features, soft_masks, text_embeddings, labels, vocabulary_index=vocabulary_index)
            if labels is not None:
                ecac_out["class_pixel_counts"] = self.ecac.class_pixel_counts
        return HVLFormerOutput(
            pred_logits=decoded["pred_logits"], pred_masks=decoded["pred_masks"], attn_maps=decoded["attn_maps"],
            aux_outputs=decoded["aux_outputs"], features=features, level_queries=level_queries,
            relevance=htqg_extras["relevance"], sre_logits=htqg_extras.get("sre_logits"), ptrm_affinity=affinity,
            mask_features=mask_features, refined_queries=queries, caa=caa_out or None, ecac=ecac_out)

    def relevance_inputs(self, images: Tensor, text_embeddings: Tensor,
                         presence: Optional[Tensor]) -> Dict[str, Optional[Tensor]]:
        """Extra HTQG inputs (HierVL: zero-shot image embedding or presence); none for HVLFormer's SRE."""
        return {}

    def decode_pixels(self, pixel_features: Dict[str, Tensor], weighted_queries: Tensor,
                      level_hook: Optional[Callable[[List[Tensor]], List[Tensor]]] = None) -> Tuple[Tensor, List[Tensor]]:
        """Pixel decoder: ``mask_features`` and the three multi-scale maps (HierVL adds text centres).
        ``level_hook`` (CAA) is passed only when given, so a decoder without it works with CAA off."""
        if level_hook is None:
            return self.pixel_decoder.forward_features(pixel_features)
        return self.pixel_decoder.forward_features(pixel_features, level_hook=level_hook)

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs: List[Dict[str, Any]], unlabeled: Optional[Dict[str, Any]] = None):
        """Training: weighted supervised losses of the labeled batch (plus, when ``unlabeled`` is given,
        the unlabeled losses and ``stat_*`` statistics, which are not losses; see
        :func:`~hvlformer.modeling.unlabeled_objective.unlabeled_losses`). Inference: per image
        ``{"sem_seg": K x height x width}`` (:func:`~hvlformer.modeling.inference.semantic_inference`)."""
        images = self.preprocess_images(batched_inputs)
        text_embeddings = self.encode_text()  # once per step, shared by every view
        if not self.training:
            return semantic_inference(self, batched_inputs, images, text_embeddings)
        labels = self.pad_labels(batched_inputs, tuple(images.tensor.shape[-2:]))
        outputs = self.predict(images.tensor, text_embeddings, self.labeled_presence(labels),
                               labels=labels if self.ecac is not None else None)
        losses = self.supervised_losses(outputs, labels, text_embeddings, images.tensor)
        if unlabeled is not None:
            self.unlabeled_criterion.observe_labels(labels, self.ignore_value)  # distribution alignment
            losses.update(unlabeled_losses(self, unlabeled, text_embeddings))
            losses["stat_sre_mean_labeled"] = outputs.relevance.detach().float().mean()
        return losses

    def labeled_presence(self, labels: Tensor) -> Optional[Tensor]:
        """``presence`` of :meth:`predict` for a labeled batch (HierVL); None for HVLFormer."""
        return None

    def supervised_losses(self, outputs: HVLFormerOutput, labels: Tensor, text_embeddings: Tensor,
                          images: Tensor) -> Dict[str, Tensor]:
        """Weighted losses of a labeled batch (:class:`~hvlformer.modeling.losses.HVLFormerLoss`).
        labels: ``B x H x W`` long; images: the normalised batch (f_CLS^0 for L^V)."""
        criterion = self.criterion
        return criterion(outputs, labels, text_embeddings,
                         reference_text=self.reference_text() if criterion.needs_reference_text else None,
                         reference_global=(self.backbone.reference_global_embedding(images)
                                           if criterion.needs_reference_image else None))
