"""``HVLFormerPredictor``: single-image inference from Python, and open-vocabulary class lists.

    from hvlformer import setup_cfg
    from hvlformer.predictor import HVLFormerPredictor

    predictor = HVLFormerPredictor(cfg)               # builds the model, loads cfg.MODEL.WEIGHTS
    result = predictor("photo.jpg")                   # a path, or an H x W x 3 uint8 array (BGR by default)
    result.labels                                     # H x W int64 class ids
    result.probabilities                              # K x H x W float32, sums to 1 over the classes
    predictor.set_vocabulary("cat, dog, grass")       # new class list (needs the "text" classifier)

Decisions:

- **Input format** follows detectron2's ``DefaultPredictor``: an array is BGR (as ``cv2.imread`` gives) unless
  ``format="RGB"`` is passed; paths are read with :func:`hvlformer.data.read_image_checked` (EXIF rotation
  applied, clear errors for missing or corrupt files); PIL images are converted to RGB. Grey images are
  repeated to 3 channels and an alpha channel is dropped.
- **Resolution**: the model sees the image at ``TEST.INFERENCE_SCALE`` (by default the short side at the
  training crop size, ``min(INPUT.CROP.SIZE)``, and the long side at most the longest side seen in
  training, ``INPUT.RESIZE_BASE * max(INPUT.RESIZE_RATIO_RANGE)``; ``MIN_SIZE 0`` = original size) and
  the scores are resized back to the input size. A 4000x3000 photo at full resolution took minutes and
  GBs with the tiny model and showed a dot-lattice artefact; the benchmark protocols (original size,
  sliding windows) are for evaluating the built-in datasets.
- **Scores and probabilities**: the model's class scores are Mask2Former's semantic scores
  ``sum_q softmax(class)_k * sigmoid(mask)`` (non-negative; up to E where the E query levels of a class
  agree). ``labels`` is their argmax. ``probabilities`` divides them by their sum over the classes at each
  pixel (``s_k / sum_j s_j``): a per-pixel distribution with the same argmax and no temperature to choose.
  A softmax of the raw scores would be almost flat (they differ by at most E), and clipping them to [0, 1]
  would not sum to one.
- **Vocabulary** (:meth:`HVLFormerPredictor.set_vocabulary`): the text prompts are rebuilt from the new
  names (the sentences of a descriptions JSON file when one is given; otherwise a training class keeps its
  training prompts and a new name gets ``MODEL.HVLFORMER.TEXT.FALLBACK_TEMPLATE``) and the model's textual
  queries and ``text`` classifier follow with no retraining. With the ``linear`` classifier
  the K+1 outputs are fixed: a different number of classes is an error, the same number only renames them
  (with a warning). Names that the training dataset has keep its colours; new names get colours from a
  fixed palette, unused by the others.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from PIL import Image

from .checkpoint import HVLFormerCheckpointer
from .data import default_class_colors, read_image_checked, register_datasets_from_cfg
from .data.dataset_mappers import inference_resize
from .data.validation import array_to_rgb8, image_to_rgb8
from .modeling.clip_loader import clip_weights_from_checkpoint
from .modeling.text import load_class_descriptions, reference_prompts

__all__ = ["HVLFormerPredictor", "SemanticPrediction", "parse_vocabulary", "normalize_scores"]

logger = logging.getLogger("hvlformer")
ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


def normalize_scores(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-pixel class probabilities ``s_k / sum_j s_j`` of non-negative ``K x H x W`` scores.

    ``eps`` is added to every score, so a pixel where all scores are 0 gets the uniform distribution.
    """
    scores = scores.float().clamp_min(0) + eps
    return scores / scores.sum(dim=0, keepdim=True)


