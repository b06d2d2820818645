"""The HVLFormer trainer: detectron2's DefaultTrainer with the project's data, evaluator, optimizer groups,
WarmupPolyLR and training step (:mod:`.train_loop`, device-agnostic mixed precision).

:class:`Trainer` holds the one construction sequence (config rescaling, dataset check, model, optimizer,
teacher, DDP, training step, scheduler, checkpointer); the semi-supervised trainer overrides its parts
(:meth:`Trainer.training_config`, :meth:`Trainer.build_teacher`, :meth:`Trainer.build_train_step`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import weakref
from typing import Iterator, List, Optional

import numpy as np

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import HVLFormerCheckpointer
from ..data import HVLFormerSemanticDatasetMapper, register_datasets_from_cfg
from ..data.check import check_datasets_from_cfg
from ..evaluation import build_sem_seg_evaluator
from .ema import EMATeacher
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer
from .train_loop import TrainStep, amp_dtype


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


def describe_batch_recipe(cfg: CfgNode, world_size: int, original: Optional[CfgNode] = None) -> str:
    """The training recipe as one visible block: per-GPU and global batch, base LR and iterations.

    Args:
        cfg: the config training runs with (after :func:`auto_scale_semi` / ``auto_scale_workers``).
        world_size: number of training processes (GPUs).
        original: the config before rescaling; when its batch differs from ``cfg``'s, the block says that
            the recipe was RESCALED (``SOLVER.REFERENCE_WORLD_SIZE``) and from what.

    Raises ``ValueError`` when a global batch does not split evenly over the processes.
    """
    semi = bool(cfg.DATASETS.TRAIN_UNLABELED)
    batches = ([("labeled", cfg.SOLVER.IMS_PER_BATCH_LABELED), ("unlabeled", cfg.SOLVER.IMS_PER_BATCH_UNLABELED)]
               if semi else [("labeled", cfg.SOLVER.IMS_PER_BATCH)])
    for name, total in batches:
        if total % world_size:
            raise ValueError(f"the global {name} batch {total} is not divisible by the {world_size} training "
                             "processes; change SOLVER.IMS_PER_BATCH* or the GPU count")
    rule = "=" * 78
    lines = [rule, f"TRAINING RECIPE on {world_size} process(es)",
             "  global batch: " + " + ".join(f"{total} {name}" for name, total in batches),
             "  per GPU: " + " + ".join(f"{total // world_size} {name}" for name, total in batches),
             f"  base LR: {cfg.SOLVER.BASE_LR:g}   max iterations: {cfg.SOLVER.MAX_ITER}"]
    if original is not None and (original.SOLVER.MAX_ITER != cfg.SOLVER.MAX_ITER
                                 or original.SOLVER.BASE_LR != cfg.SOLVER.BASE_LR):
        lines.append(f"  RESCALED by SOLVER.REFERENCE_WORLD_SIZE={original.SOLVER.REFERENCE_WORLD_SIZE}: the config "
                     f"asked for a global batch of "
                     f"{original.SOLVER.IMS_PER_BATCH_LABELED if semi else original.SOLVER.IMS_PER_BATCH}"
                     f" labeled, base LR {original.SOLVER.BASE_LR:g}, {original.SOLVER.MAX_ITER} iterations")
    else:
        lines.append("  the config's global batch, LR and iterations (SOLVER.REFERENCE_WORLD_SIZE 0: no rescaling)")
    lines.append(rule)
    return "\n".join(lines)


def log_batch_recipe(cfg: CfgNode, world_size: int, original: Optional[CfgNode] = None) -> None:
    """Log :func:`describe_batch_recipe` at the start of training (a warning when the recipe was rescaled)."""
    text = describe_batch_recipe(cfg, world_size, original)
    level = logging.WARNING if "RESCALED" in text else logging.INFO
    logging.getLogger("hvlformer").log(level, "\n%s", text)


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the block, then put torch's (CPU and current CUDA device), NumPy's and Python's global random generators
    back as they were before it.

    Why: creating a DataLoader iterator draws its base seed from torch's generator, so each evaluation during
    training (``TEST.EVAL_PERIOD``) would shift every later random draw of the training step in this process
    (the point sampling of the mask losses) and the trained weights would depend on how often a run is
    evaluated."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EvaluationWriter(hooks.PeriodicWriter):
    """detectron2's ``PeriodicWriter`` (every ``period`` steps and after the last one) that also writes after each
    step at which ``TEST.EVAL_PERIOD`` evaluated.

    Why: the event storage keeps one latest value per key, so an evaluation not written before the next one was
    lost from ``metrics.json`` and TensorBoard (with ``TEST.EVAL_PERIOD 10`` and the writers' 20 steps, every
    other evaluation)."""

    def __init__(self, writers: list, period: int, eval_period: int) -> None:
        super().__init__(writers, period=period)
        self._eval_period = eval_period

    def after_step(self) -> None:
        if self._eval_period > 0 and (self.trainer.iter + 1) % self._eval_period == 0:
            for writer in self._writers:
                writer.write()
        else:
            super().after_step()


class BestCheckpointer(hooks.BestCheckpointer):
    """detectron2's ``BestCheckpointer`` (after the evaluation hooks: ``model_best.pth`` whenever the metric
    improves) that survives a resume and names a wrong metric.

    - The best value and its step are also written to ``model_best.json`` beside the weights; a resumed run
      (``start_iter > 0``) reads them back, so its first evaluation does not replace a better ``model_best.pth``
      of the steps before the interruption. A run from step 0 starts afresh.
    - A metric the evaluation did not produce is an error listing the ones it did (detectron2 only warns, and
      the run would end without a best checkpoint). Checked on the main process only: in a distributed run the
      other processes' storages never hold the evaluation's results."""

    def __init__(self, eval_period: int, checkpointer, val_metric: str, mode: str = "max",
                 file_prefix: str = "model_best") -> None:
        super().__init__(eval_period, checkpointer, val_metric, mode=mode, file_prefix=file_prefix)
        self.record_path = os.path.join(checkpointer.save_dir, f"{file_prefix}.json")

    def before_train(self) -> None:
        if self.trainer.start_iter > 0 and os.path.isfile(self.record_path):
            with open(self.record_path) as f:
                record = json.load(f)
            if record.get("metric_name") == self._val_metric:
                self.best_metric, self.best_iter = record["metric"], record["iteration"]
                self._logger.info(f"Best {self._val_metric} so far: {self.best_metric:0.5f} @ {self.best_iter} steps")

    def _best_checking(self) -> None:
        if not comm.is_main_process():
            return  # the evaluation's results reach the main process's storage only; it alone saves
        latest = self.trainer.storage.latest()
        if self._val_metric not in latest:
            evaluated = sorted(k for k in latest if "/" in k)  # evaluation results are "task/metric"
            raise ValueError(f"TEST.BEST_CHECKPOINT.METRIC={self._val_metric!r} is not an evaluation result of this "
                             f"run; it has: {', '.join(evaluated) or 'none'}")
        super()._best_checking()

    def _update_best(self, val: float, iteration: int) -> bool:
        if not super()._update_best(val, iteration):
            return False
        # only reached on the main process (see _best_checking), where the checkpointer saves too
        with open(self.record_path, "w") as f:
            json.dump({"metric_name": self._val_metric, "metric": float(val), "iteration": int(iteration)}, f)
        return True


def amp_of(cfg: CfgNode) -> Optional[torch.dtype]:
    """The autocast dtype of ``SOLVER.AMP`` (``None``: full precision)."""
    return amp_dtype(cfg.SOLVER.AMP.DTYPE) if cfg.SOLVER.AMP.ENABLED else None


class Trainer(DefaultTrainer):
    """Supervised training on labeled images (``DATASETS.TRAIN``), evaluation on ``DATASETS.TEST``."""

    def __init__(self, cfg: CfgNode) -> None:  # noqa: D107 - DefaultTrainer's steps with our own parts
        super(DefaultTrainer, self).__init__()  # TrainerBase: DefaultTrainer.__init__ would build its own step
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        original = cfg
        cfg = self.training_config(cfg, comm.get_world_size())
        check_datasets(cfg, training=True)  # datasets first (cheap), then the model (may download CLIP)
        log_batch_recipe(cfg, comm.get_world_size(), original)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self.teacher = self.build_teacher(cfg, model)
        self._trainer = self.build_train_step(cfg, wrap_ddp(cfg, model), optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        extra = {"teacher": self.teacher} if self.teacher is not None else {}
        self.checkpointer = HVLFormerCheckpointer(self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                                  **extra)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> List[hooks.HookBase]:
        """DefaultTrainer's hooks, with its writer replaced by :class:`EvaluationWriter` (every evaluation
        reaches ``metrics.json``), and :class:`BestCheckpointer` with ``TEST.BEST_CHECKPOINT.METRIC``."""
        hook_list = [EvaluationWriter(h._writers, h._period, self.cfg.TEST.EVAL_PERIOD)
                     if type(h) is hooks.PeriodicWriter else h for h in super().build_hooks()]
        best = self.cfg.TEST.BEST_CHECKPOINT
        if best.METRIC:
            # after the evaluation hooks, before the writer (the last hook); more evaluation hooks (the EMA
            # teacher's) go in before it
            hook_list.insert(len(hook_list) - 1, BestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer,
                                                                  best.METRIC, mode=best.MODE))
        return hook_list

    @classmethod
    def training_config(cls, cfg: CfgNode, world_size: int) -> CfgNode:
        """The config training runs with: detectron2's ``SOLVER.REFERENCE_WORLD_SIZE`` rescaling."""
        return DefaultTrainer.auto_scale_workers(cfg, world_size)

    @classmethod
    def build_teacher(cls, cfg: CfgNode, model) -> Optional[EMATeacher]:
        """The teacher that supplies unlabeled targets (none in supervised training)."""
        return None

    def build_train_step(self, cfg: CfgNode, model, optimizer) -> TrainStep:
        """The training step over ``model`` (already DDP-wrapped) with the training data loader."""
        return TrainStep(model, self.build_train_loader(cfg), optimizer, amp=amp_of(cfg))

    @classmethod
    def register_datasets(cls, cfg: CfgNode) -> None:
        """Register the datasets whose definition depends on the config (shapes size, splits)."""
        register_datasets_from_cfg(cfg)
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
    def test(cls, cfg: CfgNode, model, evaluators=None):
        """DefaultTrainer's evaluation on ``DATASETS.TEST``, leaving the global random generators as they were
        (:func:`preserved_rng_state`): a run's weights do not depend on ``TEST.EVAL_PERIOD``."""
        with preserved_rng_state():
            return super().test(cfg, model, evaluators)

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
