"""Losses and routers against independent references: exact RLOO gradient, balance, z-loss, contrast."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from loramix import MixLoraConfig, losses
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


def test_memory_queue_keeps_the_last_rows_of_a_push_larger_than_a_queue():
    queue = ExpertMemoryQueue(num_layers=1, num_experts=2, size=3, dim=1)
    values = torch.arange(1.0, 8.0).view(1, 7, 1)  # expert 0 gets 1, 3, 4, 6, 7; expert 1 gets 2, 5
    queue.push(values, torch.tensor([[0, 1, 0, 0, 1, 0, 0]]))
    queue.flush()
    assert queue.queue[0, 0, :, 0].tolist() == [6.0, 7.0, 4.0]  # 1 and 3 out; 4 sits where it was written
    assert queue.queue[0, 1, :2, 0].tolist() == [2.0, 5.0] and queue.filled[0, 1].tolist() == [True, True, False]
    queue.push(torch.tensor([[[8.0]]]), torch.tensor([[0]]))
    queue.flush()
    assert queue.queue[0, 0, :, 0].tolist() == [6.0, 7.0, 8.0]  # the oldest, 4, goes next


def test_memory_queue_load_clears_the_empty_slots():
    """The contrastive loss reads zeros in an empty slot, whatever a loaded state holds there."""
    queue = ExpertMemoryQueue(num_layers=1, num_experts=2, size=2, dim=3)
    state = {"queue": torch.randn(1, 2, 2, 3), "filled": torch.tensor([[[True, False], [False, False]]])}
    queue.load_state_dict(state | {"position": torch.tensor([[1, 0]])})
    assert torch.equal(queue.queue[0, 0, 0], state["queue"][0, 0, 0])
    assert queue.queue[0, 0, 1].eq(0).all() and queue.queue[0, 1].eq(0).all()


def contrastive_loss_by_loops(hidden, active, up, queue: ExpertMemoryQueue, temperature: float, layers=None):
    """The reference for the contrastive loss, straight from its definition: per layer, token and (query,
    positive) pair, the experts' outputs B_e A_e x normalised one by one, the positive against every filled
    slot of the queues of the experts the token did not choose. `layers`: the queue's layers (default all)."""
    slots = layers or list(range(len(hidden)))
    _, tokens, n, rank = hidden.shape
    losses = []
    for layer, slot in enumerate(slots):
        experts_up = up[layer].view(-1, n, rank)  # B_e = experts_up[:, e]
        terms = []
        for s in range(tokens):
            chosen = active[layer, s].tolist()
            query = {e: F.normalize(experts_up[:, e] @ hidden[layer, s, e], dim=0) for e in chosen}
            negatives = [queue.queue[slot, e][queue.filled[slot, e]] for e in range(n) if e not in chosen]
            negatives = torch.cat(negatives)
            for i, j in itertools.permutations(chosen, 2):
                positive = query[i] @ query[j] / temperature
                negative = negatives @ query[i] / temperature
                terms.append(torch.logsumexp(torch.cat([positive[None], negative]), 0) - positive)
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses)


def random_contrast(layers=2, tokens=5, n=5, k=2, rank=3, dim=6, size=4):
    """Expert activations, B and a queue in which some slots and one expert's whole queue are empty."""
    hidden = torch.randn(layers, tokens, n, rank, requires_grad=True)
    up = torch.randn(layers, dim, n * rank, requires_grad=True)
    active = torch.stack([torch.stack([torch.randperm(n)[:k] for _ in range(tokens)]) for _ in range(layers)])
    queue = ExpertMemoryQueue(layers, n, size, dim)
    experts = torch.arange(3 * size) % (n - 1)  # experts 0 to n - 2 fill 3 of their 4 slots, expert n - 1 none
    queue.push(F.normalize(torch.randn(layers, len(experts), dim), dim=-1), experts.expand(layers, -1))
    queue.flush()
    return hidden, active, up, queue


