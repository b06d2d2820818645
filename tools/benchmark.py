#!/usr/bin/env python
"""Measure HVLFormer's training step time, peak memory and inference time per image; prints JSON.

    python tools/benchmark.py --config-file configs/tiny/hvlformer_tiny_shapes.yaml
    python tools/benchmark.py --config-file configs/voc/... --device cuda --batch-size 4 SOLVER.AMP.ENABLED True
    python tools/benchmark.py --config-file configs/voc/hvlformer_vitb16_voc_92.yaml --semi-batch 4+4 ...

``--semi-batch L+U`` times the semi-supervised step (``SemiSupervisedStep``: L labeled images, U unlabeled
images in three views, CMCR targets from the config's teacher) instead of the supervised one.

``--sweep`` measures the whole matrix in one process, one fresh model per setting: every ``L+U`` of
``--batch-sizes`` x AMP off/on x gradient checkpointing off/on (x every MSDeformAttn core of ``--impls``),
plus the inference time per image once per AMP setting and core. On CUDA a setting that runs out of
memory is recorded as such and the sweep goes on. The semi-supervised ViT-B/16 VOC matrix on a GPU:

    python tools/benchmark.py --config-file configs/voc/hvlformer_vitb16_voc_92.yaml --sweep \\
        --batch-sizes 4+4,8+8 --output bench.json MODEL.HVLFORMER.CLIP.PRETRAINED ""

Inputs are random images at the config's crop size with random labels (the speed does not depend on
the content), so no dataset is read; the class list comes from the config's dataset metadata. Peak
memory is ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` per setting on CUDA, and the
process's peak RSS on CPU (cumulative over a sweep, so only its first setting is meaningful there).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.utils.events import EventStorage

from hvlformer import setup_cfg
from hvlformer.engine import build_optimizer
from hvlformer.engine.ema import EMATeacher
from hvlformer.engine.train_loop import SemiSupervisedStep, amp_dtype
from hvlformer.engine.trainer import Trainer
from hvlformer.modeling.pixel_decoder.ms_deform_attn import MS_DEFORM_ATTN_IMPLS, resolve_impl

from _common import emit_json  # tools/_common.py (this folder is on sys.path when the tool runs)

#: The paper trains on two 24 GB cards; a setting "fits" when its reserved peak leaves room for the CUDA
#: context (about half a GiB) on such a card.
FITS_24GB_RESERVED_GIB = 23.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
                "peak_memory_kind": "torch.cuda.max_memory_allocated (reserved: max_memory_reserved)"}
    # Linux: KiB -> MiB (process peak RSS)
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "process peak RSS"}


def parse_batch(spec: str) -> Tuple[int, int]:
    """``"4+4"`` -> ``(4, 4)`` (labeled + unlabeled images per step); ``"8"`` -> ``(8, 0)`` (supervised)."""
    parts = spec.split("+")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"batch spec must be 'L' or 'L+U' with integers, got {spec!r}")
    labeled, unlabeled = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    if labeled < 1:
        raise ValueError(f"at least one labeled image per step, got {spec!r}")
    return labeled, unlabeled


def _on_off(text: str) -> List[bool]:
    values = {"off": False, "on": True}
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or any(t not in values for t in items):
        raise ValueError(f"expected a comma list of off/on, got {text!r}")
    return [values[t] for t in items]


class _SyntheticBatches:
    """Random labeled (``image``, ``sem_seg``) or unlabeled (three views, padding, CutMix box) dicts at the
    crop size, in the formats of the dataset mappers; an endless iterator of lists of ``n`` dicts."""

    def __init__(self, n: int, height: int, width: int, num_classes: int, unlabeled: bool, seed: int) -> None:
        self.n, self.height, self.width, self.num_classes, self.unlabeled = n, height, width, num_classes, unlabeled
        self.generator = torch.Generator().manual_seed(seed)

    def _image(self) -> torch.Tensor:
        return torch.randint(0, 256, (3, self.height, self.width), generator=self.generator, dtype=torch.uint8)

    def _one(self, with_labels: bool = True) -> Dict[str, Any]:
        h, w = self.height, self.width
        record: Dict[str, Any] = {"image": self._image(), "height": h, "width": w}
        if self.unlabeled:
            box = torch.zeros(h, w, dtype=torch.bool)
            box[h // 4: h // 2, w // 4: w // 2] = True
            record.update(image_weak=self._image(), image_strong=self._image(),
                          padding=torch.zeros(h, w, dtype=torch.bool), cutmix_box=box)
        elif with_labels:
            record["sem_seg"] = torch.randint(0, self.num_classes, (h, w), generator=self.generator)
        return record

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        while True:
            yield [self._one() for _ in range(self.n)]


def measure(cfg, device: torch.device, labeled: int, unlabeled: int, iters: int, warmup: int,
            inference_images: int) -> Dict[str, Any]:
    """Train ``warmup + iters`` steps of ``labeled`` (+ ``unlabeled``) random images, then time
    ``inference_images`` single-image inferences; the figures of one setting."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = Trainer.build_model(cfg)  # registers the config's datasets (class list) first
    optimizer = build_optimizer(cfg, model)
    num_classes = model.num_classes
    height, width = cfg.INPUT.CROP.SIZE
    use_amp = cfg.SOLVER.AMP.ENABLED
    dtype = amp_dtype(cfg.SOLVER.AMP.DTYPE)
    labeled_batches = _SyntheticBatches(labeled, height, width, num_classes, unlabeled=False, seed=0)

    if unlabeled > 0:
        teacher = EMATeacher(model, cfg.SEMI.EMA_DECAY) if cfg.SEMI.TEACHER == "ema" else None
        trainer = SemiSupervisedStep(model, iter(labeled_batches),
                                     iter(_SyntheticBatches(unlabeled, height, width, num_classes, True, seed=1)),
                                     optimizer, teacher, dtype if use_amp else None, rampup_iters=0)

        def step() -> None:
            trainer.run_step()
            trainer.iter += 1
    else:
        batches = iter(labeled_batches)

        def step() -> None:
            data = next(batches)
            with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                losses = model(data)
                total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()

    step_times = []
    model.train()
    with EventStorage(0):
        for index in range(iters + warmup):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if index >= warmup:
                step_times.append(time.perf_counter() - start)
    memory = _peak_memory(device)

    model.eval()
    inference_times = []
    single = _SyntheticBatches(1, height, width, num_classes, unlabeled=False, seed=2)
    with torch.no_grad():
        for index in range(inference_images + 1 if inference_images > 0 else 0):
            data = [single._one(with_labels=False)]
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                model(data)
            _sync(device)
            if index >= 1:
                inference_times.append(time.perf_counter() - start)
    step_mean = statistics.mean(step_times)
    images = labeled + unlabeled
    result = {
        "amp": use_amp,
        "amp_dtype": cfg.SOLVER.AMP.DTYPE if use_amp else None,
        "gradient_checkpointing": cfg.MODEL.HVLFORMER.CLIP.GRADIENT_CHECKPOINTING,
        "msdeform_attn_impl": cfg.MODEL.SEM_SEG_HEAD.MSDEFORM_ATTN_IMPL,
        "msdeform_attn_core": resolve_impl(cfg.MODEL.SEM_SEG_HEAD.MSDEFORM_ATTN_IMPL, device),
        "batch": f"{labeled}+{unlabeled}" if unlabeled else str(labeled),
        "batch_size": labeled,
        "unlabeled_batch_size": unlabeled,
        "crop_size": [height, width],
        "num_classes": num_classes,
        "train_step_s": round(step_mean, 4),
        "train_step_s_std": round(statistics.pstdev(step_times), 4),
        "train_images_per_s": round(images / step_mean, 3),
        **memory,
        "inference_s_per_image": round(statistics.mean(inference_times), 4) if inference_times else None,
        "parameters_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters_total": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        result["fits_24gb_card"] = result["peak_memory_reserved_mb"] / 1024 <= FITS_24GB_RESERVED_GIB
    return result  # the model and optimizer go with this frame; sweep() collects before the next setting


def _setting_cfg(args: argparse.Namespace, amp: Optional[bool], checkpointing: Optional[bool],
                 impl: Optional[str], labeled: int, unlabeled: int):
    cfg = setup_cfg(args, freeze=False)
    cfg.MODEL.DEVICE = args.device
    if amp is not None:
        cfg.SOLVER.AMP.ENABLED = amp
    if checkpointing is not None:
        cfg.MODEL.HVLFORMER.CLIP.GRADIENT_CHECKPOINTING = checkpointing
    if impl is not None:
        cfg.MODEL.SEM_SEG_HEAD.MSDEFORM_ATTN_IMPL = impl
    cfg.SOLVER.IMS_PER_BATCH = cfg.SOLVER.IMS_PER_BATCH_LABELED = labeled
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = unlabeled
    cfg.freeze()
    return cfg


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def sweep(args: argparse.Namespace) -> Dict[str, Any]:
    """The matrix of ``--batch-sizes`` x ``--amp`` x ``--checkpointing`` x ``--impls``."""
    device = torch.device(args.device)
    batches = [parse_batch(b) for b in args.batch_sizes.split(",")]
    impls = [i.strip() for i in args.impls.split(",")]
    for impl in impls:
        if impl not in MS_DEFORM_ATTN_IMPLS:
            raise ValueError(f"--impls: unknown MSDeformAttn impl {impl!r}; expected {MS_DEFORM_ATTN_IMPLS}")
    results = []
    inference_done = set()
    for impl, amp, checkpointing, (labeled, unlabeled) in itertools.product(
            impls, _on_off(args.amp), _on_off(args.checkpointing), batches):
        # inference does not depend on the training batch or on checkpointing: once per (core, AMP)
        infer = args.inference_images if (impl, amp) not in inference_done else 0
        cfg = _setting_cfg(args, amp, checkpointing, impl, labeled, unlabeled)
        setting = {"batch": f"{labeled}+{unlabeled}" if unlabeled else str(labeled), "amp": amp,
                   "gradient_checkpointing": checkpointing, "msdeform_attn_impl": impl}
        out_of_memory = None
        try:
            result = measure(cfg, device, labeled, unlabeled, args.iters, args.warmup, infer)
            inference_done.add((impl, amp))
        except torch.cuda.OutOfMemoryError as error:
            out_of_memory = str(error).splitlines()[0]
        # outside the except block: the traceback (and the model it holds) is gone before freeing
        gc.collect()
        if out_of_memory is not None:
            torch.cuda.empty_cache()
            result = {**setting, "error": f"out of memory: {out_of_memory}"}
        print(json.dumps(result), file=sys.stderr, flush=True)  # progress: one line per setting
        results.append(result)
    return {
        "benchmark": "training_sweep",
        "config": args.config_file,
        "overrides": args.opts,
        "device": _device_name(device),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "iters": args.iters, "warmup": args.warmup, "inference_images": args.inference_images,
        "results": results,
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--semi-batch", default=None, metavar="L+U",
                        help="time the semi-supervised step with L labeled + U unlabeled images")
    parser.add_argument("--iters", type=int, default=5, help="timed training steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--inference-images", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="measure the matrix of the options below")
    parser.add_argument("--batch-sizes", default="4+4,8+8", help="sweep: comma list of L+U (or L)")
    parser.add_argument("--amp", default="off,on", help="sweep: AMP settings, comma list of off/on")
    parser.add_argument("--checkpointing", default="off,on", help="sweep: gradient checkpointing, off/on")
    parser.add_argument("--impls", default="auto", help="sweep: MSDeformAttn cores (MODEL.SEM_SEG_HEAD."
                                                        "MSDEFORM_ATTN_IMPL), comma list")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.sweep:
        report = sweep(args)
    else:
        labeled, unlabeled = parse_batch(args.semi_batch) if args.semi_batch else (None, 0)
        if labeled is None:
            base = setup_cfg(args, freeze=False)
            labeled = args.batch_size or base.SOLVER.IMS_PER_BATCH
        cfg = _setting_cfg(args, None, None, None, labeled, unlabeled)
        device = torch.device(args.device)
        report = {"config": args.config_file, "device": _device_name(device),
                  **measure(cfg, device, labeled, unlabeled, args.iters, args.warmup, args.inference_images)}
    emit_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
