"""On-policy distillation losses: top-k reverse KL (exact, chunked, masked, low precision) and the sampled estimator."""

from __future__ import annotations

import math

import pytest
import torch

import vlm_post.losses.logprobs as logprobs_module
from vlm_post.losses import (
    TAIL_FLOOR,
    aggregate,
    coarsened_reverse_kl,
    sampled_reverse_kl_advantages,
    sampled_reverse_kl_loss,
    topk_entropy,
    topk_reverse_kl,
    topk_reverse_kl_and_entropy_from_hidden,
    topk_reverse_kl_from_hidden,
)

pytestmark = pytest.mark.fast


def exact_reverse_kl(student_logprobs, teacher_logprobs):
    """sum_v p_v (log p_v - log q_v) over the whole vocabulary."""
    return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)


def teacher_topk(num_tokens, vocab, k, dtype=torch.float32, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(scale * torch.randn(num_tokens, vocab, generator=generator, dtype=torch.float64), -1)
    values, ids = full.topk(k, dim=-1)
    return full.to(dtype), ids, values.to(dtype)


def grads(outputs, weights, inputs):
    loss = sum((output * w).sum() for output, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs, retain_graph=True)


# ---------------------------------------------------------------- (a) top-k reverse KL with a tail bucket


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_kl_with_k_equal_to_the_vocabulary_is_the_exact_reverse_kl(dtype):
    torch.manual_seed(0)
    num_tokens, vocab, width = 9, 13, 6
    teacher_full, _, _ = teacher_topk(num_tokens, vocab, vocab, dtype)
    ids = torch.stack([torch.randperm(vocab) for _ in range(num_tokens)])  # any order of all V ids
    hidden, weight = torch.randn(num_tokens, width, dtype=dtype), torch.randn(vocab, width, dtype=dtype)
    student = torch.log_softmax(hidden @ weight.t(), -1)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=student), torch.distributions.Categorical(logits=teacher_full)
    )
    torch.testing.assert_close(exact_reverse_kl(student, teacher_full), exact)
    teacher_at_ids = teacher_full.gather(-1, ids)
    torch.testing.assert_close(topk_reverse_kl(student, ids, teacher_at_ids), exact)
    torch.testing.assert_close(topk_reverse_kl_from_hidden(hidden, weight, ids, teacher_at_ids, chunk_size=4), exact)


