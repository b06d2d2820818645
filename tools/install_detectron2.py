#!/usr/bin/env python
"""Install detectron2 on a machine where it is not importable, without compiling anything.

detectron2 is not published on PyPI. The route used here (verified for this project):

1. ``pip download sal-detectron2==0.7.2`` (a cp310 wheel whose Python code is upstream detectron2 at
   commit a59f0563 plus a version bump and two trivial fixes); its sha256 is checked.
2. The wheel is rewritten: the CUDA/Python-3.10 ``detectron2/_C*.so`` extension and the top-level
   ``tools`` package (it would shadow this project's ``tools/``) are dropped, ``numpy<2`` and ``black``
   are removed from its requirements, and it is retagged ``py3-none-any`` (pure Python).
3. The rewritten wheel is installed with ``--no-deps`` plus its pure-Python requirements.

detectron2 then imports and runs on any Python 3; only its compiled ops (deformable conv, rotated
boxes, NMS-rotated), which HVLFormer does not use, are unavailable.

If ``import detectron2`` already works (for example a user who built the official one for GPU), this
script does nothing. ``--wheel-dir DIR`` only builds the rewritten wheel into DIR (for an offline
wheelhouse) and installs nothing.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE_REQUIREMENT = "sal-detectron2==0.7.2"
SOURCE_WHEEL = "sal_detectron2-0.7.2-cp310-none-any.whl"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
OUTPUT_WHEEL = "sal_detectron2-0.7.2-py3-none-any.whl"
# Requirements of the wheel that are dropped: numpy<2 (the project runs on NumPy 2 and routes around
# the one detectron2 call it uses that needs NumPy 1) and black (a formatter, not a runtime need).
DROPPED_REQUIREMENTS = ("numpy", "black")
# detectron2's own pure-Python runtime requirements that its wheel metadata leaves out.
EXTRA_REQUIREMENTS = ("fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def download_source_wheel(dest: Path) -> Path:
    """Download the sal-detectron2 wheel into ``dest`` (or reuse it) and verify its sha256."""
    wheel = dest / SOURCE_WHEEL
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.10", "--implementation", "cp", SOURCE_REQUIREMENT, "-d", str(dest)]
        subprocess.run(cmd, check=True)
    actual = _sha256(wheel)
    if actual != SOURCE_SHA256:
        raise SystemExit(f"{wheel}: sha256 {actual} does not match the verified {SOURCE_SHA256}; "
                         "refusing to install it.")
    return wheel


def _keep(name: str) -> bool:
    if name.startswith("tools/"):
        return False
    if re.match(r"detectron2/_C[^/]*\.so$", name):
        return False
    return True


def _rewrite_metadata(text: str) -> tuple[str, list[str]]:
    """Drop unwanted ``Requires-Dist`` lines; return the new METADATA and the kept runtime requirements."""
    lines, requirements = [], []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            spec = line.split(":", 1)[1].strip()
            name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower()
            if name in DROPPED_REQUIREMENTS:
                continue
            if ";" not in spec:  # markers are extras or old-Python conditions; not needed at runtime
                requirements.append(spec)
        lines.append(line)
    return "\n".join(lines) + "\n", requirements


def repack(source: Path, out_dir: Path) -> tuple[Path, list[str]]:
    """Write the pure-Python wheel into ``out_dir``; return it and its runtime requirements."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / OUTPUT_WHEEL
    requirements: list[str] = []
    records = []
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = None
        for info in zin.infolist():
            name = info.filename
            if not _keep(name):
                continue
            if name.endswith(".dist-info/RECORD"):
                record_name = name
                continue
            data = zin.read(name)
            if name.endswith(".dist-info/METADATA"):
                text, requirements = _rewrite_metadata(data.decode())
                data = text.encode()
            elif name.endswith(".dist-info/WHEEL"):
                text = data.decode()
                text = re.sub(r"(?m)^Root-Is-Purelib:.*$", "Root-Is-Purelib: true", text)
                text = re.sub(r"(?m)^Tag:.*\n?", "", text).rstrip("\n") + "\nTag: py3-none-any\n"
                data = text.encode()
            elif name.endswith(".dist-info/top_level.txt"):
                data = b"detectron2\n"
            zout.writestr(name, data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")
        if record_name is None:
            raise SystemExit(f"{source} has no RECORD file; it is not a valid wheel.")
        records.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(records) + "\n")
    return output, requirements + list(EXTRA_REQUIREMENTS)


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel-dir", type=Path, default=None,
                        help="only build the rewritten wheel (and download its requirements) into this folder")
    parser.add_argument("--no-requirements", action="store_true",
                        help="with --wheel-dir: do not download detectron2's requirements as well")
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = parser.parse_args()

    if args.wheel_dir is None and detectron2_importable() and not args.force:
        print("detectron2 is already importable; leaving it alone.")
        return
    cache = Path(os.environ.get("HVLFORMER_CACHE", Path.home() / ".cache" / "hvlformer"))
    cache.mkdir(parents=True, exist_ok=True)
    source = download_source_wheel(cache)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.wheel_dir if args.wheel_dir is not None else Path(tmp)
        wheel, requirements = repack(source, out_dir)
        if args.wheel_dir is not None:
            if not args.no_requirements:
                subprocess.run([sys.executable, "-m", "pip", "download", "-d", str(out_dir), *requirements],
                               check=True)
            print(f"wrote {wheel} and its requirements to {out_dir}")
            return
        subprocess.run([sys.executable, "-m", "pip", "install", *requirements], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
                       check=True)
    print("installed detectron2 (pure Python, no compiled ops)")


if __name__ == "__main__":
    main()
