"""Per-task export of a `task`-router model as a peft LoRA adapter: peft computes what loramix computes."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import loramix
from loramix import MixLoraConfig
from loramix.export import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_peft, export_run
from loramix.models import tiny_gpt2, tiny_llama
from loramix.recipe import Recipe

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TASKS = ["pubmedqa", "mediqa_rqe", "symptom2disease"]


def task_model(builder, shared_gate: bool = True) -> loramix.MixLoraModel:
    config = MixLoraConfig(
        "all-linear", router="task", num_experts=4, expert_rank=2, alpha=12.0, num_tasks=3, shared_task_gate=shared_gate
    )
    model = loramix.wrap(builder().eval(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)
    return model


def inputs():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 128, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("shared_gate", [True, False])
@pytest.mark.parametrize("architecture", BUILDERS)
def test_peft_reproduces_the_task_mixture(tmp_path, architecture, shared_gate):
    model = task_model(BUILDERS[architecture], shared_gate)
    batch = inputs()
    with torch.no_grad():
        expected = model(**batch, task_ids=torch.tensor([2, 2])).logits
        other_task = model(**batch, task_ids=torch.tensor([0, 0])).logits
    export_peft(model, tmp_path, task_id=2)

    peft_model = PeftModel.from_pretrained(BUILDERS[architecture]().eval(), tmp_path)
    with torch.no_grad():
        got = peft_model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, other_task, atol=1e-3)  # the export is task 2's, not any task's


@pytest.mark.parametrize("architecture", BUILDERS)
def test_adapter_files_follow_peft(tmp_path, architecture):
    model = task_model(BUILDERS[architecture])
    export_peft(model, tmp_path, task_id=0)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8  # n * r
    assert config["lora_alpha"] / config["r"] == pytest.approx(12.0 / 8)
    assert config["fan_in_fan_out"] is (architecture == "gpt2")
    suffixes = {name.rsplit(".", 1)[-1] for name in model.layers}
    assert set(config["target_modules"]) == suffixes
    tensors = load_file(tmp_path / PEFT_WEIGHTS_NAME)
    assert len(tensors) == 2 * len(model.layers)
    for name, layer in model.layers.items():
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (8, layer.in_features)
        assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (layer.out_features, 8)


def test_other_routers_and_bad_task_ids_are_refused(tmp_path):
    model = loramix.wrap(tiny_llama(), MixLoraConfig("all-linear", router="topk", num_experts=4, expert_rank=2))
    with pytest.raises(ValueError, match="router='task'.*'topk'"):
        export_peft(model, tmp_path, task_id=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        export_peft(task_model(tiny_llama), tmp_path, task_id=3)


def write_run(run_dir, **adapter) -> None:
    run_dir.mkdir()
    Recipe(name="run", model="tiny-llama", tasks=TASKS, max_length=64, **adapter).to_yaml(run_dir / "recipe.yaml")


def test_export_run_writes_the_named_task(tmp_path):
    model = task_model(tiny_llama)
    run_dir = tmp_path / "run"
    write_run(run_dir, mixlora=model.mixlora_config.to_dict())
    model.save_pretrained(run_dir / "adapter")
    out = export_run(run_dir, "mediqa_rqe", tmp_path / "out")

    batch = inputs()
    with torch.no_grad():
        expected = model(**batch, task_ids=torch.tensor([1, 1])).logits
        got = PeftModel.from_pretrained(tiny_llama().eval(), out)(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not trained on task 'medqa_usmle'"):
        export_run(run_dir, "medqa_usmle", tmp_path / "out")


def test_export_run_refuses_runs_without_a_task_router(tmp_path):
    write_run(tmp_path / "lora", lora={"r": 4})
    with pytest.raises(ValueError, match="already is a peft adapter"):
        export_run(tmp_path / "lora", "pubmedqa", tmp_path / "out")
    write_run(tmp_path / "soft", mixlora={"target_modules": "all-linear", "router": "soft"})
    with pytest.raises(ValueError, match="router='soft'"):
        export_run(tmp_path / "soft", "pubmedqa", tmp_path / "out")
