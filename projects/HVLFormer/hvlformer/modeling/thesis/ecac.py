"""Extended Context-Aware Classifier (ECAC), thesis chapter 4 (Sec. 4.2, eqs. 4.1-4.21), as a dense
classifier on HVLFormer's mask features.

Shapes: ``B`` batch, ``d`` feature width (mask features, stride 4), ``h x w`` their grid, ``K`` classes of
the current vocabulary, ``n`` classes of the memory (the training vocabulary), ``C`` text width.

Forward (``ExtendedContextAwareClassifier.forward``):

1. Student centres (eq. 4.6): ``C_s[b, k] = sum_p m_k(p) F(p) / sum_p m_k(p)`` from the model's predicted
   soft masks ``m`` (``B x K x h x w`` class probabilities, e.g. the mask-classification semantic scores).
2. Teacher centres (eq. 4.3, training only): the same mean under the one-hot ground truth of labeled images.
3. Classifier (eqs. 4.4 / 4.7): ``W[b, k] = xi([C[b, k]; M_k; W_t t_k])``, ``xi`` = Linear-ReLU-Linear
   (``3d -> d -> d``): ``B x K x d``; the class text embedding ``t_k`` is an input, so the classifier
   fits textual queries and any vocabulary.
4. Outputs (eqs. 4.5 / 4.8): ``O = W F / sqrt(d)``: ``B x K x h x w``; calibration (eqs. 4.9 / 4.10)
   ``O~_k = gamma_k O_k + delta_k`` with separate (gamma, delta) for student and teacher.
5. Memory (eqs. 4.1 / 4.2, training, no gradient): per class present in the labeled batch,
   ``Z_k`` = mean feature under the ground truth, ``M_k <- (1 - mu) M_k + mu Z_k`` (copied the first time).

Losses (separate functions; eq. 4.21 ``L = L_rceS + L_rceT + L_M + alpha L_KL + beta L_iv``, alpha = 1,
beta = 50): :func:`ecac_reweighted_ce` (eqs. 4.13 / 4.14 with :func:`reweighting_class_weights`),
:func:`ecac_memory_loss` (eq. 4.20, from ``MEMORY_START_ITER`` memory updates on), :func:`ecac_kl_loss`
(eq. 4.12), :func:`ecac_intra_variance_loss` (eqs. 4.15-4.19). :func:`ecac_fuse_scores` mixes the student
into the mask-classification scores at inference.

Decisions (where chapter 4 leaves things open, or where the host model differs):

- Where it acts: on a DENSE head over the mask features (stride 4), not on the per-query class scores. The
  thesis's classifier and all its losses are per pixel (``O = S F``, pixel KL, pixel intra-variance); in
  HVLFormer every textual query already belongs to one class, so re-classifying queries with class centres
  would duplicate what the query already encodes; the mask features are shared by every query, so making
  them classifiable by (image centre, dataset centre, text) helps every mask. The student's centres come
  from the mask-classification prediction itself (its soft masks), which is what couples ECAC to the host.
  At inference the calibrated student probabilities are mixed into the semantic scores with weight
  ``INFERENCE_WEIGHT`` (0 = ECAC only shapes the features through its training losses).
- Unlabeled images: the teacher branch (and every ECAC loss, and the memory update) uses labeled images
  only. The thesis motivates the teacher precisely by the reliability of ground truth over "unstable
  pseudo-labels" (Sec. 4.2.3), and HVLFormer's unlabeled images already have their own objective (CMCR).
- Momentum ``mu = 0.1``: a class's memory is about the mean of its last ten labeled observations, slow
  enough to smooth one image, fast enough for a rarely seen class to follow the changing features.
- Re-weighting exponent ``rho = 0.5``: between plain CE (``rho = 0``) and inverse frequency (``rho = 1``,
  weights of 1e3 and more on long tails); the class frequencies are the running pixel counts of the labeled
  batches seen so far (no pass over the dataset needed; they converge to the dataset frequencies).
- KL temperature ``tau = 1`` (eq. 4.11 has none); with another tau the loss is multiplied by ``tau^2`` so
  its gradient scale does not change. The KL is the true KL divergence (eq. 4.12 minus the teacher's
  entropy, a constant for the student): 0 when the student matches. ``H^i`` is the teacher's entropy.
  Pixels of all images of the batch are pooled per class; classes absent from the batch are left out of the
  ``1/C`` average.
- Memory loss: ``M`` is a buffer (EMA only, never a gradient target), so eq. 4.20 trains the FEATURES to be
  classified by the dataset-level centres: logits ``cos(F(p), M_k) / 0.1``. It starts after 1000 memory
  updates (the module counts its own updates; they are the labeled training iterations).
- Missing centres: a class absent from an image's ground truth takes the memory as teacher centre (the
  student's centre when the memory has not seen the class yet); a memory row not yet initialised is
  replaced by the image's own centre. Intra-variance centres are per image and class.
- Output scale ``1 / sqrt(d)`` (raw dot products of width-d vectors start at magnitude ``sqrt(d)``).
- The projector ``xi`` is shared by student and teacher (the same symbol in eqs. 4.4 / 4.7), so what the
  teacher learns from the ground truth is learnt in the student's classifier space.
- Another vocabulary at inference: ``vocabulary_index`` maps its classes to memory rows (-1 = new class:
  local centre instead of memory, no calibration).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

from ..regularization import fp32_loss
from .labels import downsample_labels

__all__ = ["ExtendedContextAwareClassifier", "reweighting_class_weights", "ecac_reweighted_ce",
           "ecac_memory_loss", "ecac_kl_loss", "ecac_intra_variance_loss", "ecac_fuse_scores",
           "masked_class_means"]


def masked_class_means(features: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """``sum_p w_k(p) F(p) / sum_p w_k(p)``: features ``B x d x h x w``, weights ``B x K x h x w`` (soft
    masks or one-hot) -> ``B x K x d`` (eqs. 4.1 / 4.3 / 4.6; all-zero weights give a zero centre)."""
    sums = torch.einsum("bkp,bdp->bkd", weights.flatten(2).to(features.dtype), features.flatten(2))
    return sums / weights.flatten(2).sum(-1, keepdim=True).to(features.dtype).clamp_min(eps)


def _one_hot(labels: Tensor, num_classes: int, ignore_value: int) -> Tensor:
    """``B x h x w`` labels -> ``B x K x h x w`` float one-hot, zero at ignored pixels."""
    valid = (labels != ignore_value) & (labels < num_classes) & (labels >= 0)
    one_hot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    return one_hot * valid[:, None].float()


def reweighting_class_weights(class_frequencies: Tensor, rho: float) -> Tensor:
    """Eq. 4.14: ``w_c = (1 / f_c)^rho / sum_k (1 / f_k)^rho`` from frequencies ``K`` (any scale; zero
    frequencies are clamped to the smallest positive one so an unseen class does not get an infinite
    weight)."""
    freq = class_frequencies.double()
    positive = freq[freq > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=freq.dtype, device=freq.device)
    inverse = freq.clamp_min(floor).reciprocal().pow(rho)
    return (inverse / inverse.sum()).float()


@fp32_loss
def ecac_reweighted_ce(logits: Tensor, labels: Tensor, class_weights: Optional[Tensor] = None,
                       ignore_value: int = 255) -> Tensor:
    """Eq. 4.13: class-weighted cross-entropy of ``B x K x h x w`` logits against ``B x h x w`` labels at the
    same resolution (the weighted mean ``sum_i w_{y_i} CE_i / sum_i w_{y_i}``, so the normalisation of the
    weights does not matter). 0 (with a graph) when every pixel is ignored."""
    if not (labels != ignore_value).any():
        return logits.sum() * 0.0
    weight = class_weights.float().to(logits.device) if class_weights is not None else None
    return F.cross_entropy(logits.float(), labels.long(), weight=weight, ignore_index=ignore_value)


@fp32_loss
def ecac_memory_loss(memory_logits: Tensor, labels: Tensor, ignore_value: int = 255) -> Tensor:
    """Eq. 4.20: cross-entropy of the memory classifier's logits ``B x K x h x w`` against the labels."""
    return ecac_reweighted_ce(memory_logits, labels, None, ignore_value)


