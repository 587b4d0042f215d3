"""Evaluation: batched greedy generation, task ids, per-task metrics, and a whole run folder."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loramix
import loramix.evaluate as evaluation
from loramix import MixLoraConfig
from loramix.data import TASKS, Example, Task, get_task
from loramix.evaluate import evaluate_model, evaluate_run, generate_answers
from loramix.models import tiny_llama, tiny_tokenizer

PROMPTS = ["Is aspirin an NSAID?", "fever, cough and a sore throat for three days", "a", "Which gene? BRCA1 or TP53"]


def tiny_model_and_tokenizer(seed: int = 0):
    return tiny_llama(seed=seed).eval(), tiny_tokenizer()


def mixture(model, router: str = "topk", **overrides) -> loramix.MixLoraModel:
    values = dict(router=router, num_experts=4, expert_rank=2, top_k=2, num_tasks=3 if router == "task" else None)
    wrapped = loramix.wrap(model, MixLoraConfig("all-linear", **{**values, **overrides}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the experts an effect
        for layer in wrapped.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    return wrapped


def peft_lora(model):
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return wrapped.eval()


EXAMPLES = [Example(task="pubmedqa", prompt=prompt, answer="yes") for prompt in PROMPTS]
BUILDS = {
    "base": lambda model: model,
    "topk": mixture,
    "prompt-level": lambda model: mixture(model, "prompt", top_k=3),
    "sequence-topk": lambda model: mixture(model, "topk", routing_level="sequence"),
    "peft": peft_lora,
}


@pytest.mark.parametrize("build", BUILDS)
def test_batched_left_padded_answers_equal_one_at_a_time(build):
    model, tokenizer = tiny_model_and_tokenizer()
    model = BUILDS[build](model)
    batched = generate_answers(model, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=3)
    single = generate_answers(model, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=1)
    assert batched == single
    assert len(set(batched)) > 1  # differing answers: the comparison means something


def test_task_ids_reach_every_row():
    model, tokenizer = tiny_model_and_tokenizer()
    wrapped = mixture(model, "task")
    seen = []
    generate = wrapped.generate

    def recording_generate(*args, task_ids=None, **kwargs):
        seen.append((None if task_ids is None else task_ids.tolist(), kwargs["input_ids"].shape[0]))
        return generate(*args, task_ids=task_ids, **kwargs)

    wrapped.generate = recording_generate
    first = generate_answers(wrapped, tokenizer, EXAMPLES, task_id=2, max_new_tokens=6, batch_size=3)
    assert seen == [([2, 2, 2], 3), ([2], 1)]
    second = generate_answers(wrapped, tokenizer, EXAMPLES, task_id=0, max_new_tokens=6, batch_size=3)
    assert first != second  # the task's experts answer
    with pytest.raises(ValueError, match="needs task_ids"):
        generate_answers(wrapped, tokenizer, EXAMPLES, max_new_tokens=2)
    with pytest.raises(ValueError, match="only a MixLoraModel takes task ids"):
        generate_answers(wrapped.unload(), tokenizer, EXAMPLES, task_id=0, max_new_tokens=2)


def test_answers_end_at_eos_and_keep_the_example_order():
    model, tokenizer = tiny_model_and_tokenizer()
    letters = {prompt: tokenizer.convert_tokens_to_ids(prompt[0]) for prompt in PROMPTS}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    calls = []

    def scripted_generate(input_ids, attention_mask, **kwargs):
        """Answer each prompt with its first letter twice, then eos, then noise."""
        calls.append(kwargs)
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = tokenizer.decode(ids[mask.bool()]).split("user\n")[1].split("<|im_end|>")[0]
            rows.append([letters[prompt]] * 2 + [eos, letters[prompt], pad])
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    model.generate = scripted_generate
    answers = generate_answers(model, tokenizer, EXAMPLES, max_new_tokens=5, batch_size=3)
    assert answers == [prompt[0] * 2 for prompt in PROMPTS]
    assert eos in calls[0]["eos_token_id"] and calls[0]["pad_token_id"] == pad and calls[0]["do_sample"] is False


class YesNoTask(Task):
    """A registered yes/no task whose examples the test chooses (nothing is read from disk)."""

    choices = ("yes", "no")
    max_new_tokens = 4

    def __init__(self, name: str, train: list[str], test: list[str]) -> None:
        self.name = name
        self.splits = {
            split: [
                Example(name, f"{name} {split} question {i}?", a, self.choices, str(i)) for i, a in enumerate(answers)
            ]
            for split, answers in (("train", train), ("test", test))
        }

    def read(self, folder) -> dict[str, list[Example]]:
        return self.splits

    def load(self, data_dir=None) -> dict[str, list[Example]]:
        return self.splits


def register_yes_no_tasks(monkeypatch) -> dict[str, YesNoTask]:
    tasks = {
        "alpha": YesNoTask("alpha", ["yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "no", "yes", "yes"]),
        "beta": YesNoTask("beta", ["no", "no"], ["no", "no", "yes"]),
        "gamma": YesNoTask("gamma", ["yes"], ["yes", "no", "yes", "yes"]),
    }
    for name, task in tasks.items():
        monkeypatch.setitem(TASKS, name, task)
    return tasks


def test_evaluate_model_scores_parsed_answers(monkeypatch):
    truth = ["yes", "no", "maybe", "no", "yes", "yes"]
    outputs = ["Yes.", "No, never", "Maybe so", "I would say yes", "yes", "It is unclear"]
    examples = [Example("pubmedqa", f"question {i}", answer, ("yes", "no", "maybe")) for i, answer in enumerate(truth)]
    calls = []

    def scripted(model, tokenizer, examples, *, task_id, max_new_tokens, batch_size, max_prompt_length, **options):
        calls.append((examples[0].task, task_id, max_new_tokens, options["bf16"], options["system_prompt"]))
        return outputs

    monkeypatch.setattr(evaluation, "generate_answers", scripted)
    results = evaluate_model(None, None, {"pubmedqa": examples}, {"pubmedqa": 2})
    assert results["pubmedqa"]["outputs"] == outputs
    assert results["pubmedqa"]["predictions"] == ["yes", "no", "maybe", "yes", "yes", "it is unclear"]
    # 4 of 6 right; F1 yes = 2*2/(3+3), no = 2*1/(1+2), maybe = 2*1/(1+1)
    assert results["pubmedqa"]["metrics"] == pytest.approx({"accuracy": 4 / 6, "macro_f1": (2 / 3 + 2 / 3 + 1) / 3})
    assert calls == [("pubmedqa", 2, get_task("pubmedqa").max_new_tokens, False, None)]
    evaluate_model(None, None, {"pubmedqa": examples}, None, max_new_tokens=9, bf16=True, system_prompt="")
    assert calls[-1] == ("pubmedqa", None, 9, True, "")


def write_run(run, adapter, **recipe_values) -> None:
    """A run folder as training leaves it: recipe, splits (a subset of alpha's test set) and the adapter."""
    run.mkdir(exist_ok=True)
    recipe = {"name": "run", "model": "tiny-llama", "tasks": ["alpha", "beta"], "evaluation": ["gamma"]}
    recipe |= recipe_values
    if isinstance(adapter, loramix.MixLoraModel):
        recipe["mixlora"] = adapter.config.to_dict()
    else:
        recipe["lora"] = {"r": 2, "target_modules": ["q_proj", "v_proj"]}
    (run / "recipe.yaml").write_text(json.dumps(recipe | {"max_length": 64}))  # JSON is YAML
    indices = {"train": [0, 1, 2], "test": [5, 1, 2, 3]}
    sizes = {"train": 5, "test": 6}
    (run / "splits.json").write_text(json.dumps({"alpha": {"seed": 0, "sizes": sizes, "indices": indices}}))
    adapter.save_pretrained(run / "adapter")


@pytest.mark.parametrize("adapter", ["topk", "task", "peft"])
def test_evaluate_run_writes_metrics_and_caches_zero_shot(tmp_path, monkeypatch, adapter):
    register_yes_no_tasks(monkeypatch)
    model, _ = tiny_model_and_tokenizer()
    run = tmp_path / "run"
    write_run(run, peft_lora(model) if adapter == "peft" else mixture(model, adapter))
    generated = []
    generate = evaluation.generate_answers

    def counting(model, tokenizer, examples, **kwargs):
        generated.append((examples[0].task, kwargs["task_id"]))
        return generate(model, tokenizer, examples, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", counting)
    metrics = evaluate_run(run, max_examples=3)
    assert metrics == json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"alpha", "beta", "gamma"}
    alpha = metrics["tasks"]["alpha"]
    assert alpha["n"] == 3  # splits.json's 4 test indices, capped by max_examples
    # majority of the training examples used (0, 1, 2: yes yes no) -> "yes"; test examples 5, 1, 2: yes no yes
    assert alpha["majority"] == pytest.approx({"accuracy": 2 / 3, "macro_f1": (0.8 + 0.0) / 2})
    assert set(alpha["model"]) == set(alpha["zero_shot"]) == {"accuracy", "macro_f1"}
    zero_shot = [("alpha", None), ("beta", None), ("gamma", None)]
    ids = {"topk": [("alpha", 0), ("beta", 1), ("gamma", None)], "task": [("alpha", 0), ("beta", 1)]}
    ids["peft"] = zero_shot
    assert generated == zero_shot + ids[adapter]
    if adapter == "task":
        assert metrics["tasks"]["gamma"]["model"] is None and "gamma" in metrics["meta"]["notes"][0]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    alpha_rows = [row for row in rows if row["task"] == "alpha"]
    assert [(row["id"], row["answer"]) for row in alpha_rows] == [("5", "yes"), ("1", "no"), ("2", "yes")]
    hits = sum(row["prediction"] == row["answer"] for row in alpha_rows)
    assert alpha["model"]["accuracy"] == pytest.approx(hits / 3)
    assert metrics["meta"]["adapter"] == ("peft" if adapter == "peft" else "loramix")
    assert metrics["meta"]["parameters"]["trainable"] > 0

    generated.clear()
    again = evaluate_run(run, max_examples=3)
    assert generated == ids[adapter]  # zero-shot scores came from zero_shot.json
    assert again["tasks"]["alpha"]["zero_shot"] == alpha["zero_shot"]
    assert again["tasks"]["alpha"]["model"] == alpha["model"]  # greedy: the same answers


def test_evaluate_run_prompts_as_the_run_was_trained(tmp_path, monkeypatch):
    register_yes_no_tasks(monkeypatch)
    model, _ = tiny_model_and_tokenizer()
    run, adapter = tmp_path / "run", mixture(model, "topk")
    generate, prompts = evaluation.generate_answers, []

    def recording(model, tokenizer, examples, **kwargs):
        prompts.append(kwargs["system_prompt"])
        return generate(model, tokenizer, examples, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", recording)
    write_run(run, adapter, system_prompt="Be brief.")
    evaluate_run(run, max_examples=3)
    assert prompts == ["Be brief."] * 6  # zero-shot and the adapter, three tasks each
    prompts.clear()
    write_run(run, adapter, system_prompt="")  # another prompt format: the cached zero-shot scores do not apply
    evaluate_run(run, max_examples=3)
    assert prompts == [""] * 6


def test_evaluate_run_refuses_changed_data(tmp_path, monkeypatch):
    tasks = register_yes_no_tasks(monkeypatch)
    run = tmp_path / "run"
    write_run(run, mixture(tiny_llama()))
    tasks["alpha"].splits["test"].pop()
    with pytest.raises(ValueError, match="the data changed"):
        evaluate_run(run)
