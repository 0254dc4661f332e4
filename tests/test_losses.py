"""Chunked log-probs and the SFT loss against the direct formulas."""

from __future__ import annotations

import torch

from vlm_post.losses import IGNORE_INDEX, sft_cross_entropy, token_logprobs


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
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 7, 8, IGNORE_INDEX]])
    loss, count = sft_cross_entropy(hidden, weight, labels, chunk_size=3)
    logp = torch.log_softmax(hidden @ weight.t(), -1)
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(6) if labels[b, t] != IGNORE_INDEX]
    assert count == len(terms) == 6
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_sft_loss_without_targets_is_zero_with_grad():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, count = sft_cross_entropy(hidden, torch.randn(5, 8), torch.full((1, 4), IGNORE_INDEX))
    assert count == 0 and loss.detach().item() == 0.0 and loss.requires_grad
