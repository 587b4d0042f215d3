"""Losses and routers against independent references: exact RLOO gradient, balance, z-loss, contrast."""

import copy
import itertools

import pytest
import torch

from loramix import MixLoraConfig
from loramix.losses import (
    ExpertMemoryQueue,
    expert_contrastive_loss,
    load_balance_loss,
    rloo_surrogate,
    router_z_loss,
    selection_log_prob,
)
from loramix.routing import RoutingContext
from loramix.routing.remix import ReMixRouter


def test_selection_log_prob_is_a_distribution_over_ordered_draws():
    log_probs = torch.randn(5).log_softmax(-1)
    total = sum(
        selection_log_prob(log_probs, torch.tensor(order)).exp() for order in itertools.permutations(range(5), 3)
    )
    assert total == pytest.approx(1.0, abs=1e-5)


def test_sampling_without_replacement_matches_the_sequential_draw_probabilities():
    torch.manual_seed(0)
    router = ReMixRouter(MixLoraConfig(["x"], router="remix", num_experts=4, top_k=2), 3, 4, key="r").train()
    x = torch.randn(1, 1, 3)
    logits = router.gate(x).float().log_softmax(-1)[0, 0]
    draws = 20000
    indices = router(x.expand(draws, 1, 3), RoutingContext()).indices[:, 0]
    for order in itertools.permutations(range(4), 2):
        frequency = (indices == torch.tensor(order)).all(-1).float().mean()
        expected = selection_log_prob(logits.detach(), torch.tensor(order)).exp()
        assert frequency == pytest.approx(float(expected), abs=0.015)


def test_rloo_estimate_matches_the_exact_gradient_of_the_expected_loss():
    """Average the RLOO gradient over many batches of M samples; compare with the gradient of
    E_I[L(I)] = sum over the k-subsets I of Q(I) L(I), computed exactly by enumeration."""
    torch.manual_seed(0)
    n, k, samples, trials = 4, 2, 4, 3000
    config = MixLoraConfig(["x"], router="remix", num_experts=n, top_k=k, remix_samples=samples)
    router = ReMixRouter(config, 3, n, key="r").train()
    x = torch.randn(1, 1, 3)
    subsets = list(itertools.combinations(range(n), k))
    loss_of = {s: float(v) for s, v in zip(subsets, torch.rand(len(subsets)) * 3, strict=True)}

    log_probs = router.gate(x).float().log_softmax(-1)[0, 0]
    expected_loss = sum(
        loss_of[s] * sum(selection_log_prob(log_probs, torch.tensor(o)).exp() for o in itertools.permutations(s))
        for s in subsets
    )
    (exact,) = torch.autograd.grad(expected_loss, router.gate.weight)

    routing = router(x.expand(trials * samples, 1, 3), RoutingContext())
    chosen = routing.indices[:, 0].sort(-1).values.tolist()
    losses = torch.tensor([loss_of[tuple(s)] for s in chosen]).view(trials, samples)
    log_q = routing.log_prob[:, 0].view(trials, samples)
    # one surrogate per trial, each over M samples of a batch of one sequence; averaged over the trials
    surrogate = sum(rloo_surrogate(losses[t].view(samples, 1), log_q[t].view(samples, 1)) for t in range(trials))
    (estimate,) = torch.autograd.grad(surrogate / trials, router.gate.weight)
    torch.testing.assert_close(estimate, exact, atol=0.03, rtol=0.1)
    assert exact.abs().max() > 0.05  # the check is not vacuous


def test_rloo_baseline_is_leave_one_out():
    losses = torch.tensor([[1.0], [2.0], [6.0]])
    log_probs = torch.tensor([[-1.0], [-2.0], [-0.5]], requires_grad=True)
    surrogate = rloo_surrogate(losses, log_probs)
    assert surrogate.item() == 0.0  # only its gradient counts: logged losses stay cross-entropy + auxiliary
    surrogate.backward()
    # d/dlogQ_m = (L_m - mean of the others) / M
    others = torch.tensor([(2 + 6) / 2, (1 + 6) / 2, (1 + 2) / 2])
    torch.testing.assert_close(log_probs.grad[:, 0], (losses[:, 0] - others) / 3)