@fp32_loss
def ecac_kl_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0,
                 ignore_value: int = 255) -> Tensor:
    """Eq. 4.12: entropy-weighted, class-averaged KL(teacher || student) per pixel.

    ``L = tau^2 / |K_present| * sum_k [sum_i B_k^i H^i KL_i / sum_i B_k^i H^i]`` with ``B_k`` the
    ground-truth mask of class k (``labels`` ``B x h x w``), ``H^i`` the teacher's entropy at pixel i and
    ``KL_i = sum_c p_t log(p_t / p_s)`` at temperature ``tau``; the teacher is not differentiated.
    """
    num_classes = student_logits.shape[1]
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    teacher = log_teacher.exp()
    kl = (teacher * (log_teacher - log_student)).sum(1)                      # B x h x w
    entropy = -(teacher * log_teacher).sum(1)                                # B x h x w
    masks = _one_hot(labels, num_classes, ignore_value)                      # B x K x h x w
    weight = masks * entropy[:, None]
    per_class_weight = weight.sum(dim=(0, 2, 3))
    present = masks.sum(dim=(0, 2, 3)) > 0
    if not present.any():
        return student_logits.sum() * 0.0
    per_class = (weight * kl[:, None]).sum(dim=(0, 2, 3)) / per_class_weight.clamp_min(1e-12)
    return per_class[present].mean() * temperature ** 2


