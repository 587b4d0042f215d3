"""Regional compilation: every router's decoder blocks compile as one graph (no graph break), all blocks share it
whatever their number, sequence lengths stay dynamic, and the compiled model computes eager's losses and
gradients; generation and evaluation run eagerly."""

import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_methods import METHOD_CONFIGS
from test_methods import wrapped as method_model
from test_train import tiny_recipe
from torch import nn
from torch._dynamo.utils import counters

import loramix
from loramix import compilation
from loramix.call import current_tokens
from loramix.models import tiny_llama
from loramix.train import train

ROUTERS = {
    "soft": {"router": "soft"},
    "topk": {"router": "topk"},
    "remix": {"router": "remix", "remix_samples": 2},
    "task": {"router": "task", "num_tasks": 2},
    "prompt": {"router": "prompt"},
    "contrastive": {"router": "topk", "contrastive_loss_weight": 0.1, "memory_queue_size": 8},
    "remix, upper layers": {"router": "remix", "remix_samples": 2, "layers_to_transform": "all but the first"},
}
LENGTHS = (10, 14, 9)  # a second length makes the graphs dynamic; the third reuses them


def mixture(settings: dict, num_layers: int = 3) -> loramix.MixLoraModel:
    torch.manual_seed(0)
    if "layers_to_transform" in settings:  # the lower block's samples are shared (compute_loss's repeat hook)
        settings = settings | {"layers_to_transform": list(range(1, num_layers))}
    config = loramix.MixLoraConfig("all-linear", num_experts=4, expert_rank=2, top_k=2, **settings)
    model = loramix.wrap(tiny_llama(num_layers=num_layers), config).train()
    for layer in model.layers.values():
        nn.init.normal_(layer.lora_B, std=0.1)  # experts that change the output, so that gradients flow everywhere
    return model


def batch(length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    labels = ids.clone()
    labels[:, :4] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "task_ids": torch.tensor([0, 1]),
    }


def step(model: loramix.MixLoraModel, length: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # ReMix's sampled routes and the contrastive tokens draw alike in both models
    loss = model.compute_loss(batch(length))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def graphs_for(settings: dict, num_layers: int) -> int:
    torch._dynamo.reset()
    counters.clear()
    model = mixture(settings, num_layers)
    model.compile("eager")
    for length in LENGTHS:
        step(model, length)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("router", ROUTERS)
def test_compiled_blocks_share_one_graph_and_compute_eager_losses_and_gradients(router):
    # fullgraph: a graph break inside a block would raise; equal counts: no block has graphs of its own
    eager, compiled = mixture(ROUTERS[router]), mixture(ROUTERS[router])
    torch._dynamo.reset()
    counters.clear()
    assert compiled.compile("eager")  # dynamo captures the graphs (the Python state is what could differ)
    for length in LENGTHS:
        (loss, grads), (compiled_loss, compiled_grads) = step(eager, length), step(compiled, length)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == grads.keys() and any("lora_A" in name for name in grads)
        for name in grads:
            torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.last_losses.keys() == eager.last_losses.keys()
    assert counters["stats"]["unique_graphs"] == graphs_for(ROUTERS[router], num_layers=5) <= 12


@pytest.mark.skipif(compilation.compile_problem("inductor", torch.device("cpu")) is not None, reason="no compiler")
def test_inductor_compiles_a_mixture_that_trains_as_eager_does():
    eager, compiled = mixture(ROUTERS["topk"], num_layers=2), mixture(ROUTERS["topk"], num_layers=2)
    torch._dynamo.reset()
    assert compiled.compile()  # inductor: C++ kernels on the CPU
    for length in LENGTHS[:1]:  # (dynamic lengths: the tests above)
        (loss, grads), (compiled_loss, compiled_grads) = step(eager, length), step(compiled, length)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("router", ["topk", "prompt"])
def test_a_compiled_model_generates_and_is_evaluated_eagerly(router):
    eager, compiled = mixture(ROUTERS[router]).eval(), mixture(ROUTERS[router]).eval()
    torch._dynamo.reset()
    counters.clear()
    compiled.compile("eager")
    prompt = batch(8)["input_ids"]
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, task_ids=torch.tensor([0, 1]))
    with torch.no_grad():
        assert torch.equal(
            compiled.generate(input_ids=prompt, **settings), eager.generate(input_ids=prompt, **settings)
        )
    assert counters["stats"]["unique_graphs"] == 0  # nothing was compiled for decoding
    assert compilation.is_compiled(compiled) and not compilation.is_compiled(eager)


