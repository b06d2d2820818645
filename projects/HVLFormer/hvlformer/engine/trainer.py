"""The supervised HVLFormer trainer: detectron2's DefaultTrainer with the project's data, evaluator,
optimizer groups, WarmupPolyLR and device-agnostic mixed precision."""
from __future__ import annotations

import logging
import os
import weakref

from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import HVLFormerCheckpointer
from ..data import (
    HVLFormerSemanticDatasetMapper,
    register_custom_semi_dataset_from_cfg,
    register_shapes_from_cfg,
    register_split_files_from_cfg,
)
from ..data.check import check_datasets_from_cfg
from ..data.semi import register_shapes_semi_split
from ..evaluation import build_sem_seg_evaluator
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer
from .train_loop import AutocastTrainer, amp_dtype


def check_datasets(cfg: CfgNode, training: bool = True) -> None:
    """:func:`hvlformer.data.check.check_datasets_from_cfg` on the main process (the others wait)."""
    if comm.is_main_process():
        check_datasets_from_cfg(cfg, training=training)
    comm.synchronize()


def wrap_ddp(cfg: CfgNode, model):
    """DistributedDataParallel when more than one process trains (gloo/CPU: no device ids)."""
    kwargs = {"broadcast_buffers": False, "find_unused_parameters": cfg.MODEL.DDP_FIND_UNUSED_PARAMETERS}
    if not cfg.MODEL.DEVICE.startswith("cuda"):
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


class Trainer(DefaultTrainer):
    """Supervised training on labeled images (``DATASETS.TRAIN``), evaluation on ``DATASETS.TEST``."""

    def __init__(self, cfg: CfgNode) -> None:  # noqa: D107 - same steps as DefaultTrainer, own step loop
        super(DefaultTrainer, self).__init__()
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        check_datasets(cfg, training=True)  # datasets first (cheap), then the model (may download CLIP)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(cfg, model)
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = AutocastTrainer(model, data_loader, optimizer, dtype=amp_dtype(cfg.SOLVER.AMP.DTYPE))
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = HVLFormerCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def register_datasets(cls, cfg: CfgNode) -> None:
        """Register the datasets whose definition depends on the config (shapes size, splits)."""
        register_shapes_from_cfg(cfg)
        register_shapes_semi_split(cfg)
        register_split_files_from_cfg(cfg)
        register_custom_semi_dataset_from_cfg(cfg)

    @classmethod
    def build_model(cls, cfg: CfgNode):
        cls.register_datasets(cfg)  # the model takes its class list from the dataset metadata
        return super().build_model(cfg)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        cls.register_datasets(cfg)
        return build_detection_train_loader(cfg, mapper=HVLFormerSemanticDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        cls.register_datasets(cfg)
        return build_detection_test_loader(cfg, dataset_name, mapper=HVLFormerSemanticDatasetMapper(cfg, is_train=False, dataset_name=dataset_name))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_sem_seg_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer):
        return build_lr_scheduler(cfg, optimizer)
