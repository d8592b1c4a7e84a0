"""Mixed precision: autocast for the forward pass and the loss, and fp16's gradient scaler.

``optim.precision``:

- ``fp32``: nothing changes.
- ``bf16``: forward and loss under ``torch.autocast(dtype=bfloat16)`` on the run's device (CPU
  or GPU). bf16 has fp32's exponent range, so gradients need no scaling.
- ``fp16``: autocast to float16 and a ``GradScaler`` (CUDA only; the config refuses fp16 without
  a GPU). The loss is scaled before backward; after the gradients are averaged across ranks
  (Horovod's ``synchronize()``, DDP's backward) they are unscaled and clipped, and the scaler
  steps, or skips the step when the scaled gradient overflowed. The averaged gradient is the
  same on every rank, so every rank skips the same steps and the scalers stay equal. The
  scaler's state is part of the checkpoint.

Every training rank builds the same :class:`Precision` from the same config.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """What ``optim.precision`` means for one rank's step on ``device``."""

    def __init__(self, name: str = "fp32", device: torch.device = torch.device("cpu")) -> None:
        if name == "fp16" and device.type != "cuda":  # the config refuses it first; a guard
            raise ValueError("fp16 needs a CUDA device")
        self.name, self.device = name, device
        self.scaler: Optional[Any] = None
        if name == "fp16":  # CUDA only: not exercised here (no GPU)
            self.scaler = torch.amp.GradScaler("cuda")
        self.overflow_steps = 0  # fp16 steps the scaler skipped

    def autocast(self):
        """Context for the forward pass and the loss."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the (averaged) gradients by the scale, before clipping or checking them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, finite: bool) -> None:
        """Apply the update (fp16: unless the scaled gradient overflowed; then skip it and lower
        the scale). ``finite``: whether the unscaled gradient is finite, the same on every rank."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skips when unscale_ found inf/NaN
        self.scaler.update()
        if not finite:
            self.overflow_steps += 1
            optimizer.zero_grad()

    @property
    def handles_overflow(self) -> bool:
        """An infinite gradient is the scaler's business (skip and rescale), not an error."""
        return self.scaler is not None

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
