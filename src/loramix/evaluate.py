"""Evaluation: greedy answers for task examples, per-task metrics, and the scores of a run folder."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from loramix.data import Example, collate, encode_example, get_task
from loramix.model import MixLoraModel, load
from loramix.models import load_model
from loramix.precision import use_bf16
from loramix.recipe import load_recipe

DEFAULT_MAX_PROMPT_LENGTH = 1024


# ---- generation ---------------------------------------------------------------------------------------------
def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a MixLoraModel or a peft PeftModel (or the model itself)."""
    if isinstance(model, MixLoraModel):
        return model.base_model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's eos and those of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(_hf_model(model), "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos token: set tokenizer.eos_token so that answers can end")
    return sorted(ids)


def generate_answers(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    task_id: int | None = None,
    max_new_tokens: int,
    batch_size: int = 16,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    bf16: bool = False,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers (the generated text only) to the examples' chat-template prompts, in their order.

    Prompts are left-padded and batched by length. `task_id` is given to every row of a MixLoraModel;
    a peft or plain model takes none. `bf16` runs the model under bfloat16 autocast; `system_prompt` as in
    loramix.data.encode.chat_messages.
    """
    mixture = isinstance(model, MixLoraModel)
    if task_id is not None and not mixture:
        raise ValueError(f"task_id={task_id} given, but only a MixLoraModel takes task ids ({type(model).__name__})")
    if not examples:
        return []
    eos = _eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    rows = [encode_example(example, tokenizer, max_prompt_length, False, system_prompt) for example in examples]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # longest first: less padding
    answers = [""] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            batches = range(0, len(order), batch_size)
            for start in tqdm(batches, desc=f"answering {examples[0].task}", leave=False, disable=None):
                chunk = order[start : start + batch_size]
                batch = collate([rows[i] for i in chunk], pad, padding_side="left")
                inputs = {
                    "input_ids": batch["input_ids"].to(device),
                    "attention_mask": batch["attention_mask"].to(device),
                }
                if task_id is not None:
                    inputs["task_ids"] = torch.full((len(chunk),), task_id, dtype=torch.long, device=device)
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
                for index, tokens in zip(chunk, new_tokens, strict=True):
                    end = next((position for position, token in enumerate(tokens) if token in eos), len(tokens))
                    answers[index] = tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


# ---- metrics ------------------------------------------------------------------------------------------------
def evaluate_model(
    model: nn.Module,
    tokenizer,
    tasks: dict[str, list[Example]],
    task_ids: dict[str, int] | None = None,
    *,
    batch_size: int = 16,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    max_new_tokens: int | None = None,
    bf16: bool = False,
    system_prompt: str | None = None,
) -> dict[str, dict]:
    """Per task: {"metrics": the task's score of the parsed answers, "outputs": generated texts,
    "predictions": parsed answers}. `task_ids` maps task names to the ids a MixLoraModel routes by
    (tasks missing from it get none); `max_new_tokens` overrides each task's own; `bf16` and `system_prompt`
    as in generate_answers."""
    results = {}
    for name, examples in tasks.items():
        task = get_task(name)
        outputs = generate_answers(
            model,
            tokenizer,
            examples,
            task_id=(task_ids or {}).get(name),
            max_new_tokens=max_new_tokens or task.max_new_tokens,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
            bf16=bf16,
            system_prompt=system_prompt,
        )
        predictions = [task.parse(output) for output in outputs]
        results[name] = {"metrics": task.score(predictions, examples), "outputs": outputs, "predictions": predictions}
    return results


# ---- a run folder -------------------------------------------------------------------------------------------
def _write_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside `path`, then move it into place."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _split_examples(name: str, splits: dict, data_dir: str | None, max_examples: int | None) -> tuple[list, list]:
    """(train, test) examples of a task as training used them (splits.json indices), test capped at max_examples."""
    loaded = get_task(name).load(data_dir)
    recorded = splits.get(name, {})
    for split, size in recorded.get("sizes", {}).items():
        if len(loaded.get(split, [])) != size:
            raise ValueError(
                f"task {name!r}: its {split} split has {len(loaded.get(split, []))} examples, but {size} when the "
                "run was trained (splits.json): the data changed, so the run's test examples cannot be found"
            )
    indices = recorded.get("indices", {})
    train, test = (
        [loaded[split][i] for i in indices[split]] if split in indices else list(loaded.get(split, []))
        for split in ("train", "test")
    )
    if not test:
        raise ValueError(f"task {name!r} has no test examples (data folder: {data_dir or 'the default'})")
    return train, test if max_examples is None else test[:max_examples]


def _load_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """The base model with the run's adapter: a peft adapter if adapter_config.json is there, else loramix's."""
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir)
    return load(model, adapter_dir)


def _count_parameters(model: nn.Module) -> dict[str, int]:
    if isinstance(model, MixLoraModel):
        return model.count_parameters()
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return {"trainable": lora, "active_per_token": lora}


def evaluate_run(
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    max_examples: int | None = None,
    zero_shot: bool = True,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
) -> dict:
    """Score a run's adapter, the zero-shot base model and the majority class on each task's test split.

    The tasks are the recipe's `tasks` (task id = position) and its evaluation-only `evaluation` tasks;
    the test examples are the first `max_examples` of splits.json's test indices. Zero-shot scores are
    cached in zero_shot.json (by model, task, test size, precision, prompt length and system prompt). `bf16`
    (default: the recipe's training.bf16, resolved by loramix.precision.use_bf16) runs both models under
    bfloat16 autocast. The prompts carry the recipe's system prompt.
    Writes metrics.json and predictions.jsonl in the run folder and returns the metrics.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")  # also registers the recipe's JSONL tasks
    splits = _read_json(run_dir / "splits.json")
    data_dir = data_dir or recipe.data_dir
    trained = list(recipe.tasks)
    names = list(dict.fromkeys([*trained, *recipe.evaluation]))
    examples = {name: _split_examples(name, splits, data_dir, max_examples) for name in names}
    bf16 = use_bf16(recipe.training.bf16, device) if bf16 is None else bf16
    settings = {
        "batch_size": batch_size,
        "max_prompt_length": recipe.max_length,
        "bf16": bf16,
        "system_prompt": recipe.system_prompt,
    }
    model, tokenizer = load_model(recipe.model, device=device)

    cache_path = run_dir / "zero_shot.json"
    cache = _read_json(cache_path)
    # the prompts' format is part of the key: runs that share a cache (benchmarks/accuracy.py) may differ in it
    prompt_format = f"{'bf16' if bf16 else 'fp32'}|{recipe.max_length}|system={recipe.system_prompt!r}"
    keys = {name: f"{recipe.model}|{name}|{len(test)}|{prompt_format}" for name, (_, test) in examples.items()}
    uncached = {name: test for name, (_, test) in examples.items() if keys[name] not in cache}
    if zero_shot and uncached:
        for name, result in evaluate_model(model, tokenizer, uncached, None, **settings).items():
            cache[keys[name]] = result["metrics"]
        _write_atomically(cache_path, json.dumps(cache, indent=2))

    model = _load_adapter(model, run_dir / "adapter")
    notes = []
    scored = {name: test for name, (_, test) in examples.items()}
    task_ids = None
    if isinstance(model, MixLoraModel):
        task_ids = {name: index for index, name in enumerate(trained)}
        if model.config.router == "task":
            for name in names[len(trained) :]:
                del scored[name]
                notes.append(f"{name}: not scored, the task router has no gate for a task it was not trained on")
    results = evaluate_model(model, tokenizer, scored, task_ids, **settings)

    tasks = {}
    for name, (train, test) in examples.items():
        tasks[name] = {
            "model": results[name]["metrics"] if name in results else None,
            "zero_shot": cache.get(keys[name]),
            "majority": get_task(name).majority(train, test),
            "n": len(test),
        }
    meta = _read_json(run_dir / "metrics.json").get("meta", {})
    meta.update(
        model=recipe.model,
        adapter="loramix" if isinstance(model, MixLoraModel) else "peft",
        parameters=_count_parameters(model),
        task_ids=task_ids,
        max_examples=max_examples,
        **settings,
        eval_seconds=round(time.perf_counter() - started, 1),
    )
    meta.pop("notes", None)
    if notes:
        meta["notes"] = notes
    metrics = {"tasks": tasks, "meta": meta}
    _write_atomically(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    predictions = [
        {"task": name, "id": example.id, "output": output, "prediction": prediction, "answer": example.answer}
        for name, result in results.items()
        for example, output, prediction in zip(scored[name], result["outputs"], result["predictions"], strict=True)
    ]
    _write_atomically(run_dir / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in predictions))
    return metrics
