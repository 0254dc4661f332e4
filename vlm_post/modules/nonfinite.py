"""One policy for NaN and inf, in every stage.

- An optimizer step whose loss or gradient is non-finite (on any rank) is skipped: its gradients
  are dropped, so the weights and the optimizer's moments stay as they were. The step still
  counts: ``global_step`` and the learning-rate schedule advance, so ``max_steps`` ends the run.
- Skips are counted (``train/skipped_steps``) and said on the log. ``max_consecutive_skips`` in
  a row stop the run with one line and exit status 1 (1: stop at the first).
- Weights that turn non-finite after a step (a finite but huge update) stop the run at once:
  there is nothing left to skip.
- No checkpoint is written with a non-finite tensor (``refuse_nonfinite``, called on every
  save); the previous checkpoint stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from vlm_post.errors import RunStopped
from vlm_post.models.sharding import local_tensor

# Not `--ckpt_path`: a resume restores the optimizer's learning rate along with its state.
ADVICE = (
    "lower model.init_args.optim.lr (or clip gradients harder) and start again, or go on from a checkpoint's "
    "weights with --model.init_args.init_from <checkpoint>"
)


@dataclass
class SkippedSteps:
    """How many optimizer steps were skipped for a non-finite loss or gradient, in all and in a row."""

    max_consecutive: int
    total: int = 0
    consecutive: int = 0

    def record(self, finite: bool, step: int, kept: str) -> None:
        """Count one optimizer step; raise ``RunStopped`` at ``max_consecutive`` skips in a row."""
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise RunStopped(
                f"stopped at step {step}: {self.consecutive} optimizer step(s) in a row had a non-finite loss or "
                f"gradient (model.init_args.max_consecutive_skips: {self.max_consecutive}); the weights were not "
                f"updated by them; {kept}; {ADVICE}"
            )
        rank_zero_info(  # one line on the log, next to the step's other lines
            f"vlm_post: step {step} skipped: non-finite loss or gradient ({self.consecutive} in a row, "
            f"{self.total} in all; the run stops at {self.max_consecutive} in a row)"
        )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


def count_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int, str | None]:
    """(non-finite tensors, tensors, the first non-finite one's name) over this rank's (local) tensors."""
    named = [(name, pieces) for name, tensor in tensors if (pieces := _local_pieces(tensor))]
    # Every optimizer step checks every gradient and weight: one host sync per device, not one per tensor.
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for _, pieces in named:
        for piece in pieces:
            flags.setdefault(piece.device, []).append(torch.isfinite(piece).all())
    if all(bool(torch.stack(device_flags).all()) for device_flags in flags.values()):
        return 0, len(named), None
    bad = [name for name, pieces in named if not all(bool(torch.isfinite(piece).all()) for piece in pieces)]
    return len(bad), len(named), bad[0]


def _local_pieces(tensor: torch.Tensor) -> list[torch.Tensor]:
    """This rank's floating-point data of ``tensor``: a DTensor's (FSDP2) or ShardedTensor's (FSDP1) local shards."""
    if hasattr(tensor, "local_shards"):  # FSDP1's sharded state dict
        pieces = [shard.tensor for shard in tensor.local_shards()]
    else:
        pieces = [local_tensor(tensor)]
    return [piece for piece in pieces if piece.is_floating_point() and piece.numel()]


def checkpoint_tensors(checkpoint: Mapping) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor a checkpoint holds (weights, optimizer moments, ...), named by its path in the dict."""
    stack = [("", checkpoint)]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, Mapping):
            stack.extend((f"{prefix}.{key}" if prefix else str(key), item) for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{prefix}[{i}]", item) for i, item in enumerate(value))


def refuse_nonfinite(checkpoint: Mapping, step: int, kept: str) -> None:
    """Raise ``RunStopped`` rather than save weights or optimizer state with a NaN or inf (this rank's tensors).

    Only those: callbacks keep infinities on purpose (ModelCheckpoint's worst score starts at inf).
    """
    model_and_optimizer = {key: checkpoint.get(key) for key in ("state_dict", "optimizer_states")}
    bad, total, first = count_nonfinite(checkpoint_tensors(model_and_optimizer))
    if bad:
        raise RunStopped(
            f"refusing to save the checkpoint of step {step}: {bad} of {total} tensors are non-finite "
            f"(first: {first}); {kept}; {ADVICE}"
        )


class NonFiniteGuard:
    """The policy above as methods of a LightningModule with a ``policy`` and ``skips`` (``SkippedSteps``)."""

    policy: torch.nn.Module
    skips: SkippedSteps

    @property
    def skipped_steps(self) -> int:
        return self.skips.total

    def record_step(self, finite: bool) -> None:
        """Count the optimizer step about to be taken (skipped unless ``finite``); may stop the run."""
        self.skips.record(finite, self.global_step + 1, self._kept())
        if self._trainer is not None:
            self.log("train/skipped_steps", float(self.skips.total), batch_size=1)

    def gradients_finite(self) -> bool:
        """Whether every gradient is finite, on every rank (a rank that skips alone would desynchronise FSDP)."""
        grads = (("", p.grad) for p in self.policy.parameters() if p.grad is not None)
        return self._all_ranks_agree(count_nonfinite(grads)[0] == 0)

    def check_weights_finite(self) -> None:
        """After an optimizer step: stop at once if a weight turned NaN/inf (a finite but too large update)."""
        bad, total, first = count_nonfinite(self.policy.named_parameters())
        if not self._all_ranks_agree(bad == 0):
            raise RunStopped(
                f"stopped at step {self.global_step}: the update made {bad} of {total} weight tensors non-finite "
                f"(first: {first or 'on another rank'}); nothing was saved from them; {self._kept()}; {ADVICE}"
            )

    def _refuse_nonfinite_checkpoint(self, checkpoint: dict) -> None:
        try:
            refuse_nonfinite(checkpoint, self.global_step, self._kept())
            finite = True
        except RunStopped as error:
            finite, refusal = False, error
        if not self._all_ranks_agree(finite):  # every rank refuses together: no rank waits in the save alone
            raise (
                refusal
                if not finite
                else RunStopped(
                    f"refusing to save the checkpoint of step {self.global_step}: another rank holds a non-finite "
                    f"tensor; {self._kept()}; {ADVICE}"
                )
            )

    def _all_ranks_agree(self, ok: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(ok, all=True)) if self._trainer else ok

    def _kept(self) -> str:
        """What a stopped run leaves to resume from, for its message."""
        # Not the callback's last/best_model_path: it names a file before the file is written.
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else None
        saved = sorted(p.name for p in folder.glob("*.ckpt")) if folder is not None and folder.is_dir() else []
        if not saved:
            return "no checkpoint had been written yet"
        names = ", ".join(saved[:3]) + (f" and {len(saved) - 3} more" if len(saved) > 3 else "")
        return f"the checkpoints already in {folder} ({names}) are as they were"
