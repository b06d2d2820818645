#!/usr/bin/env python
"""What a trained tiny `shapes` run's language anchors and fine-tuned image tower still know (issue 13).

For each run (the OUTPUT_DIR of a finished ``train_net.py`` run from the project's tiny CLIP) it reports:

* ``text``: how far apart the pretrained text tower puts the classes, for three phrasings: the plain prompt
  ``"a photo of a {name}."`` (what the tiny CLIP was trained and evaluated with), the run's class prompts
  (the dataset descriptions its CoOp text encoder starts from, averaged per class) and its reference prompts
  T0 (``TEXT.REFERENCE_TEMPLATE``, the anchor of L^L). Per phrasing: the square/cross cosine and the mean and
  largest cosine between different classes. Also the cosines of the run's trained class embeddings t.
* ``finetuned_tower``: the run's fine-tuned image tower (``backbone.visual``) put back into the pretrained
  CLIP, scored like the pretraining tool scores a CLIP (``tools/pretrain_tiny_clip.py``'s dense zero-shot
  with plain prompts, and the twin patch probe) on its ``dev`` images at the run's image size. A high twin
  probe here next to a low square IoU in the run's own evaluation says the segmentation head, not the
  encoder, loses the class.

    python tools/anchor_diagnostics.py output/c_conv/supervised_seed0 --json-out d.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import pretrain_tiny_clip as tiny  # tools/pretrain_tiny_clip.py (this folder is on sys.path when the tool runs)
from _common import emit_json, finished_run_cfg


def cosine_summary(embeddings: Tensor, names: Sequence[str]) -> Dict[str, Any]:
    """``K x C`` embeddings -> square/cross cosine, mean and max cosine between different classes, the matrix."""
    e = F.normalize(embeddings.float(), dim=-1)
    cos = e @ e.T
    off = cos[~torch.eye(len(names), dtype=torch.bool)]
    return {"square_cross": round(float(cos[names.index("square"), names.index("cross")]), 3),
            "mean_between_classes": round(float(off.mean()), 3), "max_between_classes": round(float(off.max()), 3),
            "cosine": [[round(float(v), 3) for v in row] for row in cos]}


def load_run(run_dir: Path):
    """(cfg, trained HVLFormer model in eval mode) of a finished run."""
    from hvlformer.predictor import HVLFormerPredictor

    cfg = finished_run_cfg(run_dir)
    return cfg, HVLFormerPredictor(cfg).model.eval()


def finetuned_clip(cfg, model) -> "tiny.TinyClipPretrainer":
    """The run's pretrained CLIP with its image tower replaced by the run's fine-tuned one (its text tower is
    the pretrained one)."""
    from hvlformer.modeling.clip_loader import build_clip_model

    c = cfg.MODEL.HVLFORMER.CLIP
    if not c.PRETRAINED:
        raise ValueError("the run starts from random CLIP weights: there is no pretrained text tower to compare with")
    clip_model, tokenizer = build_clip_model(c.MODEL_NAME, c.PRETRAINED)
    clip_model.visual.load_state_dict(model.backbone.visual.state_dict(), strict=True)
    return tiny.TinyClipPretrainer(clip_model.eval(), tokenizer).eval()


def prompt_cosines(clip_model, tokenizer, names: Sequence[str], class_prompts: Sequence[Sequence[str]],
                   reference_prompts: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """:func:`cosine_summary` of the plain prompts, of the class prompts (``K`` lists, each class's
    embeddings averaged and renormalised, as the CoOp text encoder's start) and of the reference prompts T0,
    all embedded by ``clip_model``'s (frozen) text tower."""
    with torch.no_grad():
        def embed(texts: List[str]) -> Tensor:
            return F.normalize(clip_model.encode_text(tokenizer(texts)).float(), dim=-1)

        plain = embed([tiny.PLAIN_TEMPLATE.format(n) for n in names])
        described = torch.stack([F.normalize(embed(list(p)).mean(0), dim=-1) for p in class_prompts])
        reference = embed(list(reference_prompts))
    return {"plain_prompts": cosine_summary(plain, names), "class_prompts": cosine_summary(described, names),
            "reference_prompts_T0": cosine_summary(reference, names)}


def diagnose(run_dir: Path, num_images: int = 100) -> Dict[str, Any]:
    cfg, model = load_run(run_dir)
    names = list(model.class_names)
    finetuned = finetuned_clip(cfg, model)
    text = prompt_cosines(finetuned.clip, finetuned.tokenizer, names, model.class_prompts,
                          model.reference_class_prompts)
    with torch.no_grad():
        trained = model.encode_text()
    size = int(cfg.DATASETS.SHAPES.IMAGE_SIZE)
    metrics = tiny.evaluate(finetuned.clip, finetuned.tokenizer, "dev", num_seg_images=num_images,
                            num_presence_images=num_images, image_size=size)
    return {
        "run": str(run_dir), "classes": names,
        "text": {**text, "trained_class_embeddings": cosine_summary(trained, names),
                 "reference_template": cfg.MODEL.HVLFORMER.TEXT.REFERENCE_TEMPLATE},
        "finetuned_tower": {"image_size": size, "images": num_images,
                            "dense_miou": round(metrics["dense_miou"], 1),
                            "dense_iou": {k: round(v, 1) for k, v in metrics["dense_iou"].items()},
                            "square_row_percent": metrics["dense_confusion_percent"]["square"],
                            "twin_patch_probe": metrics["twin_patch_probe"]},
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="OUTPUT_DIR of finished train_net.py runs on shapes")
    parser.add_argument("--num-images", type=int, default=100, help="dev images for the zero-shot scores")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": "python tools/anchor_diagnostics.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": [diagnose(run, args.num_images) for run in args.runs]}
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
