"""How long a prompt may be (``data.max_prompt_length``), checked once per row when the data is set up.

A row over the limit is a bad row: reported with its id, its length and the limit, skipped and counted (EasyR1's
``max_prompt_length`` with ``filter_overlong_prompts``). Two checks, the cheap one first:

1. Characters, before any tokenizer runs. The question (with its choices, as the adapter wrote it) may hold at most
   ``CHARS_PER_TOKEN * max_prompt_length`` characters, so a 10 MB question is never tokenized (tokenizing one, and
   the batch after it, exhausted a 24 GiB machine). 16 characters per token is several times what tokenizers
   average on text (about 3 to 5 for Qwen's on English and LaTeX), so this bound only rejects rows that could not
   fit anyway; the token check decides the others.
2. Tokens: the prompt as the model receives it, i.e. the chat template (a system turn if the template writes one,
   the question, the instruction, the generation prompt), plus each image's tokens, from its size after
   ``min_pixels``/``max_pixels``, where the processor can tell them without processing the pixels
   (``collate.prompt_token_count``; Qwen2-VL and Qwen2.5-VL can). The response budget is not counted.

The token check needs the processor: a data module outside a Trainer that was given none checks characters only.
"""

from __future__ import annotations

from vlm_post.data.collate import prompt_text, prompt_token_count
from vlm_post.data.schema import Example
from vlm_post.data.sources import BadRow

CHARS_PER_TOKEN = 16


class PromptLimit:
    """Raises ``BadRow`` for an example whose prompt is longer than ``max_tokens``."""

    def __init__(self, max_tokens: int, instruction: str, processor=None) -> None:
        self.max_tokens = max_tokens
        self.max_chars = CHARS_PER_TOKEN * max_tokens
        self.instruction = instruction
        self.processor = processor

    def check(self, example: Example) -> None:
        chars = len(example.question)
        if chars > self.max_chars:
            raise BadRow(
                f"question of {chars:,} characters, over the bound of {self.max_chars:,} "
                f"({CHARS_PER_TOKEN} per token of data.max_prompt_length={self.max_tokens}); not tokenized"
            )
        if self.processor is None:
            return
        text = prompt_text(self.processor, example, self.instruction)
        tokens = prompt_token_count(self.processor, text, example.images)
        if tokens > self.max_tokens:
            raise BadRow(
                f"prompt of {tokens:,} tokens (text and images), over data.max_prompt_length={self.max_tokens}"
            )
