"""A ViT with a small convolutional stem, registered with timm, for the project's tiny CLIP.

Why: the tiny ViT with a linear 8 px patch embedding (``HVL-Tiny-ViT-P8``) does not learn to tell the
``shapes`` colour twins apart (square / cross share a hue family; only outline and texture differ). On pure
8 px patches a linear probe of its best stage reaches about 70 % on square / cross, after CLIP pretraining and
equally after 1,000 steps of direct per-patch labels; the same tower with two full-resolution 3 x 3
convolutions before the patch projection reaches 96.8 % with the same labels and steps, and with the cheaper
strided stem used here SEE_RESULTS (``tools/twin_probe_report.py``, results in ``docs/RESULTS.md``). A
convolutional stem (Xiao et al., "Early convolutions help transformers see better",
NeurIPS 2021) gives each token a local non-linear feature of its pixels before the transformer mixes tokens.

How it loads: :func:`hvl_tiny_conv_vit_p8` is a timm model entry point (registered with timm when this module
is imported, which :func:`hvlformer.modeling.clip_loader.register_project_model_configs` does), and the
open_clip architecture ``HVL-Tiny-ConvViT-P8`` (``model_configs/HVL-Tiny-ConvViT-P8.json``) names it as its
``timm_model_name``. So ``MODEL.HVLFORMER.CLIP.MODEL_NAME HVL-Tiny-ConvViT-P8`` with ``PRETRAINED <path>``
builds and loads it exactly like any open_clip timm tower (EVA02-CLIP), with no special case; the backbone
runs it through the timm-ViT adapter of :mod:`.clip_vit`.

The stem keeps timm's ``PatchEmbed`` interface: ``proj`` maps ``B x 3 x H x W`` to ``B x width x H/p x W/p``
(the adapters call ``patch_embed.proj``), here a ``Sequential`` of the two convolutions and the patch
projection.
"""
from __future__ import annotations

from typing import Any

from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["strided_conv_stem", "ConvStemPatchEmbed", "hvl_tiny_conv_vit_p8"]


def strided_conv_stem(in_chans: int, width: int, patch: int, bias: bool = True) -> nn.Sequential:
    """``B x in_chans x H x W`` -> ``B x width x H/patch x W/patch``: ``log2(patch)`` 3 x 3 convolutions of
    stride 2 (padding 1, ReLU after each), their channels doubling up to ``width`` (``width/4, width/2, width``
    for 8 px patches), then a 1 x 1 convolution, as the stem of Xiao et al. (2021) without its BatchNorm (batch
    statistics would tie the images of a contrastive batch together). Costs about 4 times the FLOPs of a linear
    patch embedding instead of 60 times for full-resolution 3 x 3 convolutions, and sees the same 3 x 3
    neighbourhoods of the full-resolution pixels in its first layer."""
    steps = patch.bit_length() - 1
    if patch < 2 or 1 << steps != patch:
        raise ValueError(f"the strided stem needs a power-of-two patch size >= 2, got {patch}")
    if width % (1 << (steps - 1)):
        raise ValueError(f"width {width} must be divisible by {1 << (steps - 1)} for a {patch} px stem")
    layers, channels = [], in_chans
    for i in range(steps):
        out = width >> (steps - 1 - i)
        layers += [nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        channels = out
    layers.append(nn.Conv2d(channels, width, kernel_size=1, bias=bias))
    return nn.Sequential(*layers)


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose ``proj`` is :func:`strided_conv_stem` instead of one ``p x p`` convolution:
    ``B x in_chans x H x W`` -> tokens ``B x (H/p * W/p) x embed_dim`` (``forward``) or, through ``proj`` alone,
    a map ``B x embed_dim x H/p x W/p``: the token grid of a plain ``p`` px patch embedding."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        patch_proj: nn.Conv2d = self.proj
        if patch_proj.kernel_size[0] != patch_proj.kernel_size[1]:
            raise ValueError(f"non-square patches {patch_proj.kernel_size} are not supported")
        self.proj = strided_conv_stem(patch_proj.in_channels, patch_proj.out_channels, patch_proj.kernel_size[0],
                                      bias=patch_proj.bias is not None)


@register_model
def hvl_tiny_conv_vit_p8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The project's tiny image tower: width 64, 4 blocks of 2 heads (as ``HVL-Tiny-ViT-P8``), 8 px tokens at
    128 px (a 16 x 16 grid), class-token pooling, a pre-norm like open_clip's ``ln_pre``, and the strided
    convolutional stem :class:`ConvStemPatchEmbed` (16, 32, 64 channels). ``kwargs`` (``num_classes``, ``global_pool``, ...) override
    the defaults as for any timm model. There are no timm weights: pretrained weights come as an open_clip
    state dict (``MODEL.HVLFORMER.CLIP.PRETRAINED``)."""
    if pretrained:
        raise ValueError("hvl_tiny_conv_vit_p8 has no timm weights: load an open_clip checkpoint of "
                         "HVL-Tiny-ConvViT-P8 through MODEL.HVLFORMER.CLIP.PRETRAINED instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's own arguments
        kwargs.pop(key, None)
    options = dict(img_size=128, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, pre_norm=True,
                   global_pool="token", embed_layer=ConvStemPatchEmbed)
    options.update(kwargs)
    return VisionTransformer(**options)
