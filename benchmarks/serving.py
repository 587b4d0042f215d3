"""Serving under load: loramix's continuous batching against the window batcher it replaced and peft's
`adapter_names` batches, on the same request traces, side by side in one process.

    python benchmarks/serving.py                    # SmolLM2-135M, 8 tenants, offered loads 0.5, 2 and 6 req/s
    python benchmarks/serving.py --http             # and the head-of-line case with the openai client against
                                                    # a real `loramix serve` process
    python benchmarks/serving.py --quick            # the tiny model: a check that everything runs
    python benchmarks/serving.py --only-adapters    # 16 and 64 peft LoRA adapters: shared batches against peft

Schedulers (one thread each, real computation; requests arrive on the wall clock at the trace's times):
  continuous  loramix.serve.Engine as the server runs it: new prompts are processed in a forward of their own
              and join the running batch at the next decoding step; finished rows leave at once
  window      the batcher the server had before: wait for a request, gather more for 5 ms (up to 16), run that
              batch to its end with `generate` (per-row task gates), and only then start the next batch
  peft        the same window batching over 8 peft LoRA adapters of the same rank, `generate(adapter_names=...)`
Traces: Poisson arrivals at an offered load, tenants uniform, one request in eight long (64 tokens), the others
short (8 tokens); prompts are real medical texts in the chat template. Also the head-of-line case: one 200-token
request, and 1 s later four 8-token requests: their latency beside it against alone.
Figures: time to first token and per-token latency (p50, p99 over requests), generated tokens/s over the trace.
Adapters by name: 64 requests at once, round robin over 16 or 64 peft LoRA adapters, 32 tokens each: loramix's
shared batch (per-row factors) against peft's `generate(adapter_names=...)` in batches of 16.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import StoppingCriteria, StoppingCriteriaList

import loramix
from loramix.data import get_task
from loramix.models import load_model
from loramix.serve import Engine, GenerationRequest, Sequence

TENANTS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULERS = ["continuous", "window", "peft"]
MAX_BATCH, WINDOW_S = 16, 0.005
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "serving.png"


class Feed(StoppingCriteria):
    """Hands each generated token of a static batch to its row's Sequence (which keeps the token times)."""

    def __init__(self, sequences: list[Sequence]) -> None:
        self.sequences = sequences

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        for sequence, token in zip(self.sequences, input_ids[:, -1].tolist(), strict=True):
            if not sequence.finished:
                sequence.advance(token)
        return torch.tensor([sequence.finished for sequence in self.sequences], device=input_ids.device)


def static_generate(generate, engine: Engine, sequences: list[Sequence]) -> None:
    """Run a batch to its end with one `generate` call (left-padded prompts), as the window batcher did."""
    length = max(len(s.request.prompt_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), engine.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        prompt = sequence.request.prompt_ids
        input_ids[row, length - len(prompt) :], mask[row, length - len(prompt) :] = torch.tensor(prompt), 1
    with torch.inference_mode():
        generate(
            [s.request.task for s in sequences],
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(s.request.max_tokens for s in sequences),
            do_sample=False,
            eos_token_id=engine.eos_token_ids,
            pad_token_id=engine.pad_token_id,
            stopping_criteria=StoppingCriteriaList([Feed(sequences)]),
        )
    for sequence in sequences:
        sequence.finish("length")  # a no-op for those that ended


def loramix_generate(engine: Engine):
    """generate(tasks, **inputs) with per-row task gates (TaskRows), as the window batcher ran it."""

    def generate(tasks: list[int], **inputs) -> None:
        with engine.rows.select(torch.tensor(tasks)) as model:
            model.generate(**inputs)

    return generate


def peft_generate(base: torch.nn.Module, rank: int):
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="tenant0")
    for tenant in range(1, TENANTS):
        model.add_adapter(f"tenant{tenant}", config)
    model.eval()

    def generate(tasks: list[int], **inputs) -> None:
        model.generate(**inputs, adapter_names=[f"tenant{t}" for t in tasks])

    return generate


