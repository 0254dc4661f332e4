"""Chunked log-probs, entropies and the SFT loss against the direct formulas."""

from __future__ import annotations

import pytest
import torch

import vlm_post.losses.logprobs as logprobs_module
from vlm_post.losses import IGNORE_INDEX, sft_cross_entropy, token_logprobs, token_logprobs_and_entropy

pytestmark = pytest.mark.fast


def direct_logprobs_and_entropy(hidden, weight, targets, temperature=1.0, precision=torch.float32):
    """The formulas on full logits: log_softmax, gather, -(p * log p).sum()."""
    logp = torch.log_softmax((hidden @ weight.t()).to(precision) / temperature, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def grads(outputs, weights, inputs):
    loss = sum((output * w).sum() for output, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def test_chunked_logprobs_match_log_softmax_values_and_grads():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    chunked = token_logprobs(hidden, weight, targets, chunk_size=8)
    direct = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(chunked, direct)
    grads = torch.autograd.grad(chunked.sum(), (hidden, weight))
    expected = torch.autograd.grad(direct.sum(), (hidden, weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_sft_loss_is_masked_token_mean_next_token_nll():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8)
    weight = torch.randn(11, 8)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 7, 8, IGNORE_INDEX]]
    )
    loss, count = sft_cross_entropy(hidden, weight, labels, chunk_size=3)
    logp = torch.log_softmax(hidden @ weight.t(), -1)
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(6) if labels[b, t] != IGNORE_INDEX]
    assert count == len(terms) == 6
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_sft_loss_without_targets_is_zero_with_grad():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, count = sft_cross_entropy(hidden, torch.randn(5, 8), torch.full((1, 4), IGNORE_INDEX))
    assert count == 0 and loss.detach().item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_entropy_match_direct_formula_values_and_grads(chunk_size, temperature, monkeypatch):
    # CPU blocks of 3 rows of 50 fp32 logits, so chunks also split into blocks (with a short last one)
    monkeypatch.setattr(logprobs_module, "_CPU_BLOCK_BYTES", 3 * 50 * 4)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)  # 37 tokens: most chunk sizes leave a short last chunk
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size, temperature=temperature)
    # float64 reference: at T = 0.6 the logits reach ~25, where fp32 gradients differ by ~1e-5 either way
    direct = direct_logprobs_and_entropy(hidden.double(), weight.double(), targets, temperature, torch.float64)
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == entropy.shape == (37,)
    torch.testing.assert_close(logprobs, direct[0].float())
    torch.testing.assert_close(entropy, direct[1].float())
    coefficients = (torch.randn(37), torch.randn(37))  # per-token weights, like advantages and an entropy bonus
    for used in [(0,), (1,), (0, 1)]:  # gradients through log-probs only, entropy only, both
        picked = [coefficients[i] for i in used]
        got = grads([(logprobs, entropy)[i] for i in used], picked, (hidden, weight))
        want = grads([direct[i] for i in used], [c.double() for c in picked], (hidden, weight))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_entropy_is_exact_full_vocabulary_entropy_of_known_distributions():
    weight = torch.eye(4)
    hidden = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    logprobs, entropy = token_logprobs_and_entropy(hidden, weight, torch.tensor([0, 0, 3]), chunk_size=2)
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0)
    log4 = torch.log(torch.tensor(4.0))
    torch.testing.assert_close(entropy, torch.stack([log4, torch.tensor(0.0), -(p * p.log()).sum()]))
    torch.testing.assert_close(logprobs, torch.stack([-log4, torch.tensor(0.0), p[3].log()]))


def test_no_grad_and_logprobs_only_paths_agree():
    torch.manual_seed(1)
    hidden, weight, targets = torch.randn(20, 8), torch.randn(30, 8), torch.randint(0, 30, (20,))
    with torch.no_grad():
        logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=6)
    only, none = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=7, with_entropy=False)
    assert none is None
    torch.testing.assert_close(only, logprobs)
    torch.testing.assert_close(token_logprobs(hidden, weight, targets, chunk_size=3), logprobs)
    torch.testing.assert_close(entropy, direct_logprobs_and_entropy(hidden, weight, targets)[1])


def test_bf16_inputs_give_fp32_outputs_and_bf16_grads():
    torch.manual_seed(2)
    hidden = torch.randn(12, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 40, (12,))
    logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=5)
    direct = direct_logprobs_and_entropy(hidden, weight, targets)  # same bf16 matmul, fp32 after
    assert logprobs.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logprobs, direct[0])
    torch.testing.assert_close(entropy, direct[1])
    got = grads((logprobs, entropy), (1.0, 1.0), (hidden, weight))
    want = grads(direct, (1.0, 1.0), (hidden, weight))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, atol=0.05, rtol=0.05)


def test_nothing_of_vocabulary_size_per_token_is_kept_for_backward():
    num_tokens, vocab, width = 64, 1000, 8
    hidden = torch.randn(num_tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs, entropy = token_logprobs_and_entropy(hidden, weight, torch.randint(0, vocab, (num_tokens,)), 4)
    (logprobs.sum() + entropy.sum()).backward()
    assert saved_sizes and max(saved_sizes) == vocab * width  # the head itself; no (tokens, V) logits
    assert hidden.grad is not None and weight.grad is not None


def test_empty_input_and_bad_arguments():
    no_tokens = torch.zeros(0, dtype=torch.long)
    logprobs, entropy = token_logprobs_and_entropy(torch.zeros(0, 4), torch.randn(6, 4), no_tokens)
    assert logprobs.shape == entropy.shape == (0,)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_and_entropy(torch.zeros(3, 4), torch.randn(6, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(torch.zeros(3, 4), torch.randn(6, 4), torch.zeros(3).long(), temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.zeros(3, 4), torch.randn(6, 4), torch.zeros(3, dtype=torch.long), chunk_size=0)


def test_under_autocast_the_projection_runs_in_bf16_like_a_plain_matmul():
    torch.manual_seed(3)
    hidden = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)  # decoder output under bf16-mixed
    weight = torch.randn(40, 16, requires_grad=True)  # fp32 master weights
    targets = torch.randint(0, 40, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4)
        direct = direct_logprobs_and_entropy(hidden, weight, targets)  # autocast runs this matmul in bf16
    torch.testing.assert_close(logprobs, direct[0])
    torch.testing.assert_close(entropy, direct[1])
    got = grads((logprobs, entropy), (1.0, 1.0), (hidden, weight))
    want = grads(direct, (1.0, 1.0), (hidden, weight))
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=0.05, rtol=0.05)
