#!/usr/bin/env python
"""Parameters per module and inference FLOPs of an HVLFormer config, as Markdown tables.

    python tools/analyze_model.py --config-file configs/tiny/hvlformer_tiny_shapes.yaml
    python tools/analyze_model.py --config-file configs/Base-HVLFormer.yaml --input-size 512 512 --depth 3 \\
        MODEL.HVLFORMER.CLIP.PRETRAINED "" DATASETS.TRAIN "('shapes_train',)" DATASETS.TEST "('shapes_val',)"

What is counted:

- **Parameters**: every parameter in the module tree, split into trainable and frozen (the CLIP text tower is
  frozen except its learnable context). The frozen reference encoder E_I^0 of L^V lives outside the module
  tree (it is not in checkpoints) and is listed on its own line when present.
- **FLOPs** (fvcore ``FlopCountAnalysis``, through detectron2's tracing adapter) of the inference of one
  image of ``--input-size`` (default: ``INPUT.CROP.SIZE``), in fvcore's convention: one multiply-add = one
  FLOP, element-wise operations not counted. fvcore does not count attention kernels itself; this tool adds
  handlers for ``scaled_dot_product_attention``, ``_native_multi_head_attention`` (the fused path of
  ``nn.MultiheadAttention`` in the CLIP towers) and ``baddbmm``. The class text embeddings are computed
  once per vocabulary and cached at inference, so the text tower is not part of the per-image count.
  Sliding-window inference (``TEST.SLIDING_WINDOW.ENABLED``) counts all windows.

``--thesis-modules`` adds a table of the thesis's optional modules (hvlformer/modeling/thesis: CAA, ECAC,
LSMSeg's category filter, class refinement and visual fusion), each built STANDALONE at the config's widths
(pixel-decoder, mask and query widths, CLIP text and vision widths, the dataset's class count) and traced on
the tensors it would see for one ``--input-size`` image: parameters, inference FLOPs (same convention) and,
for CAA, the bytes of its ``P x P`` affinity map. ``--vocabulary`` sets the class count of the category
filter's row (default: the dataset's; the filter matters for hundreds of names). The whole-model table
does not include them: the meta-architecture does not build them yet (docs/THESIS_MODULES.md, Integration).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger("analyze_model")


# ------------------------------------------------------------------------------------------------ parameters
def parameter_rows(model: nn.Module, depth: int = 2) -> List[Tuple[str, int, int]]:
    """``(module name, trainable, frozen)`` for the model and its submodules down to ``depth`` levels."""
    totals: "OrderedDict[str, List[int]]" = OrderedDict()
    totals["model"] = [0, 0]
    for name, param in model.named_parameters():
        parts = name.split(".")[:-1]
        slot = 0 if param.requires_grad else 1
        totals["model"][slot] += param.numel()
        for d in range(1, min(depth, len(parts)) + 1):
            key = ".".join(parts[:d])
            totals.setdefault(key, [0, 0])[slot] += param.numel()
    # keep the module order of the model, parents before children
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rows = sorted(totals.items(), key=lambda kv: (0, "") if kv[0] == "model" else (1, _sort_key(kv[0], order)))
    return [(name, t, f) for name, (t, f) in rows]


def _sort_key(name: str, order: Dict[str, int]) -> Tuple[int, ...]:
    parts = name.split(".")
    return tuple(order.get(".".join(parts[: i + 1]), 10 ** 9) for i in range(len(parts)))


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def parameter_table(model: nn.Module, depth: int = 2) -> str:
    lines = ["| module | parameters | trainable | frozen |", "|:--|--:|--:|--:|"]
    for name, trainable, frozen in parameter_rows(model, depth):
        lines.append(f"| {name} | {_fmt_count(trainable + frozen)} | {_fmt_count(trainable)} | "
                     f"{_fmt_count(frozen)} |")
    backbone = getattr(model, "backbone", None)
    reference = getattr(backbone, "reference_tower", None) if backbone is not None else None
    if isinstance(reference, nn.Module):
        count = sum(p.numel() for p in reference.parameters())
        lines.append(f"| (frozen reference encoder E_I^0, not in checkpoints) | {_fmt_count(count)} | 0 | "
                     f"{_fmt_count(count)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ FLOPs
def _shape(value) -> Optional[List[int]]:
    from fvcore.nn.jit_handles import get_shape

    try:
        return get_shape(value)
    except Exception:  # non-tensor argument
        return None


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def sdpa_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q, k, v)``: ``QK^T`` and ``AV`` multiply-adds."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = _prod(q[:-2])
    return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]


def native_mha_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """``_native_multi_head_attention(query, key, value, embed_dim, num_heads, ...)`` (batch first):
    the input projections, ``QK^T``, ``AV`` and the output projection."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    batch, length, dim = _prod(q[:-2]), q[-2], q[-1]
    source = k[-2]
    projections = batch * length * dim * dim + 2 * batch * source * dim * dim + batch * length * dim * dim
    attention = 2 * batch * length * source * dim
    return projections + attention


