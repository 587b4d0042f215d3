"""Adding a task to a finished task-router run (`continue_from`): the old task stays bit-identical."""

import json

import pytest
import torch
from safetensors.torch import load_file

import loramix
from loramix.models import tiny_llama
from loramix.recipe import Recipe
from loramix.train import build_model, seed_everything, train

TRAINING = {"steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 2, "save_every": 3, "lr": 5e-2}
MIXLORA = {"target_modules": ["q_proj", "v_proj"], "router": "task", "num_experts": 4, "expert_rank": 2}


def recipe_for(task_file, tasks, **values) -> Recipe:
    common = {"name": "tiny", "model": "tiny-llama", "task_files": [str(task_file)], "max_length": 48}
    return Recipe(**common, tasks=tasks, eval_examples=8, training=TRAINING, **values)


@pytest.fixture
def first_run(tmp_path, task_file):
    return train(recipe_for(task_file, ["parity"], mixlora=MIXLORA), tmp_path / "first")


def test_an_added_task_learns_while_the_old_one_stays_bit_identical(tmp_path, task_file, first_run):
    recipe = recipe_for(task_file, ["parity", "parity2"], continue_from=str(first_run))
    assert recipe.mixlora_config().num_tasks == 2
    seed_everything(recipe.training.seed)
    initial, _ = build_model(recipe, torch.device("cpu"))  # what the continuing run starts from
    initial_rows = initial.shared_routers["task"].embedding.weight.detach().clone()
    second = train(recipe, tmp_path / "second")

    before, after = (
        load_file(first_run / "adapter/adapter.safetensors"),
        load_file(second / "adapter/adapter.safetensors"),
    )
    embedding = "shared_routers.task.embedding.weight"
    assert set(before) == set(after)
    assert all(torch.equal(before[name], after[name]) for name in before if name != embedding)
    assert torch.equal(after[embedding][:1], before[embedding])
    assert torch.equal(initial_rows[:1], before[embedding])
    assert not torch.allclose(after[embedding][1], initial_rows[1])  # the new task's row trained

    old, new = loramix.load(tiny_llama(), first_run / "adapter"), loramix.load(tiny_llama(), second / "adapter")
    input_ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = old(input_ids=input_ids, task_ids=torch.tensor([0, 0])).logits
        assert torch.equal(new(input_ids=input_ids, task_ids=torch.tensor([0, 0])).logits, expected)
        assert not torch.equal(new(input_ids=input_ids, task_ids=torch.tensor([1, 1])).logits, expected)

    counts = json.loads((second / "training.json").read_text())["encoded"]
    assert counts["parity"] == 0 and counts["parity2"] > 0  # only the added task trains
    scores = [json.loads((run / "metrics.json").read_text())["tasks"]["parity"]["model"] for run in (first_run, second)]
    assert scores[0] == scores[1]  # the old task's test scores before and after adding a task


def test_a_continuing_recipe_names_what_is_wrong(tmp_path, task_file, first_run):
    with pytest.raises(ValueError, match=r"tasks=\['parity2'\] is invalid: a run continuing"):
        recipe_for(task_file, ["parity2"], continue_from=str(first_run))
    with pytest.raises(ValueError, match="training.weight_decay=0.1 is invalid"):
        Recipe(
            name="tiny",
            model="tiny-llama",
            tasks=["parity", "parity2"],
            task_files=[str(task_file)],
            continue_from=str(first_run),
            training=TRAINING | {"weight_decay": 0.1},
        )
    with pytest.raises(ValueError, match="continue_from=.* is invalid: give no lora|takes its adapter"):
        recipe_for(task_file, ["parity", "parity2"], continue_from=str(first_run), lora={"r": 2})
    with pytest.raises(ValueError, match="expected a finished run folder"):
        recipe_for(task_file, ["parity", "parity2"], continue_from=str(tmp_path / "nowhere"))
    topk = train(
        recipe_for(task_file, ["parity"], mixlora=MIXLORA | {"router": "topk"}), tmp_path / "topk", evaluate=False
    )
    with pytest.raises(ValueError, match="tasks can be added to a `task`-router"):
        recipe_for(task_file, ["parity", "parity2"], continue_from=str(topk))
