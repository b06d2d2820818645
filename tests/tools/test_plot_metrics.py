"""tools/plot_metrics.py: metrics.json parsing and the PNG of training curves."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

plot_metrics = load_script("tools/plot_metrics.py")


def write_metrics(folder: Path, scale: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in range(19, 200, 20):
        lines.append(json.dumps({"iteration": it, "total_loss": scale * 50 / (1 + it / 50), "loss_ce": 4 - it / 100,
                                 "loss_ce_0": 4.2 - it / 100, "loss_cmcr_mask": 0.5 * scale,
                                 "lr": 1e-4 * min(1, it / 50), "unlabeled/confident_fraction": it / 200,
                                 "time": 0.3, "eta_seconds": 10.0}))
        if it in (99, 199):
            lines.append(json.dumps({"iteration": it + 1, "sem_seg/mIoU": it / 4 * scale, "sem_seg/mACC": 30.0,
                                     "pixel_text_alignment/mean": 0.1, "pixel_text_alignment/num_images": 50}))
    lines.append('{"iteration": 219, "total_loss": 3.')  # an interrupted write
    # a resumed run logs iteration 179 again: the later value wins
    lines.append(json.dumps({"iteration": 179, "total_loss": 1.0}))
    path = folder / "metrics.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_metrics(tmp_path, caplog):
    path = write_metrics(tmp_path / "run")
    series = plot_metrics.load_metrics(str(tmp_path / "run"))  # a folder works as well as the file
    iters, values = series["total_loss"]
    assert list(iters) == list(range(19, 200, 20)) and values[list(iters).index(179)] == 1.0
    assert list(series["sem_seg/mIoU"][0]) == [100, 200]
    assert "unreadable" in caplog.text
    with pytest.raises(FileNotFoundError):
        plot_metrics.load_metrics(str(tmp_path / "missing"))
    assert plot_metrics.load_metrics(str(path)).keys() == series.keys()


def test_default_and_selected_keys():
    available = ["total_loss", "loss_ce", "loss_ce_0", "loss_mask", "lr", "time", "sem_seg/mIoU", "sem_seg/mACC",
                 "unlabeled/confident_fraction", "pixel_text_alignment/mean", "pixel_text_alignment/level_1",
                 "pixel_text_alignment/num_images", "teacher/sem_seg/mIoU"]
    assert plot_metrics.default_keys(available) == [
        "total_loss", "loss_ce", "loss_mask", "lr", "unlabeled/confident_fraction", "sem_seg/mIoU",
        "teacher/sem_seg/mIoU", "pixel_text_alignment/mean"]
    assert "loss_ce_0" in plot_metrics.default_keys(available, aux=True)
    assert plot_metrics.select_keys(available, ["loss_ce.*", "lr"]) == ["loss_ce", "loss_ce_0", "lr"]
    np.testing.assert_allclose(plot_metrics.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])


def test_plot_writes_a_png_with_several_runs(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b", scale=2.0)
    out = tmp_path / "plots" / "curves.png"
    code = plot_metrics.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.json"), "--labels", "A", "B",
                              "--output", str(out), "--smooth", "3", "--log-loss"])
    assert code == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 600
    assert plot_metrics.main([str(tmp_path / "a"), "--keys", "nothing.*", "--output", str(tmp_path / "x.png")]) == 1
    assert plot_metrics.main([str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 1
