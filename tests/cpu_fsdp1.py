"""Lightning's FSDPStrategy (FSDP1) on CPU processes, for tests only.

Lightning refuses ``FSDPStrategy`` on the CPU by its exact type, and FSDP1 asks for an accelerator unless it is
given a CPU ``device_id``, which Lightning never passes. FSDP1 itself runs on gloo: this subclass passes the
CPU device, so that the GPU recipes' FSDP1 path (auto-wrap, full-state checkpoints, clipping, export) runs here.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed import fsdp


class _FSDPOnCPU(fsdp.FullyShardedDataParallel):
    def __init__(self, *args, device_id=None, **kwargs) -> None:
        super().__init__(*args, device_id=torch.device("cpu"), **kwargs)


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapper, fsdp.FullyShardedDataParallel = fsdp.FullyShardedDataParallel, _FSDPOnCPU
        try:  # Lightning imports the class from torch.distributed.fsdp when it wraps
            return super()._setup_model(model)
        finally:
            fsdp.FullyShardedDataParallel = wrapper
