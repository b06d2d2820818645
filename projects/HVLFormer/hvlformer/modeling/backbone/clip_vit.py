"""CLIP vision encoder E_I as a detectron2 backbone (paper Sec. 3 and Sec. 4.1).

``CLIPViTBackbone`` wraps an open_clip vision tower and returns

- ``res2`` .. ``res5`` (strides 4, 8, 16, 32): a ViTDet simple feature pyramid over the patch tokens of the
  four blocks in ``out_indices`` (block ``out_indices[i]`` feeds level ``i``). ``w`` is the tower width.
  With 16 px tokens: res2 = ConvT2x2(w -> w/2) -> Norm -> GELU -> ConvT2x2(-> w/4); res3 = ConvT2x2(w -> w/2);
  res4 = identity (w); res5 = MaxPool2 (w). With 8 px tokens (e.g. the project's ``HVL-Tiny-ViT-P8``):
  res2 = ConvT2x2(w -> w/2) -> Norm -> GELU -> Conv1x1(-> w/4); res3 = Conv1x1(w -> w/2); res4 = MaxPool2 (w);
  res5 = MaxPool4 (w). The channels are the same in both cases.
- ``clip_global``: f_CLS, the tower's own image embedding (after ln_post and proj), ``B x C``.
- ``clip_dense``: patch tokens of the last block -> ln_post -> proj, ``B x C x H/s x W/s`` with ``s`` =
  ``token_stride`` (16, or 8 for a tower with 8 px patches).

Decisions:

- Two tower kinds, one small adapter class each, chosen by an explicit ``isinstance`` check:
  open_clip's native ``VisionTransformer`` (CLIP ViT-B/16 ...) and open_clip's ``TimmModel`` wrapping a
  timm ``Eva`` (EVA02-CLIP) or a timm ``VisionTransformer`` (the project's conv-stem tiny tower
  ``HVL-Tiny-ConvViT-P8``, :mod:`.conv_stem_vit`). Anything else is a clear ``TypeError``. The adapters hold no modules: they
  run a given tower, so the same code runs the trained tower and the frozen reference copy.
- Positional embeddings are interpolated (bicubic, float32, no antialias) from the pretraining grid to the
  input grid on every call (nothing size-dependent is cached); prefix (class) positions are kept. EVA02's
  rotary embedding is rebuilt for the input grid the same way timm does for dynamic sizes.
- ``output_shape()`` strides are always 4/8/16/32 and inputs must have H, W divisible by 16. Towers with 16 or
  8 px patches run on the input as it is (token stride 16 or 8: a tiny model on 96-128 px images needs the
  finer grid for dense prediction). A tower with another patch size (EVA02-L/14) gets its input resized
  bilinearly to ``(H/16 * p, W/16 * p)`` first, so its token grid is ``H/16 x W/16`` (token stride 16).
- Patch dropout of the tower (a pretraining trick) is never applied: dense prediction needs every token.
- ``pyramid_norm``: detectron2 ``get_norm`` names; ``""`` = no norm. ``"SyncBN"`` becomes plain ``"BN"``
  unless torch.distributed is initialised with more than one process (single-process CPU runs work).
- The frozen reference E_I^0 (for L^V) is a deep copy of the tower taken at construction (i.e. of the
  PRETRAINED CLIP weights ``build_clip_model`` loaded; built from a config only when there are such weights,
  see :func:`~hvlformer.modeling.clip_loader.has_pretrained_reference`), held in a
  :class:`~hvlformer.modeling.frozen.FrozenModule` (``reference``): a frozen submodule, so it moves and is
  copied with the backbone (``.to()``, ``to_empty``, ``deepcopy``), but it is not in ``state_dict()``,
  ``parameters()``, the optimizer or DDP.
  If the tower's initial weights are loaded later by other means, call :meth:`reset_reference`; code that
  never needs it (the EMA teacher) calls :meth:`drop_reference`.
  ``reference_global_embedding`` (f_CLS^0, L^V) and ``reference_dense_embedding`` (HierVL L_mask) run it.
- The CLIP model is loaded once per model: the meta-architecture passes its vision tower (``visual``) to
  this backbone's ``from_config``; without one (the backbone on its own) ``from_config`` loads it.
"""
from __future__ import annotations

import abc
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ..clip_loader import build_clip_model, has_pretrained_reference, reference_needed_at_test
from ..frozen import FrozenModule

__all__ = ["CLIPViTBackbone", "interpolate_pos_embed", "NOMINAL_STRIDE", "NATIVE_PATCH_SIZES"]

