"""The training steps: one supervised step with device-agnostic mixed precision (detectron2's AMPTrainer
requires CUDA), and the semi-supervised step as its subclass (paper Sec. 4.1).

:class:`TrainStep` is detectron2's ``SimpleTrainer`` step split into overridable parts: :meth:`~TrainStep.next_batch`,
:meth:`~TrainStep.forward` (run under ``torch.autocast`` when ``amp`` is a dtype), :meth:`~TrainStep.loss_terms`
(model outputs -> losses and ``stat_*`` statistics) and :meth:`~TrainStep.after_optimizer_step`. The backward,
gradient scaling, metric writing and optimizer step are written once, in :meth:`~TrainStep.run_step`.
:class:`SemiSupervisedStep` overrides only what differs: a labeled plus an unlabeled batch, the CutMix-ed
unlabeled views and the teacher's targets, the ramp-up of the unlabeled losses and the EMA update.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..cutmix import apply_cutmix
from ..modeling.unlabeled_objective import teacher_targets
from .ema import EMATeacher, unwrap

__all__ = ["AMP_DTYPES", "amp_dtype", "TrainStep", "SemiSupervisedStep", "UNLABELED_LOSSES"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Losses of the unlabeled batch, scaled by the ramp-up factor of :meth:`SemiSupervisedStep.unlabeled_ramp`.
UNLABELED_LOSSES = ("loss_cmcr_mask", "loss_cmcr_class", "loss_cmcr_align", "loss_entropy", "loss_clip_guidance")


def amp_dtype(name: str) -> torch.dtype:
    """``SOLVER.AMP.DTYPE`` as a torch dtype."""
    if name not in AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE must be one of {sorted(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[name]


class TrainStep(SimpleTrainer):
    """One optimisation step: ``SimpleTrainer`` with an optional ``torch.autocast`` forward on the model's
    device type and the ``grad_scaler`` checkpointed with the trainer state.

    ``amp=None``: full precision (the scaler is disabled, so the step is exactly ``SimpleTrainer``'s);
    bfloat16 needs no loss scaling; float16 uses a ``torch.amp.GradScaler`` (enabled on CUDA only).
    """

    def __init__(self, model, data_loader, optimizer, amp: Optional[torch.dtype] = None, **kwargs: Any) -> None:
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.amp = amp
        self.device_type = next(unwrap(model).parameters()).device.type
        self.grad_scaler = torch.amp.GradScaler(self.device_type,
                                                enabled=amp == torch.float16 and self.device_type == "cuda")

    # ------------------------------------------------------------------ the parts subclasses override
    def next_batch(self) -> Any:
        """The data of one step (here: the next batch of the data loader)."""
        return next(self._data_loader_iter)

    def forward(self, data: Any) -> Dict[str, Tensor]:
        """The model's outputs on ``data`` (under autocast when enabled)."""
        outputs = self.model(data)
        return {"total_loss": outputs} if isinstance(outputs, Tensor) else outputs

    def loss_terms(self, outputs: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """``(losses, statistics)``: the ``stat_*`` outputs are logged (without the prefix), not optimised."""
        losses = {k: v for k, v in outputs.items() if not k.startswith("stat_")}
        stats = {k[len("stat_"):]: v for k, v in outputs.items() if k.startswith("stat_")}
        return losses, stats

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (nothing here)."""

    # ------------------------------------------------------------------ the step
    def run_step(self) -> None:
        assert self.model.training, f"[{type(self).__name__}] model was changed to eval mode!"
        start = time.perf_counter()
        data = self.next_batch()
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            outputs = self.forward(data)
        loss_dict, stats = self.loss_terms(outputs)
        losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        if stats and comm.is_main_process():
            get_event_storage().put_scalars(**{k: float(v) for k, v in stats.items()})
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.after_optimizer_step()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("grad_scaler"):  # empty when saved by a disabled scaler (full precision, bf16)
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class SemiSupervisedStep(TrainStep):
    """Labeled losses + unlabeled losses in one forward of the (DDP) model.

    Each step takes a labeled batch (``data_loader``) and an unlabeled three-view batch
    (``unlabeled_loader``, :class:`~hvlformer.data.UnlabeledViewsMapper`), CutMixes the strong views, and
    gets the CMCR targets of the original views from ``teacher`` (an :class:`EMATeacher`) or, without one,
    from the model itself inside its forward. The unlabeled losses are scaled by :meth:`unlabeled_ramp`;
    the teacher is updated after every optimizer step.
    """

    def __init__(self, model, labeled_loader, unlabeled_loader, optimizer, teacher: Optional[EMATeacher] = None,
                 amp: Optional[torch.dtype] = None, rampup_iters: int = 0, start_iter: int = 0,
                 guidance_weights: Tuple[float, float] = (0.0, 0.0), max_iter: int = 1) -> None:
        """``guidance_weights``: the CLIP guidance's weight at step 0 and at ``max_iter`` (linear in between,
        :meth:`guidance_weight`; ``SEMI.CLIP_GUIDANCE_WEIGHT`` / ``_FINAL_WEIGHT``, ``SOLVER.MAX_ITER``)."""
        super().__init__(model, labeled_loader, optimizer, amp=amp)
        if rampup_iters < 0 or start_iter < 0:
            raise ValueError(f"SEMI.UNLABELED_RAMPUP_ITERS and SEMI.UNLABELED_START_ITER must be >= 0, "
                             f"got {rampup_iters} and {start_iter}")
        if min(guidance_weights) < 0 or max_iter < 1:
            raise ValueError(f"SEMI.CLIP_GUIDANCE_WEIGHT / _FINAL_WEIGHT must be >= 0 and SOLVER.MAX_ITER >= 1, "
                             f"got {guidance_weights} and {max_iter}")
        self.rampup_iters = rampup_iters
        self.start_iter = start_iter
        self.guidance_weights = tuple(guidance_weights)
        self.max_iter_of_schedule = max_iter
        self.unlabeled_loader = unlabeled_loader
        self._unlabeled_iter = iter(unlabeled_loader)
        self.teacher = teacher

    def unlabeled_ramp(self, iteration: int) -> float:
        """Factor of the unlabeled losses: 0 before ``start_iter`` (the supervised burn-in), then
        ``min(1, (iteration - start_iter) / rampup_iters)`` (1 without a ramp-up)."""
        if iteration < self.start_iter:
            return 0.0
        if self.rampup_iters <= 0:
            return 1.0
        return min(1.0, (iteration - self.start_iter) / self.rampup_iters)

    def guidance_weight(self, iteration: int) -> float:
        """Weight of ``loss_clip_guidance`` at ``iteration``: linear from ``guidance_weights[0]`` at step 0 to
        ``guidance_weights[1]`` at ``max_iter`` (SemiVL's decay), on top of :meth:`unlabeled_ramp`."""
        start, end = self.guidance_weights
        progress = min(1.0, max(0.0, iteration / self.max_iter_of_schedule))
        return start + (end - start) * progress

    @torch.no_grad()
    def unlabeled_batch(self, unlabeled: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Stack the views, CutMix the strong one, and compute the teacher's targets on the original view."""
        core = unwrap(self.model)
        original = torch.stack([d["image"] for d in unlabeled]).to(core.device)
        boxes = torch.stack([d["cutmix_box"] for d in unlabeled]).to(core.device)
        strong, order = apply_cutmix(torch.stack([d["image_strong"] for d in unlabeled]).to(core.device), boxes)
        batch = {
            "image_original": original,
            "image_weak": torch.stack([d["image_weak"] for d in unlabeled]),
            "image_strong": strong,
            "padding": torch.stack([d["padding"] for d in unlabeled]),
            "cutmix_box": boxes,
            "mix_order": order,
        }
        if "oracle_sem_seg" in unlabeled[0]:  # SEMI.ORACLE_LABELS: the hidden labels, CutMix-ed in the losses
            batch["oracle_sem_seg"] = torch.stack([d["oracle_sem_seg"] for d in unlabeled]).to(core.device)
        # self teacher: the model computes the targets from image_original inside its forward, reusing that
        # step's text embeddings (one text-tower pass per step instead of two)
        if self.teacher is not None:
            teacher = self.teacher.model
            batch["targets"] = teacher_targets(teacher, original, teacher.encode_text(), core.unlabeled_criterion,
                                               batch["padding"])
        return batch

    def next_batch(self) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """``(labeled batch, unlabeled batch)``."""
        return next(self._data_loader_iter), next(self._unlabeled_iter)

    def forward(self, data: Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]) -> Dict[str, Tensor]:
        labeled, unlabeled = data
        # during the burn-in and the ramp-up's first step the unlabeled views are not even prepared
        batch = self.unlabeled_batch(unlabeled) if self.unlabeled_ramp(self.iter) > 0 else None
        return self.model(labeled, unlabeled=batch)

    def loss_terms(self, outputs: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        losses, stats = super().loss_terms(outputs)
        ramp = self.unlabeled_ramp(self.iter)
        weights = {k: ramp for k in UNLABELED_LOSSES}
        weights["loss_clip_guidance"] = ramp * self.guidance_weight(self.iter)
        return {k: v * weights.get(k, 1.0) for k, v in losses.items()}, stats

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            self.teacher.update(self.model, self.iter)
