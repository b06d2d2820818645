"""A ViT with a small convolutional stem, registered with timm, for the project's tiny CLIP.

Why: the tiny ViT with a linear 8 px patch embedding (``HVL-Tiny-ViT-P8``) does not learn to tell the
``shapes`` colour twins apart (square / cross share a hue family; only outline and texture differ). On pure
8 px patches a linear probe of its best stage reaches about 70 % on square / cross, after CLIP pretraining and
equally after 1,000 steps of direct per-patch labels. The same tower with two 3 x 3 convolutions of 32
channels at full resolution before the patch projection reaches 96.8 % with the same labels and steps
(``tools/twin_probe_report.py --direct-stem conv``; ``docs/RESULTS.md``, "Where square and cross are lost").
A convolutional stem (Xiao et al., "Early convolutions help transformers see better", NeurIPS 2021) gives each
token a local non-linear feature of its pixels (texture) before the transformer mixes tokens.

Cheaper stems were probed the same way and stayed at the linear stem's level (square / cross 68-71 % after
500-1,000 steps): three stride-2 convolutions (:func:`strided_conv_stem`, 10 times cheaper), one full-resolution
convolution of 16 or 32 channels, two of 16. So the tower uses the stem that was measured to work,
:data:`TINY_STEM_LAYERS`; it costs about 1.2 s per forward + backward of 32 images at 128 px on one CPU thread
(0.7 s channels-last) against 0.01 s for the linear embedding.

How it loads: :func:`hvl_tiny_conv_vit_p8` is a timm model entry point (registered with timm when this module
is imported, which :func:`hvlformer.modeling.clip_loader.register_project_model_configs` does), and the
open_clip architecture ``HVL-Tiny-ConvViT-P8`` (``model_configs/HVL-Tiny-ConvViT-P8.json``) names it as its
``timm_model_name``. So ``MODEL.HVLFORMER.CLIP.MODEL_NAME HVL-Tiny-ConvViT-P8`` with ``PRETRAINED <path>``
builds and loads it exactly like any open_clip timm tower (EVA02-CLIP), with no special case; the backbone
runs it through the timm-ViT adapter of :mod:`.clip_vit`.

The stem keeps timm's ``PatchEmbed`` interface: ``proj`` maps ``B x 3 x H x W`` to ``B x width x H/p x W/p``
(the adapters call ``patch_embed.proj``), here a ``Sequential`` of the convolutions and the patch projection.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["conv_stem", "parse_stem", "strided_conv_stem", "ConvStemPatchEmbed", "hvl_tiny_conv_vit_p8"]


def conv_stem(in_chans: int, width: int, patch: int, layers: Sequence[Tuple[int, int]],
              bias: bool = True) -> nn.Sequential:
    """``B x in_chans x H x W`` -> ``B x width x H/patch x W/patch``: 3 x 3 convolutions (padding 1, ReLU after
    each), one per ``(channels, stride)`` in ``layers``, then the patch projection, a convolution whose kernel
    and stride are ``patch / prod(strides)`` (1 x 1 when the strides already reach ``patch``)."""
    total = 1
    for _, stride in layers:
        total *= stride
    if patch % total:
        raise ValueError(f"the stem's strides {[st for _, st in layers]} must divide the patch size {patch}")
    modules, channels = [], in_chans
    for out, stride in layers:
        modules += [nn.Conv2d(channels, out, kernel_size=3, stride=stride, padding=1), nn.ReLU()]
        channels = out
    modules.append(nn.Conv2d(channels, width, kernel_size=patch // total, stride=patch // total, bias=bias))
    return _ChannelsLastSequential(*modules)


class _ChannelsLastSequential(nn.Sequential):
    """``nn.Sequential`` that runs on a channels-last copy of its input: full-resolution 3 x 3 convolutions are
    about 1.6 times faster so on a CPU (the output is a regular tensor of the same values and shape)."""

    def forward(self, x):  # type: ignore[override]
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def parse_stem(spec: str) -> List[Tuple[int, int]]:
    """``"16,32/2"`` -> ``[(16, 1), (32, 2)]``: comma-separated ``channels[/stride]`` of :func:`conv_stem`."""
    layers = []
    for part in spec.split(","):
        channels, _, stride = part.strip().partition("/")
        try:
            layers.append((int(channels), int(stride or 1)))
        except ValueError:
            raise ValueError(f"bad stem spec {spec!r}: expected comma-separated channels[/stride], e.g. '16,32/2'") from None
    if not layers or any(c < 1 or st < 1 for c, st in layers):
        raise ValueError(f"bad stem spec {spec!r}: channels and strides must be positive")
    return layers


def strided_conv_stem(in_chans: int, width: int, patch: int, bias: bool = True) -> nn.Sequential:
    """:func:`conv_stem` with ``log2(patch)`` stride-2 convolutions, their channels doubling up to ``width``
    (``width/4, width/2, width`` for 8 px patches), then a 1 x 1 projection: the stem of Xiao et al. (2021)
    without its BatchNorm. Probed and not used: see the module docstring."""
    steps = patch.bit_length() - 1
    if patch < 2 or 1 << steps != patch:
        raise ValueError(f"the strided stem needs a power-of-two patch size >= 2, got {patch}")
    if width % (1 << (steps - 1)):
        raise ValueError(f"width {width} must be divisible by {1 << (steps - 1)} for a {patch} px stem")
    return conv_stem(in_chans, width, patch, [(width >> (steps - 1 - i), 2) for i in range(steps)], bias)


#: The stem of ``hvl_tiny_conv_vit_p8``: ``(channels, stride)`` of each 3 x 3 convolution before the 8 x 8
#: patch projection (chosen with ``tools/twin_probe_report.py --direct-stem``, see the module docstring).
TINY_STEM_LAYERS: Tuple[Tuple[int, int], ...] = ((32, 1), (32, 1))


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose ``proj`` is a :func:`conv_stem` instead of one ``p x p`` convolution:
    ``B x in_chans x H x W`` -> tokens ``B x (H/p * W/p) x embed_dim`` (``forward``) or, through ``proj`` alone,
    a map ``B x embed_dim x H/p x W/p``: the token grid of a plain ``p`` px patch embedding.

    Args:
        stem_layers: ``(channels, stride)`` of the stem's 3 x 3 convolutions; the other arguments are timm's.
    """

    def __init__(self, *args: Any, stem_layers: Sequence[Tuple[int, int]] = TINY_STEM_LAYERS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        patch_proj: nn.Conv2d = self.proj
        if patch_proj.kernel_size[0] != patch_proj.kernel_size[1]:
            raise ValueError(f"non-square patches {patch_proj.kernel_size} are not supported")
        # the projection keeps a bias even under timm's pre_norm (which drops it for a linear patch embedding):
        # the stem that untied the colour twins in the per-patch-labels probe had one
        self.proj = conv_stem(patch_proj.in_channels, patch_proj.out_channels, patch_proj.kernel_size[0],
                              stem_layers, bias=True)


@register_model
def hvl_tiny_conv_vit_p8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The project's tiny image tower: width 64, 4 blocks of 2 heads (as ``HVL-Tiny-ViT-P8``), 8 px tokens at
    128 px (a 16 x 16 grid), class-token pooling, a pre-norm like open_clip's ``ln_pre``, and the convolutional
    stem :class:`ConvStemPatchEmbed` (:data:`TINY_STEM_LAYERS`). ``kwargs`` (``num_classes``, ``global_pool``,
    ...) override the defaults as for any timm model. There are no timm weights: pretrained weights come as an
    open_clip state dict (``MODEL.HVLFORMER.CLIP.PRETRAINED``)."""
    if pretrained:
        raise ValueError("hvl_tiny_conv_vit_p8 has no timm weights: load an open_clip checkpoint of "
                         "HVL-Tiny-ConvViT-P8 through MODEL.HVLFORMER.CLIP.PRETRAINED instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's own arguments
        kwargs.pop(key, None)
    options = dict(img_size=128, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, pre_norm=True,
                   global_pool="token", embed_layer=ConvStemPatchEmbed)
    options.update(kwargs)
    return VisionTransformer(**options)