#: Input size divisibility, and the token stride of towers whose patch size is not a native one (their
#: inputs are resized so that one token covers 16 x 16 input pixels).
NOMINAL_STRIDE = 16
#: Patch sizes run on the input as it is: the token stride is the patch size.
NATIVE_PATCH_SIZES = (8, 16)

_LEVELS = ("res2", "res3", "res4", "res5")


def interpolate_pos_embed(pos: Tensor, num_prefix: int, src_grid: Tuple[int, int],
                          dst_grid: Tuple[int, int]) -> Tensor:
    """Resample absolute position embeddings ``L x C`` (``num_prefix`` leading rows, then a ``src_grid``
    row-major grid) to ``dst_grid`` with bicubic interpolation. Prefix rows are kept as they are; at the
    source size the input is returned unchanged."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    if grid.shape[0] != src_grid[0] * src_grid[1]:
        raise ValueError(f"position embedding has {grid.shape[0]} grid rows, expected {src_grid[0]}x{src_grid[1]}")
    grid = grid.float().reshape(1, src_grid[0], src_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(dst_grid[0] * dst_grid[1], -1).to(pos.dtype)
    return torch.cat([prefix, grid], dim=0)


# ---------------------------------------------------------------------------------------------- adapters
class _TowerAdapter(abc.ABC):
    """How to run one kind of open_clip vision tower token by token. Holds only static facts about the
    tower (no modules, no tensors), so it serves the trained tower and the frozen reference alike."""

    width: int
    embed_dim: int
    patch_size: int
    num_blocks: int
    num_prefix: int

    @abc.abstractmethod
    def embed(self, visual: nn.Module, x: Tensor) -> Tuple[Tensor, Tuple[int, int], Optional[Tensor]]:
        """Image -> ``(tokens B x (P + h*w) x width, (h, w), extra block input)``."""

    @abc.abstractmethod
    def blocks(self, visual: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @abc.abstractmethod
    def run_block(self, block: nn.Module, x: Tensor, extra: Optional[Tensor]) -> Tensor:
        """One block on batch-first tokens."""

    @abc.abstractmethod
    def heads(self, visual: nn.Module, x: Tensor, dense: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Final-block tokens -> ``(global B x C, dense patch embeddings B x h*w x C or None)``."""


