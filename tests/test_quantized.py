"""A quantized base (bitsandbytes 8- and 4-bit on the CPU): experts in the compute dtype train, save, load and
generate; merging into quantized weights is refused."""

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from test_compile import batch  # noqa: E402

import loramix  # noqa: E402
from loramix import MixLoraConfig  # noqa: E402
from loramix.models import load_model, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(hidden_size=64).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def quantized(folder, kind: str):
    return load_model(str(folder), quantization=kind)[0]


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_a_quantized_base_trains_saves_loads_and_generates(tmp_path, saved_base, kind):
    base = quantized(saved_base, kind)
    weight_dtype = base.model.layers[0].self_attn.q_proj.weight.dtype
    assert not weight_dtype.is_floating_point  # int8 or packed 4-bit storage
    config = MixLoraConfig("all-linear", router="task", num_experts=4, expert_rank=2, num_tasks=2)
    model = loramix.wrap(base, config).train()
    assert all(loramix.model.is_quantized(layer) for layer in model.layers.values())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or "router" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model.compute_loss(batch(10))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]

    model.eval().save_pretrained(tmp_path / "adapter")
    loaded = loramix.load(quantized(saved_base, kind), tmp_path / "adapter").eval()
    inputs = {key: batch(10)[key] for key in ("input_ids", "attention_mask", "task_ids")}
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5)
    prompt = inputs["input_ids"][:, :4]
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, task_ids=torch.tensor([0, 1]))
    assert torch.equal(loaded.generate(input_ids=prompt, **settings), model.generate(input_ids=prompt, **settings))
    with pytest.raises(ValueError, match="cannot be merged into quantized weights.*unquantized"):
        model.merge_task(0)


def test_a_bad_quantization_names_what_is_allowed():
    with pytest.raises(ValueError, match="quantization='3bit' is invalid; allowed: None, 8bit, 4bit"):
        load_model("tiny-llama", quantization="3bit")
    with pytest.raises(ValueError, match="needs a saved model"):
        load_model("tiny-llama", quantization="8bit")


def test_a_recipe_trains_evaluates_and_serves_on_its_quantized_base(tmp_path, saved_base, task_file):
    from loramix.recipe import Recipe
    from loramix.serve.run import load_engine
    from loramix.train import train

    recipe = Recipe(
        name="tiny-4bit",
        model=str(saved_base),
        quantization="4bit",
        tasks=["parity", "parity2"],
        task_files=[str(task_file)],
        max_length=48,
        eval_examples=4,
        training={"steps": 3, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2},
        mixlora={"target_modules": ["q_proj", "v_proj"], "router": "task", "num_experts": 2, "expert_rank": 2},
    )
    run = train(recipe, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"parity", "parity2"}
    zero_shot = json.loads((run / "zero_shot.json").read_text())
    assert zero_shot and all(f"{saved_base}@4bit|" in key for key in zero_shot)  # not the float32 base's cache
    engine = load_engine(run, device="cpu", max_new_tokens=8)
    assert all(loramix.model.is_quantized(layer) for layer in engine.model.layers.values())


def test_a_quantized_recipe_cannot_be_sharded():
    from loramix.recipe import Recipe

    with pytest.raises(ValueError, match="training.sharding='fsdp' is invalid: a quantized base trains with"):
        Recipe(name="q", tasks=["pubmedqa"], quantization="8bit", training={"sharding": "fsdp"}, mixlora={})
