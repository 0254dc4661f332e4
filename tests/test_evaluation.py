"""The evaluation harness on the tiny model: sampled-token entropy, metric aggregation, records, intervals."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import demo_datamodule, sft_module, trainer
from vlm_post.metrics import EvalMetrics, pass_at_k
from vlm_post.modules.evaluation import EvalConfig, evaluate_batch, sampled_token_entropy


@pytest.fixture(scope="module")
def module_and_batch(tiny_model, demo_data):
    module = sft_module(tiny_model)
    module.configure_model()
    module.policy.eval()
    dm = demo_datamodule(demo_data)
    dm.processor = module.processor
    dm.setup("test")
    batch = dm.collator(with_prompt=True, with_sft=False)([dm.datasets["demo_test"][i] for i in range(3)])
    return module, batch


@pytest.mark.fast
def test_sampled_token_entropy_matches_the_full_softmax(module_and_batch):
    module, batch = module_and_batch
    torch.manual_seed(0)
    config = EvalConfig(n=4, temperature=0.7, max_new_tokens=8, forward_batch_size=5)
    samples = module.engine.sample(module.policy, batch, config.sampling())
    entropy = sampled_token_entropy(module, samples, config)
    inputs = samples.rows().inputs
    with torch.no_grad():
        logits = module.policy(**inputs).logits.float() / config.temperature
    width, length = batch["prompt"]["input_ids"].shape[1], samples.response_ids.shape[1]
    probs = torch.softmax(logits[:, width - 1 : width - 1 + length], -1)
    direct = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    mask = samples.response_mask.bool()
    torch.testing.assert_close(entropy[mask], direct[mask], atol=1e-4, rtol=1e-4)
    assert (entropy[~mask] == 0).all()
    # Micro-batching the rows (5 of 12, images regrouped) must not change anything.
    whole = sampled_token_entropy(module, samples, EvalConfig(n=4, temperature=0.7, forward_batch_size=64))
    torch.testing.assert_close(entropy, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.fast
def test_metrics_agree_with_the_records(module_and_batch):
    module, batch = module_and_batch
    torch.manual_seed(1)
    config = EvalConfig(n=4, temperature=1.5, max_new_tokens=8)
    result = evaluate_batch(module, batch, config)
    metrics = EvalMetrics(config.pass_k, greedy=True)
    metrics.update_from(**result.metric_fields())
    values = {k: float(v) for k, v in metrics.compute().items()}
    records = result.records(batch["examples"])
    assert len(records) == 3 and all(len(r["responses"]) == 4 for r in records)
    correct = [sum(r["correct"]) for r in records]
    assert values["mean_accuracy"] == pytest.approx(sum(correct) / 12)
    assert values["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in correct) / 3)
    assert values["greedy_accuracy"] == pytest.approx(sum(r["greedy_correct"] for r in records) / 3)
    assert values["accuracy"] == values["greedy_accuracy"]
    distinct = [len({a for a in r["extracted"]}) for r in records]  # None counts as one "no answer" category
    assert values["mean_distinct_answers"] >= 1 and values["mean_distinct_answers"] <= max(distinct)
    tokens = sum(sum(r["response_lengths"]) for r in records)
    weighted = sum(r["mean_token_entropy"] * sum(r["response_lengths"]) for r in records)
    assert values["entropy"] == pytest.approx(weighted / tokens, rel=1e-4)


@pytest.mark.fast
def test_greedy_only_validation_reports_greedy_metrics(module_and_batch):
    module, batch = module_and_batch
    config = EvalConfig(n=0, greedy=True, max_new_tokens=8)
    result = evaluate_batch(module, batch, config)
    metrics = EvalMetrics(config.pass_k, greedy=True)
    metrics.update_from(**result.metric_fields())
    values = metrics.compute()
    assert set(values) == {"accuracy", "greedy_accuracy", "format_rate", "response_length"}


@pytest.mark.fast
def test_eval_config_validation():
    with pytest.raises(ValueError, match="pass_k"):
        EvalConfig(n=4, pass_k=[8])
    with pytest.raises(ValueError, match="evaluate nothing"):
        EvalConfig(n=0, greedy=False)
    with pytest.raises(ValueError, match=r"EvalConfig.top_p: 0 does not conform to restriction v>0.0 and v<=1.0"):
        EvalConfig(top_p=0)  # built in Python, not parsed: the same range types apply
    assert EvalConfig(n=16).pass_k == [1, 2, 4, 8, 16]
    # pass@n is always among the defaults, a power of two or not
    assert EvalConfig(n=12).pass_k == [1, 2, 4, 8, 12]
    assert EvalConfig(n=200).pass_k == [1, 2, 4, 8, 16, 32, 64, 128, 200]
    assert EvalConfig(n=1).pass_k == [1] and EvalConfig(n=0).pass_k == []


@pytest.mark.fast
def test_intervals_default_to_10000_resamples():
    # 1,000 puts 25 draws in each tail of a 95% interval; 10,000 puts 250 (bench/study_report.py: the report's time)
    from vlm_post.study.config import EvalProtocol

    assert EvalConfig().bootstrap_resamples == 10_000
    assert EvalProtocol(config="eval.yaml", datasets=[]).bootstrap_resamples == 10_000


@pytest.mark.slow
def test_test_writes_records_summary_and_intervals(tiny_model, demo_data, tmp_path):
    import json

    module = sft_module(
        tiny_model, eval=EvalConfig(n=4, max_new_tokens=6, output_dir=str(tmp_path), bootstrap_resamples=200)
    )
    results = trainer(tmp_path, max_steps=1).test(module, demo_datamodule(demo_data), verbose=False)[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    row = summary["results"][0]
    assert row["dataset"] == "demo_test" and row["problems"] == 16
    for key in ("accuracy", "mean_accuracy", "pass@1", "pass@4", "entropy", "mean_distinct_answers", "format_rate"):
        assert key in row and f"test/demo_test/{key}" in results
    low, high = row["ci"]["pass@4"]
    assert low <= row["pass@4"] <= high
    for k in (1, 2, 4):  # maj@k beside pass@k, with its interval; a vote is never right more often than some sample
        low, high = row["ci"][f"maj@{k}"]
        assert low <= row[f"maj@{k}"] <= high and row[f"maj@{k}"] <= row[f"pass@{k}"] + 1e-6
    assert row["maj@1"] == pytest.approx(row["mean_accuracy"])
    lines = (tmp_path / "demo_test.jsonl").read_text().splitlines()
    assert len(lines) == 16 and "mean_token_entropy" in json.loads(lines[0])
