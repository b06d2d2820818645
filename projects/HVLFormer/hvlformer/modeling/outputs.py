"""What the network returns (:class:`HVLFormerOutput`) and how its queries become class scores
(:func:`semantic_scores`, the inference output and, normalised, CMCR's per-class probability maps)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["HVLFormerOutput", "semantic_scores"]


def semantic_scores(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """``B x Q x (K+1)`` class logits and ``B x Q x h x w`` mask logits -> ``B x K x h x w`` class scores.

    All queries of a class (its E levels, and any instance query predicting it) add up:
    ``sum_q softmax(c_q)[k] * sigmoid(m_q)`` (Mask2Former's semantic inference). Computed in float32.
    """
    probs = pred_logits.float().softmax(dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, pred_masks.float().sigmoid())


@dataclass
class HVLFormerOutput:
    """One pass of the network (:meth:`hvlformer.modeling.meta_arch.HVLFormer.predict`) over a batch of ``B``
    images ``B x 3 x H x W``; ``Q = E*K (+ M instance queries)``, ``D`` the decoder width.

    The first four fields are the transformer decoder's predictions in Mask2Former's layout
    (:meth:`decoder_outputs` gives them as the dict that the criterion, the matcher and CMCR read).
    """

    #: ``B x Q x (K+1)`` class logits of the last decoder layer.
    pred_logits: Tensor
    #: ``B x Q x H/4 x W/4`` mask logits of the last decoder layer.
    pred_masks: Tensor
    #: ``B x Q x h x w`` attention maps of the last layer (CMCR's l_align), or None.
    attn_maps: Optional[Tensor]
    #: Earlier predictions (the initial queries', then one per layer but the last), each a dict as above.
    aux_outputs: List[Dict[str, Any]]
    #: Backbone outputs: ``res2`` .. ``res5``, ``clip_global`` (f_CLS, ``B x C``), ``clip_dense``.
    features: Dict[str, Tensor]
    #: ``Q_hat``: ``E x K x D`` unweighted hierarchical queries (L_div).
    level_queries: Tensor
    #: ``B x K`` class relevance that weighted the queries (SRE, zero-shot or ground-truth presence, or ones).
    relevance: Tensor
    #: ``B x K`` SRE logits (learned SRE modes only; the presence BCE), else None.
    sre_logits: Optional[Tensor]
    #: PTRM affinities ``B x K x h x w`` per pixel level (empty without PTRM).
    ptrm_affinity: List[Tensor]
    #: ``B x D x H/4 x W/4`` per-pixel embeddings of the pixel decoder.
    mask_features: Tensor
    #: ``B x E x K x D`` queries after PTRM (what the decoder receives; the eq.-10 alignment).
    refined_queries: Tensor
    #: CAA's outputs when ``MODEL.HVLFORMER.CAA.ENABLED`` (thesis ch. 3): ``features`` (the refined level),
    #: ``coarse_logits`` ``B x K x h x w``, ``affinity_logits`` ``B x P x P``, ``centers`` ``B x K x D'``.
    caa: Optional[Dict[str, Tensor]] = None
    #: ECAC's outputs when ``MODEL.HVLFORMER.ECAC.ENABLED`` (thesis ch. 4): ``student_logits``
    #: ``B x K x H/4 x W/4``; for a labeled batch also ``teacher_logits``, ``labels`` (``B x H/4 x W/4``),
    #: ``class_pixel_counts`` (``K``, the running counts of eq. 4.14) and, once active, ``memory_logits``.
    #: None on unlabeled training batches (ECAC has no loss there).
    ecac: Optional[Dict[str, Tensor]] = None
    #: ``TEST.CLIP_ENSEMBLE.LEVEL pixel`` / ``pixel_unseen`` at inference: ``logits`` ``B x K x h x w`` (CLIP's
    #: per-patch class logits), ``weights`` ``K`` (CLIP's exponent per class) and, for ``pixel_unseen``,
    #: ``decoder_split`` ``K`` bools (the training names), fused into the semantic scores per pixel
    #: (:func:`hvlformer.modeling.clip_ensemble.pixel_geometric_ensemble`). None otherwise.
    clip_pixel: Optional[Dict[str, Tensor]] = None

    def decoder_outputs(self) -> Dict[str, Any]:
        """The decoder predictions as a dict: ``pred_logits``, ``pred_masks``, ``attn_maps``, ``aux_outputs``."""
        return {"pred_logits": self.pred_logits, "pred_masks": self.pred_masks, "attn_maps": self.attn_maps,
                "aux_outputs": self.aux_outputs}

    def semantic_scores(self) -> Tensor:
        """``B x K x H/4 x W/4`` class scores of the last layer (see :func:`semantic_scores`)."""
        return semantic_scores(self.pred_logits, self.pred_masks)
