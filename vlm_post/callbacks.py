"""Callbacks that every stage gets from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from vlm_post.errors import RunStopped
from vlm_post.models.export import export_hf
from vlm_post.models.init_from import load_policy_state, policy_state_from_checkpoint
from vlm_post.models.sharding import full_state_dict, is_sharded


class HFExport(Callback):
    """At the end of fit, export the best (or last) weights in HF format: model + processor.

    Args:
        dirpath: where the export lands; default ``<trainer.default_root_dir>/export``.
        weights: ``best`` takes the ModelCheckpoint's best checkpoint (its monitored metric),
            falling back to the final weights when no checkpoint was monitored; ``last`` takes
            the final weights.
        enabled: turn the export off.

    With ``best``, the module's policy is left holding the best weights, as
    ``trainer.test(ckpt_path="best")`` would. ``dirpath`` becomes a symlink to a version folder beside it,
    replaced atomically, with a sha256 manifest (``vlm_post.models.export``). Weights with a NaN or inf are not
    exported: the fit stops with ``RunStopped`` and the previous export stays as it was.
    """

    def __init__(
        self, dirpath: str | None = None, weights: Literal["best", "last"] = "best", enabled: bool = True
    ) -> None:
        self.dirpath = dirpath
        self.weights = weights
        self.enabled = enabled

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        source = "final weights"
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        fsdp1 = isinstance(trainer.strategy, FSDPStrategy)  # wraps the LightningModule itself, not the policy
        sharded = is_sharded(pl_module.policy)  # FSDP2
        if self.weights == "best" and best and (fsdp1 or (sharded and Path(best).is_dir())):
            # FSDP1 (a full-state file or a sharded folder) and FSDP2 (a sharded folder): every rank loads in place.
            trainer.strategy.load_checkpoint(best)
            source = best
        elif self.weights == "best" and best and Path(best).is_file():
            load_policy_state(pl_module.policy, policy_state_from_checkpoint(best), best)
            source = best
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "export")
        state_dict = None
        if fsdp1:  # gather from the wrapped root, keep the policy's weights
            state_dict = full_state_dict(trainer.strategy.model)
            state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        elif sharded:
            state_dict = full_state_dict(pl_module.policy)  # every rank takes part in the gather
        refusal = None
        if trainer.is_global_zero:
            provenance = {
                "weights": source,
                "global_step": trainer.global_step,
                "monitor": getattr(checkpoint, "monitor", None),
                "best_score": float(checkpoint.best_model_score)
                if getattr(checkpoint, "best_model_score", None) is not None
                else None,
            }
            try:
                export_hf(pl_module.policy, pl_module.processor, out, state_dict, provenance)
                rank_zero_info(f"exported {source} in HF format to {out}")
            except RunStopped as error:  # non-finite weights: nothing written, the previous export kept
                refusal = str(error)
        # Every rank stops together: a rank that went on alone would wait for the others forever.
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal:
            raise RunStopped(refusal)