def test_topk_kl_is_the_exact_kl_of_the_k_plus_one_coarsening_and_a_lower_bound():
    torch.manual_seed(1)
    num_tokens, vocab, k = 8, 20, 5
    teacher_full, ids, teacher_values = teacher_topk(num_tokens, vocab, k, torch.float64)
    student = torch.log_softmax(torch.randn(num_tokens, vocab, dtype=torch.float64), -1)

    def coarsen(logprobs):  # (N, k + 1) probabilities: the k ids, then everything else
        head = logprobs.exp().gather(-1, ids)
        return torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1)

    categorical = torch.distributions.Categorical
    expected = torch.distributions.kl_divergence(
        categorical(probs=coarsen(student)), categorical(probs=coarsen(teacher_full))
    )
    got = topk_reverse_kl(student, ids, teacher_values)
    torch.testing.assert_close(got, expected)
    assert (got >= 0).all() and (got <= exact_reverse_kl(student, teacher_full) + 1e-12).all()  # data processing


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_topk_kl_and_entropy_pass_gradcheck_in_float64(chunk_size, temperature):
    torch.manual_seed(2)
    num_tokens, vocab, width, k = 6, 9, 4, 3
    hidden = torch.randn(num_tokens, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=torch.float64, requires_grad=True)
    _, ids, teacher_values = teacher_topk(num_tokens, vocab, k, torch.float64)
    mask = torch.tensor([True, True, False, True, True, True])

    def both(hidden, weight):
        return topk_reverse_kl_and_entropy_from_hidden(
            hidden, weight, ids, teacher_values, chunk_size=chunk_size, temperature=temperature, mask=mask
        )

    assert torch.autograd.gradcheck(both, (hidden, weight))
    assert torch.autograd.gradcheck(lambda h, w: both(h, w)[0], (hidden, weight))  # KL alone: entropy grad None
    assert torch.autograd.gradcheck(lambda h, w: both(h, w)[1], (hidden, weight))  # entropy alone: KL grad None


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_topk_kl_matches_the_reference_values_and_grads(chunk_size, temperature, monkeypatch):
    # CPU blocks of 3 rows of 50 fp32 logits, so chunks also split into blocks (with a short last one)
    monkeypatch.setattr(logprobs_module, "_CPU_BLOCK_BYTES", 3 * 50 * 4)
    torch.manual_seed(3)
    num_tokens, vocab, width, k = 37, 50, 16, 8
    hidden = torch.randn(num_tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    _, ids, teacher_values = teacher_topk(num_tokens, vocab, k, seed=3)
    kl, entropy = topk_reverse_kl_and_entropy_from_hidden(
        hidden, weight, ids, teacher_values, chunk_size=chunk_size, temperature=temperature
    )
    student = torch.log_softmax(hidden @ weight.t() / temperature, -1)
    reference_kl = topk_reverse_kl(student, ids, teacher_values)
    reference_entropy = -(student.exp() * student).sum(-1)
    torch.testing.assert_close(kl, reference_kl)
    torch.testing.assert_close(entropy, reference_entropy)
    weights = (torch.rand(num_tokens), torch.rand(num_tokens))
    got = grads((kl, entropy), weights, (hidden, weight))
    want = grads((reference_kl, reference_entropy), weights, (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_masked_positions_get_zero_kl_and_no_gradient_whatever_they_hold():
    torch.manual_seed(4)
    num_tokens, vocab, width, k = 6, 12, 5, 4
    hidden = torch.randn(num_tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    _, ids, teacher_values = teacher_topk(num_tokens, vocab, k)
    mask = torch.tensor([True, False, True, True, False, True])
    garbage_ids, garbage_values = ids.clone(), teacher_values.clone()
    garbage_ids[~mask] = torch.tensor([-1, 10**6, 0, 3])  # cache padding: out-of-range ids, nan / inf log-probs
    garbage_values[~mask] = torch.tensor([float("nan"), -float("inf"), float("inf"), 0.0])
    kl = topk_reverse_kl_from_hidden(hidden, weight, garbage_ids, garbage_values, chunk_size=4, mask=mask)
    student = torch.log_softmax(hidden @ weight.t(), -1)
    reference = topk_reverse_kl(student, garbage_ids, garbage_values, mask=mask)
    unmasked = topk_reverse_kl(student, ids, teacher_values)
    assert torch.isfinite(kl).all() and (kl[~mask] == 0).all()
    torch.testing.assert_close(kl, reference)
    torch.testing.assert_close(kl[mask], unmasked[mask])
    grad_hidden, grad_weight = torch.autograd.grad(kl.sum(), (hidden, weight))
    assert torch.isfinite(grad_hidden).all() and torch.isfinite(grad_weight).all()
    assert (grad_hidden[~mask] == 0).all()
    torch.testing.assert_close(grad_weight, torch.autograd.grad(unmasked[mask].sum(), weight)[0])
    # the gathered-log-prob entry point masks the same way
    torch.testing.assert_close(coarsened_reverse_kl(student.gather(-1, ids), garbage_values, mask), reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_teacher_logprobs(dtype):
    torch.manual_seed(5)
    num_tokens, vocab, width, k = 16, 64, 8, 32
    hidden, weight = torch.randn(num_tokens, width, requires_grad=True), torch.randn(vocab, width)
    _, ids, teacher_values = teacher_topk(num_tokens, vocab, k)
    low = teacher_values.to(dtype)  # as cached
    kl = topk_reverse_kl_from_hidden(hidden, weight, ids.int(), low, chunk_size=5)
    assert kl.dtype == torch.float32 and torch.isfinite(kl).all()
    assert torch.isfinite(torch.autograd.grad(kl.sum(), hidden)[0]).all()
    # the error is the rounding's first-order effect: on each log q(i), and on log q(tail) = log(1 - sum q(i)),
    # which bf16 (8 mantissa bits) gets wrong by tens of percent for tails of ~1% while fp16 stays within ~1%
    error = (kl - topk_reverse_kl_from_hidden(hidden, weight, ids, teacher_values)).abs()
    student = torch.log_softmax(hidden @ weight.t(), -1).detach().gather(-1, ids)
    tail_error = ((1 - low.float().exp().sum(-1)).clamp(min=TAIL_FLOOR) / (1 - teacher_values.exp().sum(-1))).log()
    bound = (student.exp() * (low.float() - teacher_values).abs()).sum(-1)
    bound += (1 - student.exp().sum(-1)) * tail_error.abs()
    assert (error <= 1.5 * bound + 1e-5).all()
    if dtype == torch.float16:
        assert error.max() < 1e-2
    # a student equal to the teacher: rounding can push the cached top-k mass above 1; the KL stays >= 0 and ~0
    teacher_full, all_ids, all_values = teacher_topk(num_tokens, vocab, vocab, seed=6)
    self_kl = topk_reverse_kl(teacher_full, all_ids, all_values.to(dtype))
    assert (all_values.to(dtype).float().exp().sum(-1) > 1).any()  # the case is exercised
    assert (self_kl >= -1e-6).all() and self_kl.max() < (1e-3 if dtype == torch.float16 else 1e-2)


def test_tail_bucket_when_the_teacher_top_k_mass_is_one():
    torch.manual_seed(7)
    num_tokens, vocab, width, k = 5, 10, 4, 4
    teacher_logits = torch.full((num_tokens, vocab), -float("inf"))
    ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(num_tokens)])
    teacher_logits.scatter_(-1, ids, torch.randn(num_tokens, k))
    teacher_values = torch.log_softmax(teacher_logits, -1).gather(-1, ids)  # top-k mass 1, empty tail

    # a student with tail mass: charged p(tail) (log p(tail) - log TAIL_FLOOR), finite, with finite grads
    hidden = torch.randn(num_tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    kl = topk_reverse_kl_from_hidden(hidden, weight, ids, teacher_values, chunk_size=2)
    student = torch.log_softmax(hidden @ weight.t(), -1).detach()
    head = student.gather(-1, ids)
    tail = 1 - head.exp().sum(-1)
    expected = (head.exp() * (head - teacher_values)).sum(-1) + tail * (tail.log() - math.log(TAIL_FLOOR))
    torch.testing.assert_close(kl, expected)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(kl.sum(), (hidden, weight)))

    # a student with an empty tail too (0 log 0 = 0): KL 0 at the teacher, no nan in value or gradient
    student_logits = teacher_logits.clone().requires_grad_()
    noise = 0.3 * torch.randn(num_tokens, vocab)
    for logits in (student_logits, student_logits + noise):  # -inf outside the ids either way
        kl = topk_reverse_kl(torch.log_softmax(logits, -1), ids, teacher_values)
        grad = torch.autograd.grad(kl.sum(), student_logits)[0]
        assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    self_kl = topk_reverse_kl(torch.log_softmax(teacher_logits, -1), ids, teacher_values)
    torch.testing.assert_close(self_kl, torch.zeros(num_tokens))


def test_topk_entropy_is_the_coarsened_entropy_a_lower_bound_exact_at_full_k():
    num_tokens, vocab, k = 7, 30, 6
    full, _, values = teacher_topk(num_tokens, vocab, k, torch.float64)
    full_entropy = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(topk_entropy(full), full_entropy)  # k = V
    head = values.exp()
    probs = torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1)
    coarse = torch.distributions.Categorical(probs=probs).entropy()
    torch.testing.assert_close(topk_entropy(values), coarse)
    tail = probs[:, -1]
    assert (coarse <= full_entropy).all() and (full_entropy <= coarse + tail * math.log(vocab - k) + 1e-12).all()
    half = topk_entropy(values.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, coarse.float(), atol=1e-2, rtol=0)
    # an empty tail and fewer than k candidates (-inf entries): finite, equal to the entropy of what is there
    padded = torch.tensor([[math.log(0.5), math.log(0.5), -float("inf")]])
    torch.testing.assert_close(topk_entropy(padded), torch.tensor([math.log(2.0)]))


def test_nothing_of_vocabulary_size_per_token_is_kept_for_backward():
    num_tokens, vocab, width, k = 64, 1000, 8, 16
    hidden = torch.randn(num_tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    _, ids, teacher_values = teacher_topk(num_tokens, vocab, k)
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kl, entropy = topk_reverse_kl_and_entropy_from_hidden(hidden, weight, ids, teacher_values, chunk_size=4)
    (kl.sum() + entropy.sum()).backward()
    assert saved_sizes and max(saved_sizes) == vocab * width  # the head itself; no (tokens, V) logits
    assert hidden.grad is not None and weight.grad is not None


def test_bf16_under_autocast_gives_fp32_kl_and_grads_in_the_input_dtypes():
    torch.manual_seed(8)
    num_tokens, vocab, width, k = 10, 40, 16, 8
    hidden = torch.randn(num_tokens, width, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    _, ids, teacher_values = teacher_topk(num_tokens, vocab, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = topk_reverse_kl_from_hidden(hidden, weight, ids, teacher_values.bfloat16(), chunk_size=3)
        logits = hidden @ weight.t()  # autocast runs this matmul in bf16
    reference = topk_reverse_kl(torch.log_softmax(logits.float(), -1), ids, teacher_values.bfloat16())
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, reference)
    got = torch.autograd.grad(kl.sum(), (hidden, weight))
    want = torch.autograd.grad(reference.sum(), (hidden, weight))
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=0.05, rtol=0.05)


def test_topk_empty_input_and_bad_arguments():
    kl, entropy = topk_reverse_kl_and_entropy_from_hidden(
        torch.zeros(0, 4), torch.randn(6, 4), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    )
    assert kl.shape == entropy.shape == (0,)
    ids, values = torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2), -1.0)
    with pytest.raises(ValueError, match="topk_ids"):
        topk_reverse_kl_from_hidden(torch.zeros(3, 4), torch.randn(6, 4), ids, values[:, :1])
    with pytest.raises(ValueError, match="topk_ids"):
        topk_reverse_kl_from_hidden(torch.zeros(4, 4), torch.randn(6, 4), ids, values)
    with pytest.raises(ValueError, match="mask"):
        topk_reverse_kl_from_hidden(torch.zeros(3, 4), torch.randn(6, 4), ids, values, mask=torch.ones(2).bool())
    with pytest.raises(ValueError, match="temperature"):
        topk_reverse_kl_from_hidden(torch.zeros(3, 4), torch.randn(6, 4), ids, values, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        topk_reverse_kl_from_hidden(torch.zeros(3, 4), torch.randn(6, 4), ids, values, chunk_size=0)


# ---------------------------------------------------------------- (b) the sampled-token estimator


def discounted_by_loop(sample_kl, mask, discount):
    out = torch.zeros_like(sample_kl)
    for row in range(sample_kl.shape[0]):
        running = 0.0
        for t in reversed(range(sample_kl.shape[1])):
            if mask[row, t]:
                running = float(sample_kl[row, t]) + discount * running
                out[row, t] = running
    return -out


@pytest.mark.parametrize("discount", [0.0, 0.5, 0.9, 1.0])
def test_advantages_are_minus_the_discounted_reverse_kl_to_go_over_valid_tokens(discount):
    torch.manual_seed(9)
    student, teacher = -torch.rand(3, 13, dtype=torch.float64) * 3, -torch.rand(3, 13, dtype=torch.float64) * 3
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, 9:] = False  # padding
    mask[1, 3:6] = False  # a hole (e.g. a tool's output): neither discounted nor summed
    mask[2] = False  # a padding row
    teacher[~mask] = float("nan")
    advantages = sampled_reverse_kl_advantages(student, teacher.half(), mask, discount)
    expected = discounted_by_loop(student - teacher.half().double(), mask, discount)
    torch.testing.assert_close(advantages, expected)
    assert (advantages[~mask] == 0).all() and not advantages.requires_grad
    if discount == 0.0:
        torch.testing.assert_close(advantages[mask], -(student - teacher.half().double())[mask])


def test_long_responses_do_not_overflow_the_discounted_sum():
    torch.manual_seed(10)
    student, teacher = -torch.rand(2, 3000, dtype=torch.float64), -torch.rand(2, 3000, dtype=torch.float64)
    mask = torch.ones(2, 3000, dtype=torch.bool)
    mask[1, 2500:] = False
    advantages = sampled_reverse_kl_advantages(student, teacher, mask, discount=0.9)
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages, discounted_by_loop(student - teacher, mask, 0.9))


