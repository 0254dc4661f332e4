"""The GPU check's figures (bench/gpu_step.py): FLOPs and MFU by the FLOP model of gpu_step.py's docstring, per-stage
summaries of the timed steps, and the table printed at the end."""

from __future__ import annotations

from _gpu_model import QWEN_VOCAB, SHAPES

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
MEASURED_FLOPS = 790e12  # the best bf16 matmul rate measured on the H200 we use


class FlopModel:
    """The FLOP formulas of the module docstring, from the model's parameter counts and config."""

    def __init__(self, size: str, params: dict) -> None:
        text, vision = SHAPES[size]["text"], SHAPES[size]["vision"]
        self.n_dec = params["decoder"]
        self.n_head = QWEN_VOCAB * text["hidden_size"]
        self.n_vis = params["vision_patch_embed"] + params["vision_blocks"]
        self.n_merge = params["vision_merger"]
        self.layers = text["num_hidden_layers"]
        self.d_attn = text["hidden_size"]  # heads x head_dim
        self.d_vis = vision["hidden_size"]
        self.depth = vision["depth"]
        self.full_layers = len(vision["fullatt_block_indexes"])
        self.merge = vision["spatial_merge_size"]
        self.window_units = vision["window_size"] // vision["spatial_merge_size"] // vision["patch_size"]

    def vision_forward(self, grids: list[list[int]]) -> float:
        flops = 0.0
        for t, h, w in grids:
            patches = t * h * w
            flops += 2 * self.n_vis * patches + 2 * self.n_merge * patches / (self.merge**2)
            # windows of window_units x window_units merged tokens (4 patches each), cut at the edges
            hm, wm = h // self.merge, w // self.merge
            rows = [min(self.window_units, hm - i) for i in range(0, hm, self.window_units)]
            cols = [min(self.window_units, wm - j) for j in range(0, wm, self.window_units)]
            window_sq = t * sum((r * c * self.merge**2) ** 2 for r in rows for c in cols)
            flops += (self.depth - self.full_layers) * 4 * self.d_vis * window_sq
            flops += self.full_layers * 4 * self.d_vis * patches**2
        return flops

    def forward(self, seq_lens: list[int], head_tokens: int, grids: list[list[int]]) -> float:
        tokens = sum(seq_lens)
        attention = sum(2 * self.layers * self.d_attn * s * s for s in seq_lens)
        return 2 * self.n_dec * tokens + 2 * self.n_head * head_tokens + attention + self.vision_forward(grids)

    def generation(
        self, prefill_lens: list[int], prefill_grids: list[list[int]], prompt_lens: list[int], steps: int
    ) -> float:
        """Prefill of ``prefill_lens`` sequences (each prompt once when the engine shares the prefill across its
        n samples, else every row) + ``steps`` decode steps of every row (``prompt_lens``: one per row)."""
        flops = self.forward(prefill_lens, len(prefill_lens), prefill_grids)
        for p in prompt_lens:
            for step in range(steps):
                context = p + step + 1
                flops += 2 * self.n_dec + 2 * self.n_head + 4 * self.layers * self.d_attn * context
        return flops


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(stage: str, timer, warmup: int, flops: FlopModel, module, args) -> dict:
    timed = timer.steps[warmup:] or timer.steps  # all steps when there were no timed ones
    out: dict = {"steps_timed": len(timed), "steps_total": len(timer.steps), "per_step": []}
    for step in timer.steps:
        skip = ("seq_lens", "grids", "prompt_lens", "response_lens", "image_counts", "prefill_lens", "prefill_grids")
        out["per_step"].append({k: v for k, v in step.items() if k not in skip})
    step_s = mean([s["step_s"] for s in timed])
    if stage == "sft":
        tokens = mean([sum(s["seq_lens"]) for s in timed])
        step_flops = mean([3 * flops.forward(s["seq_lens"], s["head_tokens"], s["grids"]) for s in timed])
        out.update(
            rows=timed[0]["rows"],
            seq_len=timed[0]["width"],
            tokens_per_step=tokens,
            target_tokens_per_step=mean([s["head_tokens"] for s in timed]),
            image_tokens_per_step=mean([s["image_tokens"] for s in timed]),
            step_s=step_s,
            step_s_min=min(s["step_s"] for s in timed),
            tokens_per_s=tokens / step_s,
            target_tokens_per_s=mean([s["head_tokens"] for s in timed]) / step_s,
            tflop_per_step=step_flops / 1e12,
            achieved_tflops=step_flops / step_s / 1e12,
            mfu_989=step_flops / step_s / PEAK_FLOPS,
            mfu_790=step_flops / step_s / MEASURED_FLOPS,
            loss_first=timer.steps[0].get("loss"),
            loss_last=timer.steps[-1].get("loss"),
        )
        return out
    passes = 3 + (1 if module.loss_config.uses_reference else 0)
    prompts = timed[0]["rows"] // module.rollout.n
    single_update = module.single_update(prompts)
    passes += 0 if single_update and module.loss_config.kl_mode != "reward" else 1  # old log-probs
    gen_s = mean([s["gen_s"] for s in timed])
    reward_s = mean([s["reward_s"] for s in timed])
    train_s = step_s - gen_s - reward_s
    gen_flops = mean(
        [flops.generation(s["prefill_lens"], s["prefill_grids"], s["prompt_lens"], s["decode_steps"]) for s in timed]
    )
    train_tokens = mean([sum(s["prompt_lens"]) + s["response_tokens"] for s in timed])
    train_flops = mean(
        [
            passes
            * flops.forward(
                [p + r for p, r in zip(s["prompt_lens"], s["response_lens"])], s["response_tokens"], s["grids"]
            )
            for s in timed
        ]
    )
    response_tokens = mean([s["response_tokens"] for s in timed])
    out.update(
        prompts=prompts,
        n=module.rollout.n,
        rows=timed[0]["rows"],
        prompt_len=mean([mean(s["prompt_lens"]) for s in timed]),
        decode_steps=mean([s["decode_steps"] for s in timed]),
        response_len_mean=response_tokens / timed[0]["rows"],
        finished_rows=mean([s["finished"] for s in timed]),
        shared_prefill=all(s.get("shared_prefill") for s in timed),
        forward_passes_per_training_token=passes,
        step_s=step_s,
        gen_s=gen_s,
        reward_s=reward_s,
        train_s=train_s,
        gen_fraction=gen_s / step_s,
        gen_tokens_per_s=response_tokens / gen_s,
        gen_ms_per_decode_step=1e3 * gen_s / max(1.0, mean([s["decode_steps"] for s in timed])),
        train_tokens_per_step=train_tokens,
        train_tokens_per_s=train_tokens / train_s,
        step_tokens_per_s=train_tokens / step_s,
        gen_tflop_per_step=gen_flops / 1e12,
        train_tflop_per_step=train_flops / 1e12,
        mfu_gen_989=gen_flops / gen_s / PEAK_FLOPS,
        mfu_train_989=train_flops / train_s / PEAK_FLOPS,
        mfu_train_790=train_flops / train_s / MEASURED_FLOPS,
        mfu_989=(gen_flops + train_flops) / step_s / PEAK_FLOPS,
        mfu_790=(gen_flops + train_flops) / step_s / MEASURED_FLOPS,
        reward_mean_last=timer.steps[-1].get("reward_mean"),
        kl_last=timer.steps[-1].get("kl"),
    )
    return out


