"""IAPT (loramix.methods.iapt): its prefix attention against a hand-written one, soft tokens made from the prompt
alone and once per prompt, padding, config errors and the models it refuses."""

import math

import pytest
import torch

import loramix
from loramix.methods.iapt import IaptConfig, IaptModel
from loramix.models import tiny_gpt2, tiny_llama


def adapted_llama(implementation: str = "sdpa", **settings) -> IaptModel:
    model = tiny_llama().eval()
    model.set_attn_implementation(implementation)
    adapted = loramix.wrap(model, IaptConfig(bottleneck=4, **settings))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in adapted.generators.parameters():  # attention pooling starts as the mean: give it scores
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return adapted


def left_padded():
    """3 rows of lengths 8, 5 and 7, left-padded with id 0."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 128, (3, 8), generator=generator)
    attention_mask = (torch.arange(8) >= torch.tensor([0, 3, 1])[:, None]).long()
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def reference_soft_tokens(generator, hidden, prompt):
    """Attention pooling over the prompt tokens, down, rational activation, up: (B, m, d)."""
    scores = (hidden @ generator.pool.score).masked_fill(~prompt, float("-inf"))
    pooled = (scores.softmax(-1).unsqueeze(-1) * hidden).sum(1)
    small = generator.activation(pooled @ generator.down.weight.T + generator.down.bias)
    return (small @ generator.up.weight.T + generator.up.bias).view(hidden.shape[0], -1, hidden.shape[-1])


def reference_attention(block, soft, hidden, cos, sin, real):
    """Llama attention with m position-free prefix tokens: softmax over [prefix keys; causal sequence keys]."""
    attention, norm = block.self_attn, block.input_layernorm
    batch, length, _ = hidden.shape
    heads, kv_heads, head_dim = 4, 2, attention.head_dim

    def project(linear, x, count):
        return linear(x).view(batch, -1, count, head_dim).transpose(1, 2)

    x, p = norm(hidden), norm(soft)
    query = rotate(project(attention.q_proj, x, heads), cos[:, None], sin[:, None])
    key = rotate(project(attention.k_proj, x, kv_heads), cos[:, None], sin[:, None])
    keys = torch.cat([project(attention.k_proj, p, kv_heads), key], dim=2).repeat_interleave(heads // kv_heads, 1)
    values = torch.cat([project(attention.v_proj, p, kv_heads), project(attention.v_proj, x, kv_heads)], dim=2)
    values = values.repeat_interleave(heads // kv_heads, 1)
    scores = query @ keys.transpose(2, 3) / math.sqrt(head_dim)
    causal = torch.ones(length, length, dtype=torch.bool).tril() & real[:, None, None, :]
    visible = torch.cat([torch.ones(batch, 1, length, soft.shape[1], dtype=torch.bool), causal], dim=-1)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return attention.o_proj((weights @ values).transpose(1, 2).reshape(batch, length, -1))


@pytest.mark.parametrize(("implementation", "padded"), [("sdpa", True), ("sdpa", False), ("eager", True)])
def test_the_prefix_attention_is_softmax_over_prefix_and_causal_keys(implementation, padded):
    """sdpa with a boolean 4D mask, sdpa with no mask (causal), eager with an additive mask; grouped-query heads."""
    adapted = adapted_llama(implementation, layers_to_transform=[1])
    block, generator = adapted.base_model.model.layers[1], adapted.generators["1"]
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda module, args: seen.update(hidden=args[0])),
        block.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(rotary=kwargs["position_embeddings"]), with_kwargs=True
        ),
        block.self_attn.register_forward_hook(lambda module, args, output: seen.update(output=output[0])),
    ]
    input_ids, attention_mask = left_padded()
    if not padded:
        attention_mask = torch.ones_like(attention_mask)
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        adapted(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        real = attention_mask.bool()
        soft = reference_soft_tokens(generator, seen["hidden"], real)
        expected = reference_attention(block, soft, seen["hidden"], *seen["rotary"], real)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["output"], expected, rtol=1e-5, atol=1e-5)  # padding queries see the prefix only


def test_decoding_with_the_cache_continues_the_prompt():
    """Steps of one token (queries of length 1) over the cache give what one forward with that prompt gives."""
    adapted = adapted_llama()
    input_ids, attention_mask = left_padded()
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    prompt_length = 5
    with torch.no_grad():
        prompt_mask = attention_mask.bool() & (torch.arange(8) < prompt_length)
        whole = adapted(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, prompt_mask=prompt_mask
        )
        model = adapted.base_model
        with adapted.prompt_routing():
            cut = slice(0, prompt_length)
            out = model(
                input_ids=input_ids[:, cut], attention_mask=attention_mask[:, cut], position_ids=positions[:, cut]
            )
            steps, cache = [out.logits], out.past_key_values
            for t in range(prompt_length, 8):
                out = model(
                    input_ids=input_ids[:, t : t + 1],
                    attention_mask=attention_mask[:, : t + 1],
                    position_ids=positions[:, t : t + 1],
                    past_key_values=cache,
                )
                steps.append(out.logits)
    real = attention_mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], whole.logits[real], rtol=1e-4, atol=1e-5)


def soft_tokens_of(adapted: IaptModel, **inputs) -> dict[str, torch.Tensor]:
    made = {}
    hooks = [
        generator.register_forward_hook(lambda module, args, output, key=key: made.setdefault(key, output))
        for key, generator in adapted.generators.items()
    ]
    with torch.no_grad():
        adapted(**inputs)
    for hook in hooks:
        hook.remove()
    return made


def test_soft_tokens_depend_on_the_prompt_only():
    adapted = adapted_llama()
    generator = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 128, (2, 6), generator=generator)
    answers = [torch.randint(3, 128, (2, 4), generator=generator) for _ in range(2)]
    prompt_mask = torch.arange(10).expand(2, 10) < 6
    made = [soft_tokens_of(adapted, input_ids=torch.cat([prompt, a], 1), prompt_mask=prompt_mask) for a in answers]
    assert set(made[0]) == {"0", "1"}
    for layer in made[0]:
        torch.testing.assert_close(made[0][layer], made[1][layer], rtol=0, atol=0)
    changed = prompt.clone()
    changed[:, 2] = (changed[:, 2] + 7) % 128  # (a permuted prompt would pool to the same mean at init)
    other = soft_tokens_of(adapted, input_ids=torch.cat([changed, answers[0]], 1), prompt_mask=prompt_mask)
    assert not torch.allclose(other["0"], made[0]["0"])  # a different prompt: different soft tokens
    assert not torch.allclose(made[0]["0"][0], made[0]["0"][1])  # and each row its own


@pytest.mark.parametrize("use_cache", [True, False])
def test_decoding_steps_do_not_rerun_the_generators(use_cache):
    adapted = adapted_llama()
    calls = []
    for key, generator in adapted.generators.items():
        generator.register_forward_hook(lambda module, args, output, key=key: calls.append((key, args[0].shape[1])))
    input_ids, attention_mask = left_padded()
    with torch.no_grad():
        adapted.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False, use_cache=use_cache
        )
    assert calls == [("0", 8), ("1", 8)]  # once per layer, on the prompt


def test_padding_tokens_change_nothing_in_the_real_tokens():
    """Padding queries now see the prefix (so none attends to nothing), but real tokens and soft tokens ignore
    whatever the padding holds."""
    adapted = adapted_llama()
    input_ids, attention_mask = left_padded()
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    noise = input_ids.masked_scatter(attention_mask == 0, torch.randint(3, 128, (int((attention_mask == 0).sum()),)))
    inputs = {"attention_mask": attention_mask, "position_ids": positions}
    with torch.no_grad():
        clean, noisy = (adapted(input_ids=ids, **inputs).logits for ids in (input_ids, noise))
    real = attention_mask.bool()
    assert torch.isfinite(clean).all()
    torch.testing.assert_close(noisy[real], clean[real], rtol=0, atol=1e-6)
    assert not torch.allclose(noisy[~real], clean[~real])
    made = [soft_tokens_of(adapted, input_ids=ids, **inputs) for ids in (input_ids, noise)]
    torch.testing.assert_close(made[0]["1"], made[1]["1"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_soft_tokens": 0}, r"IaptConfig.num_soft_tokens=0 is invalid: expected an integer >= 1"),
        ({"bottleneck": 2.5}, r"IaptConfig.bottleneck=2.5 is invalid: expected an integer >= 1"),
        ({"pooling": "max"}, r"IaptConfig.pooling='max' is invalid: allowed: \['attention', 'mean', 'last'\]"),
        ({"dropout": 1.0}, r"IaptConfig.dropout=1.0 is invalid: expected 0 <= dropout < 1"),
        ({"layers_to_transform": []}, r"IaptConfig.layers_to_transform=\[\] is invalid: expected None or a non-empty"),
    ],
)
def test_config_errors_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        IaptConfig(**settings)


def test_models_it_cannot_adapt_are_refused_and_left_as_they_were():
    model = tiny_llama()
    with pytest.raises(
        ValueError, match=r"layers_to_transform=\[1, 2\] is invalid: LlamaForCausalLM has decoder layers 0-1"
    ):
        loramix.wrap(model, IaptConfig(layers_to_transform=[1, 2]))
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="LlamaForCausalLM uses 'flash_attention_2'"):
        loramix.wrap(model, IaptConfig())
    model.config._attn_implementation = "sdpa"
    model.model.layers[0].self_attn.k_norm = torch.nn.Identity()  # as Qwen3's normed keys
    with pytest.raises(ValueError, match="IAPT does not support LlamaForCausalLM: its LlamaDecoderLayer"):
        loramix.wrap(model, IaptConfig())
    del model.model.layers[0].self_attn.k_norm
    assert all(p.requires_grad for p in model.parameters())
    loramix.wrap(model, IaptConfig())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_unload_gives_the_attention_its_config_back(build):
    model = build()
    adapted = loramix.wrap(model, IaptConfig(layers_to_transform=[0]))
    attentions = [m for m in model.modules() if hasattr(m, "loramix_iapt_prefix")]
    assert len(attentions) == 1 and attentions[0].config._attn_implementation == "loramix_iapt"
    assert model.config._attn_implementation == "sdpa"  # the model's masks and other layers are untouched
    adapted.unload()
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "k_proj") or hasattr(m, "c_attn"))
    assert not any(hasattr(m, "loramix_iapt_prefix") for m in model.modules())


def test_trainable_parameters_are_the_generators():
    """Per layer: pooling scores d, down d r + r, rational activation 7 + 5, up r m d + m d."""
    adapted = loramix.wrap(tiny_llama(), IaptConfig(num_soft_tokens=3, bottleneck=5))
    d, r, m = 32, 5, 3
    assert adapted.count_parameters()["trainable"] == 2 * (d + d * r + r + 12 + r * m * d + m * d)