def run_trace(scheduler: str, engine: Engine, generate, trace: list[tuple[float, GenerationRequest]]) -> list[Sequence]:
    """Serve `trace` ((arrival second, request), sorted) with a scheduler; the sequences keep their times."""
    start = time.monotonic()
    pending, waiting, done = deque(trace), deque(), []

    def arrivals() -> None:
        now = time.monotonic()
        while pending and start + pending[0][0] <= now:
            offset, request = pending.popleft()
            sequence = engine.sequence(copy.copy(request))
            sequence.arrived = start + offset
            waiting.append(sequence)
            done.append(sequence)

    def sleep_until_next() -> None:
        if pending:
            time.sleep(max(0.0, start + pending[0][0] - time.monotonic()))

    while pending or waiting or engine.running:
        arrivals()
        if scheduler == "continuous":
            free = MAX_BATCH - engine.running
            if waiting and free > 0:
                engine.admit([waiting.popleft() for _ in range(min(free, len(waiting)))])
            if engine.running:
                engine.step()
            elif not waiting:
                sleep_until_next()
            continue
        if not waiting:
            sleep_until_next()
            continue
        deadline = time.monotonic() + WINDOW_S
        while len(waiting) < MAX_BATCH and time.monotonic() < deadline:
            time.sleep(0.001)
            arrivals()
        batch = [waiting.popleft() for _ in range(min(MAX_BATCH, len(waiting)))]
        static_generate(generate, engine, batch)
    return done