@pytest.mark.parametrize("temperature", [0.07, 0.5, 0.01], ids=["default", "warm", "cold-row-maximum"])
@pytest.mark.parametrize("chunk_bytes", [losses.EXPONENTIALS_CHUNK_BYTES, 1], ids=["all-layers", "layer-by-layer"])
def test_contrastive_loss_and_gradients_against_a_per_token_loop(temperature, chunk_bytes, monkeypatch):
    """The rank-space loss (queue against B once, logits shifted by 1/t or, for t <= 0.04, by the row's
    largest included value, computed for all layers at once or layer by layer) equals the loss from the
    experts' outputs, value and gradients."""
    monkeypatch.setattr(losses, "EXPONENTIALS_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    hidden, active, up, queue = random_contrast(k=3 if temperature == 0.5 else 2)
    expected = contrastive_loss_by_loops(hidden, active, up, queue, temperature)
    expected_grads = torch.autograd.grad(expected.sum(), [hidden, up])
    got, queries = expert_contrastive_loss(hidden, active, up, queue, temperature)
    got_grads = torch.autograd.grad(got.sum(), [hidden, up])
    torch.testing.assert_close(got, expected)
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)
    for layer, s, j in itertools.product(range(2), range(5), range(active.shape[-1])):
        e = active[layer, s, j]
        output = up[layer].detach().view(-1, 5, 3)[:, e] @ hidden[layer, s, e].detach()
        torch.testing.assert_close(queries[layer, s, j], F.normalize(output, dim=0))
    one_layer, _ = expert_contrastive_loss(hidden[1:], active[1:], up[1:], queue, temperature, layers=[1])
    torch.testing.assert_close(one_layer, got[1:])


def test_contrastive_loss_without_negatives_is_zero_with_zero_gradients():
    """An empty queue (the first step) leaves no negative: loss 0.0 and gradients 0.0, not NaN."""
    torch.manual_seed(0)
    for temperature in (0.07, 0.01):
        hidden, active, up, _ = random_contrast()
        loss, _ = expert_contrastive_loss(hidden, active, up, ExpertMemoryQueue(2, 5, 4, 6), temperature)
        loss.sum().backward()
        assert loss.eq(0).all() and hidden.grad.eq(0).all() and up.grad.eq(0).all()


def test_a_push_before_the_backward_does_not_change_the_gradient_of_the_loss_that_read_the_queue():
    torch.manual_seed(0)
    n, rank, dim, temperature = 4, 2, 3, 0.5
    queue = ExpertMemoryQueue(1, n, size=2, dim=dim)
    queue.push(F.normalize(torch.randn(1, 8, dim), dim=-1), torch.arange(8)[None] % n)
    active = torch.tensor([[[0, 1], [2, 3]]])

    def read(queue):
        hidden = torch.randn(1, 2, n, rank, requires_grad=True)
        up = torch.randn(1, dim, n * rank, requires_grad=True)
        return expert_contrastive_loss(hidden, active, up, queue, temperature)[0].sum(), (hidden, up)

    def reference_gradient(inputs):
        hidden, up = inputs
        loss, _ = expert_contrastive_loss(hidden, active, up, reference, temperature)
        return torch.autograd.grad(loss.sum(), inputs)

    reference = copy.deepcopy(queue)
    reference.flush()

    (first, first_inputs), (second, second_inputs) = read(queue), read(queue)
    expected = reference_gradient(first_inputs), reference_gradient(second_inputs)
    kept = queue.queue
    first.backward()
    queue.push(torch.ones(1, 2, dim), torch.tensor([[0, 2]]))
    read(queue)  # writes the push while `second` still awaits its backward
    queue.load_state_dict(queue.state_dict())  # so does a load
    second.backward()
    for inputs, gradients in zip((first_inputs, second_inputs), expected, strict=True):
        for tensor, gradient in zip(inputs, gradients, strict=True):
            torch.testing.assert_close(tensor.grad, gradient)
    assert queue.queue is not kept, "the queue was copied, not written under the pending backward"

    loss, _ = read(queue)
    loss.backward()
    kept = queue.queue
    queue.push(torch.ones(1, 2, dim), torch.tensor([[1, 3]]))
    read(queue)
    assert queue.queue is kept and queue.queue[0, 1].eq(1).all(-1).any(), "after the backward: written in place"


def test_contrastive_loss_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, active, up, queue = random_contrast()
    expected = expert_contrastive_loss(hidden, active, up, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = expert_contrastive_loss(hidden, active, up, queue, 0.07)
    torch.testing.assert_close(got, expected)
