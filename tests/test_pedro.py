"""PEDRO (loramix.methods.pedro): prompt-generated vectors rescaling the outputs of q, v and up, checked against
hand computations; the behaviour every method shares is in test_methods.py."""

import pytest
import torch
import torch.nn.functional as F

import loramix
from loramix.methods.pedro import PedroConfig
from loramix.models import tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def randomised(config: PedroConfig, architecture: str = "llama", seed: int = 1):
    """A wrapped tiny model whose generators' zero-initialised tensors have random values."""
    adapted = loramix.wrap(BUILDERS[architecture]().eval(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapted.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return adapted


def record_vectors(adapted) -> list[torch.Tensor]:
    """The list that every generator call of `adapted` appends its vectors to (layer by layer)."""
    calls = []
    for generator in adapted.generators.values():
        generator.register_forward_hook(lambda module, args, output: calls.append(output.detach()))
    return calls


def capture(module, store: dict, key: str) -> None:
    """Keep the input and (rescaled) output of `module`'s next forwards in store[key]."""
    module.register_forward_hook(lambda m, args, output: store.__setitem__(key, (args[0], output)))


def left_padded_prompts():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 128, (2, 6), generator=generator)
    attention_mask = (torch.arange(6) >= torch.tensor([0, 2])[:, None]).long()
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def hand_vectors(generator, hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, total) 1 + W_up g(W_down rms(pool(H))), with the pooling, the normalisation and the rational function
    written out."""
    weights = mask.double()
    if pooling == "attention":
        scores = (hidden.double() @ generator.pool.score.double()).masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-1)
    elif pooling == "last":
        last = mask.shape[1] - 1 - mask.flip(-1).double().argmax(-1)
        weights = F.one_hot(last, mask.shape[1]).double()
    weights = weights / weights.sum(-1, keepdim=True)
    pooled = torch.einsum("bt,btd->bd", weights, hidden.double())
    pooled = pooled / (pooled.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    z = pooled @ generator.down.weight.double().T
    numerator = sum(c * z**i for i, c in enumerate(generator.activation.numerator.double()))
    denominator = 1 + sum(c.abs() * z.abs() ** (j + 1) for j, c in enumerate(generator.activation.denominator.double()))
    return 1 + (numerator / denominator) @ generator.up.weight.double().T + generator.up.bias.double()


@pytest.mark.parametrize("pooling", ["attention", "mean", "last"])
def test_outputs_are_rescaled_by_the_vectors_of_the_prompt(tiny_batch, pooling):
    adapted = randomised(PedroConfig(bottleneck=4, pooling=pooling))
    block = adapted.base_model.model.layers[1]
    seen = {}

    def keep_input(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    block.register_forward_pre_hook(keep_input, with_kwargs=True)
    modules = {"q": block.self_attn.q_proj, "v": block.self_attn.v_proj, "up": block.mlp.up_proj}
    for key, module in [*modules.items(), ("k", block.self_attn.k_proj)]:
        capture(module, seen, key)
    prompt_mask = tiny_batch["labels"] == -100
    with torch.no_grad():
        adapted(input_ids=tiny_batch["input_ids"], attention_mask=tiny_batch["attention_mask"], prompt_mask=prompt_mask)
    mask = prompt_mask & tiny_batch["attention_mask"].bool()
    vectors = hand_vectors(adapted.generators["1"], seen["hidden"], mask, pooling)
    sizes = [module.out_features for module in modules.values()]
    for (key, module), vector in zip(modules.items(), vectors.split(sizes, dim=-1), strict=True):
        inputs, output = seen[key]
        expected = vector[:, None] * F.linear(inputs.double(), module.weight.double())
        torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    inputs, output = seen["k"]  # not a target: untouched
    torch.testing.assert_close(output, F.linear(inputs, block.self_attn.k_proj.weight), rtol=0, atol=0)


def test_vectors_depend_on_the_prompt_only(tiny_batch):
    """In training the vectors pool the unlabelled tokens: those of the prompt alone, not the answer's."""
    adapted = randomised(PedroConfig(bottleneck=4))
    calls = record_vectors(adapted)

    def vectors(input_ids):
        calls.clear()
        adapted.compute_loss({**tiny_batch, "input_ids": input_ids})
        return torch.stack(calls)

    original = vectors(tiny_batch["input_ids"])
    answer_changed = tiny_batch["input_ids"].clone()
    answer_changed[:, 4] = (answer_changed[:, 4] + 1) % 128
    torch.testing.assert_close(vectors(answer_changed), original, rtol=0, atol=0)
    prompt_changed = tiny_batch["input_ids"].clone()
    prompt_changed[:, 2] = (prompt_changed[:, 2] + 1) % 128
    assert not torch.isclose(vectors(prompt_changed), original).all(-1).any()
    with torch.no_grad():  # the same vectors as for the prompt alone
        calls.clear()
        adapted(input_ids=tiny_batch["input_ids"][:, :4])
    torch.testing.assert_close(torch.stack(calls), original, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_runs_the_generators_once_on_the_prompt(use_cache):
    adapted = randomised(PedroConfig(bottleneck=4))
    calls = record_vectors(adapted)
    input_ids, attention_mask = left_padded_prompts()
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "use_cache": use_cache}
    with torch.no_grad():
        generated = adapted.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    assert len(calls) == len(adapted.generators) == 2
    # By hand: greedy decoding, every step a whole forward whose vectors pool the prompt tokens only.
    sequence, mask = input_ids, attention_mask
    prompt = torch.cat([attention_mask.bool(), torch.zeros(2, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        for _ in range(5):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = adapted(
                input_ids=sequence, attention_mask=mask, position_ids=positions, prompt_mask=prompt[:, : mask.shape[1]]
            ).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    assert torch.equal(generated, sequence)


def test_selected_rows_keep_their_prompts_vectors():
    """Inside prompt_routing, after select_rows, each continuation uses the vectors of its own prompt."""
    adapted = randomised(PedroConfig(bottleneck=4, pooling="mean"))
    calls = record_vectors(adapted)
    input_ids, attention_mask = left_padded_prompts()
    continuation = torch.randint(1, 128, (3, 3), generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([1, 0, 1])
    full_ids = torch.cat([input_ids[rows], continuation], dim=1)
    full_mask = torch.cat([attention_mask[rows], torch.ones(3, 3, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        with adapted.prompt_routing():
            adapted.base_model(input_ids=input_ids, attention_mask=attention_mask)
            adapted.select_rows(rows)
            routed = adapted.base_model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
        assert len(calls) == 2  # the generators ran on the prompts only
        prompt_mask = torch.cat([attention_mask[rows].bool(), torch.zeros(3, 3, dtype=torch.bool)], dim=1)
        expected = adapted(
            input_ids=full_ids, attention_mask=full_mask, position_ids=positions, prompt_mask=prompt_mask
        ).logits
    real = full_mask.bool()
    torch.testing.assert_close(routed[real], expected[real], rtol=1e-5, atol=1e-5)


def test_only_the_chosen_layers_are_adapted():
    model = tiny_llama().eval()
    inputs = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    seen, base = {}, {}
    capture(model.model.layers[0].self_attn.q_proj, base, "q0")
    with torch.no_grad():
        model(input_ids=inputs)
    adapted = randomised(PedroConfig(bottleneck=4, layers_to_transform=[1]))
    assert list(adapted.generators) == ["1"]
    capture(adapted.base_model.model.layers[0].self_attn.q_proj, seen, "q0")
    with torch.no_grad():
        adapted(input_ids=inputs)
    torch.testing.assert_close(seen["q0"][1], base["q0"][1], rtol=0, atol=0)


def test_gpt2_fused_projections_are_rescaled_whole():
    """Suffixes name any linear or Conv1D module: GPT-2's c_attn (q, k and v) and c_fc."""
    config = PedroConfig(target_modules=["c_attn", "c_fc"], bottleneck=4)
    model = tiny_gpt2().eval()
    inputs = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        torch.testing.assert_close(loramix.wrap(model, config)(input_ids=inputs).logits, expected, rtol=0, atol=0)
    adapted = randomised(config, "gpt2")
    calls, seen = record_vectors(adapted), {}
    block = adapted.base_model.transformer.h[0]
    capture(block.attn.c_attn, seen, "c_attn")
    capture(block.mlp.c_fc, seen, "c_fc")
    with torch.no_grad():
        adapted(input_ids=inputs)
    sizes = [block.attn.c_attn.nf, block.mlp.c_fc.nf]
    for key, vector in zip(("c_attn", "c_fc"), calls[0].split(sizes, dim=-1), strict=True):
        inputs_seen, output = seen[key]
        module = getattr(block.attn if key == "c_attn" else block.mlp, key)
        torch.testing.assert_close(output, vector * (inputs_seen @ module.weight + module.bias), rtol=1e-5, atol=1e-6)
    prompt = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(7))
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = adapted.generate(input_ids=prompt, **options)
        uncached = adapted.generate(input_ids=prompt, use_cache=False, **options)
    assert torch.equal(cached, uncached)


def test_a_bfloat16_model_keeps_its_dtype_and_starts_as_base():
    model = tiny_llama().eval().to(torch.bfloat16)
    inputs = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        got = loramix.wrap(model, PedroConfig(bottleneck=4))(input_ids=inputs).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_parameter_count_and_card():
    adapted = loramix.wrap(tiny_llama(), PedroConfig(bottleneck=4, pooling="attention"))
    hidden, total, rank = 32, 32 + 16 + 64, 4  # q: 32, v: 2 KV heads of 8, up: 64
    per_layer = hidden + hidden * rank + 12 + rank * total + total  # pooling, down, rational (7 + 5), up, bias
    assert adapted.count_parameters() == {"trainable": 2 * per_layer, "active_per_token": 2 * per_layer}
    (method, paper), details = adapted.method_config.card_details()
    assert paper == "arXiv 2409.17834" and method.startswith("PEDRO")
    assert details["rescaled modules"] == "q_proj, v_proj, up_proj" and details["bottleneck"] == "4"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bottleneck": 0}, r"PedroConfig.bottleneck=0 is invalid: expected an integer >= 1"),
        ({"pooling": "max"}, r"PedroConfig.pooling='max' is invalid: allowed: \['attention', 'mean', 'last'\]"),
        ({"dropout": 1.0}, r"PedroConfig.dropout=1.0 is invalid: expected 0 <= dropout < 1"),
        ({"dropout": True}, r"PedroConfig.dropout=True is invalid"),
        ({"target_modules": []}, r"PedroConfig.target_modules=\[\] is invalid"),
        ({"target_modules": 3}, r"PedroConfig.target_modules=3 is invalid"),
        ({"layers_to_transform": [-1]}, r"PedroConfig.layers_to_transform=\[-1\] is invalid"),
    ],
)
def test_config_errors_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        PedroConfig(**settings)


def test_targets_the_model_lacks_are_refused():
    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\] match no linear layer"):
        loramix.wrap(tiny_llama(), PedroConfig(target_modules=["c_attn"]))
