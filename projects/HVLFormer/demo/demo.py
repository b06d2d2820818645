#!/usr/bin/env python
"""HVLFormer demo: segment images or a video and write what a person wants to look at.

    python projects/HVLFormer/demo/demo.py --config-file configs/tiny/hvlformer_tiny_shapes.yaml \\
        --input photo.jpg 'more/*.png' folder/ --output demo_out/ --heatmaps \\
        --opts MODEL.WEIGHTS output/tiny_shapes/model_final.pth

Per input image ``<name>`` (the file name without extension; made unique when two inputs share it):

- ``<name>_overlay.png``: the image with the segmentation drawn over it (the look of detectron2's
  ``Visualizer.draw_sem_seg``: the dataset's palette and class names; the background class is left
  uncoloured unless ``--draw-background``), the size of the input image;
- ``<name>_labels.png``: the label map, one 8-bit grey value per pixel = the class id (16-bit when there are
  more than 256 classes); read it back with PIL / ``cv2.IMREAD_UNCHANGED``;
- ``<name>_heatmaps.png`` (``--heatmaps``): one panel per class with its per-pixel probability, the class
  scores normalised to sum to 1 over the classes at every pixel (see ``hvlformer.predictor``).

``--input`` takes files, folders (their image files, not recursive) and glob patterns (``**`` recurses;
quote them so that the shell does not expand them). An input that is missing, matches nothing or cannot be
decoded is reported and skipped; the others are processed. The exit status is 1 when anything was skipped.
``--video-input clip.mp4`` writes ``<name>_overlay.mp4`` instead.

``--vocabulary "cat, dog, grass"`` (or a file: one name per line / comma-separated, or a descriptions JSON
whose class names and sentences are used) replaces the class list at inference: the text prompts, the
textual queries and the ``text`` classifier are rebuilt from the new names with no retraining. It needs a
model trained with ``MODEL.HVLFORMER.CLASSIFIER text``; the paper's ``linear`` classifier has one output
per training class, so a different number of classes is refused. See ``projects/HVLFormer/demo/README.md``
for what this can and cannot do.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
logger = logging.getLogger("hvlformer.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="HVLFormer demo: overlays, label maps and probability heat-maps for images or a video.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python projects/HVLFormer/demo/demo.py --config-file configs/tiny/hvlformer_tiny_shapes.yaml "
               "--input img.jpg --output out/ --opts MODEL.WEIGHTS output/tiny_shapes/model_final.pth",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--input", nargs="+", default=[], metavar="PATH",
                        help="image files, folders or glob patterns (quote globs)")
    parser.add_argument("--video-input", metavar="FILE", help="a video file; writes <name>_overlay.mp4")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the results (created)")
    parser.add_argument("--vocabulary", metavar="NAMES|FILE",
                        help='new class list: "cat, dog, grass", a text file of names or a descriptions JSON')
    parser.add_argument("--descriptions", metavar="FILE",
                        help="descriptions JSON for the --vocabulary names (default: the fallback template)")
    parser.add_argument("--heatmaps", action="store_true", help="also write <name>_heatmaps.png (one panel per class)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlay colours (0-1)")
    parser.add_argument("--draw-background", action="store_true",
                        help='also colour the "background" class in the overlay (default: left as the image)')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. --opts MODEL.WEIGHTS model_final.pth (must come last)")
    return parser


# ------------------------------------------------------------------------------------------------ inputs
def expand_inputs(patterns: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files to process (in the given order, sorted within a folder or glob, without repeats) and the
    ``(pattern, reason)`` of the inputs that name nothing."""
    files: List[str] = []
    problems: List[Tuple[str, str]] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f)))
            if not found:
                problems.append((pattern, "folder has no image files (" + ", ".join(IMAGE_EXTENSIONS) + ")"))
        elif os.path.exists(pattern):
            found = [pattern]
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                problems.append((pattern, "pattern matches no file"))
        else:
            found = []
            problems.append((pattern, "no such file or folder"))
        for path in found:
            if path not in files:
                files.append(path)
    return files, problems


