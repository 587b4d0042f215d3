"""Every loramix method besides the mixture (loramix.methods): the same behaviour asked of each, on tiny models.

Each method is listed in METHOD_CONFIGS with a small config; a method's own behaviour is tested in its file.
"""

import pytest
import torch
from test_train import tiny_recipe

import loramix
from loramix.methods import METHODS, AdaptedModel
from loramix.methods.adalink import AdaLinkConfig
from loramix.methods.alora import AloraConfig
from loramix.methods.iapt import IaptConfig
from loramix.methods.pedro import PedroConfig
from loramix.models import tiny_gpt2, tiny_llama
from loramix.recipe import Recipe
from loramix.train import train

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
METHOD_CONFIGS = {  # name -> a function giving a small config for 3 tasks
    "adalink": lambda: AdaLinkConfig(rank=2, num_tasks=3),
    "adalink-shared": lambda: AdaLinkConfig(rank=2, per_task=False),
    "alora": lambda: AloraConfig(rank=2, max_rank=4, allocate_every=2, allocation_rounds=1, prune_per_round=2),
    "iapt": lambda: IaptConfig(bottleneck=4),
    "pedro": lambda: PedroConfig(bottleneck=4),
}
ARCHITECTURES = {name: ("llama", "gpt2") for name in METHOD_CONFIGS}  # where a method runs on one family only
ARCHITECTURES["pedro"] = ("llama",)  # its config names Llama's modules; GPT-2's fused ones: test_pedro.py


def cases():
    return [(name, arch) for name in METHOD_CONFIGS for arch in ARCHITECTURES[name]]


def wrapped(name: str, architecture: str = "llama", randomise: bool = True) -> AdaptedModel:
    model = loramix.wrap(BUILDERS[architecture]().eval(), METHOD_CONFIGS[name]())
    if randomise:
        randomise_adapter(model)
    return model


def randomise_adapter(model: AdaptedModel, seed: int = 1) -> None:
    """Adapters start as (or near) the base model; give their zero-initialised tensors values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 128, (3, 10), generator=generator)
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_ids": torch.tensor([0, 1, 2]),
    }


def left_padded_prompts():
    """3 prompts of lengths 6, 4 and 5, left-padded with id 0, and their task ids."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 128, (3, 6), generator=generator)
    attention_mask = (torch.arange(6) >= torch.tensor([0, 2, 1])[:, None]).long()
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask, torch.tensor([2, 0, 1])


def test_every_method_is_registered():
    assert {name.split("-")[0] for name in METHOD_CONFIGS} <= set(METHODS)
    assert set(METHODS) - {"mixlora"} <= {name.split("-")[0] for name in METHOD_CONFIGS}


@pytest.mark.parametrize(("name", "architecture"), cases())
def test_a_fresh_adapter_computes_the_base_model(name, architecture):
    model = BUILDERS[architecture]().eval()
    data = batch()
    expected = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    adapted = loramix.wrap(model, METHOD_CONFIGS[name]())
    if not adapted.starts_as_base:
        pytest.skip(f"{name} cannot start as the base model")
    got = adapted(input_ids=data["input_ids"], attention_mask=data["attention_mask"], task_ids=data["task_ids"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "architecture"), cases())
