"""Evaluation: greedy answers for task examples, per-task metrics, and the scores of a run folder."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from loramix.card import run_card, write_card
from loramix.compilation import eager_if_compiled
from loramix.data import Example, Task, collate, encode_example, get_task
from loramix.data.encode import template_parts
from loramix.data.metrics import bootstrap, percentile_interval
from loramix.files import atomic_write_text, read_json
from loramix.methods import AdaptedModel, backbone
from loramix.models import default_cache_dir, eos_token_ids, load_model
from loramix.precision import use_bf16
from loramix.recipe import EVAL_MODES, Recipe, load_recipe
from loramix.report import write_report
from loramix.run_folder import RunFolder
from loramix.sharding import is_sharded

DEFAULT_MAX_PROMPT_LENGTH = 1024


# ---- generation ---------------------------------------------------------------------------------------------
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

    Prompts are left-padded and batched by length. `task_id` is given to every row of a loramix model;
    a peft or plain model takes none. `bf16` runs the model under bfloat16 autocast; `system_prompt` as in
    loramix.data.encode.chat_messages.
    """
    adapted = isinstance(model, AdaptedModel)
    if task_id is not None and not adapted:
        raise ValueError(f"task_id={task_id} given, but only a loramix model takes task ids ({type(model).__name__})")
    if not examples:
        return []
    eos = eos_token_ids(backbone(model), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    rows = [encode_example(example, tokenizer, max_prompt_length, False, system_prompt) for example in examples]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # longest first: less padding
    answers = [""] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with without_grad(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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


# ---- choice scoring -----------------------------------------------------------------------------------------
def _continuation_ids(tokenizer, system_prompt: str | None) -> Callable[[str], list[int]]:
    """Token ids of a choice as training writes an answer after the generation prompt (with its end of turn)."""
    _, _, lead, end = template_parts(tokenizer, system_prompt)
    cache: dict[str, list[int]] = {}

    def ids(choice: str) -> list[int]:
        if choice not in cache:
            cache[choice] = list(tokenizer(lead + choice + end, add_special_tokens=False)["input_ids"])
        return cache[choice]

    return ids


def _prompt_chunks(order: list[int], choice_counts: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive examples of `order` per forward: at most batch_size prompts and, once past one example, at
    most 3 * batch_size continuation rows (a row per choice shares its prompt's key-value cache)."""
    chunks: list[list[int]] = []
    rows = 0
    for index in order:
        if chunks and len(chunks[-1]) < batch_size and rows + choice_counts[index] <= 3 * batch_size:
            chunks[-1].append(index)
            rows += choice_counts[index]
        else:
            chunks.append([index])
            rows = choice_counts[index]
    return chunks


def score_choices(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    task_id: int | None = None,
    batch_size: int = 16,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    bf16: bool = False,
    system_prompt: str | None = None,
) -> list[list[tuple[float, int]]]:
    """Per example, per choice: (log-likelihood of the choice after the prompt, its token count), the choice
    written as training writes an answer (with the end of the assistant's turn).

    The lm-evaluation-harness `multiple_choice` scoring, with the prompt encoded once per example: a batch of
    left-padded prompts runs once, its key-value cache is repeated for the choices, and one more forward scores
    every choice's tokens. Routes computed once per prompt (task ids, `prompt` and sequence-level routers)
    come from the prompt alone and serve all its choices, as in `generate`.
    """
    adapted = isinstance(model, AdaptedModel)
    if task_id is not None and not adapted:
        raise ValueError(f"task_id={task_id} given, but only a loramix model takes task ids ({type(model).__name__})")
    missing = [example.id or str(i) for i, example in enumerate(examples) if not example.choices]
    if missing:
        raise ValueError(f"examples {missing[:5]} of {examples[0].task} have no choices to score: use generation")
    if not examples:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(backbone(model), tokenizer)[0]
    device = next(model.parameters()).device
    prompts = [encode_example(example, tokenizer, max_prompt_length, False, system_prompt) for example in examples]
    choice_ids = _continuation_ids(tokenizer, system_prompt)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]["input_ids"]))  # longest first: less padding
    scores: list[list[tuple[float, int]]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    try:
        with without_grad(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            chunks = _prompt_chunks(order, [len(e.choices) for e in examples], batch_size)
            for chunk in tqdm(chunks, desc=f"scoring {examples[0].task}", leave=False, disable=None):
                routing = model.prompt_routing(_task_ids(task_id, len(chunk), device)) if adapted else nullcontext()
                continuations = [[choice_ids(choice) for choice in examples[i].choices] for i in chunk]
                with routing:
                    results = _score_chunk(model, [prompts[i] for i in chunk], continuations, pad, device)
                for index, result in zip(chunk, results, strict=True):
                    scores[index] = [(total, count) for total, count, _ in result]
    finally:
        model.train(was_training)
    return scores


def _task_ids(task_id: int | None, rows: int, device: torch.device) -> Tensor | None:
    return None if task_id is None else torch.full((rows,), task_id, dtype=torch.long, device=device)


def _score_chunk(
    model: nn.Module,
    prompts: list[dict],
    choices: list[list[list[int]]],
    pad: int,
    device: torch.device,
    tails: list[int] | None = None,
) -> list[list[tuple[float, int, bool]]]:
    """Per prompt, per choice: (log-likelihood, token count, whether greedy decoding gives the choice). One
    forward over the prompts reads every choice's first token from its prompt's last position; one more, through
    the prompts' key-value cache, scores the choices' later tokens (none if every choice is one token).

    `tails[i]`: how many of prompt i's last tokens are also scored, as the start of each of its choices (the white
    space that lm-evaluation-harness moves from a context into its continuations, which routes as prompt)."""
    tails = tails or [0] * len(prompts)
    batch = collate(prompts, pad, padding_side="left")
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    hf_model = backbone(model)
    parameters = inspect.signature(hf_model.forward).parameters
    kept = max(tails) + 1  # the positions whose logits are read: the tails' and the last
    keeps_logits = "logits_to_keep" in parameters
    last_only = {"logits_to_keep": kept} if keeps_logits else {}
    cache_key = "cache" if "cache" in parameters else "past_key_values"  # transformers 5.2x renamed it
    owners = [row for row, options in enumerate(choices) for _ in options]
    continuations = [ids for options in choices for ids in options]
    width = max(len(ids) for ids in continuations)
    prompt = hf_model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=width > 1, **last_only
    )
    scores = prompt.logits[:, -kept:].float().log_softmax(-1)
    # each prompt's tail: its last tails[i] tokens, each predicted at the position before it
    tail_tokens = input_ids[:, input_ids.shape[1] - kept + 1 :]
    in_tail = torch.arange(kept - 1, device=device) >= kept - 1 - torch.tensor(tails, device=device)[:, None]
    tail_log_prob = (scores[:, :-1].gather(2, tail_tokens[..., None])[..., 0] * in_tail).sum(-1)
    tail_greedy = ((scores[:, :-1].argmax(-1) == tail_tokens) | ~in_tail).all(-1)
    rows = torch.tensor(owners, device=device)
    first = scores[rows, -1]  # the distribution of every choice's first token
    tokens = torch.tensor([ids + [pad] * (width - len(ids)) for ids in continuations], device=device)
    real = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in continuations], device=device)
    log_probs, greedy = first.gather(1, tokens[:, :1]), first.argmax(-1, keepdim=True) == tokens[:, :1]
    if width > 1:  # token j + 1 of a choice is predicted at its position j
        if isinstance(model, AdaptedModel):
            model.select_rows(rows)
        cache = prompt[cache_key]
        cache.batch_select_indices(rows)
        scored = real[:, 1:]  # the positions that predict a choice's token: no logits for the padding
        following = hf_model(
            input_ids=tokens[:, :-1],
            attention_mask=torch.cat([mask[rows], real[:, :-1].long()], dim=1),
            position_ids=mask.sum(-1)[rows, None] + torch.arange(width - 1, device=device),
            use_cache=True,
            **{cache_key: cache},
            **({"logits_to_keep": scored} if keeps_logits else {}),
        )
        later = (following.logits if keeps_logits else following.logits[scored]).float().log_softmax(-1)
        targets = tokens[:, 1:][scored]
        later_log_probs = torch.zeros(scored.shape, device=device).masked_scatter_(
            scored, later.gather(1, targets[:, None])[:, 0]
        )
        later_greedy = torch.ones_like(scored).masked_scatter_(scored, later.argmax(-1) == targets)
        log_probs = torch.cat([log_probs, later_log_probs], dim=1)
        greedy = torch.cat([greedy, later_greedy], dim=1)
    totals = ((log_probs * real).sum(-1) + tail_log_prob[rows]).tolist()
    exact = ((greedy | ~real).all(-1) & tail_greedy[rows]).tolist()
    results: list[list[tuple[float, int, bool]]] = [[] for _ in choices]
    for owner, total, ids, is_greedy in zip(owners, totals, continuations, exact, strict=True):
        results[owner].append((total, len(ids), is_greedy))
    return results


