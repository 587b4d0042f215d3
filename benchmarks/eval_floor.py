"""The demo's evaluation against its FLOP floor: the forward FLOPs of the tokens it scores, at this machine's
measured matrix-product rate, beside the seconds it takes, in one process.

    python benchmarks/eval_floor.py                      # configs/topk.yaml's tasks, 50 test examples each
    python benchmarks/eval_floor.py --max-examples 200   # the demo's size

The base model is evaluated as `loramix eval` evaluates (the zero-shot half of the demo's evaluation: choice
scoring, or greedy generation for tasks without choices, then the reference answers' perplexity; the recipe's
prompt length, system prompt and precision; batches of EVAL_BATCH_SIZE prompts), each part timed and counted on
its own row. Its FLOPs: per token that a forward runs, 2 x the decoder's linear weights, plus attention (4 x
layers x heads x head size x the keys it attends), plus 2 x hidden x vocabulary where logits are computed (the
prompt's last position, every continuation position, every generated token, every answer token of the
perplexity). Scored tokens: each prompt once, each choice's tokens but its last, each generated token, and for
the perplexity each prompt with its answer; padding is not counted, so the floor is what a perfect kernel would
need. The rate: a (2048 x d) @ (d x 4d) product of the model's hidden size d and dtype, timed before and after
the evaluation (the mean). Printed per task and part: tokens, GFLOP, floor seconds, measured seconds and their
ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loramix.data import get_task
from loramix.data.encode import encode_example
from loramix.evaluate import EVAL_BATCH_SIZE, _continuation_ids, answer_perplexity, answer_rows, evaluate_model
from loramix.models import load_model
from loramix.precision import use_bf16
from loramix.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def matmul_rate(hidden: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of a (2048 x hidden) @ (hidden x 4 hidden) product, repeated for about `seconds`."""
    a, b = torch.randn(2048, hidden, dtype=dtype), torch.randn(hidden, 4 * hidden, dtype=dtype)
    a @ b  # warm-up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return count * 2 * 2048 * hidden * 4 * hidden / (time.perf_counter() - started)


