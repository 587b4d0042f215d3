"""Training on a tiny model and a tiny JSONL task: sampling, schedule, answer-only loss, truncation,
resume after a kill, NaN stop, the run folder, the learning curve."""

import json
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import loramix
import loramix.learning_curve as learning_curve
import loramix.train as training
from loramix.data import Example, encode_example, get_task, load_jsonl_tasks
from loramix.data.sampling import Encoder, TaskSampler
from loramix.methods import METHODS
from loramix.models import load_model, tiny_tokenizer
from loramix.recipe import Recipe, Training, parse_duration
from loramix.run_folder import split_examples
from loramix.schedule import StepPlan, learning_rate_factor
from loramix.train import TrainingError, answer_loss, train


def tiny_recipe(
    task_file, adapter: str = "topk", dev_examples: int = 0, method_settings: dict | None = None, **training_values
) -> Recipe:
    """A recipe on the tiny parity tasks: peft LoRA (`lora`), a mixture router, or a method of loramix.methods
    (`adapter` = its name, configured by `method_settings`)."""
    settings = {"steps": 6, "batch_size": 4, "warmup_steps": 2, "log_every": 2, "save_every": 3, "lr": 1e-2}
    sections = {"lora": {"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}}
    sections |= {name: {"method": name, "adapter": method_settings or {}} for name in METHODS if name != "mixlora"}
    mixlora = {"target_modules": ["q_proj", "v_proj"], "router": adapter, "num_experts": 4, "expert_rank": 2}
    if adapter == "contrastive":
        mixlora |= {"router": "topk", "contrastive_loss_weight": 0.1, "memory_queue_size": 8}
    return Recipe(
        name="tiny",
        model="tiny-llama",
        tasks=["parity", "parity2"],
        task_files=[str(task_file)],
        max_length=48,
        eval_examples=4,
        dev_examples=dev_examples,
        training=settings | training_values,
        **sections.get(adapter, {"mixlora": mixlora}),
    )


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- sampling and schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sampling", "expected"),
    [("uniform", [0.5, 0.5]), ("proportional", [0.8, 0.2]), ("temperature", [2 / 3, 1 / 3])],
)
def test_tasks_are_drawn_by_the_sampling_rule(sampling, expected):
    sampler = TaskSampler([400, 100], sampling, temperature=2.0, seed=0)
    np.testing.assert_allclose(sampler.probabilities, expected)
    draws = sampler.draw(20000)
    assert abs(np.mean([task == 0 for task, _ in draws]) - expected[0]) < 0.015
    assert max(index for task, index in draws if task == 1) == 99


def test_task_batching_draws_one_task_per_batch_by_the_sampling_rule():
    sampler = TaskSampler([400, 100], "proportional", temperature=2.0, seed=0, batching="task")
    batches = [sampler.draw(4) for _ in range(4000)]
    assert all(len(batch) == 4 and len({task for task, _ in batch}) == 1 for batch in batches)
    assert abs(np.mean([batch[0][0] == 0 for batch in batches]) - 0.8) < 0.02
    assert len({index for batch in batches for task, index in batch if task == 1}) == 100
    with pytest.raises(ValueError, match="batching='sorted'; allowed: mixed, task"):
        TaskSampler([400, 100], "uniform", temperature=2.0, seed=0, batching="sorted")


def test_training_rows_carry_the_recipes_system_prompt():
    tokenizer = tiny_tokenizer()
    example = Example("t", "Is water wet?", "yes")
    row = Encoder(tokenizer, 64, [[example]], "Be brief.").batch([(0, 0)])
    expected = encode_example(example, tokenizer, 64, system_prompt="Be brief.")
    assert row["input_ids"][0].tolist() == expected["input_ids"] and row["labels"][0].tolist() == expected["labels"]


def test_warmup_then_decay():
    linear = Training(steps=110, warmup_steps=10, schedule="linear")
    factors = [learning_rate_factor(step, linear) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5) and factors[-1] < 0.02
    assert learning_rate_factor(60, Training(steps=110, warmup_steps=10)) == pytest.approx(0.5)  # cosine
    assert learning_rate_factor(100, Training(steps=110, warmup_steps=10, schedule="constant")) == 1.0


def test_the_logged_learning_rate_follows_the_schedule(tmp_path, task_file):
    recipe = tiny_recipe(task_file, steps=4, warmup_steps=2, log_every=1, schedule="linear")
    run = train(recipe, tmp_path / "run", evaluate=False)
    rates = [json.loads(line)["lr"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])  # warm-up over 2 steps, then linear decay


def test_a_step_plan_fits_the_time_limit():
    plan = StepPlan(Training(steps=1000, time_limit="100s"))
    plan.after_step(1, 5.0)  # the first step (warming up) is not timed
    for step in range(2, 11):
        plan.after_step(step, 5.0 + 2 * (step - 1))
    assert not plan.planned and plan.steps == 1000
    plan.after_step(11, 25.0)  # 10 steps of 2 s: 37 more fit in the 75 s left
    assert plan.planned and plan.steps == 48
    assert not plan.out_of_time(99.9) and plan.out_of_time(100.0)
    capped = StepPlan(Training(steps=30, time_limit="1h"))
    for step in range(1, 12):
        capped.after_step(step, float(step))
    assert capped.steps == 30  # `steps` stays the most a run takes
    assert StepPlan(Training(steps=7)).steps == 7 and StepPlan(Training(steps=7)).planned


def test_a_step_plan_pays_for_the_dev_evaluations():
    plan = StepPlan(Training(steps=1000, time_limit="100s", dev_every=5))
    plan.after_dev(3.0)  # the zero-shot point, before the first step
    elapsed = 8.0  # the first step took 5 s
    plan.after_step(1, elapsed)
    for step in range(2, 12):
        elapsed += 2.0
        plan.after_step(step, elapsed)
        if step % 5 == 0:
            plan.after_dev(3.0)
            elapsed += 3.0
    # 2 s a step and 3 s every 5 steps: 2.6 s a step; of the 100 - 34 s left, 3 s for the last evaluation
    assert plan.planned and plan.steps == 11 + 24  # 24 steps and 5 evaluations in 63 s
    resumed = StepPlan(Training(steps=1000, time_limit="100s", dev_every=5))
    resumed.restore(plan.state())
    assert (resumed.steps, resumed.dev_seconds, resumed.dev_count) == (plan.steps, 9.0, 3)


@pytest.mark.parametrize("text", ["14m", "90s", "1.5h", "1h30m", " 2m 30s "])
def test_durations_parse(text):
    assert parse_duration(text) == {"14m": 840, "90s": 90, "1.5h": 5400, "1h30m": 5400, " 2m 30s ": 150}[text]


@pytest.mark.parametrize("text", ["", "14", "ten minutes", "0s", "-5m"])
def test_a_bad_time_limit_names_the_field(text):
    with pytest.raises(ValueError, match="training.time_limit"):
        Training(time_limit=text)


@pytest.mark.parametrize(("key", "value"), [("dev_examples", -1), ("dev_examples", 1.5), ("dev_every", 0)])
def test_a_bad_learning_curve_setting_names_the_field(task_file, key, value):
    with pytest.raises(ValueError, match=rf"{key}={value}"):
        tiny_recipe(task_file, **{key: value})


def test_a_time_limited_run_leaves_time_for_its_learning_curve(tmp_path, task_file, monkeypatch):
    clock = iter(range(10**6))  # every reading of the clock is one second later
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    settings = {"steps": 500, "log_every": 1, "save_every": 1000, "time_limit": "60s", "dev_every": 5}
    run = train(tiny_recipe(task_file, dev_examples=2, **settings), tmp_path / "run", evaluate=False)
    summary = json.loads((run / "training.json").read_text())
    history, curve = read_lines(run / "history.jsonl"), read_lines(run / "learning_curve.jsonl")
    steps = summary["steps"]
    assert steps >= 12 and not summary["stopped_by_time_limit"] and history[-1]["seconds"] <= 60 + 5
    assert [point["step"] for point in curve] == sorted({*range(0, steps, 5), steps})
    assert all(point["dev_seconds"] > 0 for point in curve)


def test_a_time_limit_is_the_trainings_alone(tmp_path, task_file, monkeypatch):
    """The evaluation on the test splits (zero-shot and adapter) comes after the limit, not out of it."""
    settings = {"steps": 500, "log_every": 1, "save_every": 1000, "time_limit": "60s"}
    steps = []
    for evaluate in (False, True):
        clock = iter(range(10**6))  # every reading of the clock is one second later
        monkeypatch.setattr(time, "perf_counter", lambda clock=clock: float(next(clock)))
        run = train(tiny_recipe(task_file, **settings), tmp_path / f"run-{evaluate}", evaluate=evaluate)
        steps.append(json.loads((run / "training.json").read_text())["steps"])
    assert steps[0] == steps[1] >= 12
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(task["zero_shot"] is not None for task in metrics["tasks"].values())


def test_a_time_limited_run_lays_its_schedule_over_the_steps_that_fit(tmp_path, task_file, monkeypatch):
    clock = iter(range(10**6))  # every reading of the clock is one second later: a step costs a few seconds
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    recipe = tiny_recipe(task_file, steps=500, warmup_steps=2, log_every=1, save_every=1000, time_limit="60s")
    run = train(recipe, tmp_path / "run", evaluate=False)
    summary = json.loads((run / "training.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = summary["steps"]
    assert 12 <= steps < 60 and len(history) == steps and not summary["stopped_by_time_limit"]
    assert history[-1]["seconds"] <= 60 + 5
    expected = [1e-2 * learning_rate_factor(step, recipe.training, steps) for step in range(11, steps)]
    assert [h["lr"] for h in history[11:]] == pytest.approx(expected)  # planned after 11 steps: decays to 0
    assert history[-1]["lr"] < 0.05 * 1e-2


# ---- loss and encoding ----------------------------------------------------------------------------------------
def test_only_answer_tokens_carry_loss(task_file):
    model, tokenizer = load_model("tiny-llama")
    encoder = Encoder(tokenizer, 48, [[Example("t", "What is 2 + 2?", "four")]])
    batch = encoder.batch([(0, 0), (0, 0)])
    labelled = batch["labels"][0] != -100
    answer = tokenizer.decode(batch["input_ids"][0][labelled])
    assert answer.startswith("four") and labelled.sum() <= len(tokenizer("four<|im_end|>\n")["input_ids"])
    assert labelled.nonzero().min() > len(tokenizer("What is 2 + 2?")["input_ids"])

    logits = model(input_ids=batch["input_ids"]).logits.detach().requires_grad_()
    model.forward = lambda **_: type("Output", (), {"logits": logits})()
    loss = answer_loss(model, batch)
    loss.backward()
    predicts_answer = torch.nn.functional.pad(labelled[1:], (0, 1))
    assert logits.grad[0][~predicts_answer].abs().sum() == 0 and logits.grad[0][predicts_answer].abs().sum() > 0
    targets = batch["input_ids"][0][labelled]
    expected = torch.nn.functional.cross_entropy(logits[0][predicts_answer], targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mixlora_and_the_lora_baseline_optimise_the_same_loss(task_file):
    load_jsonl_tasks(task_file)
    model, tokenizer = load_model("tiny-llama")
    batch = Encoder(tokenizer, 48, [[Example("t", "5?", "odd"), Example("t", "6?", "even")]]).batch([(0, 0), (0, 1)])
    plain = answer_loss(model, batch)
    wrapped = loramix.wrap(model, loramix.MixLoraConfig(target_modules=["q_proj"], router="soft"))
    assert answer_loss(wrapped, batch).item() == pytest.approx(plain.item(), rel=1e-5)  # B = 0 at the start


def test_long_inputs_lose_context_not_the_question_nor_the_answer(tmp_path, task_file):
    _, tokenizer = load_model("tiny-llama")
    long = Example("t", "context " * 30 + "Question: even?", "odd")
    encoder = Encoder(tokenizer, 70, [[long, Example("t", "short?", "even")]])
    batch = encoder.batch([(0, 0), (0, 1)])
    text = tokenizer.decode(batch["input_ids"][0])
    assert batch["input_ids"].shape[1] == 70 and "Question: even?" in text and "odd" in text
    assert encoder.counts == {"encoded": {"t": 2}, "truncated": {"t": 1}, "dropped_turns": {"t": 0}}


# ---- the run folder -------------------------------------------------------------------------------------------
def test_a_run_writes_its_folder(tmp_path, task_file):
    run = train(tiny_recipe(task_file, "remix", steps=4), tmp_path / "run", evaluate=False)
    assert {"recipe.yaml", "splits.json", "history.jsonl", "adapter", "checkpoint", "training.json"} <= {
        p.name for p in run.iterdir()
    }
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    assert set(history[0]) >= {"step", "loss", "ce", "aux", "ess", "ess_per_layer", "load_per_layer", "lr", "seconds"}
    assert "rloo" in history[0]["aux"] and all(h["ess"] == pytest.approx(2.0) for h in history)
    assert set(json.loads((run / "routing.json").read_text())) == set(history[0]["load_per_layer"])
    summary = json.loads((run / "training.json").read_text())
    assert summary["steps"] == 4 and set(summary["truncated"]) == {"parity", "parity2"}
    assert summary["device"] == f"CPU, {torch.get_num_threads()} threads"

    splits = json.loads((run / "splits.json").read_text())
    again = train(tiny_recipe(task_file, "remix", steps=1), tmp_path / "again", evaluate=False)
    assert json.loads((again / "splits.json").read_text()) == splits  # deterministic
    parity = splits["parity"]
    assert parity["sizes"] == {"train": 32, "test": 8} and sorted(parity["indices"]["test"]) == list(range(8))
    assert parity["indices"]["train"] == list(range(32))


def test_a_run_folder_is_never_overwritten(tmp_path, task_file):
    train(tiny_recipe(task_file, steps=1), tmp_path / "run", evaluate=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_recipe(task_file, steps=1), tmp_path / "run", evaluate=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_recipe(task_file, steps=1), tmp_path / "other", resume=True, evaluate=False)
    with pytest.raises(ValueError, match=r"\['training.lr'\] changed"):
        train(tiny_recipe(task_file, steps=2, lr=0.5), tmp_path / "run", resume=True, evaluate=False)


# ---- the learning curve ---------------------------------------------------------------------------------------
def test_dev_examples_are_held_out_and_scored_along_the_run(tmp_path, task_file, monkeypatch):
    batch, drawn = Encoder.batch, set()

    def recording(self, picks):
        drawn.update((self.examples[task][index].task, self.examples[task][index].prompt) for task, index in picks)
        return batch(self, picks)

    monkeypatch.setattr(Encoder, "batch", recording)
    recipe = tiny_recipe(task_file, dev_examples=5, steps=5, dev_every=2)
    run = train(recipe, tmp_path / "run", evaluate=False)
    splits = json.loads((run / "splits.json").read_text())
    for name in recipe.tasks:
        train_indices, dev = splits[name]["indices"]["train"], splits[name]["indices"]["dev"]
        assert len(dev) == 5 and not set(dev) & set(train_indices) and sorted(train_indices + dev) == list(range(32))
        dev_prompts = {get_task(name).load()["train"][i].prompt for i in dev}
        assert not {prompt for task, prompt in drawn if task == name} & dev_prompts
        assert len(split_examples(name, splits, None, None)[0]) == 27  # the majority answer's examples
    curve = read_lines(run / "learning_curve.jsonl")
    assert [point["step"] for point in curve] == [0, 2, 4, 5]  # zero-shot, every 2 steps, the last
    for point in curve:
        assert set(point) == {"step", "seconds", "dev_seconds", "tasks"} and set(point["tasks"]) == set(recipe.tasks)
        assert list(point["tasks"]["parity"]) == ["accuracy", "accuracy_norm"]  # choice scoring


def test_the_learning_curve_skips_a_point_just_before_the_last(tmp_path, task_file):
    recipe = tiny_recipe(task_file, dev_examples=4, steps=9, dev_every=4)
    run = train(recipe, tmp_path / "run", evaluate=False)
    assert [point["step"] for point in read_lines(run / "learning_curve.jsonl")] == [0, 4, 9]  # not 8 and 9


def test_a_resumed_learning_curve_has_no_duplicate_points(tmp_path, task_file, monkeypatch):
    recipe = tiny_recipe(task_file, dev_examples=4, dev_every=2)
    straight = train(recipe, tmp_path / "straight", evaluate=False)

    draw, calls = TaskSampler.draw, []

    def killed_during_step_5(self, count):
        calls.append(count)
        if len(calls) == 5:  # after the checkpoint of step 3 and the dev point of step 4
            raise Killed
        return draw(self, count)

    monkeypatch.setattr(TaskSampler, "draw", killed_during_step_5)
    with pytest.raises(Killed):
        train(recipe, tmp_path / "resumed", evaluate=False)
    assert [p["step"] for p in read_lines(tmp_path / "resumed" / "learning_curve.jsonl")] == [0, 2, 4]
    monkeypatch.setattr(TaskSampler, "draw", draw)
    resumed = train(recipe, tmp_path / "resumed", resume=True, evaluate=False)
    expected, got = read_lines(straight / "learning_curve.jsonl"), read_lines(resumed / "learning_curve.jsonl")
    assert [p["step"] for p in got] == [0, 2, 4, 6]
    assert [p["tasks"] for p in got] == [p["tasks"] for p in expected]


def test_dev_evaluations_leave_training_and_its_routing_statistics_alone(tmp_path, task_file, monkeypatch):
    recipe = tiny_recipe(task_file, dev_examples=4, dev_every=1)  # dev forwards between and at the log steps
    scored = read_lines(train(recipe, tmp_path / "scored", evaluate=False) / "history.jsonl")
    monkeypatch.setattr(
        learning_curve, "evaluate_model", lambda model, tokenizer, tasks, **_: dict.fromkeys(tasks, {"metrics": {}})
    )
    skipped = read_lines(train(recipe, tmp_path / "skipped", evaluate=False) / "history.jsonl")
    timings = {"seconds": 0, "examples_per_second": 0}
    assert [h | timings for h in scored] == [h | timings for h in skipped]


def test_a_run_without_dev_examples_resumes_with_this_version(tmp_path, task_file):
    run = train(tiny_recipe(task_file, steps=1), tmp_path / "run", evaluate=False)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["dev_examples"], saved["training"]["dev_every"]  # a recipe.yaml of an earlier version
    del saved["data"], saved["training"]["report_to"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    train(tiny_recipe(task_file, steps=2), run, resume=True, evaluate=False)
    assert not (run / "learning_curve.jsonl").exists()
    with pytest.raises(ValueError, match=r"\['dev_examples'\] changed"):
        train(tiny_recipe(task_file, steps=3, dev_examples=2), run, resume=True, evaluate=False)


def test_a_task_needs_training_examples_left_after_its_dev_examples(tmp_path, task_file):
    with pytest.raises(ValueError, match="dev_examples=32 is invalid: task 'parity' has 32 training examples"):
        train(tiny_recipe(task_file, dev_examples=32), tmp_path / "run", evaluate=False)


# ---- resume and failures --------------------------------------------------------------------------------------
class Killed(Exception):
    """Stands for the process being killed."""


@pytest.mark.parametrize("adapter", ["remix", "contrastive", "lora"])
def test_resume_after_a_kill_ends_with_bit_identical_weights(tmp_path, task_file, monkeypatch, adapter):
    straight = train(tiny_recipe(task_file, adapter), tmp_path / "straight", evaluate=False)

    draw, calls = TaskSampler.draw, []

    def killed_during_step_5(self, count):
        calls.append(count)
        if len(calls) == 5:  # after the checkpoint of step 3 and the log of step 4
            raise Killed
        return draw(self, count)

    monkeypatch.setattr(TaskSampler, "draw", killed_during_step_5)
    with pytest.raises(Killed):
        train(tiny_recipe(task_file, adapter), tmp_path / "resumed", evaluate=False)
    monkeypatch.setattr(TaskSampler, "draw", draw)
    resumed = train(tiny_recipe(task_file, adapter), tmp_path / "resumed", resume=True, evaluate=False)

    name = "adapter_model.safetensors" if adapter == "lora" else "adapter.safetensors"
    expected, got = load_file(straight / "adapter" / name), load_file(resumed / "adapter" / name)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    for run in (straight, resumed):  # the memory queues too
        assert (run / "checkpoint" / "state.safetensors").is_file()
    queues = [load_file(run / "checkpoint" / "state.safetensors") for run in (straight, resumed)]
    assert all(torch.equal(queues[0][k], queues[1][k]) for k in queues[0] if k.startswith("model."))
    steps = [json.loads(line)["step"] for line in (resumed / "history.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, task_file, monkeypatch):
    calls = []

    def loss_explodes_at_step_3(model, batch):
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == 3 else 1.0, requires_grad=True)

    monkeypatch.setattr(training, "answer_loss", loss_explodes_at_step_3)
    with pytest.raises(TrainingError, match="loss is nan at step 3"):
        train(tiny_recipe(task_file), tmp_path / "run", evaluate=False)


def test_gradient_accumulation_and_bf16_autocast_train(tmp_path, task_file):
    recipe = tiny_recipe(task_file, "topk", steps=12, batch_size=2, grad_accumulation=2, bf16=True, log_every=4)
    run = train(recipe, tmp_path / "run", evaluate=False)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["ce"] < history[0]["ce"] and "balance" in history[0]["aux"]


@pytest.mark.parametrize("adapter", ["lora", "task"])
def test_init_from_starts_from_a_finished_runs_adapter(tmp_path, task_file, adapter):
    first = training.train(tiny_recipe(task_file, adapter), tmp_path / "first", evaluate=False)
    recipe = tiny_recipe(task_file, adapter)
    recipe.init_from = str(first)
    model, _ = training.build_model(recipe, torch.device("cpu"))
    saved = load_file(next((first / "adapter").glob("*.safetensors")))
    if adapter == "lora":
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.adapter_state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[name], saved[name]) for name in saved)

    with pytest.raises(ValueError, match="init_from=.* is invalid: that run's .*lora.* differ"):
        other = tiny_recipe(task_file, "lora")
        other.lora = other.lora | {"r": 4}
        other.init_from = str(first)
        training.build_model(other, torch.device("cpu"))
    with pytest.raises(ValueError, match="init_from=.* is invalid: expected a finished run folder"):
        nowhere = Recipe(**tiny_recipe(task_file, adapter).to_dict() | {"init_from": str(tmp_path)})
        training.build_model(nowhere, torch.device("cpu"))
