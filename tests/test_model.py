"""The wrapped model: equality at initialisation, gradients, every router end to end, save/load/merge."""

import pytest
import torch

import loramix
from loramix import MixLoraConfig
from loramix.losses import load_balance_loss, router_z_loss
from loramix.models import tiny_gpt2, tiny_llama
from loramix.routing.base import effective_support_size

ROUTER_SETTINGS = [
    ("soft", "token"),
    ("soft", "sequence"),
    ("topk", "token"),
    ("topk", "sequence"),
    ("remix", "token"),
    ("remix", "sequence"),
    ("task", "token"),
    ("prompt", "token"),
]
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def config_for(router: str, level: str = "token", **overrides) -> MixLoraConfig:
    values = dict(router=router, routing_level=level, num_experts=4, expert_rank=2, top_k=2)
    values["num_tasks"] = 3 if router == "task" else None
    values.update(overrides)
    return MixLoraConfig("all-linear", **values)


def randomise_experts(model: loramix.MixLoraModel, seed: int = 1) -> None:
    """B starts at zero; give it values so that the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)


def batch(vocab: int = 128):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 10), generator=generator)
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 5:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[attention_mask == 0] = -100
    task_ids = torch.tensor([0, 1, 2])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}


@pytest.mark.parametrize("architecture", BUILDERS)
@pytest.mark.parametrize(("router", "level"), ROUTER_SETTINGS)
def test_fresh_wrap_computes_exactly_the_base_model(architecture, router, level):
    model = BUILDERS[architecture]().eval()
    data = batch()
    expected = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    wrapped = loramix.wrap(model, config_for(router, level))
    got = wrapped(input_ids=data["input_ids"], attention_mask=data["attention_mask"], task_ids=data["task_ids"])
    assert torch.equal(got.logits, expected)


@pytest.mark.parametrize("architecture", BUILDERS)
@pytest.mark.parametrize(("router", "level"), ROUTER_SETTINGS)
def test_gradients_reach_exactly_the_expert_and_router_parameters(architecture, router, level):
    wrapped = loramix.wrap(BUILDERS[architecture](), config_for(router, level)).train()
    randomise_experts(wrapped)
    wrapped.compute_loss(batch()).backward()
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "router" in n for n in trainable)
    assert all(p.grad is None for n, p in wrapped.named_parameters() if n not in trainable)
    with_gradient = {n for n, p in wrapped.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".lora_A" in n for n in with_gradient) and any(".lora_B" in n for n in with_gradient)
    assert any("router" in n for n in with_gradient), "the router learns nothing"


@pytest.mark.parametrize(("router", "level"), ROUTER_SETTINGS)
def test_every_router_generates(router, level):
    wrapped = loramix.wrap(tiny_llama(), config_for(router, level)).eval()
    randomise_experts(wrapped)
    data = batch()
    prompt = data["input_ids"][:, :5]
    out = wrapped.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        task_ids=data["task_ids"],
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (3, 9) and torch.equal(out[:, :5], prompt)


@pytest.mark.parametrize(("router", "level"), [s for s in ROUTER_SETTINGS if s[1] == "sequence" or s[0] == "prompt"])
def test_sequence_routing_is_the_same_with_and_without_the_kv_cache(router, level):
    wrapped = loramix.wrap(tiny_llama(), config_for(router, level)).eval()
    randomise_experts(wrapped)
    prompt = batch()["input_ids"][:, :6]
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding, as in batched generation
    runs = [
        wrapped.generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            use_cache=use_cache,
            return_dict_in_generate=True,
            output_scores=True,
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].scores, runs[1].scores, strict=True):
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("router", "level"), ROUTER_SETTINGS)
def test_generated_scores_equal_a_forward_over_the_generated_sequence(router, level):
    """What `generate` keeps per call (routes, gates, the stacked B) changes nothing and does not leak into
    the next call."""
    wrapped = loramix.wrap(tiny_llama(), config_for(router, level)).eval()
    randomise_experts(wrapped)
    data = batch()
    options = dict(task_ids=data["task_ids"], do_sample=False, pad_token_id=0)
    wrapped.generate(input_ids=data["input_ids"][:, 3:], max_new_tokens=3, **options)  # an earlier call
    prompt = data["input_ids"][:, :5]
    out = wrapped.generate(
        input_ids=prompt, max_new_tokens=4, output_scores=True, return_dict_in_generate=True, **options
    )
    is_prompt = torch.arange(out.sequences.shape[1]) < 5
    logits = wrapped(
        input_ids=out.sequences, task_ids=data["task_ids"], prompt_mask=is_prompt.expand_as(out.sequences)
    ).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, logits[:, 4 + step], atol=1e-5, rtol=1e-5)


def test_sequence_routing_decodes_without_running_a_router():
    wrapped = loramix.wrap(tiny_llama(), config_for("topk", "sequence")).eval()
    calls = []
    for layer in wrapped.layers.values():
        layer.router.register_forward_hook(lambda *args: calls.append(1))
    prompt = batch()["input_ids"][:, :6]
    wrapped.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert len(calls) == len(wrapped.layers)  # once, on the prompt


def test_task_ids_select_the_task_update_and_are_required():
    wrapped = loramix.wrap(tiny_llama(), config_for("task")).eval()
    randomise_experts(wrapped)
    with torch.no_grad():
        wrapped.shared_routers["task"].embedding.weight.normal_()
    ids = batch()["input_ids"][:1].repeat(2, 1)
    logits = wrapped(input_ids=ids, task_ids=torch.tensor([0, 2])).logits
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ValueError, match="task_ids"):
        wrapped(input_ids=ids)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        wrapped(input_ids=ids, task_ids=torch.tensor([0, 3]))


def test_remix_weights_are_constant_and_ess_is_k():
    wrapped = loramix.wrap(tiny_llama(), config_for("remix", top_k=3)).train()
    data = batch()
    wrapped.compute_loss(data)
    for record in wrapped.context.records:
        active = record.routing.weights[record.routing.weights > 0]
        assert torch.equal(active, torch.ones_like(active))
        assert (record.routing.weights > 0).sum(-1).eq(3).all()
    stats = wrapped.routing_stats()
    assert all(s["ess"] == pytest.approx(3.0) for s in stats.values())
    scale = next(iter(wrapped.layers.values())).router.expert_scale
    assert scale == pytest.approx(16.0 / (3 * 2) ** 0.5)  # rsLoRA-type: alpha / sqrt(k r)


@pytest.mark.parametrize("router", ["remix", "topk"])
def test_probs_ess_is_that_of_the_routers_distribution_over_real_tokens(router):
    """The imbalance curve's second measure: the ESS of softmax(logits) over all experts, averaged over the real
    tokens, computed here independently from the records the forward left."""
    wrapped = loramix.wrap(tiny_llama(), config_for(router)).train()
    randomise_experts(wrapped)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "router" in name:
                p.normal_(std=2.0)  # far from uniform, so that the ESS is not simply n
    wrapped.reset_routing_stats()
    wrapped.compute_loss(batch())
    stats = wrapped.routing_stats()
    for record in wrapped.context.records:
        probs = record.routing.logits.float().softmax(-1)
        expected = (1 / probs.square().sum(-1))[record.mask].mean()
        name = next(n for n, layer in wrapped.layers.items() if layer.router is record.router)
        assert stats[name]["probs_ess"] == pytest.approx(float(expected), rel=1e-4)
        assert 1.0 <= stats[name]["probs_ess"] < record.routing.logits.shape[-1] - 0.5


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_remix_rloo_estimate_trains_the_routers_alone(monkeypatch, level):
    """The experts get the gradient of the loss alone: without the RLOO surrogate (the same routes drawn) their
    gradients are the same, while the routers' differ."""

    def gradients(surrogate):
        monkeypatch.setattr(loramix.model, "rloo_surrogate", surrogate)
        wrapped = loramix.wrap(tiny_llama(num_layers=3), config_for("remix", level)).train()
        randomise_experts(wrapped)
        torch.manual_seed(3)
        wrapped.compute_loss(batch()).backward()
        return {name: p.grad.clone() for name, p in wrapped.named_parameters() if p.grad is not None}

    with_rloo = gradients(loramix.model.rloo_surrogate)
    without = gradients(lambda losses, log_probs: (log_probs * 0).sum())
    experts = [name for name in with_rloo if "lora_" in name]
    routers = [name for name in with_rloo if "router" in name]
    assert experts and routers
    for name in experts:
        assert torch.allclose(with_rloo[name], without[name], atol=1e-7), name
    assert all(with_rloo[name].abs().sum() > 0 for name in routers)
    assert all(without.get(name, torch.zeros(1)).abs().sum() == 0 for name in routers)


