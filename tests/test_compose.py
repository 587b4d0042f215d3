"""LoRAHub composition: a planted combination is found, saved adapters match the in-place combination, errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import loramix
from loramix import MixLoraConfig
from loramix.compose import Composer, compose, compose_command, encode_examples, load_upstream, read_examples
from loramix.data import Example, encode_example
from loramix.export import export_peft
from loramix.models import tiny_gpt2, tiny_llama, tiny_tokenizer
from loramix.recipe import Recipe

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "compose_unseen.py"
PROMPTS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


def random_lora(path, seed, architecture="llama", r=4, targets=None, builder=None, scale=0.5):
    """A peft LoRA with random A and B (B is zero after peft's init), saved by peft."""
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets or TARGETS[architecture],
        fan_in_fan_out=architecture == "gpt2",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model((builder or BUILDERS[architecture])(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(path)
    return path


def upstream_paths(tmp_path, architecture="llama", count=3):
    return [random_lora(tmp_path / f"up{i}", i, architecture) for i in range(count)]


def examples(answers=("ab", "cd", "ef")):
    return [
        {"prompt": prompt, "answer": answer} for prompt, answer in zip(PROMPTS[: len(answers)], answers, strict=True)
    ]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def greedy_answers(composer, tokenizer, length=5):
    """Greedy continuations of PROMPTS under the composer's current weights, over lowercase letters and digits."""
    allowed = torch.tensor(tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz0123456789")))
    answers = []
    for prompt in PROMPTS:
        ids = torch.tensor([encode_example(Example("t", prompt, "-"), tokenizer, 64, with_answer=False)["input_ids"]])
        for _ in range(length):
            with torch.no_grad():
                scores = composer.peft_model(input_ids=ids).logits[0, -1, allowed]
            ids = torch.cat([ids, allowed[scores.argmax()].view(1, 1)], dim=1)
        answers.append(tokenizer.decode(ids[0, -length:]))
    return answers


def test_search_finds_a_planted_combination(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_llama().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # sharper predictions: the answers' cross-entropy tells combinations apart
    paths = upstream_paths(tmp_path)
    planted = [1.0, 0.0, -0.5]
    with Composer(model, load_upstream(paths)) as composer:
        composer.set_weights(planted)
        data = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, greedy_answers(composer, tokenizer), strict=True)]
        batch = encode_examples(read_examples(data), tokenizer, 64)
        optimum, zero = composer.cross_entropy(planted, batch), composer.cross_entropy([0, 0, 0], batch)
    assert zero - optimum > 1.5

    result = compose(model, paths, data, budget=40, seed=0, tokenizer=tokenizer)
    assert result.ce < optimum + 0.1 * (zero - optimum)
    assert len(result.losses) == 40 and result.losses[0] == pytest.approx(zero)  # the search starts at w = 0
    assert result.loss == min(result.losses) == pytest.approx(result.ce + 0.05 * sum(map(abs, result.weights)) / 3)
    assert all(abs(w) <= 1.5 for w in result.weights)
    again = compose(model, paths, data, budget=40, seed=0, tokenizer=tokenizer)
    assert again.weights == result.weights


def test_seeds_are_different_searches_each_reproducible(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_llama().eval()
    paths = upstream_paths(tmp_path)
    upstream = load_upstream(paths)
    batch = encode_examples(read_examples(examples()), tokenizer, 64)
    runs = {seed: compose(model, upstream, examples(), budget=10, seed=seed, tokenizer=tokenizer) for seed in (0, 1, 2)}
    starts = {seed: run.history[0]["weights"] for seed, run in runs.items()}
    assert starts[0] == [0.0, 0.0, 0.0]  # seed 0 starts where LoRAHub does
    assert starts[1] != starts[2] and all(0 < abs(w) <= 0.5 for seed in (1, 2) for w in starts[seed])
    with Composer(model, upstream) as composer:  # each history's losses are its weights' objective
        for run in runs.values():
            for h in run.history[:3]:
                expected = composer.cross_entropy(h["weights"], batch) + 0.05 * sum(map(abs, h["weights"])) / 3
                assert h["loss"] == pytest.approx(expected, abs=1e-6)
    searched = {seed: [h["weights"] for h in run.history] for seed, run in runs.items()}
    assert searched[0] != searched[1] != searched[2] != searched[0]
    again = compose(model, upstream, examples(), budget=10, seed=1, tokenizer=tokenizer)
    assert [h["weights"] for h in again.history] == searched[1]


@pytest.mark.parametrize("architecture", BUILDERS)
def test_saved_adapter_matches_the_in_place_combination(tmp_path, architecture):
    tokenizer = tiny_tokenizer()
    model = BUILDERS[architecture]().eval()
    paths = upstream_paths(tmp_path, architecture)
    result = compose(model, paths, examples(), budget=8, tokenizer=tokenizer)
    out = result.save(tmp_path / "out")

    batch = encode_examples(read_examples(examples()), tokenizer, 64)
    with Composer(model, result.upstream) as composer:
        composer.set_weights(result.weights)
        expected = logits(composer.peft_model, batch)
    got = logits(PeftModel.from_pretrained(BUILDERS[architecture]().eval(), out), batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    saved = json.loads((out / "weights.json").read_text())
    assert [row["weight"] for row in saved["upstream"]] == result.weights
    assert [row["adapter"] for row in saved["upstream"]] == [str(p) for p in paths]
    search = json.loads((out / "search.json").read_text())
    assert [e["loss"] for e in search["evaluations"]] == result.losses and len(result.losses) == 8
    assert (out / "search.png").stat().st_size > 0


def test_exported_task_adapters_compose_into_their_tasks(tmp_path):
    config = MixLoraConfig("all-linear", router="task", num_experts=4, expert_rank=2, num_tasks=3)
    task_model = loramix.wrap(tiny_llama().eval(), config)
    with torch.no_grad():
        for layer in task_model.layers.values():
            layer.lora_B.normal_(0, 0.2)
    paths = [export_peft(task_model, tmp_path / f"task{t}", t) for t in range(3)]
    batch = encode_examples(read_examples(examples()), tiny_tokenizer(), 64)
    with torch.no_grad():
        expected = task_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, task_ids=torch.tensor([1] * 3))
    with Composer(tiny_llama().eval(), load_upstream(paths)) as composer:
        composer.set_weights([0, 1, 0])
        torch.testing.assert_close(logits(composer.peft_model, batch), expected.logits, atol=1e-5, rtol=0)


def test_the_model_is_left_as_it_was(tmp_path):
    model = tiny_llama().train()
    model.model.embed_tokens.weight.requires_grad_(False)
    batch = encode_examples(read_examples(examples()), tiny_tokenizer(), 64)
    before = logits(model, batch)
    compose(model, upstream_paths(tmp_path), examples(), budget=3, tokenizer=tiny_tokenizer())
    assert model.training and not model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert not any("lora" in name for name, _ in model.named_modules())
    model.eval()
    assert torch.equal(logits(model, batch), before)


def test_compose_command_writes_everything(tmp_path):
    paths = upstream_paths(tmp_path, count=2)
    file = tmp_path / "examples.jsonl"
    file.write_text("".join(json.dumps(row) + "\n" for row in examples()) + "\n")
    result = compose_command(paths, file, tmp_path / "out", model="tiny-llama", budget=4, seed=1)
    assert len(result.weights) == 2 and result.settings == {"budget": 4, "l1": 0.05, "seed": 1, "examples": 3}
    names = {"adapter_config.json", "adapter_model.safetensors", "weights.json", "search.json", "search.png"}
    assert names <= {p.name for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match="does not name its base model.*--model"):
        compose_command(paths, file, tmp_path / "out2")


# ---- errors ---------------------------------------------------------------------------------------------------
def test_incompatible_upstream_adapters_are_named(tmp_path):
    one = random_lora(tmp_path / "one", 0)
    with pytest.raises(ValueError, match="at least 2 upstream"):
        load_upstream([one])
    cases = {
        "rank": (random_lora(tmp_path / "rank", 1, r=8), "ranks differ: r=8 vs r=4"),
        "modules": (random_lora(tmp_path / "modules", 1, targets=["q_proj", "k_proj"]), "target modules differ"),
        "shapes": (random_lora(tmp_path / "shapes", 1, builder=lambda: tiny_llama(hidden_size=48)), "shapes differ"),
    }
    for path, message in cases.values():
        with pytest.raises(ValueError, match=f"{one} and {path} cannot be combined: {message}"):
            load_upstream([one, path])
    other = random_lora(tmp_path / "other", 1)
    for path, name in ((one, "org/model-a"), (other, "org/model-b")):
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": name}))
    with pytest.raises(ValueError, match="base models differ: 'org/model-b' vs 'org/model-a'"):
        load_upstream([one, other])
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_upstream([one, tmp_path / "nothing"])


def test_bad_examples_are_reported_with_file_and_line(tmp_path):
    file = tmp_path / "examples.jsonl"
    cases = {
        "": "holds no examples",
        '{"prompt": "a", "answer": "b"}\n{"prompt": "a", \n': r"examples.jsonl:2: not valid JSON",
        '{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"}\n': r"examples.jsonl:3: field 'answer' must be",
        '["a", "b"]\n': r"examples.jsonl:1: expected an object",
    }
    for text, message in cases.items():
        file.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_examples(file)
    with pytest.raises(ValueError, match=r"examples\[1\]: field 'prompt'"):
        read_examples([{"prompt": "a", "answer": "b"}, {"prompt": " ", "answer": "b"}])
    with pytest.raises(FileNotFoundError, match="no examples file"):
        read_examples(tmp_path / "missing.jsonl")
    assert read_examples([Example("t", "p", "a")]) == [Example("t", "p", "a")]


# ---- the benchmark, on tiny runs ------------------------------------------------------------------------------
def test_compose_unseen_benchmark_on_tiny_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("compose_unseen", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    tasks = ["pubmedqa", "mediqa_rqe", "symptom2disease"]
    config = MixLoraConfig("all-linear", router="task", num_experts=4, expert_rank=2, num_tasks=3)
    task_run = tmp_path / "task"
    task_model = loramix.wrap(tiny_llama(), config)
    task_model.save_pretrained(task_run / "adapter")
    Recipe(name="task", model="tiny-llama", tasks=tasks, mixlora=config.to_dict()).to_yaml(task_run / "recipe.yaml")
    lora_run = tmp_path / "lora"
    random_lora(lora_run / "adapter", 0, r=8, targets="all-linear")
    Recipe(name="lora", model="tiny-llama", tasks=["ncbi_disease"], lora={"r": 8}).to_yaml(lora_run / "recipe.yaml")

    args = ["--max-test", "4", "--budget", "3", "--seeds", "0", "1", "--max-length", "128", "--out"]
    results = benchmark.run(benchmark.parse_args([str(task_run), str(lora_run), *args, str(tmp_path / "out")]))
    assert list(results["upstream"]) == [f"task:{t}" for t in tasks] + ["lora:ncbi_disease"]
    assert results["n_test"] == 4 and len(results["lorahub"]) == 2
    assert "accuracy" in results["zero_shot"] and set(results["zero_shot"]) == set(results["uniform"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| zero-shot |" in table and "| LoRAHub (2 seeds) |" in table
    for run in results["lorahub"]:
        for baseline in ("uniform", "zero_shot"):
            difference = run["differences"][baseline]
            assert difference["difference"] == pytest.approx(run["metrics"]["accuracy"] - results[baseline]["accuracy"])
            assert difference["low"] <= difference["difference"] <= difference["high"]
    assert results["lorahub"][0]["weights"] != results["lorahub"][1]["weights"]  # two searches
    assert "gain over the uniform average" in table and "paired-bootstrap" in table
    assert (tmp_path / "out" / "lorahub-seed1" / "adapter_model.safetensors").is_file()

    Recipe(name="lora", model="tiny-llama", tasks=tasks, lora={"r": 8}).to_yaml(lora_run / "recipe.yaml")
    with pytest.raises(ValueError, match="one LoRA on 3 tasks"):
        benchmark.upstream_from_runs([lora_run], "medqa_usmle", tmp_path)
    with pytest.raises(ValueError, match="trained on the target task 'pubmedqa'"):
        benchmark.upstream_from_runs([task_run], "pubmedqa", tmp_path)