def categorical_pair():
    student = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)
    teacher = torch.tensor([0.10, 0.15, 0.20, 0.25, 0.15, 0.15], dtype=torch.float64)
    return student.log(), teacher.log()


def assert_within_standard_errors(samples, expected, num_se=4.0):
    """Mean of ``samples`` (num_samples, ...) vs ``expected`` (...), per coordinate, within num_se standard errors."""
    mean, standard_error = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert ((mean - expected).abs() <= num_se * standard_error + 1e-12).all(), (mean, expected, standard_error)


def test_sampled_estimator_mean_is_the_exact_reverse_kl():
    student, teacher = categorical_pair()
    exact = float(exact_reverse_kl(student, teacher))  # about 0.30 nats
    y = torch.multinomial(student.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(y.numel(), 1, dtype=torch.bool)
    per_token = -sampled_reverse_kl_advantages(student[y, None], teacher[y, None], ones)[:, 0]
    assert_within_standard_errors(per_token, torch.tensor(exact, dtype=torch.float64))
    _, stats = sampled_reverse_kl_loss(student[y, None], student[y, None], teacher[y, None], ones)
    torch.testing.assert_close(stats["reverse_kl"], per_token.mean())


def minibatch_gradients(loss_of_batch, num_batches):
    return torch.stack([loss_of_batch(b) for b in range(num_batches)])


@pytest.mark.parametrize("on_policy", [True, False])
def test_sampled_loss_gradient_mean_is_the_exact_reverse_kl_gradient(on_policy):
    # score-function identity: E_y~pi[(log pi(y) - log q(y)) grad log pi(y)] = grad KL(pi || q); off-policy, the
    # importance ratio corrects for sampling from pi_old
    student, teacher = categorical_pair()
    theta = student.clone().requires_grad_()
    sampler = student if on_policy else torch.log_softmax(torch.zeros(6, dtype=torch.float64), -1)
    exact_grad = torch.autograd.grad(topk_reverse_kl(torch.log_softmax(theta, -1), torch.arange(6), teacher), theta)[0]
    manual = torch.autograd.grad(exact_reverse_kl(torch.log_softmax(theta, -1), teacher), theta)[0]
    torch.testing.assert_close(exact_grad, manual)  # (a) at k = V is the exact KL: the gradient to match
    num_batches, batch = 100, 2000
    generator = torch.Generator().manual_seed(1)
    y = torch.multinomial(sampler.exp(), num_batches * batch, replacement=True, generator=generator)
    y = y.view(num_batches, batch, 1)
    mask = torch.ones(batch, 1, dtype=torch.bool)

    def batch_gradient(b):
        logprobs = torch.log_softmax(theta, -1)[y[b]]
        loss, _ = sampled_reverse_kl_loss(logprobs, sampler[y[b]], teacher[y[b]], mask)
        return torch.autograd.grad(loss, theta)[0]

    assert_within_standard_errors(minibatch_gradients(batch_gradient, num_batches), exact_grad)


def test_discount_one_gives_the_sequence_kl_gradient_and_zero_the_per_token_one():
    # two steps over 3 tokens; the second step's distribution depends on the first token
    generator = torch.Generator().manual_seed(2)
    first = torch.randn(3, dtype=torch.float64, generator=generator).requires_grad_()
    second = torch.randn(3, 3, dtype=torch.float64, generator=generator).requires_grad_()
    teacher_first = torch.log_softmax(torch.randn(3, dtype=torch.float64, generator=generator) * 2, -1)
    teacher_second = torch.log_softmax(torch.randn(3, 3, dtype=torch.float64, generator=generator) * 2, -1)
    log_first, log_second = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
    step_kl = exact_reverse_kl(log_second, teacher_second)  # (3,): KL at step 2 after each first token
    sequence_kl = (log_first.exp() * (log_first - teacher_first + step_kl)).sum()
    per_token_kl = exact_reverse_kl(log_first, teacher_first) + (log_first.exp().detach() * step_kl).sum()
    sequence_grad = torch.cat([g.flatten() for g in grads((sequence_kl,), (1.0,), (first, second))])
    per_token_grad = torch.cat([g.flatten() for g in grads((per_token_kl,), (1.0,), (first, second))])

    num_batches, batch = 100, 2000
    sample = torch.Generator().manual_seed(3)
    y1 = torch.multinomial(log_first.exp().detach(), num_batches * batch, replacement=True, generator=sample)
    y2 = torch.multinomial(log_second.exp().detach()[y1], 1, generator=sample).squeeze(-1)
    y1, y2 = y1.view(num_batches, batch), y2.view(num_batches, batch)
    mask = torch.ones(batch, 2, dtype=torch.bool)

    def gradients(discount):
        def batch_gradient(b):
            step1, step2 = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
            logprobs = torch.stack([step1[y1[b]], step2[y1[b], y2[b]]], -1)
            teacher = torch.stack([teacher_first[y1[b]], teacher_second[y1[b], y2[b]]], -1)
            # sum over the response's tokens, mean over responses: the sequence objective's scale
            loss, _ = sampled_reverse_kl_loss(
                logprobs, logprobs.detach(), teacher, mask, discount, "seq-mean-token-sum-norm", max_response_length=1
            )
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, (first, second))])

        return minibatch_gradients(batch_gradient, num_batches)

    discounted, per_token = gradients(1.0), gradients(0.0)
    assert_within_standard_errors(discounted, sequence_grad)
    assert_within_standard_errors(per_token, per_token_grad)
    standard_error = discounted.std(0) / math.sqrt(num_batches)
    assert ((sequence_grad - per_token_grad).abs() > 10 * standard_error).any()  # the test tells the two apart