def test_remix_replicates_the_batch_once_per_sample():
    wrapped = loramix.wrap(tiny_llama(), config_for("remix", remix_samples=3)).train()
    wrapped.compute_loss(batch())
    record = wrapped.context.records[0]
    assert record.routing.log_prob.shape == (9, 10)
    assert "rloo" in wrapped.last_losses
    wrapped.eval()
    wrapped.compute_loss(batch())
    assert wrapped.context.records[0].routing.log_prob is None


@pytest.mark.parametrize("architecture", BUILDERS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_remix_samples_share_the_frozen_blocks_below_the_adapters(architecture, level):
    """With the lower blocks frozen, the M routing samples run them once: the loss, the gradients and the routing
    statistics equal those of the batch repeated M times from the start (the same draws, from the same seed)."""

    def step(share: bool):
        wrapped = loramix.wrap(
            BUILDERS[architecture](num_layers=3), config_for("remix", level, layers_to_transform=[1, 2])
        ).train()
        randomise_experts(wrapped)
        if not share:
            wrapped.first_adapted_block = lambda: None
        torch.manual_seed(3)
        loss = wrapped.compute_loss(batch())
        loss.backward()
        grads = {name: p.grad.clone() for name, p in wrapped.named_parameters() if p.requires_grad}
        return wrapped, loss.detach(), grads

    shared, shared_loss, shared_grads = step(share=True)
    assert shared.first_adapted_block() is not None
    repeated, repeated_loss, repeated_grads = step(share=False)
    assert torch.allclose(shared_loss, repeated_loss, atol=1e-6)
    assert shared.last_losses.keys() == repeated.last_losses.keys() >= {"ce", "rloo"}
    for name, grad in repeated_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-6), name
    assert any(grad.abs().sum() > 0 for name, grad in shared_grads.items() if "router" in name)
    assert shared.context.records[0].routing.log_prob.shape[0] == 3 * shared.mixlora_config.remix_samples
    for name, stats in repeated.routing_stats().items():
        assert shared.routing_stats()[name]["load"] == pytest.approx(stats["load"], abs=1e-6)


