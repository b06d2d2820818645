"""A device-agnostic mixed-precision training step (detectron2's AMPTrainer requires CUDA)."""
from __future__ import annotations

import time

import torch
from detectron2.engine import SimpleTrainer

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(name: str) -> torch.dtype:
    if name not in AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE must be one of {sorted(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[name]


class GradScalerStateMixin:
    """Checkpoints the ``grad_scaler`` of a training step together with detectron2's trainer state."""

    grad_scaler: torch.amp.GradScaler

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class AutocastTrainer(GradScalerStateMixin, SimpleTrainer):
    """``SimpleTrainer`` whose forward runs under ``torch.autocast`` on the model's device type.

    bfloat16 needs no loss scaling; float16 uses a ``torch.amp.GradScaler`` (enabled on CUDA only).
    """

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.dtype = dtype
        self.device_type = next(model.parameters()).device.type
        use_scaler = dtype == torch.float16 and self.device_type == "cuda"
        self.grad_scaler = torch.amp.GradScaler(self.device_type, enabled=use_scaler)

    def run_step(self) -> None:
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = loss_dict if isinstance(loss_dict, torch.Tensor) else sum(loss_dict.values())
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