def test_sampled_loss_value_aggregations_masking_and_stats():
    torch.manual_seed(11)
    logprobs = (-torch.rand(4, 6) * 2).requires_grad_()
    teacher = -torch.rand(4, 6) * 2
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3] = False
    garbage = logprobs.detach().clone()
    garbage[~mask] = float("nan")
    teacher[~mask] = -float("inf")
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        loss, stats = sampled_reverse_kl_loss(
            torch.where(mask, logprobs, float("nan")), garbage, teacher, mask, 0.5, aggregation, max_response_length=6
        )
        advantages = sampled_reverse_kl_advantages(garbage, teacher, mask, 0.5)
        torch.testing.assert_close(loss, aggregate(-advantages, mask, aggregation, 6))  # on-policy: ratio 1
        grad = torch.autograd.grad(loss, logprobs)[0]
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
        surrogate = aggregate(-advantages * logprobs, mask, aggregation, 6)  # A * grad log pi
        torch.testing.assert_close(grad, torch.autograd.grad(surrogate, logprobs)[0])
    sample_kl = torch.where(mask, logprobs.detach() - teacher, 0.0)
    torch.testing.assert_close(stats["reverse_kl"], sample_kl.sum() / mask.sum())
    torch.testing.assert_close(stats["sequence_reverse_kl"], sample_kl.sum() / 3)
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    with pytest.raises(ValueError, match="discount"):
        sampled_reverse_kl_advantages(garbage, teacher, mask, discount=1.5)
    with pytest.raises(ValueError, match="shape"):
        sampled_reverse_kl_loss(logprobs, garbage[:, :3], teacher, mask)
    with pytest.raises(ValueError, match="shape"):
        sampled_reverse_kl_advantages(garbage, teacher, mask[:, :3])