def test_first_adapted_block_is_none_when_the_first_block_is_adapted():
    assert loramix.wrap(tiny_llama(), config_for("remix")).first_adapted_block() is None
    assert loramix.wrap(tiny_llama(), config_for("remix", layers_to_transform=[1])).first_adapted_block() == (
        "model.layers.1"
    )


def test_routing_records_kept_after_the_loss_hold_no_graph():
    wrapped = loramix.wrap(tiny_llama(), config_for("soft", z_loss_weight=0.0)).train()
    loss = wrapped.compute_loss(batch())
    records = wrapped.context.records
    assert records and not any(r.routing.weights.requires_grad or r.routing.logits.requires_grad for r in records)
    loss.backward()  # the loss kept what it needs
    assert all(layer.router.gate.weight.grad is not None for layer in wrapped.layers.values())
    assert wrapped.routing_stats()


def test_routing_stats_ignore_padding():
    def stats_for(pad: int):
        # soft routing: continuous loads, so float noise from the padded attention cannot flip a top-k choice
        torch.manual_seed(0)
        wrapped = loramix.wrap(tiny_llama(), config_for("soft")).eval()
        data = batch()
        ids = torch.nn.functional.pad(data["input_ids"], (0, pad), value=7)
        mask = torch.nn.functional.pad(data["attention_mask"], (0, pad), value=0)
        wrapped(input_ids=ids, attention_mask=mask)
        return wrapped.routing_stats()

    plain, padded = stats_for(0), stats_for(5)
    for name in plain:
        assert plain[name]["load"] == pytest.approx(padded[name]["load"], abs=1e-5)
        assert sum(plain[name]["load"]) == pytest.approx(1.0)
        assert plain[name]["ess"] == pytest.approx(padded[name]["ess"], abs=1e-5)


