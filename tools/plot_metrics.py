#!/usr/bin/env python
"""Plot training curves from detectron2 ``metrics.json`` files into one PNG; several runs share each panel.

    python tools/plot_metrics.py output/tiny_shapes --output curves.png
    python tools/plot_metrics.py runs/a runs/b/metrics.json --labels "E=3" "E=1" --output compare.png
    python tools/plot_metrics.py output/run --keys 'loss_cmcr.*' 'sem_seg/mIoU' --smooth 5 --output cmcr.png

Each run is a ``metrics.json`` file or a folder holding one (detectron2's ``JSONWriter`` writes one JSON
object per line with ``"iteration"``). Default panels, in this order, for every key that some run has:

- ``total_loss`` and each loss term ``loss_*`` (the per-layer deep-supervision copies ``loss_ce_0`` ... only
  with ``--aux``);
- ``lr``;
- the confident-pixel fraction of the unlabeled images (any key containing ``confiden``);
- the evaluation metrics ``sem_seg/mIoU`` (and ``sem_seg/mACC``, ``sem_seg/pACC``, ``sem_seg/fwIoU`` with
  ``--all-eval``) and the pixel-text alignment ``pixel_text_alignment/mean`` (per level with ``--all-eval``),
  also under a prefix such as ``teacher/``.

``--keys`` replaces that choice with regular expressions (each matching key gets a panel). A resumed run
that wrote some iterations twice keeps the last value of each iteration; unreadable lines (an interrupted
write) are skipped with a warning. ``--smooth N`` draws the moving average over N logged points (the raw
curve stays faint behind it; the LR is never smoothed). ``--log-loss`` puts the losses that span more than a
factor of 10 on a logarithmic axis.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger("plot_metrics")
Series = Dict[str, Tuple[np.ndarray, np.ndarray]]  # key -> (iterations, values)
AUX_SUFFIX = re.compile(r"_\d+$")


def load_metrics(path: str) -> Series:
    """``{key: (iterations, values)}`` from a ``metrics.json`` file or a folder holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    points: Dict[str, Dict[int, float]] = {}
    bad = 0
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                iteration = int(record["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad += 1
                continue
            if not isinstance(record, dict):
                bad += 1
                continue
            for key, value in record.items():
                if key == "iteration" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    points.setdefault(key, {})[iteration] = float(value)  # later lines win (resumed runs)
    if bad:
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    series = {}
    for key, by_iter in points.items():
        iters = np.array(sorted(by_iter), dtype=np.int64)
        series[key] = (iters, np.array([by_iter[i] for i in iters], dtype=np.float64))
    return series


def default_keys(available: Sequence[str], aux: bool = False, all_eval: bool = False) -> List[str]:
    """The default panels (see the module docstring) among ``available``, in display order."""
    available = set(available)
    losses = sorted(k for k in available if k.startswith("loss_") and (aux or not AUX_SUFFIX.search(k)))
    keys = (["total_loss"] if "total_loss" in available else []) + losses
    keys += [k for k in ("lr",) if k in available]
    keys += sorted(k for k in available if "confiden" in k.lower())
    # evaluation results, also under a prefix (e.g. "teacher/sem_seg/mIoU" of an EMA teacher)
    evals = ("sem_seg/mIoU",) + (("sem_seg/mACC", "sem_seg/pACC", "sem_seg/fwIoU") if all_eval else ())
    keys += sorted(k for k in available if k.endswith(evals))
    keys += sorted(k for k in available if "pixel_text_alignment/" in k and not k.endswith("/num_images")
                   and (all_eval or k.endswith("/mean")))
    return keys


def select_keys(available: Sequence[str], patterns: Sequence[str]) -> List[str]:
    """Keys matching any of the regular expressions (``re.fullmatch``), in pattern order."""
    keys: List[str] = []
    for pattern in patterns:
        regex = re.compile(pattern)
        keys += [k for k in sorted(available) if regex.fullmatch(k) and k not in keys]
    return keys


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    if window <= 1 or len(values) < 2:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def plot_runs(runs: Sequence[Series], labels: Sequence[str], keys: Sequence[str], output: str,
              smooth: int = 1, log_losses: bool = False, columns: int = 3, title: Optional[str] = None) -> None:
    """One panel per key, one line per run; saved as ``output`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not keys:
        raise ValueError("nothing to plot: no selected key is in the metrics")
    columns = max(1, min(columns, len(keys)))
    rows = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.2 * rows + (0.4 if title else 0.0)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes.flat, keys):
        for series, label, color in zip(runs, labels, colors):
            if key not in series:
                continue
            iters, values = series[key]
            single = len(values) == 1
            if smooth > 1 and not single and key != "lr":  # the schedule is exact: never smoothed
                ax.plot(iters, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(iters, moving_average(values, smooth), color=color, label=label, linewidth=1.5)
            else:
                ax.plot(iters, values, color=color, label=label, linewidth=1.5, marker="o" if len(values) < 20 else None,
                        markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if log_losses and (key.startswith("loss_") or key == "total_loss"):
            values = np.concatenate([series[key][1] for series in runs if key in series])
            if values.min() > 0 and values.max() / values.min() > 10:  # a log axis only helps over a decade
                ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    if len(runs) > 1:
        handles, names = [], []
        for ax in axes.flat:
            for h, n in zip(*ax.get_legend_handles_labels()):
                if n not in names:
                    handles.append(h)
                    names.append(n)
        figure.legend(handles, names, loc="outside upper center", ncols=min(len(names), 5), fontsize=9)
    if title:
        figure.suptitle(title)
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(output)


def run_label(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.basename(path) == "metrics.json":
        path = os.path.dirname(path)
    return os.path.basename(path) or path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="metrics.json files or run folders")
    parser.add_argument("--output", "-o", default="metrics.png", help="PNG to write (default metrics.png)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    parser.add_argument("--keys", nargs="+", metavar="REGEX", help="plot the keys matching these regular expressions")
    parser.add_argument("--aux", action="store_true", help="include the per-layer losses (loss_ce_0, ...)")
    parser.add_argument("--all-eval", action="store_true", help="also mACC, pACC, fwIoU and per-level alignment")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over N logged points")
    parser.add_argument("--log-loss", action="store_true", help="logarithmic y axis for the losses")
    parser.add_argument("--columns", type=int, default=3, help="panels per row")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"{len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or [run_label(r) for r in args.runs]
    if len(set(labels)) != len(labels):  # two runs named "output": add their index
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    try:
        runs = [load_metrics(r) for r in args.runs]
    except FileNotFoundError as e:
        logger.error("%s", e)
        return 1
    available = sorted(set().union(*runs))
    keys = select_keys(available, args.keys) if args.keys else default_keys(available, args.aux, args.all_eval)
    if not keys:
        logger.error("no metric to plot (found keys: %s)", ", ".join(available) or "none")
        return 1
    plot_runs(runs, labels, keys, args.output, smooth=args.smooth, log_losses=args.log_loss,
              columns=args.columns, title=args.title)
    logger.info("wrote %s (%d panels, %d runs)", args.output, len(keys), len(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
