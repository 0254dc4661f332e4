"""A tiny Qwen2.5-VL built offline, for the CPU demo and the tests.

The model is randomly initialised (about 1M parameters) but is a real
``Qwen2_5_VLForConditionalGeneration`` with the real processor class, so every
code path (chat template, image-token expansion, mrope, ``mm_token_type_ids``)
is exercised exactly as with ``Qwen/Qwen2.5-VL-7B-Instruct``. The tokenizer is a
byte-level BPE of about 500 tokens trained here on a small built-in corpus,
with Qwen's special tokens and a Qwen-style chat template.

Everything is deterministic for a given seed: building twice gives identical
files, so tests and the demo never depend on a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

# Qwen2.5's control tokens, in Qwen's order. The ids differ from the real
# vocabulary (they follow the 256 byte symbols here) but the strings match, so
# the processor and chat template find them by name.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same layout as Qwen2.5-VL's own template (system prompt by default, one
# <|vision_start|><|image_pad|><|vision_end|> per image), written for this project.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern (numbers one digit at a time, words, punctuation runs).
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _training_corpus() -> list[str]:
    """Text the tiny BPE learns its merges from: the demo's prompts and answers, math notation."""
    from vlm_post.data.prompting import DEFAULT_INSTRUCTION
    from vlm_post.data.synthetic import vocabulary_sentences

    lines = [DEFAULT_INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant"]
    lines += vocabulary_sentences()
    lines += [
        "<think> </think> \\boxed{12} \\boxed{red} \\boxed{blue} \\frac{1}{2} \\sqrt{3} x = 5 30^\\circ",
        "Find x. Find y. Find the area of the triangle. Find the measure of angle 1.",
        "The answer is 0 1 2 3 4 5 6 7 8 9 10 . , ; : ( ) [ ] { } + - * / = ^ _",
        "triangle square circle rectangle angle degrees perimeter radius diameter length side",
        "Which of the following is correct? Choices: (A) (B) (C) (D) Answer with the option letter.",
    ]
    return lines * 4


def build_tiny_tokenizer(vocab_size: int = 500):
    """Train a byte-level BPE locally and wrap it as a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    state = bpe.model.__getstate__()
    import json

    model_json = json.loads(state.decode() if isinstance(state, bytes) else state)
    vocab, merges = model_json["vocab"], model_json["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 500,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    arch: Literal["qwen2_5_vl", "qwen2_vl"] = "qwen2_5_vl",
) -> Path:
    """Write a random-init tiny Qwen2.5-VL (or Qwen2-VL) with its processor, in HF format, to ``out_dir``."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    prefix = "Qwen2_5_VL" if arch == "qwen2_5_vl" else "Qwen2VL"
    config_class = getattr(transformers, f"{prefix}Config")
    model_class = getattr(transformers, f"{prefix}ForConditionalGeneration")
    processor_class = getattr(transformers, f"{prefix}Processor")

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(vocab_size)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    heads = 4
    head_dim = hidden_size // heads
    # mrope splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    half = head_dim // 2
    mrope_section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    config = config_class(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=_vision_config(arch, hidden_size),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _vision_config(arch: str, text_hidden: int) -> dict:
    common = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen2_vl":  # Qwen2-VL names the encoder width embed_dim and the output width hidden_size
        return dict(common, embed_dim=64, mlp_ratio=2, hidden_size=text_hidden)
    return dict(
        common,
        hidden_size=64,
        intermediate_size=128,
        window_size=112,
        out_hidden_size=text_hidden,
        fullatt_block_indexes=[1],
    )