def print_table(report: dict) -> None:
    sft, rl = report.get("sft", {}).get("result"), report.get("rl", {}).get("result")

    def row(label: str, figures: dict, seconds: float, tokens_per_s: float, tflop_per_step: float) -> tuple:
        """One line: time, tokens/s, TFLOP/s and the MFU against both peaks, peak memory (GPU, else the process's)."""
        tflops = tflop_per_step / seconds
        peak = figures.get("peak_allocated_gib", figures.get("peak_rss_gib_process", float("nan")))
        mfu_989, mfu_790 = tflops * 1e12 / PEAK_FLOPS, tflops * 1e12 / MEASURED_FLOPS
        return (
            label,
            figures["strategy"],
            f"{seconds:.3f}",
            f"{tokens_per_s:.0f}",
            f"{tflops:.2f}",
            f"{mfu_989:.3f}",
            f"{mfu_790:.3f}",
            f"{peak:.1f}",
        )

    cells = [("stage", "strategy", "time s", "tokens/s", "TFLOP/s", "MFU@989", "MFU@790", "peak GiB")]
    if sft:
        cells.append(row("sft step", sft, sft["step_s"], sft["tokens_per_s"], sft["tflop_per_step"]))
    if rl:
        gen, train = rl["gen_tflop_per_step"], rl["train_tflop_per_step"]
        cells.append(row("rl generate", rl, rl["gen_s"], rl["gen_tokens_per_s"], gen))
        cells.append(row("rl train", rl, rl["train_s"], rl["train_tokens_per_s"], train))
        cells.append(row("rl step", rl, rl["step_s"], rl["step_tokens_per_s"], gen + train))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    print("\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) for c in cells), flush=True)
    if rl:
        print(
            f"rl: {rl['prompts']} prompts x n={rl['n']} = {rl['rows']} rows, prompt {rl['prompt_len']:.0f} tokens, "
            f"{rl['decode_steps']:.0f} decode steps ({rl['gen_ms_per_decode_step']:.1f} ms each incl. prefill), "
            f"prefill {'once per prompt' if rl['shared_prefill'] else 'per sample'}, "
            f"generation {100 * rl['gen_fraction']:.0f}% of the step, reward {rl['reward_s']:.3f}s",
            flush=True,
        )
    if sft:
        print(
            f"sft: {sft['rows']} rows x {sft['seq_len']} tokens "
            f"({sft['target_tokens_per_step']:.0f} target tokens per step)",
            flush=True,
        )
