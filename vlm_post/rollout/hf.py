"""Rollouts with Hugging Face ``generate``, on the policy's current weights (nothing to sync)."""

from __future__ import annotations

import torch

from vlm_post.rollout.base import RolloutEngine, Rollouts, SamplingParams

# Tokens that only the processor may place. A sampled one makes the next forward
# fail ("Image features and image tokens do not match"), so they are never sampled.
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


class HFGenerateEngine(RolloutEngine):
    def __init__(self, processor) -> None:
        self.processor = processor
        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        self.banned = [vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = self._stop_ids(tokenizer)

    @staticmethod
    def _stop_ids(tokenizer) -> list[int]:
        ids = {tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = tokenizer.get_vocab().get(token)
            if token_id is not None:
                ids.add(token_id)
        return sorted(i for i in ids if i is not None)

    @torch.no_grad()
    def generate(self, policy: torch.nn.Module, prompt: dict, params: SamplingParams) -> Rollouts:
        was_training = policy.training
        policy.eval()
        try:
            sampling = (
                {"do_sample": False}
                if params.greedy
                else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or None}
            )
            output = policy.generate(
                **prompt,
                **sampling,
                max_new_tokens=params.max_new_tokens,
                num_return_sequences=1 if params.greedy else params.n,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_token_id,
                suppress_tokens=self.banned or None,
            )
        finally:
            policy.train(was_training)
        response = output[:, prompt["input_ids"].shape[1] :]
        if params.greedy and params.n > 1:  # n greedy samples are one sample n times
            response = response.repeat_interleave(params.n, dim=0)
        is_stop = torch.isin(response, torch.tensor(self.stop_ids, device=response.device))
        # A response ends at its first stop token, which is kept; everything after is padding.
        after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0
        mask = ~after_stop
        finished = is_stop.any(-1)
        texts = self.processor.batch_decode(response.masked_fill(~mask, self.pad_token_id), skip_special_tokens=True)
        batch = prompt["input_ids"].shape[0]
        prompt_index = torch.arange(batch, device=response.device).repeat_interleave(params.n)
        return Rollouts(prompt_index, response, mask.long(), finished, texts)
