"""Semantic inference of the meta-architecture: from a normalised batch to per-image class scores at the
original size (``{"sem_seg": K x height x width}``), whole-image or with sliding windows, optionally with
the pixel-text alignment of supplement eq. 10 (:mod:`hvlformer.modeling.alignment`).

The functions take the model (:class:`~hvlformer.modeling.meta_arch.HVLFormer` or a variant) and read its
settings: ``sliding_window``, ``window_size``, ``window_stride``, ``size_divisibility``,
``pixel_text_alignment``, ``ecac_inference_weight`` and the optional ``category_filter``. The network itself
runs through the model's ``predict`` / ``extract_features`` / ``decode``; nothing here has parameters.

- :func:`semantic_inference`: what ``HVLFormer.forward`` returns in eval mode.
- :func:`scores_and_alignment`: class scores of a batch at its padded resolution (with LSMSeg's category
  filter, :func:`filtered_scores_and_alignment`, when the vocabulary has more than its ``top_k`` classes).
- :func:`sliding_window_scores`: one image through windows (:func:`window_origins`), averaged per pixel.
- :func:`with_clip_ensemble`: the class logits of ``TEST.CLIP_ENSEMBLE`` (the frozen CLIP's classification of
  each mask mixed in, :mod:`hvlformer.modeling.clip_ensemble`) when the model has one, on every path above;
  with ``LEVEL pixel`` CLIP's per-patch logits instead, which :func:`output_scores_and_alignment` mixes into
  each pixel's scores.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn

from .alignment import ALIGNMENT_KEY, pixel_text_alignment, valid_cells
from .clip_ensemble import pixel_geometric_ensemble
from .outputs import HVLFormerOutput, semantic_scores
from .thesis import ecac_fuse_scores, scatter_filtered_scores

__all__ = [
    "semantic_inference", "scores_and_alignment", "output_scores_and_alignment", "filtered_scores_and_alignment",
    "sliding_window_scores", "window_origins", "with_clip_ensemble",
]


@torch.no_grad()
def semantic_inference(model: nn.Module, batched_inputs: List[Dict[str, Any]], images: ImageList,
                       text_embeddings: Tensor) -> List[Dict[str, Tensor]]:
    """Per image ``{"sem_seg": K x height x width}`` at the original size (``height``/``width`` keys),
    plus ``"pixel_text_alignment"`` (``E`` values, supplement eq. 10) when ``model.pixel_text_alignment`` is
    on: computed from the same forward pass as the scores, over each image's unpadded part; with sliding
    windows, the windows of an image are averaged (see :mod:`hvlformer.modeling.alignment`).

    Args:
        batched_inputs: the model's inputs (detectron2 format; ``height``/``width`` are optional).
        images: their normalised, padded batch (``model.preprocess_images``).
        text_embeddings: ``K x C`` class embeddings (``model.encode_text()``).
    """
    with_alignment = model.pixel_text_alignment
    if model.sliding_window:
        per_image, alignment = zip(*(sliding_window_scores(model, images.tensor[i, :, :h, :w], text_embeddings,
                                                           with_alignment)
                                     for i, (h, w) in enumerate(images.image_sizes)))
    else:
        batch_scores, batch_alignment = scores_and_alignment(
            model, images.tensor, text_embeddings, list(images.image_sizes) if with_alignment else None)
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


def scores_and_alignment(model: nn.Module, images: Tensor, text_embeddings: Tensor,
                         valid_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Class scores ``B x K x H x W`` of a normalised batch ``B x 3 x H x W`` at its (padded) resolution,
    and, when ``valid_sizes`` (the unpadded ``(h, w)`` of each image) is given, the pixel-text alignment
    ``B x E`` (supplement eq. 10) over each image's unpadded cells."""
    num_classes = text_embeddings.shape[0]
    if model.category_filter is not None and num_classes > model.category_filter.top_k:
        return filtered_scores_and_alignment(model, images, text_embeddings, valid_sizes)
    outputs = with_clip_ensemble(model, model.predict(images, text_embeddings), images)
    return output_scores_and_alignment(outputs, images.shape[-2:], valid_sizes, ecac_weight=model.ecac_inference_weight)