def test_a_backend_that_cannot_compile_here_warns_and_leaves_the_model_eager(monkeypatch):
    monkeypatch.setattr(compilation, "compile_problem", lambda backend, device: "no C++ compiler")
    model = mixture(ROUTERS["topk"])
    with pytest.warns(UserWarning, match="not compiling, training eagerly: no C\\+\\+ compiler"):
        assert not model.compile()
    assert not compilation.is_compiled(model)
    with pytest.raises(ValueError, match="backend='tvm' is invalid; allowed: inductor, aot_eager, eager"):
        model.compile("tvm")


def test_a_recipe_trains_compiled_as_it_trains_eagerly(task_file, tmp_path):
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="not compiling")  # the backend compiles: no fallback
        compiled = train(tiny_recipe(task_file, compile="eager"), tmp_path / "compiled", evaluate=False)
    eager = train(tiny_recipe(task_file), tmp_path / "eager", evaluate=False)
    one, two = (load_file(run / "adapter" / "adapter.safetensors") for run in (eager, compiled))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- decoding with a static cache and a compiled forward ------------------------------------------------------
def left_padded_prompt() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second row is two tokens shorter
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.mark.parametrize("adapter", ["prompt", "topk", "task", "merged task", "pedro", "iapt"])
def test_static_decoding_compiles_once_and_generates_as_eager_does(adapter):
    """A left-padded batch: with a static cache the model gets a 4-D mask whose padding it must still see."""
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    if adapter in METHOD_CONFIGS:
        model = method_model(adapter)
    else:
        model = mixture(ROUTERS["task" if adapter == "merged task" else adapter]).eval()
    if adapter == "merged task":
        model = model.merge_task(1)
    elif adapter == "task":
        settings["task_ids"] = torch.tensor([0, 1])
    prompt = left_padded_prompt()
    with torch.no_grad():
        eager = model.generate(**prompt, **settings)
        torch._dynamo.reset()
        counters.clear()
        static = compilation.static_decoding(model, "aot_eager")  # dynamo's graphs, without inductor's kernels
        assert static["cache_implementation"] == "static"
        assert torch.equal(model.generate(**prompt, **settings, **static), eager)
        graphs = counters["stats"]["unique_graphs"]
        assert 1 <= graphs <= 2  # the decoding step (a token-level router's statistics run eagerly after it)
        assert torch.equal(model.generate(**prompt, **settings, **static), eager)
        assert counters["stats"]["unique_graphs"] == graphs  # the second call reuses the graphs
        # what is computed once per prompt enters the graph as an input, not as a constant of the first call
        other = {"input_ids": prompt["input_ids"].flip(0), "attention_mask": prompt["attention_mask"].flip(0)}
        if "task_ids" in settings:
            settings["task_ids"] = settings["task_ids"].flip(0)
        assert torch.equal(model.generate(**other, **settings, **static), model.generate(**other, **settings))


@pytest.mark.skipif(compilation.compile_problem("inductor", torch.device("cpu")) is not None, reason="no compiler")
def test_static_decoding_with_inductor_kernels_generates_as_eager_does():
    model = mixture(ROUTERS["prompt"], num_layers=2).eval()
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompt = left_padded_prompt()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(**prompt, **settings)
        assert torch.equal(model.generate(**prompt, **settings, **compilation.static_decoding(model)), eager)


@pytest.mark.parametrize("additive", [False, True])
def test_a_4d_attention_mask_gives_the_current_tokens(additive):
    """generate's 4-D masks with a static cache: K slots, some not yet filled; the current tokens are real or
    padding as the 2-D mask says."""
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]).bool()  # prompts of 5 tokens, the second padded
    slots = 8  # the static cache's length: 3 slots not yet filled
    keys = torch.zeros(2, slots, dtype=torch.bool)
    keys[:, :5] = padding
    causal = torch.ones(5, slots, dtype=torch.bool).tril()
    visible = causal[None] & keys[:, None, :]  # (B, Q, K)
    mask = visible[:, None]
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(current_tokens(mask), padding)
    assert current_tokens(mask[:, :, -1:, :]) is None  # a decoding step: every row's one token is real


def test_static_decoding_falls_back_to_eager_with_the_reason(monkeypatch):
    model = mixture(ROUTERS["prompt"]).eval()
    model.compile("eager")
    with pytest.warns(UserWarning, match="decoding eagerly: its decoder blocks are compiled for training"):
        assert compilation.static_decoding(model, "eager") == {}
    monkeypatch.setattr(compilation, "compile_problem", lambda backend, device: "no C++ compiler")
    with pytest.warns(UserWarning, match="decoding eagerly: no C\\+\\+ compiler"):
        assert compilation.static_decoding(mixture(ROUTERS["topk"]).eval()) == {}
    with pytest.raises(ValueError, match="backend='tvm' is invalid"):
        compilation.static_decoding(model, "tvm")
