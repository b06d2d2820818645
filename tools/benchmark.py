#!/usr/bin/env python
"""Measure HVLFormer's training step time, peak memory and inference time per image; prints JSON.

    python tools/benchmark.py --config-file configs/tiny/hvlformer_tiny_shapes.yaml
    python tools/benchmark.py --config-file configs/voc/... --device cuda --batch-size 4 SOLVER.AMP.ENABLED True

Inputs are random images at the config's crop size with random labels (the speed does not depend on
the content), so no dataset is read; the class list comes from the config's dataset metadata.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from hvlformer import setup_cfg
from hvlformer.engine import build_optimizer
from hvlformer.engine.train_loop import amp_dtype
from detectron2.modeling import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--iters", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--inference-images", type=int, default=5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    cfg = setup_cfg(args, freeze=False)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    device = torch.device(args.device)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    num_classes = model.num_classes
    batch = args.batch_size or cfg.SOLVER.IMS_PER_BATCH
    height, width = cfg.INPUT.CROP.SIZE
    generator = torch.Generator().manual_seed(0)

    def make_batch(n: int, with_labels: bool):
        return [{"image": torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8),
                 **({"sem_seg": torch.randint(0, num_classes, (height, width), generator=generator)} if with_labels else {}),
                 "height": height, "width": width} for _ in range(n)]

    use_amp = cfg.SOLVER.AMP.ENABLED
    dtype = amp_dtype(cfg.SOLVER.AMP.DTYPE)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times = []
    model.train()
    for step in range(args.iters + 2):
        data = make_batch(batch, with_labels=True)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            losses = model(data)
            total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        _sync(device)
        if step >= 2:
            step_times.append(time.perf_counter() - start)
    train_peak = _peak_memory_mb(device)

    model.eval()
    inference_times = []
    with torch.no_grad():
        for index in range(args.inference_images + 1):
            data = make_batch(1, with_labels=False)
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                model(data)
            _sync(device)
            if index >= 1:
                inference_times.append(time.perf_counter() - start)
    step_mean = statistics.mean(step_times)
    print(json.dumps({
        "config": args.config_file,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "amp": use_amp,
        "gradient_checkpointing": cfg.MODEL.HVLFORMER.CLIP.GRADIENT_CHECKPOINTING,
        "batch_size": batch,
        "crop_size": [height, width],
        "num_classes": num_classes,
        "train_step_s": round(step_mean, 4),
        "train_step_s_std": round(statistics.pstdev(step_times), 4),
        "train_images_per_s": round(batch / step_mean, 3),
        "peak_memory_mb": round(train_peak, 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "inference_s_per_image": round(statistics.mean(inference_times), 4),
        "parameters_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters_total": sum(p.numel() for p in model.parameters()),
    }, indent=2))


if __name__ == "__main__":
    main()