def test_balance_loss_is_one_for_balanced_routing_and_ignores_padding():
    n = 4
    probs = torch.full((2, 8, n), 1 / n)
    top1 = torch.arange(16).remainder(n).view(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert float(load_balance_loss(probs, top1, mask)) == pytest.approx(1.0)

    skewed = torch.softmax(torch.randn(2, 8, n), -1)
    top1 = skewed.argmax(-1)
    plain = load_balance_loss(skewed, top1, mask)
    padded_probs = torch.cat([skewed, torch.softmax(torch.randn(2, 5, n) * 5, -1)], 1)
    padded_top1 = torch.cat([top1, torch.zeros(2, 5, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)
    assert float(load_balance_loss(padded_probs, padded_top1, padded_mask)) == pytest.approx(float(plain))
    # all tokens to one expert, probability one: the maximum, n
    collapsed = torch.zeros(2, 8, n)
    collapsed[..., 0] = 1
    assert float(load_balance_loss(collapsed, torch.zeros(2, 8, dtype=torch.long), mask)) == pytest.approx(n)


def test_z_loss_against_its_definition():
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    expected = sum(torch.logsumexp(logits[b, t], -1) ** 2 for b, t in [(0, 0), (0, 1), (1, 0)]) / 3
    assert float(router_z_loss(logits, mask)) == pytest.approx(float(expected), rel=1e-5)


def test_memory_queue_is_fifo_per_layer_and_expert():
    queue = ExpertMemoryQueue(num_layers=2, num_experts=2, size=3, dim=1)
    queue.push(torch.tensor([[[1.0], [2.0], [10.0]]]), torch.tensor([[0, 0, 1]]), layers=[1])
    queue.push(torch.tensor([[[7.0]], [[3.0]]]), torch.tensor([[1], [0]]))
    queue.push(torch.tensor([[[4.0], [5.0]]]), torch.tensor([[0, 0]]), layers=[1])
    assert not queue.filled.any(), "pushes are written when the queue is next read or saved"
    assert torch.equal(queue.state_dict()["queue"], queue.queue)
    assert sorted(queue.queue[1, 0, :, 0].tolist()) == [3.0, 4.0, 5.0]  # 1 and 2 were pushed out
    assert queue.filled[1, 0].all() and queue.filled[1, 1].tolist() == [True, False, False]
    assert queue.queue[1, 1, 0, 0] == 10.0
    assert queue.filled[0].sum() == 1 and queue.queue[0, 1, 0, 0] == 7.0


def test_contrastive_loss_against_a_per_token_loop():
    torch.manual_seed(0)
    layers, tokens, n, k, dim, temperature = 2, 3, 5, 2, 4, 0.5
    representations = torch.nn.functional.normalize(torch.randn(layers, tokens, n, dim), dim=-1)
    active = torch.stack([torch.stack([torch.randperm(n)[:k] for _ in range(tokens)]) for _ in range(layers)])
    queue = ExpertMemoryQueue(layers, n, size=4, dim=dim)
    queue.push(torch.nn.functional.normalize(torch.randn(layers, 12, dim), dim=-1), torch.arange(12).expand(2, -1) % n)
    queue.flush()

    expected = []
    for layer in range(layers):
        terms = []
        for s in range(tokens):
            chosen = active[layer, s].tolist()
            negatives = torch.cat([queue.queue[layer, e][queue.filled[layer, e]] for e in range(n) if e not in chosen])
            for i, j in itertools.permutations(chosen, 2):
                query = representations[layer, s, i]
                positive = query @ representations[layer, s, j] / temperature
                negative = negatives @ query / temperature
                terms.append(-(positive - torch.logsumexp(torch.cat([positive[None], negative]), 0)))
        expected.append(torch.stack(terms).mean())
    queries = representations.gather(2, active.unsqueeze(-1).expand(-1, -1, -1, dim))
    got = expert_contrastive_loss(queries, active, queue, temperature)
    torch.testing.assert_close(got, torch.stack(expected))
    one_layer = expert_contrastive_loss(queries[1:], active[1:], queue, temperature, layers=[1])
    torch.testing.assert_close(one_layer, got[1:])


def test_a_push_before_the_backward_does_not_change_the_gradient_of_the_loss_that_read_the_queue():
    torch.manual_seed(0)
    n, dim, temperature = 4, 3, 0.5
    queue = ExpertMemoryQueue(1, n, size=2, dim=dim)
    queue.push(torch.nn.functional.normalize(torch.randn(1, 8, dim), dim=-1), torch.arange(8)[None] % n)
    active = torch.tensor([[[0, 1], [2, 3]]])

    def read(queue):
        queries = torch.nn.functional.normalize(torch.randn(1, 2, 2, dim), dim=-1).requires_grad_()
        return expert_contrastive_loss(queries, active, queue, temperature).sum(), queries

    def reference_gradient(queries):
        (gradient,) = torch.autograd.grad(read_reference(queries), queries)
        return gradient

    reference = copy.deepcopy(queue)
    reference.flush()

    def read_reference(queries):
        return expert_contrastive_loss(queries, active, reference, temperature).sum()

    (first, first_queries), (second, second_queries) = read(queue), read(queue)
    expected = reference_gradient(first_queries), reference_gradient(second_queries)
    kept = queue.queue
    first.backward()
    queue.push(torch.ones(1, 2, dim), torch.tensor([[0, 2]]))
    read(queue)  # writes the push while `second` still awaits its backward
    queue.load_state_dict(queue.state_dict())  # so does a load
    second.backward()
    torch.testing.assert_close(first_queries.grad, expected[0])
    torch.testing.assert_close(second_queries.grad, expected[1])
    assert queue.queue is not kept, "the queue was copied, not written under the pending backward"

    loss, _ = read(queue)
    loss.backward()
    kept = queue.queue
    queue.push(torch.ones(1, 2, dim), torch.tensor([[1, 3]]))
    read(queue)
    assert queue.queue is kept and queue.queue[0, 1].eq(1).all(-1).any(), "after the backward: written in place"


def test_contrastive_loss_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    queue = ExpertMemoryQueue(2, 4, size=8, dim=16)
    queue.push(torch.nn.functional.normalize(torch.randn(2, 20, 16), dim=-1), torch.randint(0, 4, (2, 20)))
    queries = torch.nn.functional.normalize(torch.randn(2, 5, 2, 16), dim=-1)
    active = torch.stack([torch.stack([torch.randperm(4)[:2] for _ in range(5)]) for _ in range(2)])
    expected = expert_contrastive_loss(queries, active, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = expert_contrastive_loss(queries, active, queue, 0.07)
    torch.testing.assert_close(got, expected)