@dataclass
class SemanticPrediction:
    """The prediction for one image, at the input image's size.

    ``labels``: ``H x W`` int64 class ids into ``class_names``; ``scores``: ``K x H x W`` float32 raw class
    scores (see the module docstring); ``probabilities`` (computed on first access): ``K x H x W`` float32,
    summing to 1 over the classes; ``pixel_text_alignment``: ``E`` values (eq. 10) when the config has
    ``TEST.PIXEL_TEXT_ALIGNMENT`` on, else ``None``.
    """

    labels: np.ndarray
    scores: np.ndarray
    class_names: List[str]
    pixel_text_alignment: Optional[np.ndarray] = None
    _probabilities: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def probabilities(self) -> np.ndarray:
        if self._probabilities is None:
            self._probabilities = normalize_scores(torch.from_numpy(self.scores)).numpy()
        return self._probabilities

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def parse_vocabulary(vocabulary: Union[str, Sequence[str]]) -> List[str]:
    """Class names from ``"cat, dog, grass"`` (commas and/or new lines) or a sequence of names.

    Blank entries are dropped; an empty or repeated name is an error.
    """
    if isinstance(vocabulary, str):
        items = [part for line in vocabulary.splitlines() for part in line.split(",")]
    else:
        items = list(vocabulary)
    names = [str(n).strip() for n in items if str(n).strip()]
    if not names:
        raise ValueError(f"the vocabulary {vocabulary!r} names no class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"the vocabulary names {repeated} more than once")
    return names


def _dataset_metadata(cfg: CfgNode) -> Optional[Metadata]:
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name in MetadataCatalog.list():
            return MetadataCatalog.get(name)
    return None


def _to_rgb_array(image: ImageLike, format: str) -> np.ndarray:
    """``H x W x 3`` uint8 RGB from a path, a PIL image or an array in ``format`` ("BGR" or "RGB")."""
    if isinstance(image, (str, os.PathLike)):
        return read_image_checked(image, format="RGB")
    if isinstance(image, Image.Image):
        return image_to_rgb8(image, "PIL image")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")
    if format not in ("BGR", "RGB"):
        raise ValueError(f"format must be 'BGR' or 'RGB', got {format!r}")
    array = array_to_rgb8(image, "image array")
    if format == "BGR":
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array)


