"""Evaluation sampling: the vLLM engine against the HF engine, on the same tiny model and the study's protocol.

For each of 200 demo test problems (one image each, through the project's data pipeline and collator, in batches
of ``eval_batch_size`` as ``vlm_post test`` makes them): one greedy answer and 16 samples at T = 1, at most
``--max-new-tokens`` each. Both engines sample the same weights (the vLLM engine is synced from the HF policy);
the figures are response tokens per second of sampling (grading and the entropy pass, the same for both engines,
are left out), the vLLM engine's start (build + first sync), and how many greedy answers are the same.

    .venv-vllm/bin/python bench/eval_engine.py          # (from .venv it re-runs itself in .venv-vllm)

vLLM's CPU attention refuses small heads, so the model is the tiny Qwen2.5-VL at hidden 256 (head_dim 64), fp32.
Last line: ``ratio=<vLLM tokens/s over HF's> hf_tok_s=... vllm_tok_s=... vllm_start_s=... greedy_equal=<k>/<N>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _in_vllm_venv() -> None:
    """Re-run this script in .venv-vllm when vLLM is not importable here (make bench runs every script in .venv)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    if not VLLM_PYTHON.exists():
        sys.exit("bench/eval_engine.py: vLLM is not importable here and .venv-vllm is missing: run make setup-vllm")
    os.execv(str(VLLM_PYTHON), [str(VLLM_PYTHON), *sys.argv])


def _batches(model_dir: Path, data_dir: Path, problems: int, batch_size: int):
    from vlm_post.data import DataSource, VLMDataModule
    from vlm_post.data.synthetic import write_demo_dataset
    from vlm_post.models.loading import load_processor

    write_demo_dataset(data_dir, train=8, validation=8, test=problems, ood_test=0)
    data = VLMDataModule(
        test=[DataSource(name="bench", kind="geometry3k", path=str(data_dir / "test.parquet"))],
        eval_batch_size=batch_size,
        min_pixels=112 * 112,
        max_pixels=112 * 112,
    )
    data.processor = load_processor(str(model_dir))
    examples = list(data._dataset(data.test_sources[0]))
    collate = data.collator(True, False)
    return data.processor, [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def _sample(engine, policy, batches, protocol) -> tuple[float, int, list[str]]:
    """Seconds, response tokens and greedy texts of the whole protocol over every batch."""
    tokens, greedy_texts = 0, []
    started = time.perf_counter()
    for batch in batches:
        images = [example.images for example in batch["examples"]]
        for params in protocol:
            rollouts = engine.generate(policy, batch["prompt"], params, images=images)
            tokens += int(rollouts.lengths.sum())
            if params.greedy:
                greedy_texts += rollouts.texts
    return time.perf_counter() - started, tokens, greedy_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=50, help="eval_batch_size: prompts per engine call")
    args = parser.parse_args()
    _in_vllm_venv()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch

    from vlm_post.models.loading import load_policy
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl
    from vlm_post.rollout import HFGenerateEngine, SamplingParams
    from vlm_post.rollout.vllm import VLLMConfig, VLLMEngine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_tiny_qwen2_5_vl(Path(work) / "tiny-head64", hidden_size=256)
        processor, batches = _batches(model_dir, Path(work) / "data", args.problems, args.batch_size)
        policy = load_policy(str(model_dir)).eval()
        protocol = [
            SamplingParams(1, 0.0, max_new_tokens=args.max_new_tokens),
            SamplingParams(args.n, 1.0, max_new_tokens=args.max_new_tokens),
        ]
        torch.manual_seed(0)
        hf_s, hf_tokens, hf_greedy = _sample(HFGenerateEngine(processor), policy, batches, protocol)
        started = time.perf_counter()
        engine = VLLMEngine(processor, str(model_dir), VLLMConfig(dtype="float32", gpu_memory_utilization=0.3,
                                                                  max_model_len=1024))  # fmt: skip
        engine.sync(policy)
        start_s = time.perf_counter() - started
        vllm_s, vllm_tokens, vllm_greedy = _sample(engine, policy, batches, protocol)
        engine.close()
    equal = sum(a == b for a, b in zip(hf_greedy, vllm_greedy))
    hf_rate, vllm_rate = hf_tokens / hf_s, vllm_tokens / vllm_s
    sequences = args.problems * (1 + args.n)
    print(f"protocol: {args.problems} problems x (greedy + {args.n} samples at T=1), <= {args.max_new_tokens} new "
          f"tokens, batches of {args.batch_size}; {sequences} sequences per engine")  # fmt: skip
    print(f"{'engine':<6} {'seconds':>8} {'tokens':>8} {'tokens/s':>9}")
    print(f"{'hf':<6} {hf_s:>8.1f} {hf_tokens:>8} {hf_rate:>9.0f}")
    print(f"{'vllm':<6} {vllm_s:>8.1f} {vllm_tokens:>8} {vllm_rate:>9.0f}   (engine start + sync: {start_s:.1f} s)")
    print(f"greedy answers equal: {equal} of {len(hf_greedy)}")
    print(
        f"ratio={vllm_rate / hf_rate:.3f} hf_tok_s={hf_rate:.0f} vllm_tok_s={vllm_rate:.0f} "
        f"vllm_start_s={start_s:.1f} greedy_equal={equal}/{len(hf_greedy)}"
    )


if __name__ == "__main__":
    main()
