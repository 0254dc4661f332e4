"""Peak memory and time of chunked log-probs + entropy against the naive full-logits computation.

Setting: V = 151,936 (Qwen2.5-VL), N = 8 x 1024 tokens, fp32, hidden size 256
by default. The naive version (full logits -> log_softmax -> gather, entropy
-(p * log p).sum() from the same log-softmax, under no_grad as a logged metric)
holds about 14 GiB at its peak whatever the hidden size, which fits this 24 GiB
machine; the hidden size only sets the cost of the vocabulary matmuls. 256 keeps
the whole script to a few minutes on one CPU thread (one matmul over 8192 x
151,936 x 256 takes ~12 s here; at the real 3584 each would take ~3 minutes).

Each (method, phase) runs in a fresh subprocess, so one variant's allocations
cannot hide or inflate another's. Memory is the increase of the process's peak
resident set (ru_maxrss) over its resident set just before the timed runs, i.e.
everything the computation allocates beyond its inputs (hidden states and the
head), outputs and gradients included. Torch's CPU allocator returns large
blocks to the OS when freed, so resident memory tracks live tensors. Time is
the best of ``--repeats`` runs (default 1: each naive run takes over a minute)
after a small warm-up; forward runs under no_grad, forward+backward takes the
gradient of sum(log-probs) with respect to the hidden states (the entropy is
computed and logged, not differentiated). The chunked forward+backward does
three vocabulary matmuls to the naive two (the backward recomputes the
logits), so its time ratio rises with the hidden size as the matmuls outweigh
the naive version's full-vocabulary elementwise passes and page faults.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/logprob_entropy.py
The last line reads `peak_ratio=<x> time_ratio=<y>`, chunked over naive, forward+backward figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlm_post.losses import token_logprobs_and_entropy  # noqa: E402
from vlm_post.losses.logprobs import DEFAULT_CHUNK_SIZE  # noqa: E402

VOCAB = 151_936
TOKENS = 8 * 1024
HIDDEN = 256
METHODS = ("naive", "chunked")
PHASES = ("forward", "forward+backward")


def naive_logprobs_and_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward version: full fp32 logits for every token at once."""
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    logprobs = logp.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():  # a logged metric; differentiating it too would not fit in 24 GiB
        entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def run_method(
    method: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "naive":
        return naive_logprobs_and_entropy(hidden, weight, targets)
    logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size)
    return logprobs, entropy


def run_phase(
    method: str, phase: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> None:
    if phase == "forward":
        with torch.no_grad():
            run_method(method, hidden, weight, targets, chunk_size)
    else:
        inputs = hidden.detach().requires_grad_(True)
        logprobs, _ = run_method(method, inputs, weight, targets, chunk_size)
        logprobs.sum().backward()


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(method: str, phase: str, tokens: int, hidden_size: int, chunk_size: int, repeats: int) -> dict:
    """One variant in this (fresh) process: best time and peak memory increase."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    weight = torch.randn(VOCAB, hidden_size, generator=generator) * hidden_size**-0.5
    targets = torch.randint(0, VOCAB, (tokens,), generator=generator)
    run_phase(method, phase, hidden[:64], weight, targets[:64], chunk_size)  # one-off library initialisation
    gc.collect()
    baseline = resident_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_phase(method, phase, hidden, weight, targets, chunk_size)
        times.append(time.perf_counter() - start)
        gc.collect()
    return {"time_s": min(times), "peak_bytes": peak_resident_bytes() - baseline}


def agreement(hidden_size: int, chunk_size: int) -> dict[str, float]:
    """Largest differences between the two methods on 300 tokens: the benchmark compares equals."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, hidden_size, generator=generator) * hidden_size**-0.5
    targets = torch.randint(0, VOCAB, (300,), generator=generator)
    results = {}
    for method in METHODS:
        logprobs, entropy = run_method(method, hidden, weight, targets, min(chunk_size, 128))
        (grad,) = torch.autograd.grad(logprobs.sum(), hidden)
        results[method] = (logprobs.detach(), entropy.detach(), grad)
    names = ("logprobs", "entropy", "grad_hidden")
    return {name: (a - b).abs().max().item() for name, a, b in zip(names, results["naive"], results["chunked"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the best is reported")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.tokens, args.hidden, args.chunk_size, args.repeats)))
        return

    print(
        f"setting: N={args.tokens} tokens, V={VOCAB}, H={args.hidden}, fp32, chunk_size={args.chunk_size}, "
        f"torch threads={torch.get_num_threads()}, best of {args.repeats} timed run(s) after a warm-up"
    )
    print("memory: peak RSS increase over the inputs (ru_maxrss - RSS before), one fresh process per variant")
    diffs = agreement(args.hidden, args.chunk_size)
    print("agreement on 300 tokens, max |naive - chunked|: " + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
    figures: dict[tuple[str, str], dict] = {}
    for phase in PHASES:
        for method in METHODS:
            command = [sys.executable, __file__, "--child", method, phase, "--tokens", str(args.tokens)]
            command += ["--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
            command += ["--repeats", str(args.repeats)]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            result = figures[method, phase] = json.loads(child.stdout.strip().splitlines()[-1])
            gib, seconds = result["peak_bytes"] / 2**30, result["time_s"]
            print(f"{method:8s} {phase:17s} peak={gib:7.3f} GiB  time={seconds:7.2f} s")
    for phase in PHASES:
        chunked, naive = figures["chunked", phase], figures["naive", phase]
        print(
            f"{phase}: peak_ratio={chunked['peak_bytes'] / naive['peak_bytes']:.3f} "
            f"time_ratio={chunked['time_s'] / naive['time_s']:.3f} (goal: peak <= 0.10, time <= 1.20)"
        )
    print("the last line repeats the forward+backward ratios")
    chunked, naive = figures["chunked", "forward+backward"], figures["naive", "forward+backward"]
    peak_ratio, time_ratio = chunked["peak_bytes"] / naive["peak_bytes"], chunked["time_s"] / naive["time_s"]
    print(f"peak_ratio={peak_ratio:.3f} time_ratio={time_ratio:.3f}")


if __name__ == "__main__":
    main()