class _OpenCLIPViTAdapter(_TowerAdapter):
    """open_clip ``VisionTransformer``: conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks, ln_post, proj."""

    def __init__(self, visual: VisionTransformer) -> None:
        if visual.attn_pool is not None:
            raise TypeError("open_clip VisionTransformer with attentional pooling is not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise TypeError(f"open_clip VisionTransformer pool_type {visual.pool_type!r} is not supported")
        ph, pw = visual.patch_size
        if ph != pw:
            raise TypeError(f"non-square patches {visual.patch_size} are not supported")
        self.patch_size = ph
        self.grid = tuple(visual.grid_size)
        self.width = visual.conv1.out_channels
        self.embed_dim = visual.proj.shape[1] if visual.proj is not None else self.width
        self.num_blocks = len(visual.transformer.resblocks)
        self.num_prefix = 1
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    def embed(self, visual, x):
        x = visual.conv1(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + interpolate_pos_embed(visual.positional_embedding, 1, self.grid, (h, w)).to(x.dtype)
        return visual.ln_pre(x), (h, w), None

    def blocks(self, visual):
        return visual.transformer.resblocks

    def run_block(self, block, x, extra):
        if self.batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    def _pool(self, visual, x):
        return x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]

    def heads(self, visual, x, dense):
        tokens = visual.ln_post(x[:, 1:]) if dense else None
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(self._pool(visual, x))
        elif visual.pool_type == "tok":
            pooled = visual.ln_post(x[:, 0])  # LayerNorm is per token
        else:  # avg over the normalised patch tokens
            pooled = (tokens if dense else visual.ln_post(x[:, 1:])).mean(dim=1)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            tokens = tokens @ visual.proj if dense else None
        return pooled, tokens


class _TimmViTAdapter(_TowerAdapter):
    """open_clip ``TimmModel`` around a timm ``Eva`` (EVA02-CLIP) or a timm ``VisionTransformer`` (e.g. the
    project's conv-stem ``HVL-Tiny-ConvViT-P8``): patch_embed (its ``proj`` maps the image to the token map,
    whatever it holds), cls_token / reg_token, pos_embed, rope (Eva only), norm_pre, blocks, norm, then timm's
    pooled head (fc_norm, head) and open_clip's ``head``."""

    def __init__(self, visual: TimmModel) -> None:
        trunk = visual.trunk
        self.has_rope = hasattr(trunk, "rope")  # Eva blocks take the rotary embedding, ViT blocks do not
        if trunk.attn_pool is not None or hasattr(visual.head, "pool"):
            raise TypeError("timm EVA towers with attention pooling are not supported")
        if getattr(trunk, "rope_mixed", False):
            raise TypeError("timm EVA towers with mixed (per-depth) RoPE are not supported")
        ph, pw = trunk.patch_embed.patch_size
        if ph != pw:
            raise TypeError(f"non-square patches {trunk.patch_embed.patch_size} are not supported")
        self.patch_size = ph
        self.grid = tuple(trunk.patch_embed.grid_size)
        self.width = trunk.embed_dim
        self.num_blocks = len(trunk.blocks)
        self.num_prefix = trunk.num_prefix_tokens
        self.embed_dim = self._output_dim(visual)

    @staticmethod
    def _output_dim(visual: TimmModel) -> int:
        # the last Linear applied (open_clip's head after timm's head) sets the output width
        for module in reversed([visual.trunk.head, *visual.head.modules()]):
            if isinstance(module, nn.Linear):
                return module.out_features
        return visual.trunk.embed_dim

    def _rope(self, trunk, grid: Tuple[int, int]) -> Optional[Tensor]:
        rope = getattr(trunk, "rope", None)
        if rope is None:
            return None
        feat_shape = getattr(rope, "feat_shape", None)
        if feat_shape is None:  # built for dynamic sizes: computes any grid itself
            return rope.get_embed(shape=list(grid))
        if tuple(feat_shape) == tuple(grid):
            return rope.get_embed()
        # Built for a fixed grid (open_clip does not ask timm for dynamic sizes): rebuild the concatenated
        # sin/cos table for this grid from the rope's frequency bands, as timm's dynamic mode does.
        build = getattr(rope, "_build_embed_cat", None)
        if build is None:
            raise TypeError(f"cannot resize the rotary embedding {type(rope).__name__} to grid {grid}")
        return build(list(grid), rope.bands)

    def embed(self, visual, x):
        trunk = visual.trunk
        pe = trunk.patch_embed
        x = pe.proj(x)
        h, w = x.shape[-2:]
        x = pe.norm(x.flatten(2).transpose(1, 2))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (trunk.cls_token, trunk.reg_token) if t is not None]
        pos = None
        if trunk.pos_embed is not None:
            pos_prefix = 0 if trunk.no_embed_class else self.num_prefix
            pos = interpolate_pos_embed(trunk.pos_embed[0], pos_prefix, self.grid, (h, w)).unsqueeze(0)
        if trunk.no_embed_class:
            x = x + pos if pos is not None else x
            x = torch.cat(prefix + [x], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1)
            x = x + pos if pos is not None else x
        x = trunk.norm_pre(trunk.pos_drop(x))
        return x, (h, w), self._rope(trunk, (h, w))

    def blocks(self, visual):
        return visual.trunk.blocks

    def run_block(self, block, x, extra):
        return block(x, rope=extra) if self.has_rope else block(x)

    def heads(self, visual, x, dense):
        trunk = visual.trunk
        x = trunk.norm(x)
        pooled = visual.head(trunk.forward_head(x))
        tokens = None
        if dense:
            tokens = visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(x[:, self.num_prefix:]))))
        return pooled, tokens


def _select_adapter(visual: nn.Module) -> _TowerAdapter:
    if isinstance(visual, VisionTransformer):
        return _OpenCLIPViTAdapter(visual)
    if isinstance(visual, TimmModel):
        from timm.models.eva import Eva  # timm is only needed for timm towers
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

        if isinstance(visual.trunk, (Eva, TimmVisionTransformer)):
            return _TimmViTAdapter(visual)
        raise TypeError(
            f"unsupported timm vision tower {type(visual.trunk).__name__}: CLIPViTBackbone supports timm Eva "
            "(EVA02-CLIP) and VisionTransformer towers only"
        )
    raise TypeError(
        f"unsupported vision tower {type(visual).__name__}: CLIPViTBackbone supports open_clip "
        "VisionTransformer (CLIP ViT) and TimmModel around a timm Eva (EVA02-CLIP) or VisionTransformer"
    )


