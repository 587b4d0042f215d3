"""MixLoraLinear against a per-expert loop, for every router; and the contrastive path."""

import copy
from types import SimpleNamespace

import pytest
import torch
from test_losses import contrastive_loss_by_loops
from torch import nn
from transformers.pytorch_utils import Conv1D

import loramix
from loramix import MixLoraConfig
from loramix.layer import MixLoraLinear
from loramix.losses import expert_contrastive_loss
from loramix.models import tiny_llama
from loramix.routing import ROUTERS, RoutingContext


@pytest.mark.parametrize("router_name", ["soft", "topk", "remix"])
@pytest.mark.parametrize("base_type", ["linear", "conv1d"])
def test_layer_matches_a_loop_over_experts(router_name, base_type):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if base_type == "linear" else Conv1D(5, 6)
    config = MixLoraConfig(["x"], router=router_name, num_experts=4, expert_rank=3, top_k=2)
    context = RoutingContext()
    router = ROUTERS[router_name](config, 6, 4, key="layer").eval()
    layer = MixLoraLinear(base, 4, 3, 0.0, router, context)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 7, 6)
    context.new_forward(None)
    got = layer(x)

    weights = router.step_route.weights
    expected = base(x)
    for i in range(4):
        expert = x @ layer.lora_A[i].T @ layer.lora_B[i].T
        expected = expected + router.expert_scale * weights[..., i : i + 1] * expert
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if router_name != "soft":
        assert (weights > 0).sum(-1).eq(2).all()


def test_delta_weight_is_the_merged_update():
    torch.manual_seed(0)
    config = MixLoraConfig(["x"], router="soft", num_experts=3, expert_rank=2)
    layer = MixLoraLinear(nn.Linear(4, 5, bias=False), 3, 2, 0.0, ROUTERS["soft"](config, 4, 3, "l"), RoutingContext())
    nn.init.normal_(layer.lora_B)
    w = torch.tensor([0.2, 0.5, 0.3])
    expected = sum(w[i] * layer.lora_B[i] @ layer.lora_A[i] for i in range(3)) * layer.router.expert_scale
    torch.testing.assert_close(layer.delta_weight(w), expected)


def wrap_for_contrast(base: nn.Module, targets: list[str], queue_size: int) -> loramix.MixLoraModel:
    """`base` wrapped with a top-2-of-4 router and the contrastive loss, its experts' B made non-zero."""
    config = MixLoraConfig(
        targets,
        router="topk",
        num_experts=4,
        expert_rank=2,
        contrastive_loss_weight=0.1,
        memory_queue_size=queue_size,
    )
    wrapped = loramix.wrap(base, config).train()
    for layer in wrapped.layers.values():
        nn.init.normal_(layer.lora_B, std=0.1)
    return wrapped


def mean_of_layers_alone(samples: list, queues: nn.ModuleDict) -> torch.Tensor:
    """The reference for the stacked contrastive loss: each sampled layer's loss computed on its own."""
    per_layer = []
    for sample in samples:
        name, index = sample.layer.memory_slot
        loss, _ = expert_contrastive_loss(
            sample.hidden[None], sample.active[None], sample.up[None], queues[name], 0.07, [index]
        )
        per_layer.append(loss)
    return torch.cat(per_layer).mean().detach()


def test_contrastive_training_adds_the_loss_and_fills_the_queues():
    wrapped = wrap_for_contrast(tiny_llama(), ["q_proj", "v_proj"], queue_size=16)
    ids = torch.randint(0, 128, (2, 12))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    wrapped.compute_loss(data)  # the first step fills the queues
    queues_read = copy.deepcopy(wrapped.memory_queues)  # as the second step reads them
    loss = wrapped.compute_loss(data)
    assert "contrastive" in wrapped.last_losses and wrapped.last_losses["contrastive"] > 0
    samples = list(wrapped.context.expert_samples)
    loss.backward()
    assert set(wrapped.memory_queues) == {"32", "16"}, "one queue per output size (q_proj: 32, v_proj: 16)"
    for queue in wrapped.memory_queues.values():
        assert queue.filled.any(-1).all(), "every expert's queue received representations"
    layer = next(iter(wrapped.layers.values()))
    assert layer.lora_B.grad.abs().sum() > 0

    assert len(samples) == len(wrapped.layers)
    torch.testing.assert_close(wrapped.last_losses["contrastive"], mean_of_layers_alone(samples, queues_read))


