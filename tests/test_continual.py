"""Adding a task to a finished task-router run (`continue_from`): the old task stays bit-identical."""

import json

import pytest
import torch
from safetensors.torch import load_file

import loramix
from loramix.checkpoint import seed_everything
from loramix.continual import trained_parameters
from loramix.models import tiny_llama
from loramix.recipe import Recipe
from loramix.train import build_model, train

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


# ---- continual.new_experts: experts that only the added tasks use ---------------------------------------------
ADDED = ("added_A", "added_B", "added_gate.weight")
REUSING = {"new_experts": 2, "reuse_experts": True}  # the added task routes over the frozen experts too


@pytest.fixture
def continued_run(tmp_path, task_file, first_run):
    recipe = recipe_for(task_file, ["parity", "parity2"], continue_from=str(first_run), continual=REUSING)
    return recipe, train(recipe, tmp_path / "second")


def batch(task: int) -> dict:
    input_ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(task))
    return {"input_ids": input_ids, "task_ids": torch.tensor([task, task])}


def test_new_experts_learn_the_added_task_while_the_old_one_stays_bit_identical(first_run, continued_run):
    recipe, second = continued_run
    config = recipe.mixlora_config()
    assert (config.num_experts, config.added_experts, config.added_from_task) == (4, 2, 1)
    before = load_file(first_run / "adapter/adapter.safetensors")
    after = load_file(second / "adapter/adapter.safetensors")
    embedding = "shared_routers.task.embedding.weight"
    added = {name for name in after if name.endswith(ADDED)}
    assert set(after) - set(before) == added and len(added) == 2 * 4 + 1  # A, B in 2 layers x 2 blocks; one gate
    assert all(torch.equal(before[name], after[name]) for name in before if name != embedding)
    assert torch.equal(after[embedding][:1], before[embedding])
    assert all(after[name].shape[0] == 2 for name in added if "added_gate" not in name)
    assert all(after[name].abs().sum() > 0 for name in added if name.endswith("added_B"))  # they trained (B from 0)

    old, new = loramix.load(tiny_llama(), first_run / "adapter"), loramix.load(tiny_llama(), second / "adapter")
    weights = new.task_weights(0), new.task_weights(1)
    for name, layer in new.layers.items():
        assert layer.added_experts == 2 and layer.added_A.shape == (2, 2, layer.in_features)
        assert torch.equal(weights[0][name][4:], torch.zeros(2))  # the old task gives the added experts 0.0
        assert torch.equal(weights[0][name][:4], old.task_weights(0)[name])
        assert (weights[1][name] > 0).all() and torch.isclose(weights[1][name].sum(), torch.tensor(1.0))
    with torch.no_grad():
        assert torch.equal(new(**batch(0)).logits, old(**batch(0)).logits)
        assert not torch.allclose(new(**batch(1)).logits, old(**batch(0)).logits, atol=1e-3)
    scores = [json.loads((run / "metrics.json").read_text())["tasks"]["parity"]["model"] for run in (first_run, second)]
    assert scores[0] == scores[1]


def test_only_the_added_tasks_rows_reach_the_new_experts(task_file, first_run):
    recipe = recipe_for(task_file, ["parity", "parity2"], continue_from=str(first_run), continual=REUSING)
    model, _ = build_model(recipe, torch.device("cpu"))
    trained = {id(p) for p in trained_parameters(model, old_tasks=1)}
    names = {name for name, p in model.named_parameters() if id(p) in trained}
    assert {name.rsplit(".", 1)[-1] for name in names} == {"added_A", "added_B", "weight"}
    assert {name for name in names if name.endswith("weight")} == {
        "shared_routers.task.embedding.weight",
        "shared_routers.task.added_gate.weight",
    }
    added = [p for name, p in model.named_parameters() if name.endswith(ADDED)]
    with torch.no_grad():
        for layer in model.layers.values():
            layer.added_B.normal_(0, 0.1)  # so that added_A gets a gradient too
    for task, reaches in ((0, False), (1, True)):
        model.zero_grad(set_to_none=True)
        model(**batch(task)).logits.square().mean().backward()
        grads = [p.grad for p in added]
        assert all(g is not None and bool(g.abs().sum() > 0) == reaches for g in grads), task
        embedding_grad = model.shared_routers["task"].embedding.weight.grad
        assert torch.equal(embedding_grad[0], torch.zeros_like(embedding_grad[0]))  # the old row never moves


