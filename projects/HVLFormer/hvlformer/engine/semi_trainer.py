"""Semi-supervised training (paper section 4.1): one labeled and one unlabeled batch per step (the step is
:class:`~hvlformer.engine.train_loop.SemiSupervisedStep`), three views of every
unlabeled image, CMCR against the original view (the model itself, stop-gradient, or an EMA teacher)."""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils.events import CommonMetricPrinter, get_event_storage

from ..data import HVLFormerSemanticDatasetMapper, UnlabeledViewsMapper
from ..data.samplers import RareClassSampler, class_pixel_counts, repeat_to_length
from .ema import EMATeacher
from .train_loop import SemiSupervisedStep
from .trainer import Trainer, amp_of

logger = logging.getLogger(__name__)
#: Statistics of the semi-supervised step (not losses) shown in the console line next to the losses.
CONSOLE_STATS = ("confident_fraction", "sre_mean_labeled", "sre_mean_unlabeled")


class _SuffixLogger:
    """Forwards ``info`` to a logger with ``suffix`` appended to the message."""

    def __init__(self, logger: logging.Logger, suffix: str) -> None:
        self._logger, self._suffix = logger, suffix

    def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._logger.info(message + self._suffix, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class SemiMetricPrinter(CommonMetricPrinter):
    """detectron2's console line, plus the semi-supervised statistics (:data:`CONSOLE_STATS`, medians over
    the same window as the losses), which the stock printer leaves to ``metrics.json`` and TensorBoard:
    ``... loss_cmcr_mask: 0  ...  lr: ...  confident_fraction: 0  sre_mean_labeled: 0.52 ...``.
    ``confident_fraction`` and ``loss_cmcr_mask`` are 0 until the original view's class probability
    reaches ``SEMI.CONFIDENCE_THRESHOLD`` somewhere (docs/GETTING_STARTED.md, "Troubleshooting")."""

    def write(self) -> None:
        storage = get_event_storage()
        histories = storage.histories()
        parts = [f"{key}: {histories[key].median(storage.count_samples(key, self._window_size)):.4g}"
                 for key in CONSOLE_STATS if key in histories]
        if not parts:
            super().write()
            return
        logger = self.logger
        self.logger = _SuffixLogger(logger, "  " + "  ".join(parts))
        try:
            super().write()
        finally:
            self.logger = logger


def auto_scale_semi(cfg: CfgNode, world_size: int) -> CfgNode:
    """detectron2's REFERENCE_WORLD_SIZE rescaling, extended to the labeled/unlabeled batch sizes.

    The default (``SOLVER.REFERENCE_WORLD_SIZE: 0``, every shipped config) keeps the config's GLOBAL batch
    (the paper's 8 labeled + 8 unlabeled), LR and iterations on any GPU count: each GPU gets
    ``batch / world_size`` images. Only when the user sets ``REFERENCE_WORLD_SIZE`` to another GPU count is
    the per-GPU batch of that count kept, and the batch sizes, LR, iterations and periods rescaled by
    ``world_size / REFERENCE_WORLD_SIZE`` (detectron2's linear scaling). :func:`describe_batch_recipe`
    says which happened.
    """
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference == 0 or reference == world_size:
        return cfg
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    scale = world_size / reference
    for key in ("IMS_PER_BATCH_LABELED", "IMS_PER_BATCH_UNLABELED"):
        cfg.SOLVER[key] = int(round(cfg.SOLVER[key] * scale))
    cfg.SOLVER.IMS_PER_BATCH = cfg.SOLVER.IMS_PER_BATCH_LABELED
    cfg.SOLVER.REFERENCE_WORLD_SIZE = reference  # detectron2 rescales LR, iterations and periods next
    if frozen:
        cfg.freeze()
    return DefaultTrainer.auto_scale_workers(cfg, world_size)


class SemiSupervisedTrainer(Trainer):
    """``DATASETS.TRAIN_LABELED`` + ``DATASETS.TRAIN_UNLABELED``; evaluation on ``DATASETS.TEST`` of the
    student and (``SEMI.TEACHER: ema`` with ``SEMI.EVAL_TEACHER``) of the teacher."""

    @classmethod
    def training_config(cls, cfg: CfgNode, world_size: int) -> CfgNode:
        """Checks that both training sets are named, then :func:`auto_scale_semi`."""
        if not cfg.DATASETS.TRAIN_LABELED or not cfg.DATASETS.TRAIN_UNLABELED:
            raise ValueError("semi-supervised training needs DATASETS.TRAIN_LABELED and DATASETS.TRAIN_UNLABELED")
        return auto_scale_semi(cfg, world_size)

    @classmethod
    def build_teacher(cls, cfg: CfgNode, model) -> Optional[EMATeacher]:
        """``SEMI.TEACHER: ema``: an EMA copy of ``model``; ``self``: none (the model is its own teacher)."""
        if cfg.SEMI.TEACHER not in ("self", "ema"):
            raise ValueError(f"SEMI.TEACHER must be 'self' or 'ema', got {cfg.SEMI.TEACHER!r}")
        return EMATeacher(model, cfg.SEMI.EMA_DECAY) if cfg.SEMI.TEACHER == "ema" else None

    def build_train_step(self, cfg: CfgNode, model, optimizer) -> SemiSupervisedStep:
        """The semi-supervised step over the labeled and the unlabeled loaders (:meth:`build_semi_loaders`)."""
        labeled_loader, unlabeled_loader = self.build_semi_loaders(cfg)
        return SemiSupervisedStep(model, labeled_loader, unlabeled_loader, optimizer, self.teacher, amp_of(cfg),
                                  rampup_iters=cfg.SEMI.UNLABELED_RAMPUP_ITERS,
                                  start_iter=cfg.SEMI.UNLABELED_START_ITER,
                                  guidance_weights=(cfg.SEMI.CLIP_GUIDANCE_WEIGHT, cfg.SEMI.CLIP_GUIDANCE_FINAL_WEIGHT),
                                  max_iter=cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_semi_loaders(cls, cfg: CfgNode):
        """The labeled loader (list repeated to the unlabeled length; optional rare-class sampling) and
        the unlabeled three-view loader."""
        cls.register_datasets(cfg)
        labeled = get_detection_dataset_dicts(cfg.DATASETS.TRAIN_LABELED, filter_empty=False)
        unlabeled = get_detection_dataset_dicts(cfg.DATASETS.TRAIN_UNLABELED, filter_empty=False)
        rcs = cfg.SEMI.RARE_CLASS_SAMPLING
        labeled_mapper = HVLFormerSemanticDatasetMapper(cfg, is_train=True)
        if rcs.ENABLED:
            counts = class_pixel_counts(labeled, labeled_mapper.num_classes, labeled_mapper.ignore_label,
                                        cache_file=os.path.join(cfg.OUTPUT_DIR, "rare_class_counts.json"))
            sampler = RareClassSampler(counts, rcs.TEMPERATURE, rcs.MIN_PIXELS, seed=cfg.SEED if cfg.SEED >= 0 else None)
        else:
            labeled = repeat_to_length(labeled, len(unlabeled))
            sampler = TrainingSampler(len(labeled), seed=cfg.SEED if cfg.SEED >= 0 else None)
        labeled_loader = build_detection_train_loader(
            labeled, mapper=labeled_mapper, sampler=sampler, total_batch_size=cfg.SOLVER.IMS_PER_BATCH_LABELED,
            aspect_ratio_grouping=False, num_workers=cfg.DATALOADER.NUM_WORKERS)
        unlabeled_loader = build_detection_train_loader(
            unlabeled, mapper=UnlabeledViewsMapper(cfg),
            sampler=TrainingSampler(len(unlabeled), seed=cfg.SEED + 1 if cfg.SEED >= 0 else None),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH_UNLABELED, aspect_ratio_grouping=False,
            num_workers=cfg.DATALOADER.NUM_WORKERS)
        return labeled_loader, unlabeled_loader

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self.teacher is not None and not self.teacher.loaded_from_checkpoint:
            self.teacher.copy_from(self.model)  # start from the (possibly just loaded) student weights

    def build_writers(self):
        """detectron2's writers with :class:`SemiMetricPrinter` as the console printer."""
        return [SemiMetricPrinter(self.max_iter) if type(w) is CommonMetricPrinter else w
                for w in super().build_writers()]

    def build_hooks(self) -> List[hooks.HookBase]:
        hook_list = super().build_hooks()
        if self.teacher is not None and self.cfg.SEMI.EVAL_TEACHER and self.cfg.TEST.EVAL_PERIOD > 0:
            def test_teacher():
                results = self.test(self.cfg, self.teacher.model)
                return {f"teacher/{k}": v for k, v in results.items()}

            # before the best-checkpoint hook (which may read the teacher's results) and the writers (the last
            # hook), like detectron2's own EvalHook
            position = next(i for i, h in enumerate(hook_list) if isinstance(h, (hooks.BestCheckpointer,
                                                                                 hooks.PeriodicWriter)))
            hook_list.insert(position, hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_teacher))
        return hook_list