def _tokens_to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """``B x h*w x C`` row-major patch tokens -> ``B x C x h x w``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _resolve_norm(norm: str) -> str:
    if norm == "SyncBN":
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return "BN"
    return norm


# ---------------------------------------------------------------------------------------------- backbone
@BACKBONE_REGISTRY.register()
class CLIPViTBackbone(Backbone):
    """CLIP vision encoder E_I with a simple feature pyramid; see the module docstring."""

    @configurable
    def __init__(
        self,
        visual: nn.Module,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        pyramid_norm: str = "GN",
        gradient_checkpointing: bool = False,
        frozen_reference: bool = True,
    ) -> None:
        """
        Args:
            visual: an open_clip vision tower (``model.visual``).
            out_indices: 4 block indices (0-based, negative = from the end) feeding res2..res5; a single index
                feeds all four levels (plain ViTDet).
            pyramid_norm: norm of the res2 branch (detectron2 ``get_norm`` name, ``""`` = none).
            gradient_checkpointing: recompute each block in backward (training only).
            frozen_reference: keep a frozen copy E_I^0 of the initial tower for
                :meth:`reference_global_embedding` / :meth:`reference_dense_embedding`.
        """
        super().__init__()
        self._adapter = _select_adapter(visual)
        self.visual = visual
        self.width = self._adapter.width
        self.embed_dim = self._adapter.embed_dim
        self.patch_size = self._adapter.patch_size
        self.num_blocks = self._adapter.num_blocks
        # stride of clip_dense (and of the pyramid's input grid), see the module docstring
        self.token_stride = self.patch_size if self.patch_size in NATIVE_PATCH_SIZES else NOMINAL_STRIDE
        self.out_indices = self._normalise_indices(out_indices)
        self.gradient_checkpointing = bool(gradient_checkpointing)

        w = self.width
        if w % 4:
            raise ValueError(f"tower width {w} must be divisible by 4 for the feature pyramid")
        norm = _resolve_norm(pyramid_norm)
        if self.token_stride == 16:
            self.pyramid = nn.ModuleDict({
                "res2": nn.Sequential(
                    nn.ConvTranspose2d(w, w // 2, kernel_size=2, stride=2),
                    get_norm(norm, w // 2) if norm else nn.Identity(),
                    nn.GELU(),
                    nn.ConvTranspose2d(w // 2, w // 4, kernel_size=2, stride=2),
                ),
                "res3": nn.ConvTranspose2d(w, w // 2, kernel_size=2, stride=2),
                "res4": nn.Identity(),
                "res5": nn.MaxPool2d(kernel_size=2, stride=2),
            })
        else:  # 8 px tokens
            self.pyramid = nn.ModuleDict({
                "res2": nn.Sequential(
                    nn.ConvTranspose2d(w, w // 2, kernel_size=2, stride=2),
                    get_norm(norm, w // 2) if norm else nn.Identity(),
                    nn.GELU(),
                    nn.Conv2d(w // 2, w // 4, kernel_size=1),
                ),
                "res3": nn.Conv2d(w, w // 2, kernel_size=1),
                "res4": nn.MaxPool2d(kernel_size=2, stride=2),
                "res5": nn.MaxPool2d(kernel_size=4, stride=4),
            })
        self._out_features = list(_LEVELS)
        self._out_feature_channels = {"res2": w // 4, "res3": w // 2, "res4": w, "res5": w}
        self._out_feature_strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

        # E_I^0: a frozen submodule outside state_dict() and the optimizer (see the module docstring)
        self.reference: Optional[FrozenModule] = None
        if frozen_reference:
            self.reset_reference()

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None, visual: Optional[nn.Module] = None):
        """``visual``: the vision tower of the CLIP model the caller already loaded (the meta-architecture
        loads CLIP once for both towers); ``None`` loads ``CLIP.MODEL_NAME`` / ``CLIP.PRETRAINED`` here."""
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(f"CLIP vision towers take 3-channel images, got input_shape {input_shape}")
        c = cfg.MODEL.HVLFORMER.CLIP
        at_test = reference_needed_at_test(cfg)  # E_I^0 runs at inference too
        if visual is None:
            model, _ = build_clip_model(c.MODEL_NAME, c.PRETRAINED,
                                        weights_from_checkpoint=c.WEIGHTS_FROM_CHECKPOINT and not at_test)
            visual = model.visual
        return {
            "visual": visual,
            "out_indices": list(c.OUT_INDICES),
            "pyramid_norm": c.PYRAMID_NORM,
            "gradient_checkpointing": c.GRADIENT_CHECKPOINTING,
            "frozen_reference": has_pretrained_reference(c, at_test),
        }

    # ------------------------------------------------------------------ helpers
    def _normalise_indices(self, out_indices: Sequence[int]) -> List[int]:
        indices = [int(i) for i in out_indices]
        if len(indices) == 1:
            indices = indices * len(_LEVELS)
        if len(indices) != len(_LEVELS):
            raise ValueError(f"out_indices needs 4 block indices (res2..res5) or 1, got {list(out_indices)}")
        n = self.num_blocks
        resolved = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"out index {i} is out of range for a tower with {n} blocks")
            resolved.append(j)
        return resolved

    @property
    def size_divisibility(self) -> int:
        return NOMINAL_STRIDE

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def _prepare_input(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images B x 3 x H x W, got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % NOMINAL_STRIDE or W % NOMINAL_STRIDE:
            raise ValueError(
                f"input size {H}x{W} must be divisible by {NOMINAL_STRIDE} (pad the batch, e.g. "
                "MODEL.HVLFORMER.SIZE_DIVISIBILITY)"
            )
        p = self.patch_size
        if p != self.token_stride:
            x = F.interpolate(x, size=(H // NOMINAL_STRIDE * p, W // NOMINAL_STRIDE * p), mode="bilinear",
                              align_corners=False)
        return x

    def _run_tower(self, visual: nn.Module, x: Tensor, take: Sequence[int],
                   checkpointing: bool) -> Tuple[Tensor, Dict[int, Tensor], Tuple[int, int]]:
        ad = self._adapter
        x, grid, extra = ad.embed(visual, x)
        taken: Dict[int, Tensor] = {}
        for i, block in enumerate(ad.blocks(visual)):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(ad.run_block, block, x, extra, use_reentrant=False)
            else:
                x = ad.run_block(block, x, extra)
            if i in take:
                taken[i] = x
        return x, taken, grid

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """x: normalised images ``B x 3 x H x W`` (H, W divisible by 16). Returns res2..res5, clip_global
        (``B x C``) and clip_dense (``B x C x H/s x W/s``, ``s`` = ``token_stride``)."""
        x = self._prepare_input(x)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        final, taken, (h, w) = self._run_tower(self.visual, x, set(self.out_indices), checkpointing)
        P = self._adapter.num_prefix
        out = {
            name: self.pyramid[name](_tokens_to_map(taken[idx][:, P:], h, w))
            for name, idx in zip(_LEVELS, self.out_indices)
        }
        pooled, dense = self._adapter.heads(self.visual, final, dense=True)
        out["clip_global"] = pooled
        out["clip_dense"] = _tokens_to_map(dense, h, w)
        return out

    # ------------------------------------------------------------------ frozen reference E_I^0
    def reset_reference(self) -> None:
        """(Re)take the frozen reference E_I^0 as a copy of the tower's current weights."""
        self.reference = FrozenModule(copy.deepcopy(self.visual))

    def drop_reference(self) -> None:
        """Remove E_I^0 (for a copy of the model that never runs it, e.g. the EMA teacher)."""
        self.reference = None

    @property
    def reference_tower(self) -> Optional[nn.Module]:
        """The frozen vision tower E_I^0, or None."""
        return self.reference.module if self.reference is not None else None

    def _reference_outputs(self, x: Tensor, dense: bool) -> Tuple[Tensor, Optional[Tensor]]:
        ref = self.reference_tower
        if ref is None:
            raise RuntimeError(
                "this CLIPViTBackbone was built with frozen_reference=False "
                "(MODEL.HVLFORMER.CLIP.FROZEN_REFERENCE), so it has no frozen reference tower E_I^0"
            )
        with torch.no_grad():
            final, _, (h, w) = self._run_tower(ref, self._prepare_input(x), (), checkpointing=False)
            pooled, tokens = self._adapter.heads(ref, final, dense=dense)
        return pooled, (_tokens_to_map(tokens, h, w) if dense else None)

    def reference_global_embedding(self, x: Tensor) -> Tensor:
        """f_CLS^0 of the frozen initial tower for images ``x`` (as in :meth:`forward`), ``B x C``, no grad."""
        return self._reference_outputs(x, dense=False)[0]

    def reference_dense_embedding(self, x: Tensor) -> Tensor:
        """Dense embedding of the frozen initial tower (as ``clip_dense``), ``B x C x H/s x W/s``, no grad."""
        return self._reference_outputs(x, dense=True)[1]