class HVLFormerPredictor:
    """Build an HVLFormer from ``cfg``, load ``cfg.MODEL.WEIGHTS`` and segment single images.

    ``predictor(image) -> SemanticPrediction``; see the module docstring for the input formats.
    ``metadata`` (detectron2 ``Metadata`` with ``stuff_classes`` / ``stuff_colors``) follows the vocabulary
    and is what :class:`detectron2.utils.visualizer.Visualizer` needs.
    """

    def __init__(self, cfg: CfgNode) -> None:
        # the CLIP weights come from MODEL.WEIGHTS when it is given: nothing is downloaded (works offline)
        self.cfg = clip_weights_from_checkpoint(cfg.clone())
        register_datasets_from_cfg(self.cfg)  # the config-dependent datasets (shapes sizes, splits), as in training
        self.model = build_model(self.cfg)
        self.model.eval()
        weights = self.cfg.MODEL.WEIGHTS
        if weights:
            if "://" not in weights and not os.path.isfile(weights):
                raise FileNotFoundError(f"MODEL.WEIGHTS: checkpoint not found: {weights}")
            # strict: a checkpoint of another config (e.g. another classifier) is an error naming the layers
            HVLFormerCheckpointer(self.model, strict=True).load(weights)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the predictor uses an untrained model "
                           "(pass --opts MODEL.WEIGHTS path/to/model_final.pth)")
        # TEST.INFERENCE_SCALE (default: the training crop's short side, long side capped), not the benchmark
        # protocol: photos are often far larger than anything the model saw in training
        self.aug = inference_resize(self.cfg)
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")
        dataset = _dataset_metadata(self.cfg)
        names = list(self.model.class_names)
        colors = list(getattr(dataset, "stuff_colors", None) or []) if dataset is not None else []
        self._dataset_colors: Dict[str, Tuple[int, int, int]] = {
            n: tuple(int(v) for v in c) for n, c in zip(names, colors)}
        self._training_vocabulary = (names, [list(p) for p in self.model.class_prompts],
                                     list(self.model.reference_class_prompts))
        self.metadata = self._make_metadata(names)

    # ------------------------------------------------------------------ vocabulary
    @property
    def class_names(self) -> List[str]:
        return list(self.model.class_names)

    @property
    def classifier(self) -> str:
        return self.cfg.MODEL.HVLFORMER.CLASSIFIER

    def _make_metadata(self, names: Sequence[str]) -> Metadata:
        used = {self._dataset_colors[n] for n in names if n in self._dataset_colors}
        spare = (tuple(c) for c in default_class_colors(256)[1:] if tuple(c) not in used)
        colors = [list(self._dataset_colors[n]) if n in self._dataset_colors else list(next(spare)) for n in names]
        return Metadata(name="hvlformer_predictor", stuff_classes=list(names), stuff_colors=colors)

    def set_vocabulary(self, names: Union[str, Sequence[str]], descriptions_file: Optional[str] = None,
                       reuse_training_prompts: bool = True) -> List[str]:
        """Replace the class list; returns the new names.

        Args:
            names: ``"cat, dog, grass"`` or a list of names.
            descriptions_file: optional descriptions JSON (``datasets/descriptions/<dataset>.json`` schema)
                that describes every name. Without one, a name of the training vocabulary keeps the prompts
                the model was trained with (its dataset descriptions; ``reuse_training_prompts``) and any
                other name gets one prompt from ``MODEL.HVLFORMER.TEXT.FALLBACK_TEMPLATE``
                ("a photo of a {}.").
        Raises:
            ValueError: the ``linear`` classifier with a different number of classes (its K+1 outputs
                were trained for the training classes; train with ``MODEL.HVLFORMER.CLASSIFIER text``
                for open-vocabulary inference).
        """
        names = parse_vocabulary(names)
        if self.classifier != "text" and len(names) != self.model.num_classes:
            raise ValueError(
                f"this model uses the '{self.classifier}' classifier, whose {self.model.num_classes}+1 outputs "
                f"are tied to the {self.model.num_classes} training classes, so it cannot predict "
                f"{len(names)} classes. Open-vocabulary inference needs a model trained with "
                f"MODEL.HVLFORMER.CLASSIFIER text (a cosine classifier on the class text embeddings).")
        if self.classifier != "text" and names != self.model.class_names:
            logger.warning("the 'linear' classifier keeps its trained outputs: the new names only relabel "
                           "classes 0..%d (%s)", len(names) - 1, ", ".join(names))
        hv = self.cfg.MODEL.HVLFORMER
        descriptions = load_class_descriptions(descriptions_file or None, names,
                                               num_descriptions=hv.TEXT.NUM_DESCRIPTIONS,
                                               fallback_template=hv.TEXT.FALLBACK_TEMPLATE,
                                               style=hv.TEXT.PROMPT_STYLE)
        prompts = descriptions.prompts
        references = reference_prompts(names, descriptions.attributes, template=hv.TEXT.REFERENCE_TEMPLATE)
        source = descriptions.source
        if not descriptions_file and reuse_training_prompts:
            trained = dict(zip(self._training_vocabulary[0], zip(*self._training_vocabulary[1:])))
            prompts = [list(trained[n][0]) if n in trained else p for n, p in zip(names, prompts)]
            references = [trained[n][1] if n in trained else r for n, r in zip(names, references)]
            known = [n for n in names if n in trained]
            if known:
                source = (f"training prompts for {', '.join(known)}"
                          + (f"; {source} for the others" if len(known) < len(names) else ""))
        self.model.set_vocabulary(names, prompts, references)
        self.metadata = self._make_metadata(names)
        logger.info("vocabulary: %d classes (%s); prompts: %s", len(names), ", ".join(names), source)
        return names

    def reset_vocabulary(self) -> None:
        """Back to the training classes and their prompts."""
        names, prompts, references = self._training_vocabulary
        self.model.set_vocabulary(names, prompts, references)
        self.metadata = self._make_metadata(names)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def __call__(self, image: ImageLike, format: str = "BGR") -> SemanticPrediction:
        """Segment one image (a path, a PIL image, or an ``H x W x 3`` array in ``format``)."""
        rgb = _to_rgb_array(image, format)
        model_input = rgb if self.input_format == "RGB" else rgb[:, :, ::-1]
        height, width = model_input.shape[:2]
        resized = model_input if self.aug is None else self.aug.get_transform(model_input).apply_image(model_input)
        # an owned, writable copy (PIL and np.asarray give read-only arrays, which torch warns about)
        tensor = torch.from_numpy(np.array(resized.transpose(2, 0, 1), order="C", copy=True))
        output = self.model([{"image": tensor, "height": height, "width": width}])[0]
        scores = output["sem_seg"].float()
        alignment = output.get("pixel_text_alignment")
        return SemanticPrediction(
            labels=scores.argmax(dim=0).cpu().numpy().astype(np.int64),
            scores=scores.cpu().numpy(),
            class_names=self.class_names,
            pixel_text_alignment=None if alignment is None else alignment.float().cpu().numpy(),
        )