def test_contrastive_loss_and_gradients_of_a_tiny_model_against_a_per_token_loop():
    """The model's contrastive loss (the layers of one output size at once, in the experts' rank space) and
    its gradient on every adapter parameter equal those of the loop over layers, tokens and pairs
    (`contrastive_loss_by_loops`) on the same samples and queues: the gradient of a model with the loss is
    that of the same model without it plus the weight times the loop's."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def wrapped(weight: float) -> loramix.MixLoraModel:
        config = MixLoraConfig(
            "all-linear",
            router="topk",
            num_experts=4,
            expert_rank=2,
            contrastive_loss_weight=weight,
            memory_queue_size=16,
        )
        model = loramix.wrap(tiny_llama(), config).train()  # tiny_llama() seeds: both models start equal
        for layer in model.layers.values():
            nn.init.normal_(layer.lora_B, std=0.1)
        return model

    with_loss, without = wrapped(0.1), wrapped(0.0)
    with_loss.compute_loss(data)  # fills the queues, some experts' partly (48 pushes of 16 slots x 4 experts)
    queues = copy.deepcopy(with_loss.memory_queues)  # as the next step reads them
    for queue in queues.values():
        queue.flush()
    assert not all(queue.filled.all() for queue in queues.values())
    parameters = [p for p in with_loss.parameters() if p.requires_grad]
    total = with_loss.compute_loss(data)
    gradients = torch.autograd.grad(total, parameters, retain_graph=True)
    samples = list(with_loss.context.expert_samples)
    assert len(samples) == len(with_loss.layers) == 14 and len(queues) == 3
    reference = torch.cat(
        [
            contrastive_loss_by_loops(
                sample.hidden[None],
                sample.active[None],
                sample.up[None],
                queues[sample.layer.memory_slot[0]],
                0.07,
                [sample.layer.memory_slot[1]],
            )
            for sample in samples
        ]
    ).mean()
    torch.testing.assert_close(with_loss.last_losses["contrastive"], reference.detach())
    reference_gradients = torch.autograd.grad(reference, parameters, allow_unused=True)
    plain = torch.autograd.grad(without.compute_loss(data), [p for p in without.parameters() if p.requires_grad])
    for got, rest, contrastive in zip(gradients, plain, reference_gradients, strict=True):
        expected = rest if contrastive is None else rest + 0.1 * contrastive
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


class PooledBranchLM(nn.Module):
    """A causal LM whose adapted linears see different token counts: `pooled` runs on two positions only,
    and `unused` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 8), nn.Linear(8, 50)
        self.mixer, self.pooled, self.unused = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.mixer(self.embed(input_ids))
        pooled = self.pooled(hidden[:, :2]).mean(1, keepdim=True)
        return SimpleNamespace(logits=self.head(hidden + pooled))


def test_contrastive_loss_with_layers_that_see_different_tokens_or_do_not_run():
    torch.manual_seed(0)
    wrapped = wrap_for_contrast(PooledBranchLM(), ["mixer", "pooled", "unused"], queue_size=4)
    ids = torch.randint(0, 50, (2, 12))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    wrapped.compute_loss(data).backward()
    queues_read = copy.deepcopy(wrapped.memory_queues)
    wrapped.compute_loss(data).backward()
    samples = list(wrapped.context.expert_samples)
    assert sorted(len(sample.hidden) for sample in samples) == [4, 24], "every real token of each layer's input"

    torch.testing.assert_close(wrapped.last_losses["contrastive"], mean_of_layers_alone(samples, queues_read))
    filled = wrapped.memory_queues["8"].filled
    assert filled[:2].any() and not filled[2].any(), "the layer that did not run got nothing"