def test_new_experts_save_load_merge_export_and_serve_every_task(tmp_path, first_run, continued_run):
    from peft import PeftModel

    from loramix.export import export_peft
    from loramix.serve import TaskRows

    _, second = continued_run
    old, new = loramix.load(tiny_llama(), first_run / "adapter"), loramix.load(tiny_llama(), second / "adapter")
    new.save_pretrained(tmp_path / "again")
    again = loramix.load(tiny_llama(), tmp_path / "again")
    with torch.no_grad():
        expected = {task: new(**batch(task)).logits for task in (0, 1)}
        for task in (0, 1):
            assert torch.equal(again(**batch(task)).logits, expected[task])

        # merge_task: the old task merges exactly as before; the new one computes what the mixture computes
        merged = {task: new.merge_task(task) for task in (0, 1)}
        inputs = {task: {"input_ids": batch(task)["input_ids"]} for task in (0, 1)}
        assert torch.equal(merged[0](**inputs[0]).logits, old.merge_task(0)(**inputs[0]).logits)
        torch.testing.assert_close(merged[1](**inputs[1]).logits, expected[1], atol=1e-5, rtol=0)

        # generate (gates and B kept across decoding steps) decodes as the merged model does, for both tasks
        settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        for task in (0, 1):
            decoded = new.generate(**inputs[task], task_ids=batch(task)["task_ids"], **settings)
            assert torch.equal(decoded, merged[task].generate(**inputs[task], **settings))

    # export: the old task's adapter is the one it had (rank 4 x 2), the new one's has its 6 experts
    for task, run, model in ((0, "old", old), (0, "new", new), (1, "new", new)):
        export_peft(model, tmp_path / f"{run}{task}", task_id=task)
    ranks = {key: json.loads((tmp_path / key / "adapter_config.json").read_text())["r"] for key in ("new0", "new1")}
    assert ranks == {"new0": 8, "new1": 12}
    files = [load_file(tmp_path / key / "adapter_model.safetensors") for key in ("old0", "new0")]
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    for task in (0, 1):
        peft_model = PeftModel.from_pretrained(tiny_llama().eval(), tmp_path / f"new{task}")
        with torch.no_grad():
            torch.testing.assert_close(peft_model(**inputs[task]).logits, expected[task], atol=1e-5, rtol=0)

    # serving: one batch with rows of both tasks, each as its task alone
    input_ids = torch.cat([batch(0)["input_ids"], batch(1)["input_ids"]])
    with torch.inference_mode(), TaskRows(new).select(torch.tensor([0, 0, 1, 1])) as base:
        served = base(input_ids=input_ids).logits
    torch.testing.assert_close(served, torch.cat([expected[0], expected[1]]), atol=1e-5, rtol=0)