def output_stems(paths: Sequence[str]) -> List[str]:
    """A unique file-name stem per input: the name without extension; where two inputs would collide, the
    parent folder's name is prefixed (``a/x.jpg``, ``b/x.jpg`` -> ``a_x``, ``b_x``), then the extension
    appended (``x.jpg``, ``x.png`` -> ``x_jpg``, ``x_png``), then a number."""
    stems = [Path(p).stem or "image" for p in paths]

    def refine(make):
        counts = Counter(stems)
        for i, stem in enumerate(stems):
            if counts[stem] > 1:
                stems[i] = make(i, stem)

    refine(lambda i, stem: f"{Path(os.path.abspath(paths[i])).parent.name}_{stem}")
    refine(lambda i, stem: f"{stem}_{Path(paths[i]).suffix.lstrip('.')}")
    seen: Counter = Counter()

    def number(i, stem):
        seen[stem] += 1
        return f"{stem}_{seen[stem]}"

    refine(number)
    return stems


def read_vocabulary(value: str) -> Tuple[List[str], Optional[str]]:
    """``(names, descriptions_file)`` from ``--vocabulary``: inline names, a text file or a descriptions JSON."""
    from hvlformer.predictor import parse_vocabulary

    if os.path.isfile(value):
        if value.lower().endswith(".json"):
            with open(value, "r", encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
                raise ValueError(f'vocabulary file {value}: expected a descriptions JSON with a "classes" object')
            return parse_vocabulary(list(data["classes"])), value
        with open(value, "r", encoding="utf-8") as f:
            lines = [line.split("#", 1)[0] for line in f]
        return parse_vocabulary("\n".join(lines)), None
    return parse_vocabulary(value), None


# ------------------------------------------------------------------------------------------------ drawing
#: Class names drawn without colour in the overlay (unless --draw-background): a black "background"
#: region at 50 % opacity used to dim every picture.
BACKGROUND_NAMES = ("background",)


def background_ids(class_names: Sequence[str]) -> List[int]:
    """Ids of the classes named like :data:`BACKGROUND_NAMES` (case-insensitive)."""
    return [i for i, name in enumerate(class_names) if str(name).strip().lower() in BACKGROUND_NAMES]


def draw_overlay(image_rgb: np.ndarray, labels: np.ndarray, metadata, alpha: float = 0.5,
                 skip: Optional[Sequence[int]] = None) -> np.ndarray:
    """``H x W x 3`` uint8 RGB: the image with the labelled regions filled in their colour at ``alpha``,
    outlined in off-white and named at the centre of their largest part (the look of detectron2's
    ``Visualizer.draw_sem_seg``, drawn with NumPy/OpenCV at the image's own resolution: the Visualizer
    took 11 s and 1.4 GB for a 4000x3000 photo).

    ``labels``: ``H x W`` class ids into ``metadata.stuff_classes`` / ``stuff_colors``; ids outside them are
    not drawn. The classes in ``skip`` (default: the background class, :func:`background_ids`) are not
    drawn either, so the image shows through unchanged there, as detectron2's demos leave the classes they
    skip.
    """
    classes = list(metadata.stuff_classes)
    colors = np.asarray(metadata.stuff_colors, dtype=np.float32).reshape(-1, 3)
    skip = set(background_ids(classes) if skip is None else skip)
    drawn = [k for k in np.unique(labels) if 0 <= k < len(classes) and k not in skip]
    out = image_rgb.astype(np.float32)
    height, width = labels.shape
    thickness = max(1, round(min(height, width) / 500))
    font_scale = max(0.4, min(height, width) / 800)
    regions = []
    for k in drawn:
        mask = labels == k
        out[mask] = out[mask] * (1.0 - alpha) + colors[k] * alpha
        regions.append((k, mask))
    out = np.clip(out, 0, 255).astype(np.uint8)
    for k, mask in regions:
        mask8 = mask.astype(np.uint8)
        contours, _ = cv2.findContours(mask8, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (240, 240, 240), thickness, lineType=cv2.LINE_AA)
        count, components, stats, centroids = cv2.connectedComponentsWithStats(mask8, connectivity=8)
        if count < 2:
            continue
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if stats[largest, cv2.CC_STAT_AREA] < 0.001 * height * width:
            continue  # too small to carry a name
        text = str(classes[k])
        (text_w, text_h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        x = int(np.clip(centroids[largest][0] - text_w / 2, 0, max(width - text_w, 0)))
        y = int(np.clip(centroids[largest][1] + text_h / 2, text_h, height - 1))
        light = tuple(int(v) for v in np.clip(colors[k] * 0.4 + 255 * 0.6, 0, 255))  # a lighter class colour
        cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, light, thickness, cv2.LINE_AA)
    return out


def save_label_png(labels: np.ndarray, path: str) -> None:
    """Class ids as an 8-bit grey PNG (16-bit beyond 256 classes)."""
    if labels.min() < 0:
        raise ValueError("negative class ids")
    if labels.max() < 256:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    elif not cv2.imwrite(path, labels.astype(np.uint16)):
        raise OSError(f"could not write {path}")


def draw_heatmaps(probabilities: np.ndarray, class_names: Sequence[str], path: str,
                  title: Optional[str] = None, max_columns: int = 4) -> None:
    """A grid with one panel per class showing its per-pixel probability (0-1, shared colour scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num, height, width = probabilities.shape
    columns = min(num, max_columns)
    rows = math.ceil(num / columns)
    panel_w = 3.0
    panel_h = min(max(panel_w * height / max(width, 1), 1.0), 3 * panel_w) + 0.35
    figure = Figure(figsize=(panel_w * columns + 1.0, panel_h * rows + (0.4 if title else 0.1)), dpi=100,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    shown = None
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= num:
            continue
        shown = ax.imshow(probabilities[k], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{class_names[k]} (max {probabilities[k].max():.2f})", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.colorbar(shown, ax=axes, shrink=0.9, label="probability")
    figure.savefig(path)


def save_rgb(image_rgb: np.ndarray, path: str) -> None:
    """PNG with light compression (level 1): 1 s instead of 5 s for a 4000x3000 overlay, ~20 % larger."""
    Image.fromarray(image_rgb).save(path, compress_level=1)


# ------------------------------------------------------------------------------------------------ running
def _progress(iterable: Iterable, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, disable=not enabled, desc=desc, unit="img", file=sys.stderr)


def _report(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def process_images(predictor, paths: Sequence[str], output: str, heatmaps: bool = False, alpha: float = 0.5,
                   progress: bool = True, skip: Optional[Sequence[int]] = None) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Segment ``paths``; returns the written files and the ``(path, reason)`` of the skipped inputs."""
    from hvlformer.data import read_image_checked

    written: List[str] = []
    skipped: List[Tuple[str, str]] = []
    for path, stem in _progress(zip(paths, output_stems(paths)), len(paths), progress, "HVLFormer demo"):
        try:
            image = read_image_checked(path, format="RGB")
        except (OSError, ValueError) as e:
            skipped.append((path, str(e)))
            _report(f"SKIPPED {path}: {e}")
            continue
        try:
            prediction = predictor(image, format="RGB")
            overlay_path = os.path.join(output, f"{stem}_overlay.png")
            save_rgb(draw_overlay(image, prediction.labels, predictor.metadata, alpha, skip), overlay_path)
            labels_path = os.path.join(output, f"{stem}_labels.png")
            save_label_png(prediction.labels, labels_path)
            written += [overlay_path, labels_path]
            if heatmaps:
                heatmap_path = os.path.join(output, f"{stem}_heatmaps.png")
                draw_heatmaps(prediction.probabilities, prediction.class_names, heatmap_path,
                              title=os.path.basename(path))
                written.append(heatmap_path)
        except Exception as e:  # one failing input must not stop the batch; the traceback is logged
            skipped.append((path, f"{type(e).__name__}: {e}"))
            logger.exception("FAILED %s", path)
    return written, skipped


def process_video(predictor, path: str, output: str, alpha: float = 0.5, progress: bool = True,
                  skip: Optional[Sequence[int]] = None) -> str:
    """Segment every frame of a video; writes and returns ``<output>/<name>_overlay.mp4``."""
    capture = cv2.VideoCapture(path)
    if not os.path.isfile(path) or not capture.isOpened():
        raise ValueError(f"cannot open the video {path} (missing file or unsupported format)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out_path = os.path.join(output, f"{Path(path).stem}_overlay.mp4")
    writer = None
    frames = 0
    bar = _progress(None, total, progress, "HVLFormer video")
    try:
        while True:
            ok, frame_bgr = capture.read()
            if not ok:
                break
            frame_rgb = np.ascontiguousarray(frame_bgr[:, :, ::-1])
            prediction = predictor(frame_rgb, format="RGB")
            overlay = draw_overlay(frame_rgb, prediction.labels, predictor.metadata, alpha, skip)
            if writer is None:
                height, width = overlay.shape[:2]
                writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
                if not writer.isOpened():
                    raise OSError(f"cannot write the video {out_path} (no mp4v encoder in this OpenCV build?)")
            writer.write(np.ascontiguousarray(overlay[:, :, ::-1]))
            frames += 1
            bar.update(1)
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise ValueError(f"the video {path} has no readable frame")
    return out_path


def setup(args: argparse.Namespace):
    """The predictor for ``args`` (config, overrides, vocabulary)."""
    from hvlformer import setup_cfg
    from hvlformer.predictor import HVLFormerPredictor

    cfg = setup_cfg(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    predictor = HVLFormerPredictor(cfg)
    if args.vocabulary:
        names, descriptions = read_vocabulary(args.vocabulary)
        predictor.set_vocabulary(names, args.descriptions or descriptions)
    elif args.descriptions:
        raise ValueError("--descriptions needs --vocabulary")
    return predictor


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if not args.input and not args.video_input:
        get_parser().error("give --input and/or --video-input")
    if not 0.0 <= args.alpha <= 1.0:
        get_parser().error("--alpha must be between 0 and 1")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("hvlformer").setLevel(logging.INFO)  # the project's messages, not the libraries' INFO
    paths, problems = expand_inputs(args.input)
    for pattern, reason in problems:
        logger.error("SKIPPED %s: %s", pattern, reason)
    if args.input and not paths and not args.video_input:
        logger.error("no input image found")
        return 1
    from hvlformer.checkpoint import CheckpointMismatchError, DamagedCheckpointError

    try:
        predictor = setup(args)
    except (OSError, ValueError, KeyError, CheckpointMismatchError, DamagedCheckpointError) as e:
        logger.error("%s", e)
        return 2
    os.makedirs(args.output, exist_ok=True)
    logger.info("%d classes: %s", len(predictor.class_names), ", ".join(predictor.class_names))
    skip = [] if args.draw_background else None  # None: the "background" class is not coloured
    written, skipped = process_images(predictor, paths, args.output, heatmaps=args.heatmaps, alpha=args.alpha,
                                      progress=not args.no_progress, skip=skip)
    skipped = list(problems) + skipped
    if args.video_input:
        try:
            written.append(process_video(predictor, args.video_input, args.output, args.alpha,
                                         progress=not args.no_progress, skip=skip))
        except (OSError, ValueError) as e:
            skipped.append((args.video_input, str(e)))
            logger.error("SKIPPED %s: %s", args.video_input, e)
    logger.info("wrote %d files to %s", len(written), args.output)
    if skipped:
        logger.error("%d input(s) skipped: %s", len(skipped), "; ".join(f"{p} ({r})" for p, r in skipped))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
