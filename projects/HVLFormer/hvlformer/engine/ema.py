"""Exponential-moving-average teacher (UniMatch V2): ``teacher = d_t * teacher + (1 - d_t) * student`` with
``d_t = min(d, 1 - 1 / (t + 1))`` at iteration ``t`` (UniMatch V2's warm-up: the teacher is the plain
average of the student's weights so far until ``1 - 1 / (t + 1)`` reaches ``d``, so a randomly
initialised start does not linger in it for hundreds of iterations)."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper."""
    return model.module if isinstance(model, (DistributedDataParallel, nn.DataParallel)) else model


class EMATeacher:
    """A frozen copy of the student updated by EMA over its parameters and floating-point buffers
    (integer buffers are copied). Checkpointable: ``state_dict`` / ``load_state_dict`` are the copy's."""

    def __init__(self, student: nn.Module, decay: float = 0.996) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"SEMI.EMA_DECAY must be in [0, 1], got {decay}")
        student = unwrap(student)
        self.decay = decay
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        backbone = getattr(self.model, "backbone", None)
        if backbone is not None and hasattr(backbone, "drop_reference"):
            if getattr(self.model, "clip_ensemble", None) is not None:
                # its evaluation runs E_I^0 (TEST.CLIP_ENSEMBLE): share the student's frozen tower, not a copy
                backbone.reference = student.backbone.reference
            else:
                backbone.drop_reference()  # the teacher never needs the frozen E_I^0 copy
        self.loaded_from_checkpoint = False

    def decay_at(self, iteration: Optional[int]) -> float:
        """``min(d, 1 - 1 / (iteration + 1))``; ``d`` when ``iteration`` is None."""
        if iteration is None:
            return self.decay
        return min(self.decay, 1.0 - 1.0 / (iteration + 1))

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: Optional[int] = None) -> None:
        """One EMA step after the optimizer step of ``iteration`` (0-based; None = the constant decay)."""
        student = unwrap(student)
        decay = self.decay_at(iteration)
        student_params = dict(student.named_parameters())
        for name, teacher_param in self.model.named_parameters():
            student_param = student_params[name]
            if student_param.requires_grad:  # frozen parameters never change
                teacher_param.mul_(decay).add_(student_param.detach(), alpha=1.0 - decay)
        # by name: lazily created buffers (e.g. cached text embeddings) may exist in one model only
        student_buffers = dict(student.named_buffers())
        for name, teacher_buffer in self.model.named_buffers():
            student_buffer = student_buffers.get(name)
            if student_buffer is None or student_buffer.shape != teacher_buffer.shape:
                continue
            if teacher_buffer.dtype.is_floating_point:
                # buffers may hold +-inf (attention masks): where both agree keep the value, as
                # 0 * inf (decay 0 at iteration 0) or inf - inf would turn it into NaN
                averaged = teacher_buffer * decay + student_buffer.detach() * (1.0 - decay)
                teacher_buffer.copy_(torch.where(teacher_buffer == student_buffer, student_buffer, averaged))
            else:
                teacher_buffer.copy_(student_buffer)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Reset the teacher to the student's current weights."""
        self.model.load_state_dict(unwrap(student).state_dict())

    def state_dict(self) -> Dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)
        self.loaded_from_checkpoint = True
