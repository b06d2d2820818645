"""Install the ``hvlformer`` package (it lives in ``projects/HVLFormer/hvlformer``, detectron2-project style).

detectron2 and PyTorch are installed by ``tools/install.sh`` (detectron2 is not on PyPI).
"""
from setuptools import find_packages, setup

setup(
    name="hvlformer",
    version="0.1.0",
    description="HVLFormer: semi-supervised semantic segmentation with language anchors (detectron2 project)",
    python_requires=">=3.10",
    package_dir={"": "projects/HVLFormer"},
    packages=find_packages("projects/HVLFormer", include=["hvlformer", "hvlformer.*"]),
    package_data={"hvlformer": ["data/classes/*.json", "modeling/backbone/model_configs/*.json"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "open_clip_torch>=2.24",
        "fvcore>=0.1.5,<0.1.6",
        "pycocotools>=2.0.7",
        "numpy",
        "scipy",
        "opencv-python-headless",
        "Pillow",
        "PyYAML",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=7", "packaging"]},
)
