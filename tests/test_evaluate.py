"""Evaluation: batched greedy generation, task ids, per-task metrics, and a whole run folder."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loramix
import loramix.evaluate as evaluation
from loramix import MixLoraConfig
from loramix.data import TASKS, Example, Task, encode_example, get_task
from loramix.data.encode import template_parts
from loramix.evaluate import (
    _prompt_chunks,
    choice_predictions,
    evaluate_model,
    evaluate_run,
    generate_answers,
    score_choices,
    task_metrics,
)
from loramix.models import tiny_gpt2, tiny_llama, tiny_tokenizer

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
    with pytest.raises(ValueError, match="only a loramix model takes task ids"):
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
    results = evaluate_model(None, None, {"pubmedqa": examples}, {"pubmedqa": 2}, mode="generate", perplexity=False)
    assert results["pubmedqa"]["outputs"] == outputs
    assert results["pubmedqa"]["predictions"] == ["yes", "no", "maybe", "yes", "yes", "it is unclear"]
    # 4 of 6 right; F1 yes = 2*2/(3+3), no = 2*1/(1+2), maybe = 2*1/(1+1)
    assert results["pubmedqa"]["metrics"] == pytest.approx({"accuracy": 4 / 6, "macro_f1": (2 / 3 + 2 / 3 + 1) / 3})
    assert calls == [("pubmedqa", 2, get_task("pubmedqa").max_new_tokens, False, None)]
    evaluate_model(
        None,
        None,
        {"pubmedqa": examples},
        None,
        mode="generate",
        max_new_tokens=9,
        bf16=True,
        system_prompt="",
        perplexity=False,
    )
    assert calls[-1] == ("pubmedqa", None, 9, True, "")


def write_run(run, adapter, **recipe_values) -> None:
    """A run folder as training leaves it: recipe, splits (a subset of alpha's test set) and the adapter."""
    run.mkdir(exist_ok=True)
    recipe = {"name": "run", "model": "tiny-llama", "tasks": ["alpha", "beta"], "evaluation": ["gamma"]}
    recipe["eval_mode"] = "generate"
    recipe |= recipe_values
    if isinstance(adapter, loramix.MixLoraModel):
        recipe["mixlora"] = adapter.mixlora_config.to_dict()
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


def test_runs_share_zero_shot_scores_of_the_same_weights_and_examples(tmp_path, monkeypatch, own_zero_shot_cache):
    register_yes_no_tasks(monkeypatch)
    scored = []
    generate = evaluation.generate_answers

    def counting(model, tokenizer, examples, **kwargs):
        scored.append(kwargs["task_id"])
        return generate(model, tokenizer, examples, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", counting)
    for name, zero_shot_scored in (("first", [None] * 3), ("second", [])):
        write_run(tmp_path / name, mixture(tiny_model_and_tokenizer()[0], "topk"))
        scored.clear()
        metrics = evaluate_run(tmp_path / name, max_examples=3)
        assert scored == zero_shot_scored + [0, 1, None]
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert metrics["tasks"]["alpha"]["zero_shot"] == first["tasks"]["alpha"]["zero_shot"]
    assert len(json.loads(own_zero_shot_cache.read_text())) == 3
    evaluate_run(tmp_path / "first", max_examples=2)  # other test examples: scored anew
    assert len(json.loads(own_zero_shot_cache.read_text())) == 6

    base = evaluation.load_model
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: (tiny_llama(seed=1), base(*a, **k)[1]))
    write_run(tmp_path / "other", mixture(tiny_llama(seed=1), "topk"))
    scored.clear()
    evaluate_run(tmp_path / "other", max_examples=3)  # other weights under the same model name: scored anew
    assert scored == [None] * 3 + [0, 1, None]


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


# ---- choice scoring -------------------------------------------------------------------------------------------
CHOICES = ("yes", "no", "maybe so", "a much longer answer")
CHOICE_EXAMPLES = [Example("pubmedqa", prompt, "no", CHOICES, str(i)) for i, prompt in enumerate(PROMPTS)]
CHOICE_BUILDS = {
    **BUILDS,
    "soft": lambda model: mixture(model, "soft"),
    "remix": lambda model: mixture(model, "remix"),
    "task": lambda model: mixture(model, "task"),
}


def reference_choice_scores(model, tokenizer, example, task_id=None) -> list[float]:
    """The log-likelihood of each choice by hand: one forward over prompt + choice, summed over the choice."""
    prompt = encode_example(example, tokenizer, 1024, with_answer=False)["input_ids"]
    _, _, lead, end = template_parts(tokenizer)
    scores = []
    for choice in example.choices:
        choice_ids = tokenizer(lead + choice + end, add_special_tokens=False)["input_ids"]
        inputs = {"input_ids": torch.tensor([prompt + choice_ids])}
        if isinstance(model, loramix.MixLoraModel):  # sequence-level routes pool over the prompt, as generate does
            inputs["prompt_mask"] = torch.tensor([[True] * len(prompt) + [False] * len(choice_ids)])
            if task_id is not None:
                inputs["task_ids"] = torch.tensor([task_id])
        with torch.no_grad():
            log_probs = model(**inputs).logits[0].float().log_softmax(-1)
        scores.append(sum(log_probs[len(prompt) - 1 + j, token].item() for j, token in enumerate(choice_ids)))
    return scores


@pytest.mark.parametrize("build", CHOICE_BUILDS)
def test_choice_scores_equal_one_forward_per_choice(build):
    model, tokenizer = tiny_model_and_tokenizer()
    model = CHOICE_BUILDS[build](model).eval()
    task_id = 1 if build == "task" else None
    # batch_size 2: at most 6 continuation rows per forward, so the 4 prompts of 4 choices take 4 forwards
    scores = score_choices(model, tokenizer, CHOICE_EXAMPLES, task_id=task_id, batch_size=2)
    for example, got in zip(CHOICE_EXAMPLES, scores, strict=True):
        reference = reference_choice_scores(model, tokenizer, example, task_id)
        assert [total for total, _ in got] == pytest.approx(reference, abs=1e-4)
        assert [count for _, count in got] == [len(tokenizer(c + "<|im_end|>")["input_ids"]) for c in CHOICES]
    assert len({round(total, 3) for options in scores for total, _ in options}) > 8  # the scores differ


@pytest.mark.parametrize("build", BUILDS)
def test_answer_perplexity_equals_full_logits_one_example_at_a_time(build):
    """answer_perplexity computes logits at the answer positions only, in padded batches: the same value as every
    position's logits of one example at a time (routes of sequence-level routers included)."""
    model, tokenizer = tiny_model_and_tokenizer()
    model = BUILDS[build](model).eval()
    answers = ["yes", "no", "maybe so", "x"]
    examples = [Example(task="pubmedqa", prompt=p, answer=a) for p, a in zip(PROMPTS, answers, strict=True)]
    losses, count = 0.0, 0
    for example in examples:
        row = encode_example(example, tokenizer, 64, True)
        labels = torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        losses += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += int((labels != -100).sum())
    expected = torch.tensor(losses / count).exp().item()
    got = evaluation.answer_perplexity(model, tokenizer, examples, batch_size=3, max_prompt_length=64)
    assert got == pytest.approx(expected, rel=1e-5)


def test_choice_scores_of_a_gpt2_model_and_batching():
    model, tokenizer = tiny_gpt2(), tiny_tokenizer()
    batched = score_choices(model, tokenizer, CHOICE_EXAMPLES, batch_size=4)
    single = score_choices(model, tokenizer, CHOICE_EXAMPLES, batch_size=1)
    for got, alone, example in zip(batched, single, CHOICE_EXAMPLES, strict=True):
        assert [t for t, _ in got] == pytest.approx([t for t, _ in alone], abs=1e-4)
        assert [t for t, _ in got] == pytest.approx(reference_choice_scores(model, tokenizer, example), abs=1e-4)


def test_prompt_chunks_bound_prompts_and_continuation_rows():
    assert _prompt_chunks([0, 1, 2, 3, 4], [2, 2, 2, 2, 2], batch_size=2) == [[0, 1], [2, 3], [4]]
    assert _prompt_chunks([0, 1, 2], [24, 24, 24], batch_size=16) == [[0, 1], [2]]  # 48 rows at most
    assert _prompt_chunks([0, 1], [100, 1], batch_size=4) == [[0], [1]]  # one example alone may exceed it


def test_choice_predictions_by_sum_and_by_length():
    example = Example("pubmedqa", "q", "maybe", ("no", "maybe"))
    best, best_norm = choice_predictions([example], [[(-3.0, 2), (-4.0, 3)]])
    assert best == ["no"] and best_norm == ["maybe"]  # -3/2 < -4/5 per character
    metrics = task_metrics(get_task("pubmedqa"), [example], best, best_norm)
    assert list(metrics) == ["accuracy", "accuracy_norm", "macro_f1"]
    assert metrics["accuracy"] == 0 and metrics["accuracy_norm"] == 1


def test_choice_scoring_refuses_examples_without_choices():
    model, tokenizer = tiny_model_and_tokenizer()
    with pytest.raises(ValueError, match="have no choices"):
        score_choices(model, tokenizer, EXAMPLES)
    with pytest.raises(ValueError, match="allowed: choices, generate"):
        evaluate_model(model, tokenizer, {"pubmedqa": CHOICE_EXAMPLES}, mode="greedy")


def test_evaluate_model_scores_choices_and_generates_free_text(monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer()
    generated = []
    monkeypatch.setattr(evaluation, "generate_answers", lambda *args, **kwargs: generated.append(1) or ["none"] * 2)
    free = [Example("ncbi_disease", "Sentence: a", "none"), Example("ncbi_disease", "Sentence: b", "cancer")]
    results = evaluate_model(model, tokenizer, {"pubmedqa": CHOICE_EXAMPLES, "ncbi_disease": free})
    assert results["pubmedqa"]["mode"] == "choices" and results["ncbi_disease"]["mode"] == "generate"
    assert generated == [1]  # only the free-text task generated
    assert set(results["pubmedqa"]["predictions"]) <= set(CHOICES)
    assert len(results["pubmedqa"]["scores"]) == 4 and all(len(s) == 4 for s in results["pubmedqa"]["scores"])
    assert results["ncbi_disease"]["metrics"] == pytest.approx({"f1": 0.0, "precision": 0.0, "recall": 0.0})


@pytest.mark.parametrize("adapter", ["topk", "prompt", "peft"])
def test_evaluate_run_scores_choices_with_intervals(tmp_path, monkeypatch, adapter):
    register_yes_no_tasks(monkeypatch)
    model, _ = tiny_model_and_tokenizer()
    run = tmp_path / "run"
    wrapped = (
        peft_lora(model)
        if adapter == "peft"
        else mixture(model, adapter, **({"top_k": 3} if adapter == "prompt" else {}))
    )
    write_run(run, wrapped, eval_mode="choices")
    metrics = evaluate_run(run)
    alpha = metrics["tasks"]["alpha"]
    assert alpha["mode"] == "choices" and alpha["n"] == 4
    assert list(alpha["model"]) == list(alpha["zero_shot"]) == ["accuracy", "accuracy_norm", "macro_f1"]
    assert alpha["majority"]["accuracy"] == alpha["majority"]["accuracy_norm"]  # a constant answer
    for column in ("model", "zero_shot", "majority"):
        for metric, (low, high) in alpha["intervals"][column].items():
            assert low <= alpha[column][metric] <= high
    for baseline in ("zero_shot", "majority"):
        difference = alpha["differences"][baseline]
        assert difference["difference"] == pytest.approx(alpha["model"]["accuracy"] - alpha[baseline]["accuracy"])
        assert difference["low"] <= difference["difference"] <= difference["high"]
        assert difference["beats"] == (difference["low"] > 0)
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert all(len(row["choice_scores"]) == 2 and row["prediction"] in ("yes", "no") for row in rows)
    again = evaluate_run(run, mode="generate")  # the zero-shot cache is kept per mode
    assert again["tasks"]["alpha"]["mode"] == "generate" and "accuracy_norm" not in again["tasks"]["alpha"]["model"]


def test_predict_run_scores_the_chosen_tasks_as_evaluate_run_does(tmp_path, monkeypatch):
    register_yes_no_tasks(monkeypatch)
    model, _ = tiny_model_and_tokenizer()
    run = tmp_path / "run"
    write_run(run, mixture(model, "task"))
    predicted = evaluation.predict_run(run, {"alpha": 3, "beta": 2}, zero_shot=["alpha"])
    assert not (run / "metrics.json").exists() and not (run / "predictions.jsonl").exists()
    assert set(predicted) == {"alpha", "beta"} and set(predicted["alpha"]) == {"metrics", "rows", "zero_shot"}
    assert [row["id"] for row in predicted["alpha"]["rows"]] == ["5", "1", "2"] and len(predicted["beta"]["rows"]) == 2

    metrics = evaluate_run(run, max_examples=3)
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert predicted["alpha"]["rows"] == [row for row in rows if row["task"] == "alpha"]
    assert predicted["alpha"]["metrics"] == metrics["tasks"]["alpha"]["model"]
    assert predicted["alpha"]["zero_shot"] == metrics["tasks"]["alpha"]["zero_shot"]
    with pytest.raises(ValueError, match=r"tasks \['delta'\] are not tasks of"):
        evaluation.predict_run(run, {"delta": 1})