def baddbmm_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """``baddbmm(input, b1: b x n x m, b2: b x m x p)``."""
    b1, b2 = _shape(inputs[1]), _shape(inputs[2])
    return b1[0] * b1[1] * b1[2] * b2[2]


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop,
    "aten::_native_multi_head_attention": native_mha_flop,
    "aten::baddbmm": baddbmm_flop,
}


def flop_analysis(model: nn.Module, height: int, width: int):
    """fvcore ``FlopCountAnalysis`` of the inference of one ``height x width`` image (model in eval mode)."""
    from detectron2.utils.analysis import FlopCountAnalysis

    model.eval()
    inputs = [{"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(0)).to(model.device),
               "height": height, "width": width}]
    with torch.no_grad():
        model(inputs)  # fills the text-embedding cache: the per-image count leaves the text tower out
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


# ------------------------------------------------------------------------------------------------ thesis modules
def _clip_widths(model_name: str) -> Tuple[int, int, int]:
    """(text / joint width C, vision width, patch size) of an open_clip architecture (project configs
    included), read from its config without building it."""
    import open_clip

    from hvlformer.modeling.clip_loader import register_project_model_configs

    register_project_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {model_name!r}")
    vision = config["vision_cfg"]
    return int(config["embed_dim"]), int(vision["width"]), int(vision["patch_size"])


class _Traced(nn.Module):
    """Wraps a module whose forward returns a dict (fvcore traces tensors and tuples)."""

    def __init__(self, module: nn.Module, call) -> None:
        super().__init__()
        self.module = module
        self.call = call

    def forward(self, *inputs):
        return self.call(self.module, *inputs)


