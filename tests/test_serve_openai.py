"""`loramix serve` as users reach it: the real server process on a loopback port, driven by the official `openai`
client. Scheduling is asserted from what the server reports (its metrics, the order answers end), not from times.

The run is a tiny task-router mixture served in float64, so that an answer decoded beside others is exactly the
answer of the request alone (in float32 a batch's rounding could flip a near-tie of the greedy choice).
"""

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from test_serve import reference

import loramix
from loramix.models import tiny_llama, tiny_tokenizer

TASKS = [f"clinic{i}" for i in range(6)]
PROMPTS = ["Is aspirin an NSAID?", "fever and cough", "Which gene? BRCA1 or TP53", "hello", "rash on arms", "a b c"]
API_KEY = "test-key"
MAX_NEW_TOKENS = 200
SHORT = 40  # the most tokens a request of the load test asks for


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder: a tiny task-router mixture over six tasks, with experts that make a difference."""
    run = tmp_path_factory.mktemp("run")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "run", "model": "tiny-llama", "tasks": TASKS}))
    config = loramix.MixLoraConfig("all-linear", router="task", num_experts=4, expert_rank=2, num_tasks=len(TASKS))
    model = loramix.wrap(tiny_llama(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
        model.shared_routers["task"].embedding.weight.mul_(4)
    model.save_pretrained(run / "adapter")
    return run


@pytest.fixture(scope="module")
def alone(run_dir):
    """tokens(task, prompt, max_tokens): the greedy answer of a completion request alone (generate, float64)."""
    model = loramix.load(tiny_llama().double(), run_dir / "adapter").double().eval()
    tokenizer, cache = tiny_tokenizer(), {}

    def tokens(task: int, prompt: str, max_tokens: int = MAX_NEW_TOKENS) -> list[int]:
        length = SHORT if max_tokens <= SHORT else MAX_NEW_TOKENS  # few lengths: generating alone takes time
        if (task, prompt, length) not in cache:
            ids = tokenizer(prompt)["input_ids"]
            cache[task, prompt, length] = reference(model, tokenizer, ids, task, length)
        return cache[task, prompt, length][:max_tokens]

    return tokens


def start_server(run_dir: Path | None, *options: str) -> tuple[subprocess.Popen, str]:
    """`loramix serve` (float64, API key) on a free loopback port, with the run folder and `options`; waits until
    it answers /health."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [
        str(Path(sys.executable).parent / "loramix"),
        "serve",
        *(["--run", str(run_dir)] if run_dir is not None else []),
        *options,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float64",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-prompt-tokens",
        "48",
        *(["--merged-tasks", "1"] if run_dir is not None else []),
        "--drain-timeout",
        "60",
    ]
    environment = os.environ | {"LORAMIX_API_KEY": API_KEY, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server(run_dir):
    process, url = start_server(run_dir)
    yield url
    if process.poll() is None:
        process.kill()
    process.wait(30)


def client(url: str, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def metric(url: str, name: str, **labels) -> float:
    """The value of one sample of the server's /metrics (0 if absent)."""
    text = httpx.get(f"{url}/metrics").text
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$"
    total = 0.0
    for match in re.finditer(pattern, text, re.MULTILINE):
        if all(part in (match.group(1) or "") for part in wanted.split(",") if part):
            total += float(match.group(2))
    return total


def test_the_api_key_guards_every_v1_route(server):
    async def attempts():
        async with client(server, "wrong") as wrong, client(server) as api:
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            with pytest.raises(openai.AuthenticationError):
                await wrong.completions.create(model=TASKS[0], prompt="hi", max_tokens=2)
            return [model.id async for model in api.models.list()]

    assert asyncio.run(attempts()) == TASKS
    assert httpx.get(f"{server}/health").status_code == 200  # open, as for load balancers
    response = httpx.post(f"{server}/v1/completions", json={"model": TASKS[0], "prompt": "hi"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_answers_and_logprobs_through_the_client(server, alone):
    tokenizer = tiny_tokenizer()

    async def ask():
        async with client(server) as api:
            return await questions(api)

    async def questions(api):
        completion = await api.completions.create(model=TASKS[2], prompt=PROMPTS[0], max_tokens=6, logprobs=3)
        chat = await api.chat.completions.create(
            model=TASKS[1], messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True, top_logprobs=2
        )
        pieces = []
        stream = await api.completions.create(model=TASKS[4], prompt=PROMPTS[1], max_tokens=7, stream=True, logprobs=0)
        async for chunk in stream:
            pieces.append(chunk.choices[0])
        return completion, chat, pieces

    completion, chat, pieces = asyncio.run(ask())
    tokens = alone(2, PROMPTS[0], 6)
    choice = completion.choices[0]
    assert choice.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(choice.logprobs.tokens) == len(tokens) and all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    assert all(value <= 0 for value in choice.logprobs.token_logprobs)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(item.top_logprobs) == 2 for item in content)
    streamed = [token for piece in pieces if piece.logprobs for token in piece.logprobs.tokens]
    assert "".join(piece.text for piece in pieces) == tokenizer.decode(
        alone(4, PROMPTS[1], 7), skip_special_tokens=True
    )
    assert len(streamed) == len(alone(4, PROMPTS[1], 7))


def test_short_requests_join_a_running_long_one_and_finish_first(server, alone):
    """Four short requests sent while a long one streams join its batch at the next steps and end before it."""
    long_task, long_prompt = next((t, p) for p in PROMPTS for t in range(len(TASKS)) if len(alone(t, p)) == 200)
    joined_before = metric(server, "loramix_requests_joined_running_total")

    async def scenario():
        async with client(server) as api:
            return await requests(api)

    async def requests(api):
        ended, started = {}, asyncio.Event()

        async def long_request():
            stream = await api.completions.create(
                model=TASKS[long_task], prompt=long_prompt, max_tokens=MAX_NEW_TOKENS, stream=True
            )
            async for chunk in stream:
                started.set()
                reason = chunk.choices[0].finish_reason
            ended["long"] = (time.monotonic(), reason)

        async def short_request(index: int):
            answer = await api.chat.completions.create(
                model=TASKS[index], messages=[{"role": "user", "content": PROMPTS[index]}], max_tokens=4
            )
            ended[index] = (time.monotonic(), answer.choices[0].finish_reason)

        running = asyncio.create_task(long_request())
        await started.wait()
        await asyncio.gather(*(short_request(index) for index in range(4)))
        await running
        return ended

    ended = asyncio.run(scenario())
    assert ended["long"][1] == "length"
    assert all(ended[index][0] < ended["long"][0] for index in range(4))
    assert metric(server, "loramix_requests_joined_running_total") - joined_before >= 4


def test_two_hundred_requests_over_every_tenant_with_clients_leaving(server, alone):
    """200 requests over the six tasks, 16 at a time, random max_tokens, streamed or not; one in ten clients
    leaves mid-stream. No failure, no hang, every completed greedy answer equals the request alone."""
    tokenizer, rng = tiny_tokenizer(), random.Random(0)
    cases = [
        (rng.randrange(len(TASKS)), rng.choice(PROMPTS), rng.randint(1, SHORT), rng.random() < 0.4, i % 10 == 3)
        for i in range(200)
    ]
    cancelled_before = metric(server, "loramix_request_success_total", finished_reason="cancelled")

    async def load():
        async with client(server) as api:
            return await requests(api)

    async def requests(api):
        limit = asyncio.Semaphore(16)

        async def one(task, prompt, max_tokens, stream, leaves):
            async with limit:
                if leaves:
                    response = await api.completions.create(
                        model=TASKS[task], prompt=prompt, max_tokens=MAX_NEW_TOKENS, stream=True
                    )
                    async for _ in response:
                        break
                    await response.close()
                    return None
                if not stream:
                    answer = await api.completions.create(model=TASKS[task], prompt=prompt, max_tokens=max_tokens)
                    return answer.choices[0].text, answer.choices[0].finish_reason
                response = await api.completions.create(
                    model=TASKS[task], prompt=prompt, max_tokens=max_tokens, stream=True
                )
                chunks = [chunk.choices[0] async for chunk in response]
                return "".join(chunk.text for chunk in chunks), chunks[-1].finish_reason

        return await asyncio.wait_for(asyncio.gather(*(one(*case) for case in cases)), timeout=600)

    results = asyncio.run(load())
    for (task, prompt, max_tokens, _, leaves), result in zip(cases, results, strict=True):
        if leaves:
            continue
        tokens = alone(task, prompt, max_tokens)
        expected = (
            tokenizer.decode(tokens, skip_special_tokens=True),
            "length" if len(tokens) == max_tokens else "stop",
        )
        assert result == expected, (task, prompt, max_tokens)
    deadline = time.monotonic() + 30  # the rows of clients that left are freed at the next step
    while metric(server, "loramix_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "loramix_num_requests_running") == 0
    assert metric(server, "loramix_request_success_total", finished_reason="cancelled") > cancelled_before
    assert metric(server, "loramix_request_failure_total") == 0


def test_metrics_count_requests_tokens_and_latencies_per_model(server):
    async def ask():
        async with client(server) as api:
            return await api.completions.create(model=TASKS[5], prompt="hello", max_tokens=3)

    before = metric(server, "loramix_time_to_first_token_seconds_count", model_name=TASKS[5])
    generated = metric(server, "loramix_generation_tokens_total", model_name=TASKS[5])
    completion = asyncio.run(ask())
    assert metric(server, "loramix_time_to_first_token_seconds_count", model_name=TASKS[5]) == before + 1
    after = metric(server, "loramix_generation_tokens_total", model_name=TASKS[5])
    assert after - generated == completion.usage.completion_tokens
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "loramix_time_per_output_token_seconds_bucket",
        "loramix_num_requests_waiting",
        "loramix_prompt_tokens_total",
    ):
        assert name in text


def test_sigterm_drains_running_requests_then_exits(run_dir, alone):
    """After SIGTERM the server takes no new connection, finishes the streams that run, and exits cleanly."""
    process, url = start_server(run_dir)
    long_task, long_prompt = next((t, p) for p in PROMPTS for t in range(len(TASKS)) if len(alone(t, p)) == 200)
    tokenizer = tiny_tokenizer()

    async def scenario():
        async with client(url) as api:
            return await requests(api)

    async def requests(api):
        started, text = asyncio.Event(), []

        async def long_request():
            stream = await api.completions.create(
                model=TASKS[long_task], prompt=long_prompt, max_tokens=MAX_NEW_TOKENS, stream=True
            )
            async for chunk in stream:
                started.set()
                text.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason
            return "".join(text), reason

        running = asyncio.create_task(long_request())
        await started.wait()
        process.send_signal(signal.SIGTERM)
        return await running

    try:
        text, reason = asyncio.run(scenario())
        assert (text, reason) == (tokenizer.decode(alone(long_task, long_prompt), skip_special_tokens=True), "length")
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by the signal once it has drained
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        if process.poll() is None:
            process.kill()
