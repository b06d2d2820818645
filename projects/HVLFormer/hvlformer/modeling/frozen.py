"""A frozen module held inside the model but outside its checkpoints and its optimizer.

The frozen reference encoder E_I^0 (paper Sec. 3.1, L^V) is a copy of the pretrained CLIP vision tower. It must
move with the model (``.to()``, ``.half()``, ``to_empty``), be copied with it (``copy.deepcopy``, the EMA
teacher) and stay frozen, yet it is not a trained weight: it is rebuilt from ``CLIP.PRETRAINED`` on every run,
so it does not belong in ``state_dict()`` (a checkpoint would double the encoder's size) nor in the
optimizer.

Decisions:

- :class:`FrozenModule` is a registered submodule (in ``_modules``), so ``.to()`` / ``_apply``, ``to_empty``,
  ``deepcopy`` and ``children()`` reach it like any other.
- Its contents are hidden from ``named_modules()`` and so from ``parameters()``, ``buffers()``,
  ``requires_grad_()``, the optimizer's parameter groups, DDP's parameter broadcast and gradient buckets, and
  the EMA teacher's averaging: only the wrapper itself is listed. ``requires_grad`` is off as well.
- ``state_dict()`` leaves it out; ``load_state_dict`` keeps its current weights and reports none of them as
  missing (they are filled in with themselves before the children load), so strict loading of a checkpoint
  works with and without a reference.
- ``train()`` never switches it to training mode.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterator, Optional, Set, Tuple

from torch import nn

__all__ = ["FrozenModule"]


class FrozenModule(nn.Module):
    """Holds ``module`` frozen (``requires_grad`` off, eval mode), excluded from ``state_dict()``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def named_modules(self, memo: Optional[Set[nn.Module]] = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Module]]:
        """Only the wrapper: the frozen module's own modules, parameters and buffers are not the model's."""
        if memo is None:
            memo = set()
        if self not in memo or not remove_duplicate:
            if remove_duplicate:
                memo.add(self)
            yield prefix, self

    def train(self, mode: bool = True) -> "FrozenModule":
        # a frozen reference is always in eval mode
        self.training = False
        self.module.train(False)
        return self

    def state_dict(self, *args: Any, destination: Dict = None, prefix: str = "", keep_vars: bool = False) -> Dict:
        """Nothing: the frozen module is not part of the checkpoint."""
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # type: ignore[attr-defined]
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Checkpoints never hold it: give the children their own current tensors to "load", so that no key is
        # reported missing and the weights stay as they are.
        for name, tensor in self.module.state_dict(prefix=prefix + "module.", keep_vars=True).items():
            state_dict.setdefault(name, tensor.detach())