def summary(sequences: list[Sequence]) -> dict:
    def percentile(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")

    first = [s.token_times[0] - s.arrived for s in sequences if s.token_times]
    per_token = [
        (s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in sequences if len(s.token_times) > 1
    ]
    short = [s.token_times[-1] - s.arrived for s in sequences if s.request.max_tokens <= 8 and s.token_times]
    long = [s.token_times[-1] - s.arrived for s in sequences if s.request.max_tokens > 8 and s.token_times]
    tokens = sum(len(s.token_times) for s in sequences)
    span = max(s.token_times[-1] for s in sequences if s.token_times) - min(s.arrived for s in sequences)
    return {
        "ttft_p50": percentile(first, 0.5),
        "ttft_p99": percentile(first, 0.99),
        "tpot_p50": percentile(per_token, 0.5),
        "tpot_p99": percentile(per_token, 0.99),
        "short_latency_p50": percentile(short, 0.5),
        "long_latency_p50": percentile(long, 0.5),
        "tokens_per_s": tokens / span,
    }


def poisson_trace(engine: Engine, prompts: list[list[int]], rate: float, count: int, seed: int) -> list:
    rng = random.Random(seed)
    clock, trace = 0.0, []
    for index in range(count):
        clock += rng.expovariate(rate)
        max_tokens = 64 if index % 8 == 7 else 8
        request = engine.request(f"tenant{rng.randrange(TENANTS)}", rng.choice(prompts), max_tokens=max_tokens)
        trace.append((clock, request))
    return trace


def head_of_line_trace(engine: Engine, prompts: list[list[int]], long_tokens: int, beside: bool) -> list:
    shorts = [(1.0 if beside else 0.0, engine.request(f"tenant{i}", prompts[i], max_tokens=8)) for i in range(4)]
    if not beside:
        return shorts
    return [(0.0, engine.request("tenant7", prompts[7], max_tokens=long_tokens)), *shorts]


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """Real medical texts (symptom2disease and medical_abstracts) as chat prompts of at most 200 tokens."""
    texts = []
    for name in ("symptom2disease", "medical_abstracts"):
        texts += [example.prompt for example in get_task(name).load()["test"][: count // 2]]
    prompts = []
    for text in texts:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer(chat, add_special_tokens=False)["input_ids"][-200:])
    return prompts


def build_engine(model_name: str, rank: int):
    base, tokenizer = load_model(model_name)
    config = loramix.MixLoraConfig(
        TARGETS, router="task", num_experts=8, expert_rank=rank // 8, alpha=2 * rank, num_tasks=TENANTS
    )
    mixture = loramix.wrap(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in mixture.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
    tasks = [f"tenant{i}" for i in range(TENANTS)]
    return base, mixture, Engine(mixture, tokenizer, tasks, max_new_tokens=256, max_prompt_tokens=256), tokenizer


def http_head_of_line(model_name: str, rank: int, long_tokens: int, rounds: int, prompt_chars: int) -> dict:
    """Four 8-token chat requests alone, and 1 s after a `long_tokens` request, with the openai client against a
    `loramix serve` process of a task-router run (random experts)."""
    import asyncio

    import httpx
    import openai
    import yaml

    folder = Path(tempfile.mkdtemp(prefix="loramix-serving-"))
    _, mixture, _, tokenizer = build_engine(model_name, rank)
    tasks = [f"tenant{i}" for i in range(TENANTS)]
    recipe = {"name": "bench", "tasks": tasks, **({"model": model_name} if model_name else {})}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    mixture.save_pretrained(folder / "adapter")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [str(Path(sys.executable).parent / "loramix"), "serve", "--run", str(folder), "--port", str(port)]
    command += ["--max-new-tokens", str(long_tokens)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {process.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        texts = [example.prompt[:prompt_chars] for example in get_task("symptom2disease").load()["test"][:8]]

        async def shorts(api) -> float:
            began = time.monotonic()
            await asyncio.gather(
                *(
                    api.chat.completions.create(
                        model=tasks[i], messages=[{"role": "user", "content": texts[i]}], max_tokens=8
                    )
                    for i in range(4)
                )
            )
            return time.monotonic() - began

        async def beside(api) -> float:
            long = asyncio.create_task(
                api.chat.completions.create(
                    model=tasks[7], messages=[{"role": "user", "content": texts[7]}], max_tokens=long_tokens
                )
            )
            await asyncio.sleep(1.0)
            latency = await shorts(api)
            await long
            return latency

        async def measure() -> dict:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=600) as api:
                await shorts(api)  # warm-up
                alone = [await shorts(api) for _ in range(rounds)]
                with_long = [await beside(api) for _ in range(rounds)]
            return {"alone_s": statistics.median(alone), "beside_long_s": statistics.median(with_long)}

        result = asyncio.run(measure())
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
        shutil.rmtree(folder, ignore_errors=True)
    return result | {"ratio": result["beside_long_s"] / result["alone_s"]}


def adapter_throughput(model_name: str | None, counts: list[int], rank: int, requests: int, max_tokens: int) -> dict:
    """Generated tokens/s of `requests` requests (all at once, round robin over `count` peft LoRA adapters of rank
    `rank`) for loramix's shared batches of adapters served by name, against peft's `adapter_names` batches."""
    from loramix.serve.adapters import AdapterSet

    base, tokenizer = load_model(model_name)
    prompts = chat_prompts(tokenizer, 16)
    results = {}
    for count in counts:
        folder = Path(tempfile.mkdtemp(prefix="loramix-adapters-"))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
        for index in range(1, count):
            peft_model.add_adapter(f"a{index}", config)
        peft_model.save_pretrained(folder)  # each adapter in folder/a<i>
        peft_model.eval()
        engine = Engine(base, tokenizer, [], max_new_tokens=max_tokens, adapters=AdapterSet(base, model_name))
        for index in range(count):
            engine.load_adapter(f"a{index}", folder / f"a{index}")
        trace = [
            (0.0, engine.request(f"a{i % count}", prompts[i % len(prompts)], max_tokens=max_tokens))
            for i in range(requests)
        ]

        def peft_batches(tasks: list[int], peft_model=peft_model, **inputs) -> None:
            peft_model.generate(**inputs, adapter_names=[f"a{task}" for task in tasks])

        peer = [(0.0, copy.copy(r)) for _, r in trace]
        for index, (_, request) in enumerate(peer):
            request.task = index % count  # peft's adapter of the row
        results[str(count)] = {
            "loramix": summary(run_trace("continuous", engine, None, trace))["tokens_per_s"],
            "peft": summary(run_trace("window", engine, peft_batches, peer))["tokens_per_s"],
        }
        shutil.rmtree(folder, ignore_errors=True)
    return results


def plot(results: dict, rates: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for scheduler in SCHEDULERS:
        rows = [results[scheduler][str(rate)] for rate in rates]
        axes[0].plot(rates, [r["ttft_p50"] for r in rows], marker="o", label=f"{scheduler} p50")
        axes[0].plot(rates, [r["ttft_p99"] for r in rows], marker="x", linestyle="--", label=f"{scheduler} p99")
        axes[1].plot(rates, [r["tpot_p50"] * 1000 for r in rows], marker="o", label=f"{scheduler} p50")
        axes[1].plot(rates, [r["tpot_p99"] * 1000 for r in rows], marker="x", linestyle="--", label=f"{scheduler} p99")
        axes[2].plot(rates, [r["tokens_per_s"] for r in rows], marker="o", label=scheduler)
    for axis, title in zip(
        axes, ["time to first token (s)", "time per output token (ms)", "generated tokens/s"], strict=True
    ):
        axis.set_title(title)
        axis.set_xlabel("offered load (requests/s)")
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    figure.suptitle("8 tenants, one request in eight of 64 tokens, the rest of 8 (benchmarks/serving.py)")
    figure.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURE, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rates", default="0.5,2,6", help="offered loads, requests per second")
    parser.add_argument("--requests", type=int, default=48, help="requests per trace")
    parser.add_argument("--rank", type=int, default=16, help="each tenant's LoRA rank (8 experts of rank/8)")
    parser.add_argument("--long-tokens", type=int, default=200, help="the long request of the head-of-line case")
    parser.add_argument("--http", action="store_true", help="also the head-of-line case over HTTP (openai client)")
    parser.add_argument("--adapters", default="16,64", help="peft LoRA adapters served by name (throughput part)")
    parser.add_argument("--adapter-rank", type=int, default=8, help="rank of those adapters")
    parser.add_argument("--only-adapters", action="store_true", help="run only the adapters' throughput")
    parser.add_argument("--quick", action="store_true", help="tiny model, short traces: a check that it runs")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.model, args.rates, args.requests, args.long_tokens, args.adapters = "tiny-llama", "20,80", 16, 40, "4"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    counts = [int(count) for count in args.adapters.split(",") if count]
    adapters = adapter_throughput(args.model, counts, args.adapter_rank, requests=64, max_tokens=32) if counts else {}
    for count, r in adapters.items():
        print(
            f"{count} peft LoRA adapters of rank {args.adapter_rank}, 64 requests of 32 tokens: loramix shared "
            f"batches {r['loramix']:.1f} tokens/s, peft adapter_names {r['peft']:.1f} ({r['loramix'] / r['peft']:.2f}x)"
        )
    if args.only_adapters:
        if args.out:
            args.out.write_text(json.dumps({"adapters": adapters}, indent=2))
        return
    rates = [float(rate) for rate in args.rates.split(",")]
    base, _, engine, tokenizer = build_engine(args.model, args.rank)
    prompts = chat_prompts(tokenizer, 32)
    if args.quick:
        prompts = [prompt[-40:] for prompt in prompts]
    generators = {"window": loramix_generate(engine), "peft": peft_generate(base, args.rank)}
    results: dict = {scheduler: {} for scheduler in SCHEDULERS}
    warm = poisson_trace(engine, prompts, 100.0, 4, seed=99)
    for scheduler in SCHEDULERS:
        run_trace(scheduler, engine, generators.get(scheduler), warm)
    for rate in rates:
        trace = poisson_trace(engine, prompts, rate, args.requests, seed=0)
        for scheduler in SCHEDULERS:
            results[scheduler][str(rate)] = summary(run_trace(scheduler, engine, generators.get(scheduler), trace))
    results["adapters"] = adapters
    results["head_of_line"] = {}
    for scheduler in SCHEDULERS:
        latency = {}
        for beside in (False, True):
            trace = head_of_line_trace(engine, prompts, args.long_tokens, beside)
            sequences = run_trace(scheduler, engine, generators.get(scheduler), trace)
            latency[beside] = max(s.token_times[-1] - s.arrived for s in sequences if s.request.max_tokens == 8)
        results["head_of_line"][scheduler] = {"alone_s": latency[False], "beside_long_s": latency[True]}
    if args.http:
        results["http_head_of_line"] = http_head_of_line(
            args.model, args.rank, args.long_tokens, rounds=3, prompt_chars=150 if args.quick else 1000
        )
    print(
        f"{'scheduler':<11} {'load/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
        f"{'short p50':>9} {'long p50':>9} {'tok/s':>7}"
    )
    for scheduler in SCHEDULERS:
        for rate in rates:
            r = results[scheduler][str(rate)]
            print(
                f"{scheduler:<11} {rate:>6g} {r['ttft_p50']:>8.2f}s {r['ttft_p99']:>8.2f}s "
                f"{r['tpot_p50'] * 1e3:>7.0f}ms {r['tpot_p99'] * 1e3:>7.0f}ms "
                f"{r['short_latency_p50']:>8.2f}s {r['long_latency_p50']:>8.2f}s "
                f"{r['tokens_per_s']:>7.1f}"
            )
    top = str(rates[-1])
    print(
        f"throughput at {rates[-1]:g} req/s: continuous / window = "
        f"{results['continuous'][top]['tokens_per_s'] / results['window'][top]['tokens_per_s']:.2f}x, "
        f"continuous / peft = {results['continuous'][top]['tokens_per_s'] / results['peft'][top]['tokens_per_s']:.2f}x"
    )
    for scheduler, r in results["head_of_line"].items():
        print(
            f"head-of-line {scheduler:<11}: four 8-token requests {r['alone_s']:.2f}s alone, "
            f"{r['beside_long_s']:.2f}s sent 1 s after a {args.long_tokens}-token one "
            f"({r['beside_long_s'] / r['alone_s']:.1f}x)"
        )
    if "http_head_of_line" in results:
        r = results["http_head_of_line"]
        print(
            f"head-of-line over HTTP (openai client, loramix serve): {r['alone_s']:.2f}s alone, "
            f"{r['beside_long_s']:.2f}s beside ({r['ratio']:.2f}x)"
        )
    plot(results, rates)
    print(f"figure: {FIGURE}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