class Flops:
    """Forward FLOPs of a Llama-style model per token, given the keys it attends and whether it computes logits."""

    def __init__(self, model) -> None:
        config = model.config
        head = model.get_output_embeddings()
        self.linear = 2 * sum(
            m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
        )
        self.attention = (
            4
            * config.num_hidden_layers
            * config.num_attention_heads
            * (config.hidden_size // config.num_attention_heads)
        )
        self.logits = 2 * config.hidden_size * config.vocab_size

    def sequence(self, start: int, tokens: int, logits: int) -> float:
        """`tokens` tokens after `start` already cached, `logits` of them with logits computed."""
        keys = tokens * start + tokens * (tokens + 1) // 2  # token i attends start + i + 1 keys
        return self.linear * tokens + self.attention * keys + self.logits * logits


def task_flops(flops: Flops, examples, tokenizer, settings: dict, result: dict) -> tuple[int, float]:
    """(tokens run, forward FLOPs) of evaluating one task as evaluate_model did (`result` its output)."""
    tokens, total = 0, 0.0
    prompts = [
        len(encode_example(e, tokenizer, settings["max_prompt_length"], False, settings["system_prompt"])["input_ids"])
        for e in examples
    ]
    if result["mode"] == "choices":
        choice_ids = _continuation_ids(tokenizer, settings["system_prompt"])
        for example, prompt in zip(examples, prompts, strict=True):
            tokens, total = tokens + prompt, total + flops.sequence(0, prompt, 1)
            for choice in example.choices:
                later = len(choice_ids(choice)) - 1
                tokens, total = tokens + later, total + flops.sequence(prompt, later, later)
        return tokens, total
    for prompt, output in zip(prompts, result["outputs"], strict=True):
        generated = len(tokenizer(output, add_special_tokens=False)["input_ids"]) + 1  # and its end of turn
        tokens, total = tokens + prompt + generated - 1, total + flops.sequence(0, prompt, 1)
        total += flops.sequence(prompt, generated - 1, generated - 1)
    return tokens, total


def perplexity_flops(flops: Flops, examples, tokenizer, settings: dict) -> tuple[int, float]:
    """(tokens run, forward FLOPs) of answer_perplexity: each prompt with its answer, logits at the answer."""
    tokens, total = 0, 0.0
    for row in answer_rows(examples, tokenizer, settings["max_prompt_length"], settings["system_prompt"]):
        scored = sum(label != -100 for label in row["labels"])
        tokens, total = tokens + len(row["input_ids"]), total + flops.sequence(0, len(row["input_ids"]), scored)
    return tokens, total


def run(args: argparse.Namespace) -> dict:
    recipe = load_recipe(args.recipe, args.set)
    model, tokenizer = load_model(recipe.model)
    bf16 = use_bf16(recipe.training.bf16, "cpu")
    settings = {
        "mode": recipe.eval_mode,
        "batch_size": EVAL_BATCH_SIZE,
        "max_prompt_length": recipe.max_length,
        "bf16": bf16,
        "system_prompt": recipe.system_prompt,
    }
    dtype = torch.bfloat16 if bf16 else torch.float32
    flops = Flops(model)
    rate_before = matmul_rate(model.config.hidden_size, dtype)
    options = {key: settings[key] for key in ("batch_size", "max_prompt_length", "bf16", "system_prompt")}
    tasks = {}
    for name in recipe.tasks:
        examples = get_task(name).load(args.data_dir)["test"][: args.max_examples]
        started = time.perf_counter()
        result = evaluate_model(model, tokenizer, {name: examples}, perplexity=False, **settings)[name]
        seconds = time.perf_counter() - started
        tokens, total = task_flops(flops, examples, tokenizer, settings, result)
        tasks[name] = {"mode": result["mode"], "examples": len(examples), "tokens": tokens, "flops": total}
        tasks[name]["seconds"] = seconds
        started = time.perf_counter()
        answer_perplexity(model, tokenizer, examples, **options)
        seconds = time.perf_counter() - started
        tokens, total = perplexity_flops(flops, examples, tokenizer, settings)
        tasks[f"{name} perplexity"] = {"mode": "perplexity", "examples": len(examples), "tokens": tokens}
        tasks[f"{name} perplexity"].update(flops=total, seconds=seconds)
    rate = (rate_before + matmul_rate(model.config.hidden_size, dtype)) / 2
    for entry in tasks.values():
        entry["floor_seconds"] = entry["flops"] / rate
        entry["ratio"] = entry["seconds"] / entry["floor_seconds"]
    return {"recipe": str(args.recipe), "dtype": str(dtype), "rate_gflops": rate / 1e9, "tasks": tasks}


def table(results: dict) -> str:
    rows = [
        f"matrix-product rate: {results['rate_gflops']:.0f} GFLOP/s ({results['dtype']})",
        "",
        "| task | mode | examples | tokens | GFLOP | floor s | measured s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {"tokens": 0, "flops": 0.0, "floor_seconds": 0.0, "seconds": 0.0}
    for name, t in results["tasks"].items():
        rows.append(
            f"| {name} | {t['mode']} | {t['examples']} | {t['tokens']} | {t['flops'] / 1e9:.0f} | "
            f"{t['floor_seconds']:.1f} | {t['seconds']:.1f} | {t['ratio']:.2f}x |"
        )
        for key in totals:
            totals[key] += t[key]
    rows.append(
        f"| all | | | {totals['tokens']} | {totals['flops'] / 1e9:.0f} | {totals['floor_seconds']:.1f} | "
        f"{totals['seconds']:.1f} | {totals['seconds'] / totals['floor_seconds']:.2f}x |"
    )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "topk.yaml", help="the demo's recipe")
    parser.add_argument("--set", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--max-examples", type=int, default=50, help="test examples per task")
    parser.add_argument("--data-dir", type=Path, default=None, help="medical data folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    measured = run(arguments)
    if arguments.out:
        arguments.out.write_text(json.dumps(measured, indent=2))
    print(table(measured))