def test_new_experts_name_what_is_wrong(tmp_path, task_file, first_run, continued_run):
    with pytest.raises(ValueError, match=r"continual.new_experts=2 is invalid: .*set continue_from"):
        recipe_for(task_file, ["parity"], mixlora=MIXLORA, continual={"new_experts": 2})
    with pytest.raises(ValueError, match=r"continual.new_experts=-1 is invalid: expected a number >= 0"):
        recipe_for(task_file, ["parity", "parity2"], continue_from=str(first_run), continual={"new_experts": -1})
    with pytest.raises(ValueError, match=r"MixLoraConfig.added_experts=2 is invalid: .*'task'-router runs only"):
        loramix.MixLoraConfig(["q_proj"], router="soft", added_experts=2, added_from_task=1, num_tasks=2)
    with pytest.raises(ValueError, match=r"MixLoraConfig.added_from_task=2 is invalid: .* from 1 to num_tasks - 1 = 1"):
        loramix.MixLoraConfig(["q_proj"], router="task", added_experts=2, added_from_task=2, num_tasks=2)
    with pytest.raises(ValueError, match=r"added_from_task=\[2, 2\] is invalid: .* above the one before"):
        loramix.MixLoraConfig(["q_proj"], router="task", added_experts=[2, 1], added_from_task=[2, 2], num_tasks=4)
    with pytest.raises(ValueError, match=r"added_from_task=\[1\] is invalid: .* a list of 2 ids"):
        loramix.MixLoraConfig(["q_proj"], router="task", added_experts=[2, 1], added_from_task=[1], num_tasks=4)
    with pytest.raises(ValueError, match=r"init_from=.* is invalid: a run that adds tasks \(continue_from\)"):
        recipe_for(task_file, ["parity", "parity2"], continue_from=str(first_run), init_from=str(first_run))
    chained = {"router": "task", "added_experts": [2, 1], "added_from_task": [1, 2], "num_tasks": 4}
    with pytest.raises(ValueError, match=r"added_exclusive=\[True\] is invalid: .* expected 2 flags"):
        loramix.MixLoraConfig(["q_proj"], **chained, added_exclusive=[True])
    with pytest.raises(ValueError, match=r"added_exclusive='yes' is invalid: expected true, false or a list"):
        loramix.MixLoraConfig(["q_proj"], **chained, added_exclusive="yes")


def test_experts_added_again_leave_every_earlier_task_bit_identical(tmp_path, task_file, first_run, continued_run):
    """A third task with experts of its own, added to the run that added parity2's: parity and parity2 compute
    what they did, the earlier experts do not move, and every task exports and merges as it computes."""
    from peft import PeftModel

    from loramix.export import export_peft

    _, second = continued_run
    third = tmp_path / "parity3.jsonl"
    rows = [{"task": "parity3", "prompt": f"{n}?", "answer": "odd" if n % 2 else "even"} for n in range(40)]
    third.write_text("\n".join(json.dumps(row | {"choices": ["even", "odd"]}) for row in rows))
    recipe = Recipe(
        name="tiny",
        model="tiny-llama",
        tasks=["parity", "parity2", "parity3"],
        task_files=[str(task_file), str(third)],
        max_length=48,
        eval_examples=8,
        training=TRAINING,
        continue_from=str(second),
        continual={"new_experts": 3, "reuse_experts": True},
    )
    config = recipe.mixlora_config()
    assert (config.added_experts, config.added_from_task, config.added_groups()) == ([2, 3], [1, 2], [(1, 2), (2, 3)])
    third_run = train(recipe, tmp_path / "third")

    before = load_file(second / "adapter/adapter.safetensors")
    after = load_file(third_run / "adapter/adapter.safetensors")
    assert set(before) == set(after)
    for name, tensor in before.items():  # the earlier rows and experts stay; the new ones trained
        assert torch.equal(after[name][: tensor.shape[0]], tensor), name
        if name.endswith("added_B"):
            assert after[name].shape[0] == 5 and after[name][2:].abs().sum() > 0

    previous, model = (loramix.load(tiny_llama(), run / "adapter") for run in (second, third_run))
    assert all(layer.added_sizes == (2, 3) for layer in model.layers.values())
    for name, weights in model.task_weights(1).items():
        assert torch.equal(weights[6:], torch.zeros(3)) and torch.equal(weights[:6], previous.task_weights(1)[name])
    with torch.no_grad():
        for task in (0, 1):
            assert torch.equal(model(**batch(task)).logits, previous(**batch(task)).logits)
        expected = model(**batch(2)).logits
        assert not torch.allclose(expected, previous(**batch(1)).logits, atol=1e-3)
        inputs = {"input_ids": batch(2)["input_ids"]}
        torch.testing.assert_close(model.merge_task(2)(**inputs).logits, expected, atol=1e-5, rtol=0)
    for task, rank in ((1, 12), (2, 18)):
        export_dir = export_peft(model, tmp_path / f"export{task}", task_id=task)
        assert json.loads((export_dir / "adapter_config.json").read_text())["r"] == rank
    peft_model = PeftModel.from_pretrained(tiny_llama().eval(), tmp_path / "export2")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, expected, atol=1e-5, rtol=0)
    scores = [json.loads((run / "metrics.json").read_text())["tasks"] for run in (second, third_run)]
    assert all(scores[0][task]["model"] == scores[1][task]["model"] for task in ("parity", "parity2"))


