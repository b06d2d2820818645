"""Vision-language regularisation losses (SPEC 2.6): L^L, L^VL, L^V, the SRE presence BCE, and the
HierVL options L_prompt = L_topo + L_anchor and the masked vision-language regularisation.

Precision: every loss here runs with autocast really DISABLED (:func:`fp32_loss`) on float32 inputs. A
``.float()`` alone is not enough: inside ``torch.autocast`` an ``einsum`` / ``@`` of float32 tensors still
runs in bf16/fp16 (the L^VL logits at /0.07, the L^L cosines), and CUDA autocast refuses
``F.binary_cross_entropy`` outright. The same decorator guards the CMCR, L_div and criterion losses.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

_F = TypeVar("_F", bound=Callable[..., Any])


def _device_type(values: Any) -> str:
    """Device type of the first tensor found in ``values`` (nested lists/tuples/dicts), else ``"cpu"``."""
    stack = [values]
    while stack:
        value = stack.pop(0)
        if isinstance(value, Tensor):
            return value.device.type
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif hasattr(value, "__dataclass_fields__"):
            stack.extend(getattr(value, name) for name in value.__dataclass_fields__)
    return "cpu"


@contextmanager
def autocast_disabled(device_type: str) -> Iterator[None]:
    """Run the block in full precision: autocast off for ``device_type`` (``"cuda"``, ``"cpu"``, ...)."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def fp32_loss(fn: _F) -> _F:
    """Decorator: run a loss with autocast disabled on the device of its first tensor argument (the loss
    casts its inputs with ``.float()``), so its products, logs and BCEs are float32 under any AMP setting."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_disabled(_device_type([args, kwargs])):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def class_presence(sem_segs: List[Tensor], num_classes: int, ignore_value: int = 255) -> Tensor:
    """Which classes occur in each label map: list of ``H x W`` long -> ``B x K`` float {0, 1}."""
    rows = []
    for sem_seg in sem_segs:
        labels = sem_seg[sem_seg != ignore_value]
        rows.append(torch.bincount(labels.flatten(), minlength=num_classes)[:num_classes] > 0)
    return torch.stack(rows).float()


@fp32_loss
def language_regularization(text_embeddings: Tensor, reference_embeddings: Tensor) -> Tensor:
    """L^L = CE(t_hat @ T0_hat^T, identity): ``K x K`` logits without temperature.

    text_embeddings: ``K x C`` learned-context class embeddings; reference_embeddings: ``K x C`` frozen T0.
    """
    text = F.normalize(text_embeddings.float(), dim=-1)
    reference = F.normalize(reference_embeddings.float(), dim=-1)
    logits = text @ reference.t()
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


@fp32_loss
def vision_language_regularization(dense_embedding: Tensor, text_embeddings: Tensor, sem_seg: Tensor,
                                   temperature: float = 0.07, ignore_value: int = 255) -> Tensor:
    """L^VL: per-pixel CE of ``S = normalize(dense) @ t_hat^T / temperature`` upsampled to the labels.

    dense_embedding: ``B x C x h x w``; text_embeddings: ``K x C``; sem_seg: ``B x H x W`` long.
    Returns 0 (connected to the graph) when every pixel is ignored.
    """
    dense = F.normalize(dense_embedding.float(), dim=1)
    text = F.normalize(text_embeddings.float(), dim=-1)
    logits = torch.einsum("bchw,kc->bkhw", dense, text) / temperature
    logits = F.interpolate(logits, size=sem_seg.shape[-2:], mode="bilinear", align_corners=False)
    if not (sem_seg != ignore_value).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, sem_seg, ignore_index=ignore_value)


@fp32_loss
def vision_regularization(global_embedding: Tensor, reference_global_embedding: Tensor) -> Tensor:
    """L^V: mean squared (element-wise) distance between f_CLS (``B x C``) and the frozen f_CLS^0."""
    return F.mse_loss(global_embedding.float(), reference_global_embedding.float().detach())


@fp32_loss
def relevance_loss(sre_logits: Tensor, presence: Tensor) -> Tensor:
    """SRE BCE: ``B x K`` logits vs ``B x K`` ground-truth presence (labeled images only)."""
    return F.binary_cross_entropy_with_logits(sre_logits.float(), presence.float())


@fp32_loss
def prompt_topology_loss(text_embeddings: Tensor, clip_embeddings: Tensor) -> Tensor:
    """HierVL L_topo = sum_ij (t_i.t_j - t_i^CLIP.t_j^CLIP)^2 over normalised ``K x C`` embeddings."""
    text = F.normalize(text_embeddings.float(), dim=-1)
    clip = F.normalize(clip_embeddings.float(), dim=-1)
    return (text @ text.t() - clip @ clip.t()).pow(2).sum()


@fp32_loss
def prompt_anchor_loss(text_embeddings: Tensor, clip_embeddings: Tensor) -> Tensor:
    """HierVL L_anchor = sum_k [ ||t_k - t_k^CLIP|| - sum_{j != k} log(1 + ||t_k - t_j||) ].

    The paper's projection Phi is taken as L2 normalisation (the embeddings live on CLIP's unit sphere).
    """
    text = F.normalize(text_embeddings.float(), dim=-1)
    clip = F.normalize(clip_embeddings.float(), dim=-1)
    attract = (text - clip).norm(dim=-1).sum()
    pairwise = torch.cdist(text, text)
    off_diagonal = ~torch.eye(text.shape[0], dtype=torch.bool, device=text.device)
    repel = torch.log1p(pairwise[off_diagonal]).sum()
    return attract - repel


@fp32_loss
def masked_consistency_loss(masked_dense: Tensor, reference_dense: Tensor, region: Tensor) -> Tensor:
    """HierVL L_mask = mean over the masked region of ``1 - cos(x_mask, x_ref)``.

    masked_dense, reference_dense: ``B x C x h x w``; region: ``B x h x w`` bool.
    """
    cos = F.cosine_similarity(masked_dense.float(), reference_dense.float().detach(), dim=1)
    if not region.any():
        return cos.sum() * 0.0
    return (1.0 - cos)[region].mean()


@fp32_loss
def masked_alignment_loss(masked_dense: Tensor, text_embeddings: Tensor, labels: Tensor, region: Tensor,
                          temperature: float = 0.07) -> Tensor:
    """HierVL L_align: pixel-text contrastive CE over the masked region.

    masked_dense ``B x C x h x w``; text_embeddings ``K x C``; labels ``B x h x w`` long (class per pixel);
    region ``B x h x w`` bool.
    """
    dense = F.normalize(masked_dense.float(), dim=1)
    text = F.normalize(text_embeddings.float(), dim=-1)
    logits = torch.einsum("bchw,kc->bhwk", dense, text) / temperature
    if not region.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[region], labels[region])