def with_clip_ensemble(model: nn.Module, outputs: HVLFormerOutput, images: Tensor,
                       class_index: Optional[Tensor] = None,
                       reference_dense: Optional[Tensor] = None) -> HVLFormerOutput:
    """``outputs`` with the CLIP ensemble's class logits when ``model.clip_ensemble`` is set, else unchanged;
    with ``LEVEL pixel`` / ``pixel_unseen`` the class logits stay the decoder's and ``outputs.clip_pixel`` carries
    CLIP's per-patch logits, the class weights and (``pixel_unseen``) the training names' mask ``decoder_split``
    for :func:`output_scores_and_alignment`.

    Args:
        images: the normalised batch ``B x 3 x H x W`` of ``outputs``.
        class_index: ``K`` indices of the decoded classes in the model's vocabulary (category filter); None = all.
        reference_dense: E_I^0's dense embedding of ``images`` when already computed (``B x C x h x w``).
    """
    ensemble = model.clip_ensemble
    if ensemble is None:
        return outputs
    names = model.class_names if class_index is None else [model.class_names[i] for i in class_index.tolist()]
    if reference_dense is None:
        reference_dense = model.backbone.reference_dense_embedding(images)
    class_embeddings = ensemble.class_embeddings(model.text_encoder, names)
    class_weights = ensemble.class_weights(names, model.training_class_names, images.device)
    if ensemble.level in ("pixel", "pixel_unseen"):
        clip_pixel = {"logits": ensemble.pixel_logits(reference_dense, class_embeddings), "weights": class_weights}
        if ensemble.level == "pixel_unseen":
            clip_pixel["decoder_split"] = ensemble.seen_classes(names, model.training_class_names, images.device)
        return dataclasses.replace(outputs, clip_pixel=clip_pixel)
    logits = ensemble(outputs.pred_logits, outputs.pred_masks, reference_dense, class_embeddings, class_weights)
    return dataclasses.replace(outputs, pred_logits=logits)


def output_scores_and_alignment(outputs: HVLFormerOutput, image_size: Sequence[int],
                                valid_sizes: Optional[Sequence[Tuple[int, int]]] = None,
                                ecac_weight: float = 0.5) -> Tuple[Tensor, Optional[Tensor]]:
    """Class scores ``B x K x H x W`` of one pass at ``image_size`` (with ECAC's student mixed in with
    ``ecac_weight`` when ``outputs.ecac`` is set) and the eq.-10 alignment when ``valid_sizes`` is given
    (see :func:`scores_and_alignment`); with ``outputs.clip_pixel`` (``TEST.CLIP_ENSEMBLE.LEVEL pixel*``) CLIP's
    per-patch logits, upsampled bilinearly to ``image_size``, are mixed into each pixel's scores last."""
    masks = F.interpolate(outputs.pred_masks, size=tuple(image_size), mode="bilinear", align_corners=False)
    scores = semantic_scores(outputs.pred_logits, masks)
    if outputs.ecac is not None:
        scores = ecac_fuse_scores(scores, outputs.ecac["student_logits"], ecac_weight)
    if outputs.clip_pixel is not None:
        clip_logits = F.interpolate(outputs.clip_pixel["logits"], size=tuple(image_size), mode="bilinear",
                                    align_corners=False)
        scores = pixel_geometric_ensemble(scores, clip_logits, outputs.clip_pixel["weights"],
                                          outputs.clip_pixel.get("decoder_split"))
    if valid_sizes is None:
        return scores, None
    mask_features = outputs.mask_features
    cells = [valid_cells(size, tuple(image_size), mask_features.shape[-2:]) for size in valid_sizes]
    return scores, pixel_text_alignment(outputs.refined_queries, mask_features, cells)


