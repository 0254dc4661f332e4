"""RL rollouts: the vLLM engine against the HF engine at RL's shape, with the weight sync every step needs.

Each of ``--steps`` steps samples one batch of ``--prompts`` demo problems (one image each, through the project's
data pipeline and collator) ``--n`` times at T = 1, at most ``--max-new-tokens`` each, as an RL step's rollout does:
the HF engine on the policy, then the vLLM engine given the policy's weights first (``VLLMEngine.sync``, in buckets
of ``--sync-bucket-mb``). Between steps the policy's weights move (noise added in place), so every sync is a real
one. Figures: response tokens per second of sampling for each engine (the vLLM side with and without its syncs), the
sync's median seconds, and the engine's start.

    .venv-vllm/bin/python bench/rollout_engine.py          # (from .venv it re-runs itself in .venv-vllm)

The model is the tiny Qwen2.5-VL at hidden 256 (head_dim 64, as vLLM's CPU attention needs), fp32.
Last line: ``ratio=<vLLM tokens/s, syncs included, over HF's> hf_tok_s=... vllm_tok_s=... sync_s=... start_s=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from eval_engine import _batches, _in_vllm_venv, _sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sync-bucket-mb", type=float, default=512.0)
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
    protocol = [SamplingParams(args.n, 1.0, max_new_tokens=args.max_new_tokens)]
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_tiny_qwen2_5_vl(Path(work) / "tiny-head64", hidden_size=256)
        processor, batches = _batches(model_dir, Path(work) / "data", args.prompts * args.steps, args.prompts)
        policy = load_policy(str(model_dir)).eval()
        config = VLLMConfig(dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
                            sync_bucket_mb=args.sync_bucket_mb)  # fmt: skip
        engine, hf = VLLMEngine(processor, str(model_dir), config), HFGenerateEngine(processor)
        started = time.perf_counter()
        engine.start()
        start_s = time.perf_counter() - started
        hf_s = vllm_s = 0.0
        hf_tokens = vllm_tokens = 0
        syncs = []
        torch.manual_seed(0)
        for batch in batches:
            with torch.no_grad():  # an update moved the weights: the engine must be given them again
                for parameter in policy.parameters():
                    parameter.add_(1e-3 * torch.randn_like(parameter))
            seconds, tokens, _ = _sample(hf, policy, [batch], protocol)
            hf_s, hf_tokens = hf_s + seconds, hf_tokens + tokens
            started = time.perf_counter()
            engine.sync(policy)
            syncs.append(time.perf_counter() - started)
            seconds, tokens, _ = _sample(engine, policy, [batch], protocol)
            vllm_s, vllm_tokens = vllm_s + seconds, vllm_tokens + tokens
        engine.close()
    hf_rate, vllm_rate, sampling_rate = hf_tokens / hf_s, vllm_tokens / (vllm_s + sum(syncs)), vllm_tokens / vllm_s
    sync_s = statistics.median(syncs)
    print(
        f"{args.steps} steps of {args.prompts} prompts x {args.n} samples at T=1, <= {args.max_new_tokens} new tokens"
    )
    print(f"{'engine':<6} {'seconds':>8} {'tokens':>8} {'tokens/s':>9}")
    print(f"{'hf':<6} {hf_s:>8.2f} {hf_tokens:>8} {hf_rate:>9.0f}")
    print(f"{'vllm':<6} {vllm_s + sum(syncs):>8.2f} {vllm_tokens:>8} {vllm_rate:>9.0f}   "
          f"(sampling alone {sampling_rate:.0f} tok/s; sync median {sync_s:.3f} s; engine start {start_s:.1f} s)")  # fmt: skip
    print(
        f"ratio={vllm_rate / hf_rate:.3f} hf_tok_s={hf_rate:.0f} vllm_tok_s={vllm_rate:.0f} "
        f"sampling_ratio={sampling_rate / hf_rate:.3f} sync_s={sync_s:.3f} start_s={start_s:.1f}"
    )


if __name__ == "__main__":
    main()