def test_count_parameters():
    wrapped = loramix.wrap(tiny_llama(), MixLoraConfig(["q_proj"], num_experts=4, expert_rank=2, top_k=1))
    # tiny llama: hidden 32, 2 layers; q_proj 32 -> 32; router 4 x 32
    per_layer_experts = 4 * 2 * (32 + 32)
    assert wrapped.count_parameters() == {
        "trainable": 2 * (per_layer_experts + 4 * 32),
        "active_per_token": 2 * (2 * (32 + 32) + 4 * 32),
    }


def test_unknown_target_lists_the_linear_layers():
    with pytest.raises(ValueError, match=r"'q_proj'.*'v_proj'"):
        loramix.wrap(tiny_llama(), MixLoraConfig(["query"]))


@pytest.mark.parametrize(("architecture", "router"), [("llama", "topk"), ("gpt2", "remix"), ("llama", "prompt")])
def test_layers_to_transform_adapts_only_those_layers(architecture, router):
    wrapped = loramix.wrap(BUILDERS[architecture](), config_for(router, layers_to_transform=[1]))
    assert wrapped.layers and all(".1." in name for name in wrapped.layers)
    randomise_experts(wrapped)
    inputs = batch()
    wrapped.compute_loss(inputs).backward()
    assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)
    blocks = wrapped.base_model.get_submodule("transformer.h" if architecture == "gpt2" else "model.layers")
    assert blocks[1] is not blocks[0] and not any(isinstance(m, loramix.MixLoraLinear) for m in blocks[0].modules())
    with pytest.raises(ValueError, match=r"layers_to_transform=\[1, 5\] names layers \[5\].*numbered 0 to 1"):
        loramix.wrap(BUILDERS[architecture](), config_for(router, layers_to_transform=[1, 5]))


def test_wrapping_twice_is_refused():
    wrapped = loramix.wrap(tiny_llama(), config_for("topk"))
    with pytest.raises(ValueError, match="already wrapped"):
        loramix.wrap(wrapped.base_model, config_for("topk"))


@pytest.mark.parametrize(("router", "level"), ROUTER_SETTINGS)
def test_save_and_load_give_identical_outputs(tmp_path, router, level):
    wrapped = loramix.wrap(tiny_llama(), config_for(router, level)).eval()
    randomise_experts(wrapped)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if parameter.requires_grad and ".lora_" not in name:
                parameter.normal_(std=0.1)
    data = batch()
    expected = wrapped(**{k: data[k] for k in ("input_ids", "attention_mask", "task_ids")}).logits
    wrapped.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",  # the model card
        "adapter.safetensors",
        "loramix_config.json",
    ]
    loaded = loramix.load(tiny_llama(), tmp_path / "adapter").eval()
    got = loaded(**{k: data[k] for k in ("input_ids", "attention_mask", "task_ids")}).logits
    assert torch.equal(got, expected)