def filtered_scores_and_alignment(model: nn.Module, images: Tensor, text_embeddings: Tensor,
                                  valid_sizes: Optional[Sequence[Tuple[int, int]]] = None
                                  ) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`scores_and_alignment` with LSMSeg's category filter (thesis Sec. 5.2.5): one backbone pass,
    then per image the decoder runs on its top-k classes only (by the image-text cost of ``clip_dense``);
    the filtered-out classes get score 0 (:func:`~hvlformer.modeling.thesis.scatter_filtered_scores`)."""
    num_classes = text_embeddings.shape[0]
    features = model.extract_features(images)
    kept = model.category_filter(features["clip_dense"], text_embeddings)["indices"]    # B x k
    reference_dense = model.backbone.reference_dense_embedding(images) if model.clip_ensemble is not None else None
    scores, alignments = [], []
    for b in range(images.shape[0]):
        image_features = {name: value[b: b + 1] for name, value in features.items()}
        outputs = model.decode(images[b: b + 1], image_features, text_embeddings[kept[b]], class_index=kept[b])
        outputs = with_clip_ensemble(model, outputs, images[b: b + 1], kept[b],
                                     None if reference_dense is None else reference_dense[b: b + 1])
        image_scores, alignment = output_scores_and_alignment(
            outputs, images.shape[-2:], None if valid_sizes is None else [valid_sizes[b]],
            ecac_weight=model.ecac_inference_weight)
        scores.append(scatter_filtered_scores(image_scores, kept[b: b + 1], num_classes))
        alignments.append(alignment)
    alignment = torch.cat(alignments) if valid_sizes is not None else None
    return torch.cat(scores), alignment


def window_origins(height: int, width: int, size: int, stride: int) -> Tuple[List[int], List[int]]:
    """Top rows and left columns of the ``size x size`` windows over a ``height x width`` image (at least
    one window size in each direction): every ``stride`` pixels, and the last window of a row/column
    aligned to the border."""
    tops = list(range(0, max(height - size, 0) + 1, stride))
    lefts = list(range(0, max(width - size, 0) + 1, stride))
    if tops[-1] + size < height:
        tops.append(height - size)
    if lefts[-1] + size < width:
        lefts.append(width - size)
    return tops, lefts


def sliding_window_scores(model: nn.Module, image: Tensor, text_embeddings: Tensor,
                          with_alignment: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Sliding-window class scores for one normalised image ``3 x H x W`` -> ``K x H x W``, and with
    ``with_alignment`` the eq.-10 alignment ``E`` averaged over the windows (each window's unpadded part).

    Windows of ``model.window_size`` with ``model.window_stride`` (:func:`window_origins`); images smaller
    than a window are padded (with 0, the mean colour). The per-pixel scores are averaged over the windows
    that cover the pixel (count matrix).
    """
    size = model.window_size
    height, width = image.shape[-2:]
    padded = F.pad(image, (0, max(size - width, 0), 0, max(size - height, 0)), value=0.0)
    full_h, full_w = padded.shape[-2:]
    tops, lefts = window_origins(full_h, full_w, size, model.window_stride)
    scores = padded.new_zeros(model.num_classes, full_h, full_w)
    counts = padded.new_zeros(1, full_h, full_w)
    # the image part of a window; the rest is the padding of an image smaller than a window
    valid_sizes = [(min(height, size), min(width, size))] if with_alignment else None
    alignments = []
    for top in tops:
        for left in lefts:
            window = padded[:, top: top + size, left: left + size]
            window_batch = ImageList.from_tensors([window], model.size_divisibility).tensor
            window_scores, alignment = scores_and_alignment(model, window_batch, text_embeddings, valid_sizes)
            if with_alignment:
                alignments.append(alignment[0])
            scores[:, top: top + size, left: left + size] += window_scores[0, :, :size, :size]
            counts[:, top: top + size, left: left + size] += 1
    alignment = torch.stack(alignments).mean(dim=0) if with_alignment else None
    return (scores / counts)[:, :height, :width], alignment