def _intra_class_cosine(logits: Tensor, labels: Tensor, ignore_value: int) -> Tuple[Tensor, Tensor]:
    """Eqs. 4.15-4.18: per pixel, the cosine between its output vector (``K`` logits) and the mean output
    of the pixels of its class in the same image. Returns (cosines ``B x h x w``, valid ``B x h x w``)."""
    num_classes = logits.shape[1]
    masks = _one_hot(labels, num_classes, ignore_value)                      # B x K x h x w
    centers = masked_class_means(logits.float(), masks)                      # B x K(class) x K(logit)
    valid = masks.sum(1) > 0
    index = torch.where(valid, labels, 0).long()                             # B x h x w
    pixel_centers = torch.gather(centers, 1, index.flatten(1)[..., None].expand(-1, -1, num_classes))
    outputs = logits.float().flatten(2).transpose(1, 2)                      # B x P x K
    cosine = F.cosine_similarity(outputs, pixel_centers, dim=-1).reshape(labels.shape)
    return cosine, valid


@fp32_loss
def ecac_intra_variance_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                             ignore_value: int = 255) -> Tensor:
    """Eq. 4.19: MSE between the student's and the (detached) teacher's intra-class cosines (eqs.
    4.15 / 4.16) over the labeled pixels; logits ``B x K x h x w``, labels ``B x h x w``."""
    cos_s, valid = _intra_class_cosine(student_logits, labels, ignore_value)
    cos_t, _ = _intra_class_cosine(teacher_logits.detach(), labels, ignore_value)
    if not valid.any():
        return student_logits.sum() * 0.0
    return F.mse_loss(cos_s[valid], cos_t[valid])


def ecac_fuse_scores(mask_scores: Tensor, student_logits: Tensor, weight: float) -> Tensor:
    """Inference: ``(1 - weight) * mask_scores + weight * softmax(O~_s)``, the student upsampled
    (bilinear) to the ``B x K x H x W`` of ``mask_scores``. ``weight`` 0 returns ``mask_scores``."""
    if weight == 0:
        return mask_scores
    probs = F.interpolate(student_logits.float().softmax(dim=1), size=mask_scores.shape[-2:], mode="bilinear",
                          align_corners=False)
    return (1.0 - weight) * mask_scores + weight * probs.to(mask_scores.dtype)


