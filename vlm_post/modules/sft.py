"""SFTModule: supervised fine-tuning, the classic stage-1 warm start.

Algorithm: for each (image, question, target) the policy reads the chat-templated
prompt plus the target and minimises the token-mean cross-entropy of the target
tokens only; prompt, image and padding positions carry label -100. Targets come
from a data column (teacher solutions) or the answer wrapped in a template.
Validation samples answers and grades them, so checkpoint selection and early
stopping can watch accuracy, e.g. ``val/geo3k_val/accuracy``: an early-stopped
SFT warm start generalises out of domain better than an over-trained one.

Launch:
    vlm_post fit --config configs/demo/sft.yaml
    vlm_post fit --config configs/geo3k/sft_qwen2_5_vl_7b.yaml
The best weights are exported in HF format to ``<trainer.default_root_dir>/export``.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from vlm_post.losses import sft_cross_entropy
from vlm_post.losses.sft import IGNORE_INDEX
from vlm_post.modules.base import PolicyModule


class SFTModule(PolicyModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_losses = torch.nn.ModuleDict()
        self._nonfinite_loss = False  # since the last optimizer step (a NaN in any accumulated batch spoils it)

    def batch_parts(self, split: str) -> set[str]:
        return {"sft"} if split == "train" else {"prompt", "sft"}

    def sft_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        hidden = self.hidden_states(batch)
        return sft_cross_entropy(hidden, self.head_weight, batch["labels"], self.logprob_chunk_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss, tokens = self.sft_loss(batch["sft"])
        size = batch["sft"]["input_ids"].shape[0]
        share = self.token_share(tokens)  # 1 in one process; across ranks, the global token mean
        if not self._all_ranks_agree(bool(torch.isfinite(loss))):
            # None skips this backward on every rank; on_before_optimizer_step then drops the step's gradients.
            self._nonfinite_loss = True
            return None
        # The logged loss is the global batch's token mean (sync_dist averages the ranks' weighted shares).
        self.log("train/loss", loss.detach() * share, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/target_tokens", float(tokens), batch_size=size, reduce_fx="sum", sync_dist=True)
        return loss * share

    def on_before_optimizer_step(self, optimizer) -> None:
        finite = not self._nonfinite_loss and self.gradients_finite()
        self._nonfinite_loss = False
        self.record_step(finite)
        if not finite:
            # No gradients, no update (AdamW leaves parameters without one alone), but Lightning still counts the
            # step and advances the schedule: a run of NaN steps ends at max_steps or max_consecutive_skips.
            optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.check_weights_finite()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.evaluate(batch, "val")
        # The token mean over the whole validation set, whatever the batches and ranks: a token-weighted mean
        # metric (synced across ranks), with the evaluation sampler's fillers left out.
        sft = batch["sft"]
        real = torch.tensor([not e.is_padding for e in batch["examples"]], device=sft["labels"].device)
        loss, tokens = self.sft_loss({**sft, "labels": sft["labels"].masked_fill(~real[:, None], IGNORE_INDEX)})
        key = f"val__{name}__loss"
        if key not in self.val_losses:
            self.val_losses[key] = MeanMetric().to(self.device)
        if tokens:
            self.val_losses[key].update(loss.detach(), tokens)
        self.log(f"val/{name}/loss", self.val_losses[key], add_dataloader_idx=False)