def thesis_module_rows(cfg, height: int, width: int, num_classes: int,
                       vocabulary: Optional[int] = None) -> List[Tuple[str, int, float, str]]:
    """``(module, parameters, inference FLOPs, note)`` of each thesis module built standalone at ``cfg``'s widths
    for one ``height x width`` image with ``num_classes`` classes (``vocabulary`` names for the filter)."""
    from fvcore.nn import FlopCountAnalysis

    from hvlformer.modeling.thesis import (
        CategoryFilter,
        ClassAwareAffinity,
        ClassLinearAttentionRefinement,
        ExtendedContextAwareClassifier,
        VisualFeatureFusion,
        caa_affinity_bytes,
    )

    text_dim, vision_width, patch = _clip_widths(cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME)
    hv = cfg.MODEL.HVLFORMER
    convs, mask_dim, hidden = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, hv.HIDDEN_DIM
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def grid(stride: int) -> Tuple[int, int]:
        return -(-height // stride), -(-width // stride)

    caa_stride = (32, 16, 8)[hv.CAA.LEVEL]
    channels = {"res2": vision_width // 4, "res3": vision_width // 2, "res4": vision_width, "res5": vision_width}
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    fusion = VisualFeatureFusion(cfg, in_channels=channels)
    fusion_inputs = (rand(1, 3, height, width),
                     *[rand(1, channels[name], *grid(strides[name])) for name in fusion.levels])
    vocab = vocabulary or num_classes
    modules = [
        (f"CAA (level stride {caa_stride})", ClassAwareAffinity(cfg, text_dim=text_dim),
         lambda m, f, t: tuple(m(f, t).values()), (rand(1, convs, *grid(caa_stride)), rand(num_classes, text_dim)),
         f"P x P affinity: {caa_affinity_bytes(height, width, caa_stride) / 2 ** 20:.2f} MiB per image (fp32)"),
        ("ECAC (mask features, stride 4)", ExtendedContextAwareClassifier(cfg, text_dim=text_dim, num_classes=num_classes),
         lambda m, f, s, t: m(f, s, t)["student_logits"],
         (rand(1, mask_dim, *grid(4)), rand(1, num_classes, *grid(4)).softmax(1), rand(num_classes, text_dim)),
         "inference (student); training adds the teacher (same cost) and the memory logits"),
        (f"LSMSeg category filter ({vocab} names, k={hv.LSMSEG.CATEGORY_FILTER_TOP_K})", CategoryFilter(cfg),
         lambda m, d, t: tuple(m(d, t).values()), (rand(1, text_dim, *grid(patch)), rand(vocab, text_dim)),
         "no parameters; saves the decoder's work on the filtered classes"),
        ("LSMSeg class refinement (E x K queries)", ClassLinearAttentionRefinement(cfg), lambda m, q: m(q),
         (rand(1, hv.NUM_QUERY_LEVELS, num_classes, hidden),), "linear in K"),
        (f"LSMSeg visual fusion ({', '.join(fusion.levels)}; {hv.LSMSEG.FUSION_ENCODER})", fusion,
         lambda m, images, *feats: tuple(m(images, dict(zip(m.levels, feats))).values()), fusion_inputs,
         f"frozen encoder: {sum(p.numel() for p in fusion.encoder.parameters())} parameters, counted in FLOPs"),
    ]
    rows = []
    for name, module, call, inputs, note in modules:
        module.eval()
        params = sum(p.numel() for p in module.parameters())
        with torch.no_grad():
            analysis = FlopCountAnalysis(_Traced(module, call), inputs).set_op_handle(**EXTRA_HANDLES)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            flops = float(analysis.total())
        rows.append((name, params, flops, note))
    return rows


def thesis_module_table(rows: List[Tuple[str, int, float, str]]) -> str:
    lines = ["| module | parameters | GFLOPs | note |", "|:--|--:|--:|:--|"]
    for name, params, flops, note in rows:
        lines.append(f"| {name} | {_fmt_count(params)} | {flops / 1e9:.4f} | {note} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="image size for the FLOPs (default INPUT.CROP.SIZE)")
    parser.add_argument("--depth", type=int, default=2, help="module depth of the tables (default 2)")
    parser.add_argument("--no-flops", action="store_true", help="parameters only")
    parser.add_argument("--device", default="cpu", help="device to trace on (default cpu)")
    parser.add_argument("--thesis-modules", action="store_true",
                        help="also list the thesis modules (CAA, ECAC, LSMSeg), built standalone at the config's widths")
    parser.add_argument("--thesis-only", action="store_true", help="only the thesis-module table (no model is built)")
    parser.add_argument("--vocabulary", type=int, help="class names for the category filter's row (default: the dataset's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from detectron2.modeling import build_model
    from fvcore.nn import flop_count_table

    from hvlformer import setup_cfg
    from hvlformer.data import register_shapes_from_cfg

    cfg = setup_cfg(args, freeze=False)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    register_shapes_from_cfg(cfg)
    height, width = args.input_size or tuple(cfg.INPUT.CROP.SIZE)
    if args.thesis_modules or args.thesis_only:
        from detectron2.data import MetadataCatalog

        num_classes = len(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).stuff_classes)
        print(f"## Thesis modules, standalone at this config's widths ({height}x{width} image, {num_classes} classes)\n")
        print(thesis_module_table(thesis_module_rows(cfg, height, width, num_classes, args.vocabulary)))
        print()
        if args.thesis_only:
            return 0
    model = build_model(cfg)
    print(f"## Parameters ({args.config_file})\n")
    print(parameter_table(model, args.depth))
    if args.no_flops:
        return 0
    analysis = flop_analysis(model, height, width)
    total = analysis.total()
    print(f"\n## FLOPs of one {height}x{width} image (inference; 1 multiply-add = 1 FLOP)\n")
    print(flop_count_table(analysis, max_depth=args.depth, show_param_shapes=False))
    print(f"\nTotal: {total / 1e9:.3f} GFLOPs")
    skipped = analysis.unsupported_ops()
    if skipped:
        print("Not counted (element-wise and other ops fvcore has no formula for): "
              + ", ".join(f"{op} x{n}" for op, n in sorted(skipped.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
