"""The thesis's methods ("Towards Image Semantic Segmentation: From Context to Language") as self-contained,
optional modules: CAA (chapter 3), ECAC (chapter 4) and LSMSeg's category filter, class refinement and
visual feature fusion (chapter 5). Each is off by default (``MODEL.HVLFORMER.CAA / ECAC / LSMSEG``); the
meta-architecture builds them with :func:`build_thesis_modules`; how it calls them is in
docs/THESIS_MODULES.md ("Integration")."""
from .build import build_thesis_modules, ecac_vocabulary_index
from .caa import ClassAwareAffinity, affinity_targets, caa_affinity_bytes, caa_affinity_loss, caa_auxiliary_loss
from .category_filter import CategoryFilter, scatter_filtered_scores
from .class_refinement import ClassLinearAttentionRefinement, linear_attention
from .ecac import (
    ExtendedContextAwareClassifier,
    ecac_fuse_scores,
    ecac_intra_variance_loss,
    ecac_kl_loss,
    ecac_memory_loss,
    ecac_reweighted_ce,
    masked_class_means,
    reweighting_class_weights,
)
from .feature_fusion import AUXILIARY_ENCODER_REGISTRY, TinyConvEncoder, VisualFeatureFusion, build_auxiliary_encoder
from .labels import downsample_labels

__all__ = [
    "ClassAwareAffinity", "affinity_targets", "caa_affinity_bytes", "caa_affinity_loss", "caa_auxiliary_loss",
    "CategoryFilter", "scatter_filtered_scores", "ClassLinearAttentionRefinement", "linear_attention",
    "ExtendedContextAwareClassifier", "ecac_fuse_scores", "ecac_intra_variance_loss", "ecac_kl_loss",
    "ecac_memory_loss", "ecac_reweighted_ce", "masked_class_means", "reweighting_class_weights",
    "AUXILIARY_ENCODER_REGISTRY", "TinyConvEncoder", "VisualFeatureFusion", "build_auxiliary_encoder",
    "downsample_labels", "build_thesis_modules", "ecac_vocabulary_index",
]
