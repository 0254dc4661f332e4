"""Size, write and read speed of the teacher-logit cache (vlm_post.teacher).

Setting: 200k response tokens of random teacher scores (top-k ids up to 151,935 and fp32 log-probs, stored
as int32 + float16) at k = 32 and k = 64, in responses of 128-384 tokens (mean 256) after 1,024-token prompts,
in shards of 64k tokens in a temporary directory. Random data: the format has no compression, so
the figures do not depend on the values.

- bytes/token: every file in the cache directory (shards, manifest, lock file) over the response tokens,
  against the goal 6k + 16 (the payload alone is 6k + 6: int32 id and fp16 log-prob per top-k slot, the fp16
  log-prob of the sampled token and its int32 id).
- write tokens/s: TeacherCacheWriter.add for every response, then close (shards and manifest written,
  fsynced and hashed). The scores are made beforehand.
- read tokens/s: TeacherCache.require_batch over every response in shuffled batches of 64, padded. "cold":
  the shards dropped from the page cache first (posix_fadvise DONTNEED), a new reader and a process that
  has not verified any shard yet, so it includes opening the cache, reading from disk and the sha256 checks;
  "cold_unverified": the same with verify=False (no sha256); "warm": the same batches again with the first
  reader, best of --repeats.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_cache.py
The last line reads `k32_bytes_per_token=<x> k32_goal=<y> k32_write_tok_s=... k32_cold_read_tok_s=...
k32_cold_unverified_read_tok_s=... k32_warm_read_tok_s=...`, and the same for k64. Goals: bytes/token <= 6k + 16,
reads >= 1M tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlm_post.teacher import TeacherCache, TeacherCacheWriter, TeacherScores  # noqa: E402
from vlm_post.teacher import cache as cache_module  # noqa: E402


def make_rollouts(tokens: int, k: int, prompt_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(128, 385, (1,), generator=g)))
    n = sum(lengths)
    ids = torch.randint(0, 151_936, (n, k), generator=g)  # int64, as topk returns them
    logprobs = -torch.rand(n, k, generator=g).mul(20).sort(-1).values
    sampled = -torch.rand(n, generator=g).mul(20)
    responses = torch.randint(0, 151_936, (n,), generator=g)
    prompts = torch.randint(0, 151_936, (len(lengths), prompt_len), generator=g)
    rollouts, start = [], 0
    for i, length in enumerate(lengths):
        end = start + length
        scores = TeacherScores(ids[start:end], logprobs[start:end], sampled[start:end])
        rollouts.append((f"step{i // 64}/prompt{i % 64}/sample0", prompts[i], responses[start:end], scores))
        start = end
    return rollouts, n


def drop_page_cache(cache_dir: Path) -> None:
    for path in cache_dir.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(cache: TeacherCache, rollouts, order: list[int], batch: int) -> None:
    for b in range(0, len(order), batch):
        chosen = [rollouts[i] for i in order[b : b + batch]]
        cache.require_batch([r[0] for r in chosen], [r[1] for r in chosen], [r[2] for r in chosen])


def bench(k: int, args) -> dict[str, float]:
    rollouts, n = make_rollouts(args.tokens, k, args.prompt_len)
    order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
        cache_dir = Path(tmp)
        start = time.perf_counter()
        with TeacherCacheWriter(cache_dir, k=k, dtype="float16", shard_tokens=args.shard_tokens) as writer:
            for example_id, prompt, response, scores in rollouts:
                writer.add(example_id, prompt, response, scores)
        write_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in cache_dir.iterdir())
        shards = len(list(cache_dir.glob("*.safetensors")))

        drop_page_cache(cache_dir)
        cache_module._VERIFIED.clear()  # as in a fresh process: every shard's sha256 checked on first use
        start = time.perf_counter()
        cache = TeacherCache(cache_dir)
        read_all(cache, rollouts, order, args.batch)
        cold_s = time.perf_counter() - start
        warm_s = min(_timed(read_all, cache, rollouts, order, args.batch) for _ in range(args.repeats))
        drop_page_cache(cache_dir)
        start = time.perf_counter()
        read_all(TeacherCache(cache_dir, verify=False), rollouts, order, args.batch)
        unverified_s = time.perf_counter() - start
    figures = {
        "bytes_per_token": size / n,
        "goal": 6 * k + 16,
        "write_tok_s": n / write_s,
        "cold_read_tok_s": n / cold_s,
        "cold_unverified_read_tok_s": n / unverified_s,
        "warm_read_tok_s": n / warm_s,
    }
    print(f"k={k}: {n} tokens in {len(rollouts)} responses, {shards} shards, {size / 2**20:.1f} MiB; "
          f"{figures['bytes_per_token']:.2f} bytes/token (goal <= {6 * k + 16}, payload {6 * k + 6}); "
          f"write {write_s:.2f} s; read cold {cold_s:.3f} s (verify=False: {unverified_s:.3f} s), "
          f"warm {warm_s:.3f} s")  # fmt: skip
    return figures


def _timed(fn, *a) -> float:
    start = time.perf_counter()
    fn(*a)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-tokens", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {k: bench(k, args) for k in args.ks}
    print(" ".join(f"k{k}_{name}={value:.0f}" if value >= 100 else f"k{k}_{name}={value:.2f}"
                   for k, figures in results.items() for name, value in figures.items()))  # fmt: skip


if __name__ == "__main__":
    main()
