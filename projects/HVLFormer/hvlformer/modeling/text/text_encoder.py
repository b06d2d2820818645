"""Frozen CLIP text encoder E_T with a learnable CoOp context shared by all classes (paper Sec. 3.1
and Sec. 4.1: frozen E_T, 8-token learnable prompt).

Token sequence of a prompt: ``[SOT, ctx_1 .. ctx_n, description tokens, EOT, pad ...]`` (n = ``num_context``,
8 by default). The description is tokenized with room for the context (``context_length - n`` tokens), so
an over-long description is truncated by the tokenizer and still ends with EOT. The pooled token is where
EOT lands after the shift: the tower's own rule (``argmax`` of the token ids for CLIP, or the first ``eos``
id) on the description's ids, plus ``n``.

Decisions:

- The text tower (token_embedding, positional_embedding, transformer, ln_final, text_projection, causal
  mask) is kept as the submodule ``tower``: it moves with ``.to()``, its parameters have
  ``requires_grad=False`` (the optimizer builder skips them) and it stays in eval mode whatever
  ``train()`` says. Only ``context`` (``num_context x width``, N(0, 0.02)) is trainable.
- Both open_clip layouts are read: ``CLIP`` (the tower's parts are attributes of the model) and
  ``CustomTextCLIP`` (``model.text`` is a ``TextTransformer``). HF text towers, CoCa-style class tokens and
  padding masks are rejected with a ``TypeError``.
- With a causal mask, tokens after the pooled position cannot influence it, so sequences are cut after the
  longest pooled position of the batch (same result as the full 77 tokens, a fraction of the cost).
- ``forward(prompts)`` = ``t_k = normalize(mean_r E_T([ctx, desc_r(k)]))`` for all K classes, all
  ``sum_k R_k`` sequences in one batch (classes may have different R). In eval mode the result is computed
  without autograd and cached until the prompts, the context values, any tower tensor (in-place version,
  storage, dtype, device) or the autocast state change; in training mode nothing is cached.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

__all__ = ["CLIPTextEncoder"]


class _TextTower(nn.Module):
    """The frozen pieces of an open_clip text tower, gathered from either model layout."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        text = getattr(clip_model, "text", None)
        if text is not None:  # CustomTextCLIP
            if not isinstance(text, TextTransformer):
                raise TypeError(f"unsupported text tower {type(text).__name__}: only open_clip TextTransformer")
            if text.cls_emb is not None:
                raise TypeError("text towers with an appended class token (CoCa) are not supported")
            if getattr(text, "use_pad_mask", False):
                raise TypeError("text towers with padding masks are not supported")
            src, pool_type, eos_id = text, text.pool_type, text.eos_id
        elif hasattr(clip_model, "token_embedding"):  # CLIP
            src, pool_type = clip_model, clip_model.text_pool_type
            eos_id = getattr(clip_model, "text_eos_id", None)
        else:
            raise TypeError(f"{type(clip_model).__name__} is not an open_clip CLIP / CustomTextCLIP model")
        if pool_type not in ("argmax", "eos"):
            raise TypeError(f"text pool type {pool_type!r} is not supported (argmax / eos)")
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)

    def pool_index(self, ids: Tensor) -> Tensor:
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def forward(self, x: Tensor, pool_index: Tensor) -> Tensor:
        """Token embeddings ``B x L x width`` (before positions) -> projected pooled features ``B x C``."""
        L = x.shape[1]
        mask = None
        if self.attn_mask is not None:  # causal: nothing after the pooled token matters
            L = int(pool_index.max()) + 1
            x = x[:, :L]
            mask = self.attn_mask[:L, :L]
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), pool_index])  # LayerNorm is per token
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class CLIPTextEncoder(nn.Module):
    """E_T with ``num_context`` learnable context tokens; see the module docstring."""

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, num_context: int = 8) -> None:
        super().__init__()
        if num_context < 0:
            raise ValueError(f"num_context must be >= 0, got {num_context}")
        self.tower = _TextTower(clip_model)
        self.tower.requires_grad_(False)
        self.tower.eval()
        self.tokenizer = tokenizer
        self.num_context = int(num_context)
        self.width = self.tower.token_embedding.embedding_dim
        self.context_length = self.tower.positional_embedding.shape[0]
        proj = self.tower.text_projection
        if proj is None:
            self.embed_dim = self.width
        else:
            self.embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        if self.num_context >= self.context_length - 2:
            raise ValueError(f"num_context {num_context} leaves no room in a {self.context_length}-token context")
        if self.num_context:
            self.context = nn.Parameter(torch.empty(self.num_context, self.width))
            nn.init.normal_(self.context, std=0.02)
        else:
            self.register_parameter("context", None)
        self._cache_key: Optional[tuple] = None
        self._cache_context: Optional[Tensor] = None
        self._cache_value: Optional[Tensor] = None

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "CLIPTextEncoder":
        super().train(mode)
        self.tower.eval()  # frozen: always dropout-free
        return self

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names without weight decay (the learnable context; docs/DESIGN.md, Training)."""
        return {"context"} if self.context is not None else set()

    # ------------------------------------------------------------------ encoding
    def _uses_context(self, use_context: bool) -> bool:
        return use_context and self.context is not None

    def tokenize(self, texts: Sequence[str], use_context: bool = True) -> Tuple[Tensor, Tensor]:
        """Token ids of the texts (``B x (context_length - n)``, n = inserted context tokens) and the position
        of the pooled (EOT) token in the assembled sequence (``B``)."""
        n = self.num_context if self._uses_context(use_context) else 0
        ids = self.tokenizer(list(texts), context_length=self.context_length - n)
        ids = ids.to(self.tower.token_embedding.weight.device)
        return ids, self.tower.pool_index(ids) + n

    def encode(self, texts: Sequence[str], use_context: bool = True) -> Tensor:
        """Unnormalised E_T features ``len(texts) x C``; the learnable context is inserted after SOT when
        ``use_context`` (and ``num_context > 0``)."""
        if len(texts) == 0:
            raise ValueError("no texts to encode")
        ids, pool_index = self.tokenize(texts, use_context)
        dtype = self.tower.transformer.get_cast_dtype()
        x = self.tower.token_embedding(ids).to(dtype)
        if self._uses_context(use_context):
            ctx = self.context.to(dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1:]], dim=1)
        return self.tower(x, pool_index)

    def _weights_signature(self) -> tuple:
        return tuple((t._version, t.data_ptr(), t.dtype, t.device)
                     for t in (*self.parameters(), *self.buffers()))

    def forward(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        """Class text embeddings ``K x C``: ``t_k = normalize(mean_r E_T([ctx, prompts[k][r]]))``."""
        if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("every class needs at least one prompt")
        if self.training:
            return self._class_embeddings(prompts)
        device_type = self.tower.token_embedding.weight.device.type
        key = (tuple(tuple(p) for p in prompts), self._weights_signature(), torch.is_autocast_enabled(device_type))
        ctx = self.context
        if (
            self._cache_value is not None
            and key == self._cache_key
            and (ctx is None or torch.equal(ctx, self._cache_context))  # also catches .data updates (EMA)
        ):
            return self._cache_value
        with torch.no_grad():
            value = self._class_embeddings(prompts)
        self._cache_key = key
        self._cache_context = None if ctx is None else ctx.detach().clone()
        self._cache_value = value
        return value

    def _class_embeddings(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        flat = [text for class_prompts in prompts for text in class_prompts]
        feats = self.encode(flat)
        owner = torch.repeat_interleave(
            torch.arange(len(prompts), device=feats.device),
            torch.tensor([len(p) for p in prompts], device=feats.device),
        )
        sums = feats.new_zeros(len(prompts), feats.shape[1]).index_add(0, owner, feats)
        counts = torch.bincount(owner, minlength=len(prompts)).to(feats.dtype).unsqueeze(1)
        return F.normalize(sums / counts, dim=-1)

    def reference_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Frozen reference embeddings ``normalize(E_T(prompt))`` without context, ``K x C``, no grad."""
        with torch.no_grad():
            return F.normalize(self.encode(prompts, use_context=False), dim=-1)