def test_gradients_reach_exactly_the_adapter(name, architecture):
    adapted = wrapped(name, architecture).train()
    adapted.compute_loss(batch()).backward()
    base = {id(p) for p in adapted.base_model.parameters() if not p.requires_grad}
    trainable = [(n, p) for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable, "the adapter has no trainable parameters"
    assert all(id(p) not in base for _, p in trainable)
    assert all(p.grad is None for p in adapted.base_model.parameters() if not p.requires_grad)
    without = [n for n, p in trainable if p.grad is None or not p.grad.any()]
    assert not without, f"no gradient reached {without}"


@pytest.mark.parametrize(("name", "architecture"), cases())
def test_save_and_load_give_identical_outputs(tmp_path, name, architecture):
    adapted = wrapped(name, architecture)
    data = batch()
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"], "task_ids": data["task_ids"]}
    with torch.no_grad():
        expected = adapted(**inputs).logits
    adapted.save_pretrained(tmp_path)
    loaded = loramix.load(BUILDERS[architecture]().eval(), tmp_path)
    assert type(loaded) is type(adapted) and loaded.method_config == adapted.method_config
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    assert "Trained with [loramix]" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(("name", "architecture"), cases())
def test_generation_with_and_without_the_kv_cache_agrees(name, architecture):
    adapted = wrapped(name, architecture)
    input_ids, attention_mask, task_ids = left_padded_prompts()
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = adapted.generate(input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, **options)
        uncached = adapted.generate(
            input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, use_cache=False, **options
        )
        base = BUILDERS[architecture]().eval().generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    assert torch.equal(cached, uncached)
    if adapted.starts_as_base:  # the randomised adapter changes what is generated
        assert not torch.equal(cached, base)


@pytest.mark.parametrize(("name", "architecture"), cases())
def test_each_row_of_a_mixed_batch_is_its_own(name, architecture):
    """Rows of different tasks and prompts, left-padded in one batch, get what each gets alone."""
    adapted = wrapped(name, architecture)
    input_ids, attention_mask, task_ids = left_padded_prompts()
    with torch.no_grad():
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        together = adapted(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, task_ids=task_ids
        ).logits
        for row in range(3):
            real = attention_mask[row].bool()
            alone = adapted(input_ids=input_ids[row : row + 1, real], task_ids=task_ids[row : row + 1]).logits
            torch.testing.assert_close(together[row, real], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_unload_returns_the_untouched_base_model(name):
    model = tiny_llama().eval()
    data = batch()
    expected = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    adapted = wrapped(name)
    base = adapted.unload()
    got = base(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(p.requires_grad for p in base.parameters())
    loramix.wrap(base, METHOD_CONFIGS[name]())  # can be wrapped again


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_wrapping_twice_is_refused(name):
    adapted = wrapped(name)
    with pytest.raises(ValueError, match="already wrapped"):
        loramix.wrap(adapted.base_model, METHOD_CONFIGS[name]())


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_a_recipe_trains_evaluates_and_serves_the_method(tmp_path, task_file, name):
    from loramix.serve.run import load_engine

    config = METHOD_CONFIGS[name]()
    adapter = {k: v for k, v in config.to_dict().items() if k != "num_tasks"}
    training = {"steps": 4, "warmup_steps": 1, "save_every": 2}
    recipe = tiny_recipe(task_file, config.method, dev_examples=4, method_settings=adapter, **training)
    run = train(recipe, tmp_path / "run")
    loaded = loramix.load(tiny_llama(), run / "adapter")
    assert loaded.method == config.method and (run / "metrics.json").is_file()
    engine = load_engine(run, device="cpu", max_new_tokens=4)
    assert engine.tasks == ["parity", "parity2"]


def test_a_method_recipe_names_its_bad_settings(task_file):
    common = {"name": "tiny", "model": "tiny-llama", "tasks": ["parity"], "task_files": [str(task_file)]}
    with pytest.raises(ValueError, match="recipe key method='pedantic' is invalid"):
        Recipe(**common, method="pedantic", adapter={})
    with pytest.raises(ValueError, match=r"adapter.ranks=4 is invalid: unknown key; allowed: \['alpha'"):
        Recipe(**common, method="adalink", adapter={"ranks": 4})
    with pytest.raises(ValueError, match=r"AdaLinkConfig.rank=0 is invalid: expected an integer >= 1"):
        Recipe(**common, method="adalink", adapter={"rank": 0})
    with pytest.raises(ValueError, match="exactly one adapter section"):
        Recipe(**common, method="adalink", adapter={}, mixlora={"target_modules": "all-linear"})


def test_a_config_file_names_its_method(tmp_path):
    AdaLinkConfig(rank=2, num_tasks=3).to_json(tmp_path / "loramix_config.json")
    from loramix.methods import read_config

    assert read_config(tmp_path / "loramix_config.json") == AdaLinkConfig(rank=2, num_tasks=3)
    (tmp_path / "bad.json").write_text('{"method": "nonesuch", "rank": 2}')
    with pytest.raises(ValueError, match="method='nonesuch' is not a loramix method"):
        read_config(tmp_path / "bad.json")


def test_adalink_rows_use_their_own_tasks_adapter():
    adapted = wrapped("adalink")
    data = batch()
    inputs = {"input_ids": data["input_ids"][:1], "attention_mask": data["attention_mask"][:1]}
    with torch.no_grad():
        outputs = [adapted(**inputs, task_ids=torch.tensor([task])).logits for task in range(3)]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    with pytest.raises(ValueError, match="needs task_ids"):
        adapted(**inputs)
