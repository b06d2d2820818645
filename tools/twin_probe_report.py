#!/usr/bin/env python
"""Where the colour twins (square / cross, star / ellipse) are lost: in the pixels, or in the tiny image tower?

The tiny CLIP's patch embeddings barely tell square from cross (``twin_patch_probe`` of
``tools/pretrain_tiny_clip.py``), and that confusion is what limits issue 13's (a), (c) and (d). This tool
measures, on the same pure 8 px patches (at least 70 % one kind; fitted on split ``probe``, scored on the
held-out split ``clipval``, 11-kind images at 128 px):

* ``pixels``: what one patch's pixels hold. A logistic regression on the raw pixels (the information a
  linear patch embedding starts from) and a small CNN (two 3 x 3 convolutions of 32 channels, average
  pooled) trained on them; the CNN is a reference for what a local non-linear feature can reach;
* ``towers``: for each checkpoint, a logistic regression on the tower's tokens after the patch embedding,
  after each transformer block, and on the final dense (text-space) embedding;
* ``direct`` (``--direct-steps N``): the same tower trained from random init with per-patch kind labels (an
  upper bound on what any mask-free pretraining loss can teach it in that many steps; not a model the
  project ships), probed as above every quarter of the run. ``--direct-stem conv`` replaces the linear
  8 px patch embedding with a small convolutional stem (two 3 x 3 convolutions of 32 channels before it,
  as in Xiao et al. 2021, "Early convolutions help transformers see better"), to ask whether a tower with
  one would learn the twins faster; ``--direct-stem strided`` uses the cheaper strided stem of the
  project's ``HVL-Tiny-ConvViT-P8`` (three 3 x 3 convolutions of stride 2, then a 1 x 1 one).

    python tools/twin_probe_report.py --json-out docs/results/twin_probe_report.json --direct-steps 1000
    python tools/twin_probe_report.py --checkpoints random projects/.../hvl_tiny_vit_p8_shapes_v3.pt
    python tools/twin_probe_report.py --checkpoints random --direct-steps 1000 --direct-stem conv

Deterministic for a given thread count (one by default).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tiny_clip_pretraining as tiny  # tools/tiny_clip_pretraining/ (this folder is on sys.path when the tool runs)
from hvlformer.modeling.backbone.conv_stem_vit import conv_stem as project_conv_stem  # noqa: E402
from hvlformer.modeling.backbone.conv_stem_vit import TINY_STEM_LAYERS, parse_stem, strided_conv_stem  # noqa: E402
from _common import emit_json

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "projects" / "HVLFormer" / "hvlformer" / "modeling" / "backbone" / "pretrained"
DEFAULT_CHECKPOINTS = ("random", str(PRETRAINED / "hvl_tiny_vit_p8_shapes_v2.pt"),
                       str(PRETRAINED / "hvl_tiny_vit_p8_shapes_v3.pt"))
IMAGE_SIZE = 128
PATCH = 8


def tower_tokens(model: "tiny.TinyClipPretrainer", images: Tensor) -> List[Tensor]:
    """uint8 ``B x 3 x H x W`` -> the patch tokens ``B x N x C_l`` after the patch embedding, after each block
    and the final unit dense embedding (``L + 2`` entries; class and register tokens dropped)."""
    stages: List[Tensor] = []
    _, dense, (h, w) = model.encode_image(images, stages)
    return [t[:, -h * w:] for t in stages] + [dense]  # batch-first tokens; the patch tokens are the last h * w


def draw_split(split: str, num_images: int, batch_size: int = 50) -> List[Tuple[Tensor, Tensor]]:
    """The first ``num_images`` 11-kind images of ``split`` (128 px), drawn once: ``[(images uint8
    B x 3 x H x W, labels B x H x W), ...]`` in batches of ``batch_size``."""
    batches = []
    for start in range(0, num_images, batch_size):
        images, labels, _, _ = tiny.draw_batch(range(start, min(start + batch_size, num_images)), split, 0,
                                               IMAGE_SIZE, tiny.ALL_KINDS)
        batches.append((images, labels))
    return batches


def pure_patch_data(batches: Sequence[Tuple[Tensor, Tensor]], kinds: Sequence[int],
                    models: Sequence["tiny.TinyClipPretrainer"] = ()) -> Tuple[Tensor, Tensor, List[List[Tensor]]]:
    """For the pure patches of ``kinds`` in ``batches`` (:func:`draw_split`): raw pixels ``N x 3 x 8 x 8``
    (0-1), owners ``N`` and, per model, its :func:`tower_tokens` at those patches (``N x C_l`` each)."""
    pixels, owners = [], []
    tokens: List[List[List[Tensor]]] = [[] for _ in models]
    for images, labels in batches:
        owner = tiny.pure_patch_owners(labels, PATCH, kinds)
        keep = owner >= 0
        patches = F.unfold(images.float() / 255.0, PATCH, stride=PATCH)  # B x 3*8*8 x N, row-major patches
        pixels.append(patches.transpose(1, 2)[keep].reshape(-1, 3, PATCH, PATCH))
        owners.append(owner[keep])
        with torch.no_grad():
            for i, model in enumerate(models):
                tokens[i].append([t[keep] for t in tower_tokens(model, images)])
    per_model = [[torch.cat(stage) for stage in zip(*batches)] for batches in tokens]
    return torch.cat(pixels), torch.cat(owners), per_model


def _standardise(fit: Tensor, test: Tensor) -> Tuple[Tensor, Tensor]:
    mean, std = fit.mean(dim=0), fit.std(dim=0) + 1e-6
    return (fit - mean) / std, (test - mean) / std


def layer_probes(fit_tokens: Sequence[Tensor], fit_target: Tensor, test_tokens: Sequence[Tensor],
                 test_target: Tensor) -> List[float]:
    """Linear-probe accuracy (%, 1 decimal) at each stage (features flattened and standardised with the fit
    set's statistics)."""
    accuracies = []
    for fit, test in zip(fit_tokens, test_tokens):
        fit, test = _standardise(fit.flatten(1), test.flatten(1))
        accuracies.append(round(tiny.linear_probe_accuracy(fit, fit_target, test, test_target), 1))
    return accuracies


def cnn_probe_accuracy(fit_pixels: Tensor, fit_target: Tensor, test_pixels: Tensor, test_target: Tensor,
                       steps: int = 1500, seed: int = 0) -> float:
    """Accuracy (%) of a small CNN (two 3 x 3 convolutions of 32 channels, average pooled, linear) trained
    with Adam on ``fit_pixels`` (``N x 3 x 8 x 8``) for ``steps`` batches of 128."""
    torch.manual_seed(seed)
    mean, std = fit_pixels.mean(dim=(0, 2, 3), keepdim=True), fit_pixels.std(dim=(0, 2, 3), keepdim=True)
    fit_x, test_x = (fit_pixels - mean) / std, (test_pixels - mean) / std
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    target = fit_target.float()
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            batch = torch.randint(len(target), (128,), generator=generator)
            loss = F.binary_cross_entropy_with_logits(net(fit_x[batch])[:, 0], target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return 100 * float(((net(test_x)[:, 0] > 0) == test_target.bool()).float().mean())


def load_tower(checkpoint: str, model_name: str = tiny.MODEL_NAME) -> "tiny.TinyClipPretrainer":
    """``random`` (the pretraining tool's seed-0 initialisation) or a tiny CLIP checkpoint path, of the open_clip
    architecture ``model_name``."""
    from hvlformer.modeling.clip_loader import build_clip_model

    clip_model, tokenizer = (tiny.build_model(0, model_name) if checkpoint == "random"
                             else build_clip_model(model_name, checkpoint))
    return tiny.TinyClipPretrainer(clip_model, tokenizer).eval()


def train_direct(steps: int, probe, lr: float = 1e-3, batch_size: int = 32, stem: str = "linear",
                 model_name: str = tiny.MODEL_NAME, log=print) -> List[Dict[str, Any]]:
    """Train a random-init tower plus a linear head on per-patch kind labels (patches at least 70 % one kind,
    11 kinds; AdamW, the pretraining tool's warm-up + cosine schedule, images of split ``pretrain``);
    ``stem`` ``conv`` swaps the linear patch embedding for the conv stem of ``HVL-Tiny-ConvViT-P8`` (two 3 x 3
    convolutions of 32 channels, then the biased patch projection), ``strided`` for the strided one, and a spec
    (:func:`parse_stem`) for that stack of 3 x 3 convolutions. ``probe(model)`` is called every
    quarter of the run. Returns ``[{"step", "loss", "probe"}, ...]``."""
    model = load_tower("random", model_name).train()
    if stem != "linear":
        torch.manual_seed(0)
        width = model.clip.visual.conv1.out_channels
        if stem == "conv":  # the stem HVL-Tiny-ConvViT-P8 adopted (it was measured here first)
            model.clip.visual.conv1 = project_conv_stem(3, width, PATCH, TINY_STEM_LAYERS)
        elif stem == "strided":
            model.clip.visual.conv1 = strided_conv_stem(3, width, PATCH, bias=False)
        else:
            try:
                layers = parse_stem(stem)
            except ValueError:
                raise ValueError(f"stem must be 'linear', 'conv', 'strided' or a spec like '16,32/2', got {stem!r}") from None
            model.clip.visual.conv1 = project_conv_stem(3, width, PATCH, layers, bias=False)
    head = nn.Linear(model._adapter.embed_dim, tiny.ALL_KINDS)
    params = list(model.clip.visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    history, start = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = tiny.warmup_cosine_lr(step, steps, lr)
        images, labels, _, _ = tiny.draw_batch(range(step * batch_size, (step + 1) * batch_size), "pretrain", 0,
                                               IMAGE_SIZE, tiny.ALL_KINDS)
        _, dense, _ = model.encode_image(images)
        target = tiny.pure_patch_owners(labels, PATCH, range(tiny.ALL_KINDS))
        loss = F.cross_entropy(head(dense * 10.0).flatten(0, 1), target.flatten(), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            model.eval()
            entry = {"step": step + 1, "loss": round(float(loss.detach()), 4), "time_s": round(time.perf_counter() - start, 1),
                     "probe": probe(model)}
            model.train()
            history.append(entry)
            log(json.dumps(entry))
    return history


def report(checkpoints: Sequence[str], num_images: int = 600, direct_steps: int = 0, cnn_steps: int = 1500,
           pairs: Sequence[Tuple[str, str]] = tiny.TWIN_PAIRS, direct_stem: str = "linear",
           model_name: str = tiny.MODEL_NAME, log=print) -> Dict[str, Any]:
    """The JSON report (see the module docstring)."""
    names = tiny.vocabulary()
    kinds = sorted({names.index(n) for pair in pairs for n in pair})
    towers = [load_tower(c, model_name) for c in checkpoints]
    fit_images, test_images = draw_split("probe", num_images), draw_split("clipval", num_images)  # reused below
    fit_pixels, fit_owner, fit_tokens = pure_patch_data(fit_images, kinds, towers)
    test_pixels, test_owner, test_tokens = pure_patch_data(test_images, kinds, towers)

    def per_pair(fn) -> Dict[str, Any]:
        out = {}
        for first, second in pairs:
            a, b = names.index(first), names.index(second)
            fit_in, test_in = torch.isin(fit_owner, torch.tensor([a, b])), torch.isin(test_owner, torch.tensor([a, b]))
            out[f"{first}/{second}"] = fn(fit_in, fit_owner[fit_in] == b, test_in, test_owner[test_in] == b)
        return out

    def constant(fit_in, fit_y, test_in, test_y) -> Dict[str, Any]:
        share = float(test_y.float().mean())
        return {"constant_guess": round(100 * max(share, 1 - share), 1), "fit_patches": int(fit_in.sum()),
                "test_patches": int(test_in.sum())}

    result: Dict[str, Any] = {
        "setup": {"image_size": IMAGE_SIZE, "patch": PATCH, "num_images": num_images, "fit_split": "probe",
                  "test_split": "clipval", "pure_share": 0.7, "cnn_steps": cnn_steps, "checkpoints": list(checkpoints),
                  "model": model_name, "command": "python tools/twin_probe_report.py " + " ".join(sys.argv[1:])},
        "patches": per_pair(constant),
        "pixels": per_pair(lambda fi, fy, ti, ty: {
            "linear": layer_probes([fit_pixels[fi]], fy, [test_pixels[ti]], ty)[0],
            "cnn": round(cnn_probe_accuracy(fit_pixels[fi], fy, test_pixels[ti], ty, cnn_steps), 1)}),
        "towers": {},
    }
    log(json.dumps({"pixels": result["pixels"]}))
    for checkpoint, fit_t, test_t in zip(checkpoints, fit_tokens, test_tokens):
        stages = ["patch_embedding"] + [f"block_{i + 1}" for i in range(len(fit_t) - 2)] + ["dense_embedding"]
        probes = per_pair(lambda fi, fy, ti, ty: layer_probes([t[fi] for t in fit_t], fy, [t[ti] for t in test_t], ty))
        result["towers"][_short(checkpoint)] = {"stages": stages, "linear_probe": probes}
        log(json.dumps({_short(checkpoint): probes}))
    if direct_steps > 0:
        def probe(model):
            with torch.no_grad():
                _, _, fit_d = pure_patch_data(fit_images, kinds, [model])
                _, _, test_d = pure_patch_data(test_images, kinds, [model])
            return per_pair(lambda fi, fy, ti, ty: layer_probes([t[fi] for t in fit_d[0]], fy,
                                                                [t[ti] for t in test_d[0]], ty))
        result["direct"] = {"note": "random-init tower trained on per-patch kind labels (not shipped)",
                            "steps": direct_steps, "stem": direct_stem,
                            "history": train_direct(direct_steps, probe, stem=direct_stem,
                                                         model_name=model_name, log=log)}
    return result


def _short(checkpoint: str) -> str:
    return Path(checkpoint).stem if checkpoint != "random" else "random"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=list(DEFAULT_CHECKPOINTS),
                        help="tiny CLIP checkpoints to probe ('random': the untrained tower)")
    parser.add_argument("--model", default=tiny.MODEL_NAME,
                        help="open_clip architecture of --checkpoints (e.g. HVL-Tiny-ConvViT-P8)")
    parser.add_argument("--num-images", type=int, default=600, help="images per split (fit and test)")
    parser.add_argument("--cnn-steps", type=int, default=1500)
    parser.add_argument("--direct-steps", type=int, default=0,
                        help="also train a random-init tower on per-patch labels for this many steps")
    parser.add_argument("--direct-stem", default="linear",
                        help="patch embedding of the --direct-steps tower: 'linear' (the ViT's), 'conv' (two 3 x 3 "
                             "convolutions of 32 channels at full resolution), 'strided' (three of stride 2), or a "
                             "spec of 3 x 3 convolutions 'channels[/stride],...' before the patch projection")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = report(args.checkpoints, args.num_images, args.direct_steps, args.cnn_steps,
                    direct_stem=args.direct_stem, model_name=args.model, log=lambda line: print(line, file=sys.stderr, flush=True))
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
