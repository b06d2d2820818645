"""Helpers shared by the scripts in ``tools/`` (not a command itself).

The tools run as ``python tools/<name>.py``, so this folder is on ``sys.path`` and they import this file as
``_common``; ``tests/conftest.py`` puts the folder on ``sys.path`` for the tests, which load the tools by
file path.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

__all__ = ["emit_json", "mean_std"]


def emit_json(report: Any, path: Optional[Union[str, os.PathLike]] = None) -> str:
    """Print ``report`` as indented JSON and, when ``path`` is given, also write it there (with a final
    newline; parent folders created). Returns the text."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std"}`` of ``values`` rounded to 2 decimals; the population standard deviation, 0.0 for
    a single value."""
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.pstdev(values), 2) if len(values) > 1 else 0.0}