# ---- perplexity ---------------------------------------------------------------------------------------------
def answer_rows(
    examples: Sequence[Example], tokenizer, max_prompt_length: int, system_prompt: str | None
) -> list[dict]:
    """The examples encoded as `answer_perplexity` scores them: prompt and answer, the answer's tokens (with its end
    of turn) labelled, a conversation's last answer alone."""
    return [
        encode_example(dataclasses.replace(e, train_on="last"), tokenizer, max_prompt_length, True, system_prompt)
        for e in examples
    ]


def answer_perplexity(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    task_id: int | None = None,
    batch_size: int = 16,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    bf16: bool = False,
    system_prompt: str | None = None,
) -> float:
    """The perplexity of the reference answers given their prompts: exp of the mean cross-entropy over every
    answer token with its end of turn, encoded as training encodes them (a conversation's last answer alone)."""
    if not examples:
        return math.nan
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(backbone(model), tokenizer)[0]
    device = next(model.parameters()).device
    rows = answer_rows(examples, tokenizer, max_prompt_length, system_prompt)
    rows.sort(key=lambda row: -len(row["input_ids"]))  # less padding
    parameters = inspect.signature(backbone(model).forward).parameters
    no_cache = {"use_cache": False} if "use_cache" in parameters else {}
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with without_grad(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start : start + batch_size], pad)
                inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")} | no_cache
                task_ids = _task_ids(task_id, len(batch["input_ids"]), device)
                if task_ids is not None:
                    inputs["task_ids"] = task_ids
                labels = batch["labels"][:, 1:].to(device)
                # only the positions that predict an answer token get the (vocabulary-sized) logits
                predicts = nn.functional.pad(labels != -100, (0, 1), value=False)
                if "logits_to_keep" in parameters:
                    logits = model(**inputs, logits_to_keep=predicts).logits
                else:
                    logits = model(**inputs).logits[predicts]
                loss = nn.functional.cross_entropy(logits.float(), labels[labels != -100], reduction="sum")
                total, count = total + float(loss), count + int((labels != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(total / count)


# ---- metrics ------------------------------------------------------------------------------------------------
BOOTSTRAP_RESAMPLES = 1000
EVAL_BATCH_SIZE = 32  # prompts per forward in the evaluation of a run (48 was 25% faster than 16 on 24 choices)


def task_metrics(
    task: Task, examples: Sequence[Example], predictions: list[str], predictions_norm: list[str] | None = None
) -> dict[str, float]:
    """The task's metrics of the predictions; with choice scoring also `accuracy_norm`, the accuracy of the
    length-normalised choices (lm-evaluation-harness `acc_norm`; `accuracy` is its `acc`), after `accuracy`."""
    metrics = task.score(predictions, list(examples))
    if predictions_norm is None or "accuracy" not in metrics:
        return metrics
    norm = task.score(predictions_norm, list(examples))["accuracy"]
    ordered = {}
    for name, value in metrics.items():
        ordered[name] = value
        if name == "accuracy":
            ordered["accuracy_norm"] = norm
    return ordered


def choice_predictions(examples: Sequence[Example], scores: list[list[tuple[float, int]]]) -> tuple[list, list]:
    """(the choice of highest log-likelihood, the choice of highest log-likelihood per character) per example."""
    best, best_norm = [], []
    for example, options in zip(examples, scores, strict=True):
        totals = [total for total, _ in options]
        per_char = [total / max(len(choice), 1) for (total, _), choice in zip(options, example.choices, strict=True)]
        best.append(example.choices[max(range(len(totals)), key=totals.__getitem__)])
        best_norm.append(example.choices[max(range(len(per_char)), key=per_char.__getitem__)])
    return best, best_norm


def uses_choices(mode: str, examples: Sequence[Example]) -> bool:
    """Whether a task's examples are scored by choice log-likelihood: mode "choices" and every example has choices."""
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluation mode {mode!r} is invalid; allowed: {', '.join(EVAL_MODES)}")
    return mode == "choices" and all(example.choices for example in examples)


def without_grad(model: nn.Module) -> AbstractContextManager:
    """inference_mode, or no_grad for a sharded model: the weights it gathers must stay normal tensors, which
    training goes on updating in place."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def evaluate_model(
    model: nn.Module,
    tokenizer,
    tasks: dict[str, list[Example]],
    task_ids: dict[str, int] | None = None,
    *,
    mode: str = "choices",
    batch_size: int = 16,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    max_new_tokens: int | None = None,
    bf16: bool = False,
    system_prompt: str | None = None,
    perplexity: bool = True,
) -> dict[str, dict]:
    """Per task: {"mode", "metrics", "predictions"}, by mode "predictions_norm" and "scores" (the choices'
    log-likelihoods, `score_choices`) or "outputs" (the generated texts, `generate_answers`), and with
    `perplexity` the reference answers' (`answer_perplexity`).

    mode "choices" scores tasks whose examples all have choices by log-likelihood and generates answers for
    the others (free text); "generate" generates for every task and parses the answers. `task_ids` maps task
    names to the ids a loramix model routes by (tasks missing from it get none); `max_new_tokens` overrides
    each task's own; `bf16` and `system_prompt` as in generate_answers. Compiled blocks run eagerly here."""
    with eager_if_compiled(model):
        results = _evaluate_model(
            model, tokenizer, tasks, task_ids, mode, batch_size, max_prompt_length, max_new_tokens, bf16, system_prompt
        )
        if perplexity:
            options = dict(batch_size=batch_size, max_prompt_length=max_prompt_length, bf16=bf16)
            for name, examples in tasks.items():
                task_id = (task_ids or {}).get(name)
                results[name]["perplexity"] = answer_perplexity(
                    model, tokenizer, examples, task_id=task_id, system_prompt=system_prompt, **options
                )
        return results


def _evaluate_model(
    model, tokenizer, tasks, task_ids, mode, batch_size, max_prompt_length, max_new_tokens, bf16, system_prompt
) -> dict[str, dict]:
    results = {}
    options = dict(batch_size=batch_size, max_prompt_length=max_prompt_length, bf16=bf16, system_prompt=system_prompt)
    for name, examples in tasks.items():
        task, task_id = get_task(name), (task_ids or {}).get(name)
        if uses_choices(mode, examples):
            scores = score_choices(model, tokenizer, examples, task_id=task_id, **options)
            predictions, predictions_norm = choice_predictions(examples, scores)
            results[name] = {
                "mode": "choices",
                "metrics": task_metrics(task, examples, predictions, predictions_norm),
                "predictions": predictions,
                "predictions_norm": predictions_norm,
                "scores": [[round(total, 4) for total, _ in choice_scores] for choice_scores in scores],
            }
            continue
        outputs = generate_answers(
            model, tokenizer, examples, task_id=task_id, max_new_tokens=max_new_tokens or task.max_new_tokens, **options
        )
        predictions = [task.parse(output) for output in outputs]
        results[name] = {
            "mode": "generate",
            "metrics": task_metrics(task, examples, predictions),
            "outputs": outputs,
            "predictions": predictions,
        }
    return results


def compare(
    task: Task,
    examples: Sequence[Example],
    columns: dict[str, dict],
    against: str = "model",
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict:
    """95% percentile-bootstrap intervals of every column's metrics, and the paired-bootstrap difference of the
    task's main metric between column `against` and each other column (the same resampled examples for both).

    `columns` maps a name to {"predictions", optionally "predictions_norm"}. Returns {"intervals": {column:
    {metric: [low, high]}}, "differences": {column: {"metric", "difference", "low", "high", "beats"}}}, where
    `beats` means the interval's low end is above zero.
    """

    def score(column: dict, rows: list[int]) -> dict[str, float]:
        norm = column.get("predictions_norm")
        return task_metrics(
            task,
            [examples[i] for i in rows],
            [column["predictions"][i] for i in rows],
            None if norm is None else [norm[i] for i in rows],
        )

    draws = bootstrap(
        lambda rows: {name: score(column, rows) for name, column in columns.items()}, len(examples), resamples, seed
    )
    whole = {name: score(column, list(range(len(examples)))) for name, column in columns.items()}
    intervals = {
        name: {metric: percentile_interval([d[name][metric] for d in draws]) for metric in whole[name]}
        for name in columns
    }
    differences = {}
    if against in columns:
        main = next(iter(whole[against]))
        for name in columns:
            if name == against or main not in whole[name]:
                continue
            low, high = percentile_interval([d[against][main] - d[name][main] for d in draws])
            differences[name] = {
                "metric": main,
                "difference": whole[against][main] - whole[name][main],
                "low": low,
                "high": high,
                "beats": low > 0,
            }
    return {"intervals": intervals, "differences": differences}


# ---- a run folder -------------------------------------------------------------------------------------------
def _count_parameters(model: nn.Module) -> dict[str, int]:
    if isinstance(model, AdaptedModel):
        return model.count_parameters()
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return {"trainable": lora, "active_per_token": lora}


def _evaluation_inputs(
    run: RunFolder, data_dir, max_examples: int | None, mode: str | None, batch_size: int, device, bf16: bool | None
) -> tuple:
    """(recipe, {task: (train, test)} as training used them, evaluate_model's settings) of a run folder."""
    recipe = load_recipe(run.recipe_file)  # also registers the recipe's JSONL tasks
    data_dir = data_dir or recipe.data_dir
    names = list(dict.fromkeys([*recipe.tasks, *recipe.evaluation]))
    examples = {name: run.examples(name, data_dir, max_examples) for name in names}
    settings = {
        "mode": mode or recipe.eval_mode,
        "batch_size": batch_size,
        "max_prompt_length": recipe.max_length,
        "bf16": use_bf16(recipe.training.bf16, device) if bf16 is None else bf16,
        "system_prompt": recipe.system_prompt,
    }
    return recipe, examples, settings


def shared_zero_shot_path() -> Path:
    """Zero-shot scores kept for every run on this machine, beside the de-quantised models."""
    return default_cache_dir() / "zero_shot.json"


def weights_digest(model: nn.Module) -> str:
    """A digest of a model's weights (each tensor's name, shape, dtype, sum and 4096 of its values, evenly
    spaced; no copy of a whole tensor): scores kept under it belong to these weights, whatever their name."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = tensor.flatten()
            total = values.sum(dtype=torch.float64).item()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
            digest.update(values[:: max(1, len(values) // 4096)].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def examples_digest(examples: Sequence[Example]) -> str:
    """A digest of the examples' ids, prompts, answers, choices and earlier turns (where they have some)."""
    rows = [[e.id, e.prompt, e.answer, list(e.choices or ())] + ([e.context] if e.context else []) for e in examples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _zero_shot(
    run_dir: Path, recipe, examples: dict, settings: dict, model: nn.Module, tokenizer, score_missing: bool = True
) -> tuple[dict, dict[str, str]]:
    """(zero_shot.json's results, each task's key there), after scoring the base model on the tasks it lacks
    (if `score_missing`). The prompts' format is part of the key: runs that share a cache
    (benchmarks/accuracy.py) may differ in it. Scores missing from the run's file are looked up in the shared
    one (`shared_zero_shot_path`), under the same key plus digests of the weights and the test examples, and
    newly scored ones are kept in both."""
    cache_path = run_dir / "zero_shot.json"
    cache = read_json(cache_path, default={})
    precision = "bf16" if settings["bf16"] else "fp32"
    prompt_format = f"{settings['mode']}|{precision}|{recipe.max_length}|system={recipe.system_prompt!r}"
    model_key = recipe.model + (f"@{recipe.quantization}" if recipe.quantization else "")
    keys = {name: f"{model_key}|{name}|{len(test)}|{prompt_format}" for name, (_, test) in examples.items()}
    uncached = {name: test for name, (_, test) in examples.items() if keys[name] not in cache}
    if not (score_missing and uncached):
        return cache, keys
    weights = weights_digest(model)
    shared_keys = {name: f"{keys[name]}|{weights}|{examples_digest(test)}" for name, test in uncached.items()}
    shared = read_json(shared_zero_shot_path(), default={})
    scored = {}
    for name, test in uncached.items():
        if shared_keys[name] in shared:
            cache[keys[name]] = shared[shared_keys[name]]
            continue
        started = time.perf_counter()
        result = evaluate_model(model, tokenizer, {name: test}, None, **settings)[name]
        kept = {
            key: result[key] for key in ("metrics", "predictions", "predictions_norm", "perplexity") if key in result
        }
        cache[keys[name]] = scored[shared_keys[name]] = kept | {"seconds": time.perf_counter() - started}
    atomic_write_text(cache_path, json.dumps(cache))
    if scored:  # read again just before writing: another run may have added scores meanwhile
        shared_zero_shot_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(shared_zero_shot_path(), json.dumps(read_json(shared_zero_shot_path(), default={}) | scored))
    return cache, keys


def evaluate_run(
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    max_examples: int | None = None,
    zero_shot: bool = True,
    mode: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
) -> dict:
    """Score a run's adapter, the zero-shot base model and the majority class on each task's test split, with
    95% bootstrap intervals and the paired-bootstrap difference of the model against each baseline.

    The tasks are the recipe's `tasks` (task id = position) and its evaluation-only `evaluation` tasks;
    the test examples are the first `max_examples` of splits.json's test indices. `mode` (default: the
    recipe's eval_mode) is as in evaluate_model; the baselines are scored the same way. Zero-shot results
    are cached in zero_shot.json (by model, task, test size, mode, precision, prompt length and system
    prompt). `bf16` (default: the recipe's training.bf16, resolved by loramix.precision.use_bf16) runs both
    models under bfloat16 autocast. The prompts carry the recipe's system prompt.
    Writes metrics.json and predictions.jsonl in the run folder and the adapter's model card (README.md with the
    scores), and returns the metrics.
    """
    started = time.perf_counter()
    run_dir, run = Path(run_dir), RunFolder(run_dir)
    recipe, examples, settings = _evaluation_inputs(run, data_dir, max_examples, mode, batch_size, device, bf16)
    model, tokenizer = load_model(recipe.model, device=device, quantization=recipe.quantization)
    cache, keys = _zero_shot(run_dir, recipe, examples, settings, model, tokenizer, score_missing=zero_shot)
    mode, trained, names = settings["mode"], list(recipe.tasks), list(examples)
    model = run.load_adapter(model)
    notes = []
    scored = {name: test for name, (_, test) in examples.items()}
    task_ids = None
    if isinstance(model, AdaptedModel):
        task_ids = {name: index for index, name in enumerate(trained)}
        if model.needs_task_ids:
            for name in names[len(trained) :]:
                del scored[name]
                notes.append(f"{name}: not scored, the {model.method} adapter needs the id of a task it trained on")
    results = evaluate_model(model, tokenizer, scored, task_ids, **settings)

    tasks = {}
    for name, (train, test) in examples.items():
        task = get_task(name)
        majority = [task.majority_answer(train)] * len(test)
        columns = {"model": results.get(name), "zero_shot": cache.get(keys[name]) if zero_shot else None}
        columns = {column: value for column, value in columns.items() if value and "predictions" in value}
        columns["majority"] = {"predictions": majority}
        if uses_choices(mode, test):
            columns["majority"]["predictions_norm"] = majority
        comparison = compare(task, test, columns)
        tasks[name] = {
            "model": results[name]["metrics"] if name in results else None,
            "zero_shot": (cache.get(keys[name]) or {}).get("metrics") if zero_shot else None,
            "majority": task_metrics(task, test, **columns["majority"]),
            "intervals": comparison["intervals"],
            "differences": comparison["differences"],
            "perplexity": {
                "model": (results.get(name) or {}).get("perplexity"),
                "zero_shot": (cache.get(keys[name]) or {}).get("perplexity") if zero_shot else None,
            },
            "mode": "choices" if uses_choices(mode, test) else "generate",
            "n": len(test),
        }
    meta = run.read_json("metrics.json").get("meta", {})
    meta.update(
        model=recipe.model,
        adapter="loramix" if isinstance(model, AdaptedModel) else "peft",
        parameters=_count_parameters(model),
        task_ids=task_ids,
        max_examples=max_examples,
        **settings,
        intervals=f"95% percentile bootstrap of the test examples ({BOOTSTRAP_RESAMPLES}x), paired for differences",
        eval_seconds=round(time.perf_counter() - started, 1),
    )
    meta.pop("notes", None)
    if notes:
        meta["notes"] = notes
    metrics = {"tasks": tasks, "meta": meta}
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_card(run.adapter_dir, run_card(recipe, metrics))
    rows = [row for name, result in results.items() for row in _prediction_rows(name, result, scored[name])]
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return metrics


def evaluate_and_report(run_dir: Path, recipe: Recipe, max_examples: int | None = None, **options) -> dict:
    """Score the run (metrics.json, `evaluate_run`, on the recipe's `eval_examples` unless `max_examples`) and
    write its report."""
    limit = recipe.eval_examples if max_examples is None else max_examples
    metrics = evaluate_run(run_dir, data_dir=recipe.data_dir, max_examples=limit, **options)
    write_report(run_dir)
    return metrics


def _prediction_rows(name: str, result: dict, examples: Sequence[Example]) -> list[dict]:
    """predictions.jsonl's rows of one task's `evaluate_model` result."""
    rows = []
    for index, example in enumerate(examples):
        row = {"task": name, "id": example.id, "prediction": result["predictions"][index], "answer": example.answer}
        for key, field in (("predictions_norm", "prediction_norm"), ("scores", "choice_scores"), ("outputs", "output")):
            if key in result:
                row[field] = result[key][index]
        rows.append(row)
    return rows


def predict_run(
    run_dir: str | Path,
    tasks: dict[str, int | None],
    *,
    zero_shot: Sequence[str] = (),
    data_dir: str | Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Score a run's adapter on some of its tasks, writing nothing but the zero-shot cache: `tasks` maps a task
    of the recipe (`tasks` or `evaluation`) to how many of its test examples to score (the first of
    splits.json's order, as evaluate_run's; None: all). Returns per task {"metrics", "rows" (predictions.jsonl's
    rows)}, and for the tasks named in `zero_shot` also "zero_shot": the base model's metrics on the same
    examples (cached as evaluate_run's). A loramix adapter routes a trained task by its task id."""
    run_dir, run = Path(run_dir), RunFolder(run_dir)
    recipe, examples, settings = _evaluation_inputs(run, data_dir, None, None, batch_size, device, None)
    if unknown := sorted(set(tasks) - set(examples)):
        raise ValueError(f"tasks {unknown} are not tasks of {run_dir} (its recipe's tasks and evaluation)")
    chosen = {name: (examples[name][0], examples[name][1][:count]) for name, count in tasks.items()}
    model, tokenizer = load_model(recipe.model, device=device, quantization=recipe.quantization)
    baseline = {}
    if zero_shot:
        wanted = {name: chosen[name] for name in zero_shot}
        cache, keys = _zero_shot(run_dir, recipe, wanted, settings, model, tokenizer)
        baseline = {name: cache[keys[name]]["metrics"] for name in wanted}
    model = run.load_adapter(model)
    task_ids = {name: index for index, name in enumerate(recipe.tasks)} if isinstance(model, AdaptedModel) else None
    tests = {name: test for name, (_, test) in chosen.items()}
    results = evaluate_model(model, tokenizer, tests, task_ids, perplexity=False, **settings)
    return {
        name: {"metrics": result["metrics"], "rows": _prediction_rows(name, result, tests[name])}
        | ({"zero_shot": baseline[name]} if name in baseline else {})
        for name, result in results.items()
    }