def test_new_experts_used_alone_skip_the_frozen_ones_and_leave_the_old_task_bit_identical(
    tmp_path, task_file, first_run
):
    """continual.reuse_experts: false: the added task weighs every frozen expert 0.0 and the added ones as a
    fresh run's softmax would; training skips the frozen experts' products and computes the same loss and
    gradients as the full forward; the old task stays bit-identical."""
    recipe = recipe_for(
        task_file,
        ["parity", "parity2"],
        continue_from=str(first_run),
        continual={"new_experts": 2},  # reuse_experts: false by default where experts are added
    )
    assert recipe.mixlora_config().added_exclusive is True
    model, _ = build_model(recipe, torch.device("cpu"))
    assert all(layer.trains_last_addition_only for layer in model.layers.values())
    with torch.no_grad():
        for layer in model.layers.values():
            layer.added_B.normal_(0, 0.1)
    model.train()
    trained = trained_parameters(model, old_tasks=1)

    def loss_and_grads(skip: bool):
        for layer in model.layers.values():
            layer.trains_last_addition_only = skip
        model.zero_grad(set_to_none=True)
        loss = model(**batch(1)).logits.square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trained]

    (skipped, skipped_grads), (full, full_grads) = loss_and_grads(True), loss_and_grads(False)
    assert torch.equal(skipped, full)
    assert all(torch.equal(a, b) for a, b in zip(skipped_grads, full_grads, strict=True))

    second = train(recipe, tmp_path / "second")
    old, new = loramix.load(tiny_llama(), first_run / "adapter"), loramix.load(tiny_llama(), second / "adapter")
    for name, weights in new.task_weights(1).items():
        assert torch.equal(weights[:4], torch.zeros(4)) and torch.isclose(weights[4:].sum(), torch.tensor(1.0))
        assert torch.equal(new.task_weights(0)[name][:4], old.task_weights(0)[name])
    with torch.no_grad():
        assert torch.equal(new(**batch(0)).logits, old(**batch(0)).logits)
    with pytest.raises(ValueError, match=r"continual\.reuse_experts"):
        recipe_for(task_file, ["parity", "parity2"], continue_from=str(first_run), continual={"reuse_experts": False})


def test_an_exclusive_addition_masks_the_older_experts_for_its_own_tasks_only():
    """Experts added twice, the first addition exclusive: its task (1) weighs the 4 own experts 0.0 and the
    later addition's 0.0; the task of the later, reusing addition (2) weighs every expert; task 0 keeps its own."""
    from loramix.routing.task import TaskRouter

    config = loramix.MixLoraConfig(
        ["q_proj"], router="task", num_experts=4, num_tasks=3, added_experts=[2, 3], added_from_task=[1, 2],
        added_exclusive=[True, False],
    )  # fmt: skip
    torch.manual_seed(0)
    router = TaskRouter(config, 8, 4, "task")
    ids = torch.arange(3)
    probs = router.task_probs(ids, router.task_logits(ids))
    assert (probs[0, :4] > 0).all() and probs[0, 4:].eq(0).all()
    assert probs[1, :4].eq(0).all() and (probs[1, 4:6] > 0).all() and probs[1, 6:].eq(0).all()
    assert (probs[2] > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
