"""Training of the tiny CLIP from scratch: the seeded model, AdamW groups, warm-up + cosine schedule, the loop
(batches drawn on the fly, so a run is deterministic for a given seed and thread count), and the fp16
checkpoint with a digest of its weights that retraining can be compared with."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from hvlformer.modeling.clip_loader import build_clip_model

from .data import ALL_KINDS, draw_batch, region_tags
from .evaluation import evaluate
from .pretrainer import TinyClipPretrainer

MODEL_NAME = "HVL-Tiny-ViT-P8"  # the first shipped models' architecture (the tiny configs now load the conv stem)


def build_model(seed: int, model_name: str = MODEL_NAME) -> Tuple[nn.Module, Any]:
    """A randomly initialised open_clip model (seeded; ``HVL-Tiny-ViT-P8`` by default) and its tokenizer."""
    torch.manual_seed(seed)
    return build_clip_model(model_name, "")


def weights_digest(state: Dict[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name). Unlike the file's
    hash it does not depend on ``torch.save``'s random serialization id, so retraining can be compared."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(state[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(clip_model: nn.Module, path: Path) -> Tuple[str, str]:
    """Write the open_clip state dict in fp16 (floating tensors); returns (file sha256, weights digest)."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in clip_model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), weights_digest(state)


def warmup_cosine_lr(step: int, steps: int, lr: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: linear warm-up over the first 5 %, then a
    cosine decay to 0."""
    warmup = max(1, int(0.05 * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: ``weight_decay`` on weight matrices and kernels, none on biases, norms and embeddings
    (open_clip's ``*_embedding``; a timm tower's ``pos_embed`` / ``cls_token`` / ``reg_token``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = "embedding" in name or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace, log=print) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """Pretrain from scratch; returns ``(clip model, tokenizer, history)``."""
    clip_model, tokenizer = build_model(args.seed, args.model)
    model = TinyClipPretrainer(clip_model, tokenizer, args.fg_decay, args.bg_decay,
                               (args.clip_weight, args.tag_weight, args.dense_weight, args.region_weight,
                                args.swap_weight, args.name_weight),
                               args.dense_mode, args.region_cell, args.region_decay)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    history: List[Dict[str, float]] = []
    start, running = time.perf_counter(), {}
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, args.steps, args.lr)
        negatives: Optional[List[str]] = [] if args.swap_weight > 0 else None
        images, labels, captions, tags = draw_batch(range(step * args.batch_size, (step + 1) * args.batch_size),
                                                    "pretrain", args.seed, args.image_size, ALL_KINDS, args.random_hue,
                                                    negatives=negatives)
        cell_tags = region_tags(labels, args.region_cell, args.region_min_fraction) if args.region_weight > 0 else None
        losses = model.losses(images, captions, tags, cell_tags, negatives)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            entry = {"step": step + 1, "time_s": round(time.perf_counter() - start, 1),
                     **{k: round(v / n, 4) for k, v in running.items()}}
            history.append(entry)
            log(json.dumps(entry))
            running = {}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            # progress is always measured on the dev images, never on the held-out evaluation images
            m = evaluate(clip_model, tokenizer, "dev", num_seg_images=50, num_presence_images=200)
            log(json.dumps({"step": step + 1, "eval": "dev", "dense_miou": round(m["dense_miou"], 2),
                            "dense_iou": {k: round(v, 1) for k, v in m["dense_iou"].items()},
                            "global_auroc_min": round(m["global_auroc_min"], 3),
                            "dense_pooled_auroc_min": round(m["dense_pooled_auroc_min"], 3)}))
            model.train()
    return clip_model, tokenizer, {"losses": history, "train_time_s": round(time.perf_counter() - start, 1)}