class ExtendedContextAwareClassifier(nn.Module):
    """ECAC (see the module docstring for equations and decisions)."""

    @configurable
    def __init__(self, *, feature_dim: int, text_dim: int, num_classes: int, momentum: float = 0.1,
                 memory_start_iter: int = 1000, memory_temperature: float = 0.1, calibration: bool = True,
                 ignore_value: int = 255) -> None:
        """
        Args:
            feature_dim: d, width of the features ECAC classifies (the mask features).
            text_dim: C, width of the class text embeddings.
            num_classes: n, classes of the memory and of the calibration (the training vocabulary).
            momentum: mu of eq. 4.2.
            memory_start_iter: memory updates before the memory logits (and L_M) are produced.
            memory_temperature: temperature of the cosine memory logits of L_M.
            calibration: apply eqs. 4.9 / 4.10 (False: identity).
            ignore_value: label of unlabeled pixels.
        """
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.momentum, self.memory_start_iter = momentum, memory_start_iter
        self.memory_temperature, self.calibration, self.ignore_value = memory_temperature, calibration, ignore_value
        self.text_proj = nn.Linear(text_dim, feature_dim)                     # W_t
        self.projector = nn.Sequential(nn.Linear(3 * feature_dim, feature_dim), nn.ReLU(inplace=True),
                                       nn.Linear(feature_dim, feature_dim))  # xi
        self.student_gamma = nn.Parameter(torch.ones(num_classes))
        self.student_delta = nn.Parameter(torch.zeros(num_classes))
        self.teacher_gamma = nn.Parameter(torch.ones(num_classes))
        self.teacher_delta = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("memory", torch.zeros(num_classes, feature_dim))
        self.register_buffer("memory_initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("class_pixel_counts", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg, text_dim: int, num_classes: int, feature_dim: Optional[int] = None) -> Dict[str, Any]:
        """``text_dim`` (CLIP text width) and ``num_classes`` (training vocabulary) come from the built model;
        ``feature_dim`` defaults to ``MODEL.SEM_SEG_HEAD.MASK_DIM``."""
        ecac = cfg.MODEL.HVLFORMER.ECAC
        return {"feature_dim": feature_dim or cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, "text_dim": text_dim,
                "num_classes": num_classes, "momentum": ecac.MOMENTUM, "memory_start_iter": ecac.MEMORY_START_ITER,
                "memory_temperature": ecac.MEMORY_TEMPERATURE, "calibration": ecac.CALIBRATION,
                "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE}

    # ------------------------------------------------------------------ pieces
    @property
    def memory_active(self) -> bool:
        """Whether L_M is on: after ``memory_start_iter`` memory updates."""
        return int(self.num_updates) >= self.memory_start_iter

    def class_weights(self, rho: float) -> Tensor:
        """Eq. 4.14 from the running pixel counts of the labeled batches: ``n``."""
        return reweighting_class_weights(self.class_pixel_counts, rho)

    def _rows(self, vocabulary_index: Optional[Tensor], num_classes: int, device) -> Tuple[Tensor, Tensor, Tensor]:
        """Memory rows, their "initialised" flags and the calibration mask for the current vocabulary."""
        if vocabulary_index is None:
            if num_classes != self.num_classes:
                raise ValueError(f"{num_classes} classes but the memory has {self.num_classes}: pass "
                                 "vocabulary_index (-1 for a class the memory does not know)")
            vocabulary_index = torch.arange(num_classes, device=device)
        known = vocabulary_index >= 0
        index = vocabulary_index.clamp_min(0)
        return self.memory[index], self.memory_initialized[index] & known, known

    def classifier(self, centers: Tensor, memory: Tensor, class_embeddings: Tensor) -> Tensor:
        """Eqs. 4.4 / 4.7: centres ``B x K x d``, memory ``B x K x d``, text ``K x C`` -> ``B x K x d``."""
        text = self.text_proj(class_embeddings.to(centers.dtype))[None].expand(centers.shape[0], -1, -1)
        return self.projector(torch.cat([centers, memory, text], dim=-1))

    def _calibrate(self, logits: Tensor, gamma: Tensor, delta: Tensor, index: Optional[Tensor],
                   known: Tensor) -> Tensor:
        """Eqs. 4.9 / 4.10 on ``B x K x h x w`` logits (identity for classes unknown to the memory)."""
        if not self.calibration:
            return logits
        idx = index.clamp_min(0) if index is not None else torch.arange(logits.shape[1], device=logits.device)
        g = torch.where(known, gamma[idx], torch.ones_like(gamma[idx]))
        b = torch.where(known, delta[idx], torch.zeros_like(delta[idx]))
        return logits * g[None, :, None, None] + b[None, :, None, None]

    @torch.no_grad()
    def update_memory(self, features: Tensor, labels: Tensor) -> None:
        """Eqs. 4.1 / 4.2: features ``B x d x h x w``, labels ``B x h x w`` (training-vocabulary indices, at
        the features' resolution). Sums and counts are all-reduced over processes when distributed."""
        masks = _one_hot(labels, self.num_classes, self.ignore_value)          # B x n x h x w
        sums = torch.einsum("bkp,bdp->kd", masks.flatten(2), features.detach().float().flatten(2))
        counts = masks.sum(dim=(0, 2, 3))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        present = counts > 0
        class_means = sums / counts.clamp_min(1.0)[:, None]
        ema = (1.0 - self.momentum) * self.memory + self.momentum * class_means.to(self.memory.dtype)
        first = present & ~self.memory_initialized
        self.memory.copy_(torch.where(first[:, None], class_means.to(self.memory.dtype),
                                      torch.where(present[:, None], ema, self.memory)))
        self.memory_initialized |= present
        self.class_pixel_counts += counts.double()
        self.num_updates += 1

    # ------------------------------------------------------------------ forward
    def forward(self, features: Tensor, soft_masks: Tensor, class_embeddings: Tensor,
                labels: Optional[Tensor] = None, vocabulary_index: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """
        Args:
            features: ``F``: ``B x d x h x w`` (the mask features).
            soft_masks: ``B x K x h' x w'`` class probabilities of the host's prediction (resized to h x w).
            class_embeddings: ``K x C`` text embeddings t_k.
            labels: ``B x H x W`` ground truth of LABELED images (training only): enables the teacher, the
                memory logits and the memory update; resized by nearest neighbour to ``h x w``.
            vocabulary_index: ``K`` memory row of each class (-1 = unknown); None = the training vocabulary.

        Returns a dict: ``student_logits`` ``B x K x h x w`` (calibrated O~_s); with labels also
        ``teacher_logits`` (O~_t), ``labels`` (``B x h x w``, downsampled) and, once the memory is active,
        ``memory_logits`` ``B x K x h x w``. The memory is updated after the logits are computed.
        """
        batch, _, height, width = features.shape
        num_classes = class_embeddings.shape[0]
        memory, initialized, known = self._rows(vocabulary_index, num_classes, features.device)
        if soft_masks.shape[-2:] != features.shape[-2:]:
            soft_masks = F.interpolate(soft_masks.float(), size=(height, width), mode="bilinear", align_corners=False)
        student_centers = masked_class_means(features, soft_masks)                  # eq. 4.6, B x K x d
        memory = memory.to(features.dtype)[None].expand(batch, -1, -1)
        memory_used = torch.where(initialized[None, :, None], memory, student_centers)
        scale = 1.0 / math.sqrt(self.feature_dim)
        student_weights = self.classifier(student_centers, memory_used, class_embeddings)
        student = torch.einsum("bkd,bdhw->bkhw", student_weights, features) * scale     # eq. 4.8
        out = {"student_logits": self._calibrate(student, self.student_gamma, self.student_delta,
                                                 vocabulary_index, known)}
        if labels is None:
            return out
        labels = downsample_labels(labels, (height, width))
        masks = _one_hot(labels, num_classes, self.ignore_value)
        present = masks.flatten(2).sum(-1) > 0                                       # B x K
        teacher_centers = torch.where(present[..., None], masked_class_means(features, masks),
                                      memory_used)                                   # eq. 4.3
        teacher_weights = self.classifier(teacher_centers, memory_used, class_embeddings)
        teacher = torch.einsum("bkd,bdhw->bkhw", teacher_weights, features) * scale     # eq. 4.5
        out["teacher_logits"] = self._calibrate(teacher, self.teacher_gamma, self.teacher_delta,
                                                vocabulary_index, known)
        out["labels"] = labels
        if self.memory_active:
            cosine = torch.einsum("kd,bdhw->bkhw", F.normalize(memory[0], dim=-1), F.normalize(features, dim=1))
            out["memory_logits"] = cosine / self.memory_temperature
        if self.training and vocabulary_index is None:
            self.update_memory(features, labels)
        return out
