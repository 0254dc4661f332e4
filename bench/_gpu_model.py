"""The GPU check's model (bench/gpu_step.py): a Qwen2.5-VL folder at Qwen2.5-VL-3B's shape, or a narrow one for a CPU.

Random weights, saved with ``save_pretrained`` in bf16 (as hub checkpoints are), with the real-vocabulary
processor when it is at hand (artifacts/qwen2.5-vl-processor, tools/make_qwen_processor.py); the config's token
ids are read from that processor's tokenizer.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

from _gpu_log import log

QWEN_VOCAB = 151936  # Qwen2.5's embedding rows (151,665 tokens, padded)

# Qwen/Qwen2.5-VL-3B-Instruct's config.json
QWEN_3B = {
    "text": {
        "hidden_size": 2048,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "intermediate_size": 11008,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "out_hidden_size": 2048,
        "tokens_per_second": 2,
    },
}

SHAPES = {
    "3b": QWEN_3B,
    # The same structure, narrow enough for a CPU: the real vocabulary, so the head and the tokenizer are real.
    "tiny": {
        "text": QWEN_3B["text"]
        | {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        "vision": QWEN_3B["vision"]
        | {
            "depth": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "fullatt_block_indexes": [1, 3],
            "out_hidden_size": 64,
        },
    },
}


def processor_and_ids(processor_dir: Path, notes: list[str]):
    """The processor to ship with the model, and the token ids the model config must use."""
    from transformers import AutoProcessor

    if (processor_dir / "tokenizer.json").is_file():
        processor = AutoProcessor.from_pretrained(str(processor_dir))
        source = f"real Qwen2.5 vocabulary ({processor_dir})"
    else:  # no real vocabulary at hand: the tiny tokenizer, still with a 151,936-row model
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        from vlm_post.models.tiny import CHAT_TEMPLATE, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056),
            chat_template=CHAT_TEMPLATE,
        )
        source = "tiny tokenizer (no real-vocabulary processor found): text token counts are not Qwen's"
        notes.append(f"{processor_dir} missing: {source}")
        log(f"WARNING: {processor_dir} not found; using the tiny tokenizer with a {QWEN_VOCAB}-row model")
    tok = processor.tokenizer
    ids = {
        name: tok.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("eos", "<|im_end|>"),
            ("pad", "<|endoftext|>"),
        ]
    }
    if len(tok) > QWEN_VOCAB:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, more than the model's {QWEN_VOCAB} rows")
    return processor, ids, source


def model_config(size: str, ids: dict):
    from transformers import Qwen2_5_VLConfig

    shape = SHAPES[size]
    return Qwen2_5_VLConfig(
        text_config=dict(
            shape["text"],
            vocab_size=QWEN_VOCAB,
            hidden_act="silu",
            bos_token_id=ids["pad"],  # Qwen's config: bos = <|endoftext|> (never prepended by the tokenizer)
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        vision_config=dict(shape["vision"], hidden_act="silu"),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True,
    )


def parameter_counts(config) -> dict[str, int]:
    """Parameters by part, from the model built on the meta device (no memory, no init)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    # A parameter's part: the first whose marker is in its name (tied weights are listed once, as the embedding).
    markers = [
        ("embedding", "embed_tokens"),
        ("lm_head_untied", "lm_head."),
        ("decoder", ".language_model."),
        ("vision_patch_embed", ".visual.patch_embed"),
        ("vision_blocks", ".visual.blocks"),
        ("vision_merger", ".visual.merger"),
    ]
    counts = dict.fromkeys([part for part, _ in markers] + ["other"], 0)
    for name, param in model.named_parameters():
        counts[next((part for part, marker in markers if marker in name), "other")] += param.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def build_model_folder(args, out: Path, notes: list[str]) -> dict:
    """Config + random bf16 weights (save_pretrained) + processor in ``out``; reused when it matches."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    started = time.perf_counter()
    processor, ids, source = processor_and_ids(Path(args.processor), notes)
    config = model_config(args.size, ids)
    signature = {"size": args.size, "ids": ids, "processor": source, "seed": args.seed}
    marker = out / "bench_model.json"
    counts = parameter_counts(config)
    if marker.is_file() and json.loads(marker.read_text()).get("signature") == signature and not args.rebuild:
        log(f"model folder {out} already built for this configuration: reused")
        seconds = time.perf_counter() - started
        return {"reused": True, "seconds": seconds, "params": counts, "token_ids": ids, "processor": source}
    if out.exists():
        shutil.rmtree(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"building the {args.size} model ({counts['total'] / 1e9:.3f}B parameters) with random weights on {device}")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.bos_token_id = ids["pad"]
    built = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    saved_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    marker.write_text(json.dumps({"signature": signature, "params": counts}, indent=2) + "\n")
    result = {
        "reused": False,
        "init_s": built - started,
        "save_s": time.perf_counter() - built,
        "seconds": time.perf_counter() - started,
        "saved_gib": saved_bytes / 2**30,
        "params": counts,
        "token_ids": ids,
        "processor": source,
    }
    log(
        f"model folder written: {saved_bytes / 2**30:.2f} GiB in {result['seconds']:.1f}s "
        f"(init {result['init_s']:.1f}s)"
    )
    return result