def test_load_refuses_bad_checkpoints(tmp_path):
    wrapped = loramix.wrap(tiny_llama(), config_for("topk"))
    wrapped.save_pretrained(tmp_path / "good")
    with pytest.raises(FileNotFoundError, match="no loramix adapter folder"):
        loramix.load(tiny_llama(), tmp_path / "nowhere")

    truncated = tmp_path / "truncated"
    wrapped.save_pretrained(truncated)
    weights = truncated / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        loramix.load(tiny_llama(), truncated)

    missing = tmp_path / "missing"
    wrapped.save_pretrained(missing)
    (missing / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors is missing"):
        loramix.load(tiny_llama(), missing)

    mismatched = tmp_path / "mismatched"
    wrapped.save_pretrained(mismatched)
    config = MixLoraConfig.from_json(mismatched / "loramix_config.json")
    config.expert_rank = 3
    config.to_json(mismatched / "loramix_config.json")
    base = tiny_llama()
    with pytest.raises(ValueError, match="wrong shapes"):
        loramix.load(base, mismatched)
    assert not any(isinstance(m, loramix.MixLoraLinear) for m in base.modules()), "a failed load left adapters"


@pytest.mark.parametrize("architecture", BUILDERS)
def test_merge_task_matches_the_unmerged_model(architecture):
    wrapped = loramix.wrap(BUILDERS[architecture](), config_for("task")).eval()
    randomise_experts(wrapped)
    with torch.no_grad():
        wrapped.shared_routers["task"].embedding.weight.normal_()
    ids = batch()["input_ids"]
    for task in range(3):
        merged = wrapped.merge_task(task)
        assert not any(isinstance(m, loramix.MixLoraLinear) for m in merged.modules())
        expected = wrapped(input_ids=ids, task_ids=torch.full((3,), task)).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    before = wrapped.routing_stats()
    merged(input_ids=ids)
    assert wrapped.routing_stats() == before  # the copy reports to no routing context
    with pytest.raises(ValueError, match="router='task'"):
        loramix.wrap(tiny_llama(), config_for("topk")).merge_task(0)


def test_unload_returns_the_untouched_base_model():
    base = tiny_llama().eval()
    ids = batch()["input_ids"]
    expected = base(input_ids=ids).logits
    wrapped = loramix.wrap(base, config_for("prompt"))
    randomise_experts(wrapped)
    restored = wrapped.unload()
    assert restored is base
    assert not any(isinstance(m, loramix.MixLoraLinear) for m in restored.modules())
    assert all(p.requires_grad for p in restored.parameters())
    assert torch.equal(restored(input_ids=ids).logits, expected)


WITH_QUEUE = config_for("topk", contrastive_loss_weight=0.01, memory_queue_size=4)
UNSHARED_TASK_GATES = config_for("task", shared_task_gate=False)


@pytest.mark.parametrize(
    "config",
    [config_for(router, level) for router, level in ROUTER_SETTINGS] + [WITH_QUEUE, UNSHARED_TASK_GATES],
    ids=[f"{router}-{level}" for router, level in ROUTER_SETTINGS] + ["memory-queue", "task-gate-per-layer"],
)
def test_wrapping_puts_every_adapter_tensor_on_the_base_models_device(config):
    """A model wrapped on a GPU must not leave a router, buffer or memory queue on the CPU; the meta device
    stands in for any other device."""
    wrapped = loramix.wrap(tiny_llama().to("meta"), config)
    tensors = {name: t.device.type for name, t in [*wrapped.named_parameters(), *wrapped.named_buffers()]}
    assert {name: device for name, device in tensors.items() if device != "meta"} == {}


@pytest.mark.parametrize(("router", "level"), [("topk", "token"), ("soft", "token"), ("topk", "sequence")])
def test_stacked_losses_and_statistics_equal_the_per_router_ones(router, level):
    """Losses and statistics are computed over all routers at once; the reference is router by router."""
    config = config_for(router, level, balance_loss_weight=0.01, z_loss_weight=0.001)
    wrapped = loramix.wrap(tiny_llama(), config).train()
    wrapped.reset_routing_stats()
    wrapped.compute_loss(batch())
    records = wrapped.context.records
    assert len(records) == len(wrapped.layers)
    parts = wrapped.last_losses
    if router == "topk":
        expected = sum(load_balance_loss(r.routing.probs, r.routing.indices[..., 0], r.mask) for r in records)
        torch.testing.assert_close(parts["balance"], expected / len(records))
    expected = sum(router_z_loss(r.routing.logits, r.mask) for r in records) / len(records)
    torch.testing.assert_close(parts["z"], expected)
    stats = wrapped.routing_stats()
    for name, record in zip(wrapped.layers, records, strict=True):
        weight = record.mask.unsqueeze(-1).float()
        load = (record.routing.expert_share() * weight).sum((0, 1))
        ess = (effective_support_size(record.routing.weights) * weight[..., 0]).sum() / record.mask.sum()
        assert stats[name]["load"] == pytest.approx((load / load.sum()).tolist(), rel=1e-5)
        assert stats[name]["ess"] == pytest.approx(float(ess), rel=1e-5)
