"""The model wrapper of the tiny CLIP's pretraining: an open_clip model, its image and text encoders as the
pretraining reads them (global and patch embeddings), and the weighted losses of a batch."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvlformer.modeling.backbone.clip_vit import _select_adapter

from .data import ALL_KINDS, PLAIN_TEMPLATE, vocabulary

# The normalisation of configs/Base-HVLFormer.yaml (MODEL.PIXEL_MEAN / PIXEL_STD, 0-255 RGB).
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)


def gwrp(scores: Tensor, decay: Tensor) -> Tensor:
    """Global weighted rank pooling over patches.

    scores: ``B x N x K``; decay: ``K`` (one ``d`` per class). Returns ``B x K``:
    ``sum_r d^r s_(r) / sum_r d^r`` over the scores sorted in decreasing order.
    """
    n = scores.shape[1]
    ranks = torch.arange(n, dtype=scores.dtype, device=scores.device)
    weights = decay.to(scores.dtype)[None, :] ** ranks[:, None]  # N x K
    weights = weights / weights.sum(dim=0, keepdim=True)
    ordered = scores.sort(dim=1, descending=True).values
    return (ordered * weights[None]).sum(dim=1)


def cell_pooled(probs: Tensor, grid: Tuple[int, int], patches_per_cell: int, decay: Tensor) -> Tensor:
    """GWRP of patch probabilities within each cell of ``patches_per_cell x patches_per_cell`` patches.

    probs: ``B x N x K`` (N = h * w, row-major); returns ``B x h/p x w/p x K``.
    """
    b, _, k = probs.shape
    (h, w), c = grid, patches_per_cell
    cells = probs.reshape(b, h // c, c, w // c, c, k).permute(0, 1, 3, 2, 4, 5).reshape(b * (h // c) * (w // c), c * c, k)
    return gwrp(cells, decay).reshape(b, h // c, w // c, k)


class TinyClipPretrainer(nn.Module):
    """An open_clip model plus the few scalars of the pretraining losses (not part of the checkpoint)."""

    def __init__(self, clip_model: nn.Module, tokenizer, fg_decay: float = 0.9, bg_decay: float = 0.99,
                 loss_weights: Sequence[float] = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0), dense_mode: str = "softmax",
                 region_cell: int = 32, region_decay: float = 0.5) -> None:
        super().__init__()
        self.clip = clip_model
        self.tokenizer = tokenizer
        self._adapter = _select_adapter(clip_model.visual)
        self.tag_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.tag_bias = nn.Parameter(torch.tensor(-2.0))
        self.dense_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.dense_bias = nn.Parameter(torch.tensor(-2.0 if dense_mode == "sigmoid" else 0.0))
        self.dense_mode = dense_mode
        self.register_buffer("decay", torch.tensor([bg_decay] + [fg_decay] * (ALL_KINDS - 1)))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1))
        if len(loss_weights) != 6:
            raise ValueError(f"loss_weights are (clip, tag, dense, region, swap, names), got {loss_weights}")
        self.loss_weights = tuple(loss_weights)  # clip, tag, dense, region, swap, names
        self.region_cell = region_cell
        self.register_buffer("region_decay", torch.full((ALL_KINDS,), float(region_decay)))
        self.prompt_tokens = tokenizer([PLAIN_TEMPLATE.format(n) for n in vocabulary()])

    def encode_image(self, images: Tensor, stages: Optional[List[Tensor]] = None
                     ) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
        """uint8 ``B x 3 x H x W`` -> (unit global ``B x C``, unit patch embeddings ``B x N x C``, grid).

        ``stages`` (optional) receives the tower's tokens (batch-first, class token included) after the patch
        embedding and after each block."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        ad, visual = self._adapter, self.clip.visual
        x, grid, extra = ad.embed(visual, x)
        if stages is not None:
            stages.append(x)
        for block in ad.blocks(visual):
            x = ad.run_block(block, x, extra)
            if stages is not None:
                stages.append(x)
        pooled, dense = ad.heads(visual, x, dense=True)
        return F.normalize(pooled, dim=-1), F.normalize(dense, dim=-1), grid

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Token ids ``T x L`` -> unit text embeddings ``T x C``.

        The same result as ``clip.encode_text`` (causal mask, pooled at the EOT token = argmax id), on the
        tokens up to the last EOT of the batch only: nothing after it can reach a pooled token.
        """
        clip = self.clip
        pool = tokens.argmax(dim=-1)
        length = int(pool.max()) + 1
        x = clip.token_embedding(tokens[:, :length]) + clip.positional_embedding[:length]
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0]), pool] @ clip.text_projection
        return F.normalize(x, dim=-1)

    def losses(self, images: Tensor, captions: Sequence[str], tags: Tensor,
               cell_tags: Optional[Tensor] = None, negatives: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """The weighted pretraining losses of a batch (images uint8 ``B x 3 x H x W``, tags ``B x 11``,
        ``cell_tags`` ``B x H/cell x W/cell x 11`` from :func:`region_tags`, needed when the region weight > 0;
        ``negatives``: one name-swapped caption per image, needed when the swap weight > 0)."""
        image_emb, dense, grid = self.encode_image(images)
        w = self.loss_weights
        extra = list(negatives) if w[4] > 0 else []
        texts = self.encode_text(torch.cat([self.prompt_tokens, self.tokenizer(list(captions) + extra)]))
        prompts, caption_emb = texts[:ALL_KINDS], texts[ALL_KINDS: ALL_KINDS + len(captions)]
        scale = self.clip.logit_scale.exp().clamp(max=100.0)
        logits = scale * image_emb @ caption_emb.t()
        target = torch.arange(len(captions))
        clip_loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        tag_logits = self.tag_scale.exp() * image_emb @ prompts[1:].t() + self.tag_bias
        tag_loss = F.binary_cross_entropy_with_logits(tag_logits, tags[:, 1:])
        dense_logits = self.dense_scale.exp() * dense @ prompts.t() + self.dense_bias  # B x N x 11
        if self.dense_mode == "softmax":
            pooled = gwrp(dense_logits.softmax(dim=-1), self.decay).clamp(1e-6, 1 - 1e-6)
            dense_loss = F.binary_cross_entropy(pooled, tags)
        else:  # sigmoid: MIL per shape kind; background = no kind here
            kinds = dense_logits[..., 1:].sigmoid()  # B x N x 10
            pooled = gwrp(kinds, self.decay[1:]).clamp(1e-6, 1 - 1e-6)
            background_target = 1.0 - kinds.detach().max(dim=-1).values  # B x N
            dense_loss = (F.binary_cross_entropy(pooled, tags[:, 1:])
                          + F.binary_cross_entropy_with_logits(dense_logits[..., 0], background_target))
        out = {"clip": w[0] * clip_loss, "tag": w[1] * tag_loss, "dense": w[2] * dense_loss}
        if w[4] > 0:
            # image -> text over the B captions and the B swapped ones: a caption that names the colour twin
            # instead of the kind drawn must score below the true one
            negative_emb = texts[ALL_KINDS + len(captions):]
            swap_logits = scale * image_emb @ torch.cat([caption_emb, negative_emb]).t()
            out["swap"] = w[4] * F.cross_entropy(swap_logits, target)
        if w[5] > 0:
            cosine = prompts @ prompts.t()
            off_diagonal = ~torch.eye(ALL_KINDS, dtype=torch.bool, device=cosine.device)
            out["names"] = w[5] * cosine[off_diagonal].clamp(min=0).pow(2).mean()
        if w[3] > 0:
            # the same multiple-instance term inside each cell: a kind absent from a cell must lose all of its
            # patches, which ties the patch scores to what is under the patch (image-level pooling alone
            # lets background patches carry "there is a circle somewhere", see docs/RESULTS.md)
            patch_size = images.shape[-1] // grid[1]
            pooled_cells = cell_pooled(dense_logits.softmax(dim=-1), grid, self.region_cell // patch_size,
                                       self.region_decay).clamp(1e-6, 1 - 1e-6)
            out["region"] = w[3] * F.binary_cross_entropy(pooled_cells, cell_tags)
        return out
