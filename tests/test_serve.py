"""Serving: per-row task adapters, the batched engine, and the real HTTP server on a loopback port.

The models are tiny and in float64, so that answers generated in a batch are exactly those generated alone (in
float32 a batch's rounding could flip a near-tie of the greedy choice; that is not what these tests are about).
"""

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn
import yaml
from peft import LoraConfig, get_peft_model
from test_methods import randomise_adapter

import loramix
from loramix.data import Example, encode_example
from loramix.methods import AdaptedModel
from loramix.methods.adalink import AdaLinkConfig
from loramix.methods.iapt import IaptConfig
from loramix.methods.pedro import PedroConfig
from loramix.models import tiny_llama, tiny_tokenizer
from loramix.serve import Engine, GenerationRequest, Sequence, TaskRows, create_app, load_engine
from loramix.serve.text import TextStream

TENANTS = [f"tenant{i}" for i in range(8)]
PROMPTS = ["Is aspirin an NSAID?", "fever and cough", "a", "Which gene? BRCA1 or TP53", "hello", "rash on arms"]
MAX_NEW_TOKENS, MAX_PROMPT_TOKENS = 16, 48


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: several threads only fight other jobs for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def mixture(router: str = "task", seed: int = 0, **overrides) -> loramix.MixLoraModel:
    """A tiny float64 MixLoraModel whose experts (and task gates) make a visible difference."""
    values = dict(
        router=router, num_experts=4, expert_rank=2, top_k=2, num_tasks=len(TENANTS) if router == "task" else None
    )
    model = loramix.wrap(tiny_llama(seed=seed).eval(), loramix.MixLoraConfig("all-linear", **{**values, **overrides}))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
        if router == "task":
            model.shared_routers["task"].embedding.weight.mul_(4)  # tasks with clearly different expert weights
    return model.double().eval()


def reference(model, tokenizer, prompt_ids: list[int], task: int | None, max_tokens: int) -> list[int]:
    """Greedy tokens of `MixLoraModel.generate` for one request alone, up to its end-of-turn token."""
    ids = torch.tensor([prompt_ids])
    kwargs = {} if task is None else {"task_ids": torch.tensor([task])}
    with torch.inference_mode():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    tokens = output[0, ids.shape[1] :].tolist()
    return tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- text streaming -----------------------------------------------------------------------------------------
class ByteTokenizer:
    """Token = one UTF-8 byte: characters of several bytes arrive in pieces."""

    def decode(self, tokens, **kwargs) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")


def stream_text(text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(ByteTokenizer(), stop)
    pieces = []
    for token in text.encode():
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_text_stream_releases_only_complete_characters():
    pieces, stream = stream_text("café ü")
    assert "".join(pieces) == stream.text == "café ü"
    assert all("\ufffd" not in piece for piece in pieces)


def test_text_stream_cuts_at_a_stop_string_and_holds_back_its_start():
    pieces, stream = stream_text("one, two. three", stop=[". t", "zz"])
    assert stream.stopped and stream.text == "one, two" == "".join(pieces)
    assert not any("." in piece for piece in pieces)  # "." could have begun the stop string: never released
    pieces, stream = stream_text("a.b", stop=[". t"])
    assert not stream.stopped and "".join(pieces) == "a.b"


def test_a_sequence_ends_on_its_own_terms(tokenizer):
    """Token limit, stop string, end of turn and cancellation, each reported with the text so far."""
    requests = [GenerationRequest(0, [5], max_tokens=3)] + [GenerationRequest(0, [5], max_tokens=9) for _ in range(3)]
    requests[1].stop = ("c",)
    pieces, done = {}, {}
    sequences = [
        Sequence(
            request,
            tokenizer,
            [tokenizer.eos_token_id],
            torch.device("cpu"),
            on_text=lambda piece, _, row=row: pieces.setdefault(row, []).append(piece),
            on_done=lambda completion, row=row: done.__setitem__(row, completion),
        )
        for row, request in enumerate(requests)
    ]
    a, b, c, d = tokenizer("abcd")["input_ids"]
    eos = tokenizer.eos_token_id
    steps = [[a, a, a, a], [b, b, eos, b], [c, c, d, c], [d, d, d, d]]
    for step, tokens in enumerate(steps):
        if step == 2:
            sequences[3].finish("cancelled")
        for sequence, token in zip(sequences, tokens, strict=True):
            if not sequence.finished:
                sequence.advance(token)
    finished = {row: (c.text, c.finish_reason, len(c.token_ids)) for row, c in done.items()}
    assert finished == {0: ("abc", "length", 3), 1: ("ab", "stop", 3), 2: ("a", "stop", 1), 3: ("ab", "cancelled", 2)}
    assert {row: "".join(p) for row, p in pieces.items()} == {0: "abc", 1: "ab", 2: "a", 3: "ab"}


# ---- per-row task adapters ----------------------------------------------------------------------------------
def test_task_rows_compute_what_the_mixture_computes_in_one_forward():
    model = mixture()
    input_ids = torch.randint(3, 99, (8, 6), generator=torch.Generator().manual_seed(0))
    task_ids = torch.tensor([3, 0, 7, 3, 1, 6, 2, 5])
    with torch.inference_mode():
        expected = model(input_ids=input_ids, task_ids=task_ids).logits
        rows = TaskRows(model)
        with rows.select(task_ids) as base:
            swapped = sum(isinstance(m, loramix.MixLoraLinear) for m in base.modules())
            logits = base(input_ids=input_ids).logits
    assert swapped == 0
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert all(isinstance(model.base_model.get_submodule(name), loramix.MixLoraLinear) for name in model.layers)


def test_task_rows_need_the_task_router():
    with pytest.raises(ValueError, match="router='task'"):
        TaskRows(mixture("topk"))


# ---- the engine ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tokenizer):
    """Task router, 8 tenants; tenants 0-3 have merged copies (single-tenant batches), 4-7 only per-row adapters."""
    return Engine(
        mixture(),
        tokenizer,
        TENANTS,
        max_new_tokens=MAX_NEW_TOKENS,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        merged_tasks=4,
    )


@pytest.fixture(scope="module")
def expected(tokenizer):
    """tokens(kind, tenant, prompt): greedy tokens of the task alone (MAX_NEW_TOKENS), from a separate copy."""
    return answers_alone(mixture(), tokenizer)


def answers_alone(model, tokenizer):
    """tokens(kind, tenant, prompt): `model`'s greedy tokens for that request alone (MAX_NEW_TOKENS), cached."""
    cache = {}

    def tokens(kind: str, tenant: int, prompt: str) -> list[int]:
        key = (kind, tenant, prompt)
        if key not in cache:
            ids = chat_ids(tokenizer, prompt) if kind == "chat" else tokenizer(prompt)["input_ids"]
            cache[key] = reference(model, tokenizer, ids, tenant, MAX_NEW_TOKENS)
        return cache[key]

    return tokens


def test_a_mixed_batch_answers_each_row_as_its_task_alone(engine, tokenizer, expected):
    cases = [(tenant, PROMPTS[(tenant + i) % len(PROMPTS)], 4 + 3 * i) for i in range(2) for tenant in range(8)]
    requests = [engine.request(TENANTS[t], tokenizer(p)["input_ids"], max_tokens=m) for t, p, m in cases]
    completions = engine.generate(requests)
    for (tenant, prompt, max_tokens), completion in zip(cases, completions, strict=True):
        tokens = expected("completion", tenant, prompt)
        assert completion.token_ids == tokens[:max_tokens]
        assert completion.text == decode(tokenizer, tokens[:max_tokens])
        assert completion.finish_reason == ("length" if len(tokens) >= max_tokens else "stop")
    answers = {tuple(expected("completion", tenant, PROMPTS[0])) for tenant in range(8)}
    assert len(answers) == 8  # every tenant answers differently: a mix-up would show


@pytest.mark.parametrize("tenant", [1, 6])  # with and without a merged copy
def test_a_single_tenant_batch_matches_too(engine, tokenizer, expected, tenant):
    requests = [engine.request(TENANTS[tenant], tokenizer(p)["input_ids"], max_tokens=MAX_NEW_TOKENS) for p in PROMPTS]
    for prompt, completion in zip(PROMPTS, engine.generate(requests), strict=True):
        assert completion.token_ids == expected("completion", tenant, prompt)


@pytest.mark.parametrize("overrides", [dict(router="prompt", top_k=3), dict(router="topk", routing_level="sequence")])
def test_prompt_level_routes_are_computed_once_per_request(tokenizer, overrides):
    model = mixture(**overrides)
    engine = Engine(model, tokenizer, TENANTS[:2], max_new_tokens=8, max_prompt_tokens=MAX_PROMPT_TOKENS)
    routers = {id(r): r for r in model.routers().values()}.values()
    calls = []
    hooks = [router.register_forward_hook(lambda module, args, out: calls.append(module)) for router in routers]
    requests = [engine.request(TENANTS[i % 2], tokenizer(p)["input_ids"], max_tokens=8) for i, p in enumerate(PROMPTS)]
    completions = engine.generate(requests)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(routers)  # once, on the prompts; no decoding step routes
    assert max(len(c.token_ids) for c in completions) > 1
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        assert completion.token_ids == reference(model, tokenizer, tokenizer(prompt)["input_ids"], None, 8)


def adapted_method(name: str) -> AdaptedModel:
    """A tiny float64 PEDRO, IAPT or AdaLink adapter with values that matter (the same for the same name)."""
    model = loramix.wrap(tiny_llama().eval(), METHOD_TENANTS[name]())
    randomise_adapter(model)
    return model.double().eval()


def peft_lora():
    return get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


JOINING = {  # every kind of runner, with the state its rows carry from step to step
    "task rows and merged tasks": (lambda: mixture(), 2),
    "prompt router": (lambda: mixture("prompt", top_k=3), 0),
    "sequence-level top-k": (lambda: mixture("topk", routing_level="sequence"), 0),
    "token-level remix": (lambda: mixture("remix"), 0),
    "pedro": (lambda: adapted_method("pedro"), 0),
    "iapt": (lambda: adapted_method("iapt"), 0),
    "adalink": (lambda: adapted_method("adalink"), 0),
    "peft lora": (lambda: peft_lora().double().eval(), 0),
}


@pytest.mark.parametrize("name", list(JOINING))
def test_requests_joining_a_running_batch_answer_as_alone(tokenizer, name):
    """A long request decodes; others join it at later steps (and leave before it): every answer, and the
    logprobs of one, equal those of the request alone (`generate` on a separate copy)."""
    build, merged = JOINING[name]
    engine = Engine(
        build(), tokenizer, TENANTS, max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=48, merged_tasks=merged
    )
    alone, plain = build(), name == "peft lora"

    def alone_tokens(task: int, prompt_ids: list[int], max_tokens: int) -> list[int]:
        return reference(alone, tokenizer, prompt_ids, None if plain else task, max_tokens)

    long = next(  # a request that runs to its token limit, alone
        (t, p)
        for p in PROMPTS
        for t in (5, 3)
        if len(alone_tokens(t, tokenizer(p)["input_ids"], MAX_NEW_TOKENS)) == MAX_NEW_TOKENS
    )
    arrivals = {
        0: [(*long, MAX_NEW_TOKENS)],
        2: [(0, PROMPTS[0], 4), (6, PROMPTS[1], 6)],
        5: [(1, PROMPTS[5], 3)],
    }
    sequences, order = [], []
    for step in range(MAX_NEW_TOKENS + 2):
        new = [
            engine.sequence(engine.request(TENANTS[t], tokenizer(p)["input_ids"], max_tokens=m, logprobs=2))
            for t, p, m in arrivals.get(step, [])
        ]
        sequences += new
        if new:
            assert step == 0 or engine.running  # they join a batch that is decoding
            engine.admit(new)
        engine.step()
        order += [s for s in sequences if s.finished and s not in order]
    assert not engine.running and order[-1] is sequences[0]  # the short ones left before the long one
    for sequence in sequences:
        request = sequence.request
        tokens = alone_tokens(request.task, request.prompt_ids, request.max_tokens)
        assert sequence.completion.token_ids == tokens[: request.max_tokens], name
    first = sequences[0]
    ids = torch.tensor([first.request.prompt_ids])
    with torch.inference_mode():
        task = {} if plain else {"task_ids": torch.tensor([first.request.task])}
        output = alone.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            **task,
        )
    for logprob, logits in zip(first.completion.logprobs, output.logits, strict=False):
        table = logits[0].log_softmax(-1)
        assert logprob.logprob == pytest.approx(float(table[logprob.token]), abs=1e-9)
        assert [t for t, _ in logprob.top] == table.topk(2).indices.tolist()


def test_a_failing_prompt_fails_alone(tokenizer, expected):
    """A prompt forward that fails is retried request by request: only the request at fault fails."""
    engine = Engine(mixture(), tokenizer, TENANTS, max_new_tokens=8, max_prompt_tokens=MAX_PROMPT_TOKENS)
    runner, poison, sizes = engine.runners["model"], tokenizer("poison")["input_ids"], []
    forward = runner.forward

    def failing(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:
            sizes.append(len(input_ids))
            if any(row[-len(poison) :] == poison for row in input_ids.tolist()):
                raise RuntimeError("out of memory")
        return forward(input_ids, *args, **kwargs)

    runner.forward = failing
    errors = []
    prompts = ["poison", *PROMPTS[:3]]
    sequences = [
        engine.sequence(engine.request(TENANTS[i], tokenizer(p)["input_ids"], max_tokens=8), on_error=errors.append)
        for i, p in enumerate(prompts)
    ]
    engine.admit(sequences)
    while engine.running:
        engine.step()
    assert sizes[0] == 4 and set(sizes[1:]) == {1} and [str(e) for e in errors] == ["out of memory"]
    for tenant, sequence in enumerate(sequences[1:], start=1):
        assert sequence.completion.token_ids == expected("completion", tenant, prompts[tenant])[:8]


def test_sampling_is_reproducible_by_seed_and_leaves_greedy_rows_alone(engine, tokenizer, expected):
    ids = tokenizer(PROMPTS[0])["input_ids"]

    def batch(seed: int) -> list:
        sampled = engine.request(TENANTS[5], ids, max_tokens=MAX_NEW_TOKENS, temperature=1.5, seed=seed)
        greedy = engine.request(TENANTS[2], ids, max_tokens=MAX_NEW_TOKENS)
        return engine.generate([sampled, greedy])

    first, second, other = batch(seed=7), batch(seed=7), batch(seed=8)
    assert first[0].token_ids == second[0].token_ids != other[0].token_ids
    assert first[1].token_ids == other[1].token_ids == expected("completion", 2, PROMPTS[0])


def test_engine_checks_requests(engine):
    with pytest.raises(ValueError, match="does not exist"):
        engine.request("nobody", [5])
    with pytest.raises(ValueError, match="maximum prompt length"):
        engine.request(TENANTS[0], [5] * (MAX_PROMPT_TOKENS + 1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.request(TENANTS[0], [5], max_tokens=MAX_NEW_TOKENS + 1)
    with pytest.raises(ValueError, match="merged_tasks"):
        Engine(mixture("topk"), tiny_tokenizer(), TENANTS, max_new_tokens=8, merged_tasks=1)


def test_load_engine_serves_a_run_folder(tmp_path, tokenizer):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "run", "model": "tiny-llama", "tasks": ["a", "b"]}))
    model = loramix.wrap(tiny_llama(), loramix.MixLoraConfig("all-linear", router="task", num_experts=2, num_tasks=2))
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.normal_(0, 0.5)
    model.save_pretrained(run / "adapter")
    engine = load_engine(run, device="cpu", max_new_tokens=8, max_prompt_tokens=32)
    assert engine.tasks == ["a", "b"] and engine.rows is not None
    ids = tokenizer(PROMPTS[1])["input_ids"]
    completion = engine.generate([engine.request("b", ids, max_tokens=8)])[0]
    assert completion.token_ids == reference(model.eval(), tokenizer, ids, 1, 8)


def test_load_engine_serves_a_peft_run_folder(tmp_path, tokenizer):
    run = tmp_path / "run"
    run.mkdir()
    recipe = {"model": "tiny-llama", "tasks": ["a"], "system_prompt": "Be brief."}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run / "adapter")
    engine = load_engine(run, device="cpu", max_new_tokens=4, max_prompt_tokens=32)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    completion = engine.generate([engine.request("a", ids, max_tokens=4)])[0]
    assert completion.token_ids == reference(peft_model.eval(), tokenizer, ids, None, 4)
    # chats are rendered in the format the run was trained in: its system prompt unless they bring their own
    user = [{"role": "user", "content": "Hi"}]
    trained_format = encode_example(Example("a", "Hi", ""), tokenizer, 64, False, "Be brief.")["input_ids"]
    assert engine.encode_chat(user) == trained_format
    own = [{"role": "system", "content": "Be long."}, *user]
    assert (
        engine.encode_chat(own) == encode_example(Example("a", "Hi", ""), tokenizer, 64, False, "Be long.")["input_ids"]
    )


# ---- the HTTP server ----------------------------------------------------------------------------------------
@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port, in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine) as served:
        yield served


@contextmanager
def serving(engine, **options):
    """The real server over `engine`; yields its URL and the task ids of the rows of every decoding step's batch."""
    steps = []
    step = engine.step

    def recording():
        steps.extend([s.request.task for s in batch.sequences] for batch in engine.batches.values() if len(batch))
        step()

    engine.step = recording
    try:
        with running(create_app(engine, max_batch_size=16, **options)) as url:
            yield url, steps
    finally:
        del engine.step


def body_for(kind: str, tenant: int, prompt: str, **fields) -> tuple[str, dict]:
    if kind == "chat":
        return "/v1/chat/completions", {
            "model": TENANTS[tenant],
            "messages": [{"role": "user", "content": prompt}],
        } | fields
    return "/v1/completions", {"model": TENANTS[tenant], "prompt": prompt} | fields


def answer_of(kind: str, response: dict) -> str:
    choice = response["choices"][0]
    return choice["message"]["content"] if kind == "chat" else choice["text"]


async def ask(client: httpx.AsyncClient, path: str, body: dict) -> tuple[str, str, int]:
    """(text, finish_reason, status) of a request, streamed or not."""
    if not body.get("stream"):
        response = await client.post(path, json=body)
        if response.status_code != 200:
            return response.text, "", response.status_code
        data = response.json()
        return answer_of("chat" if "chat" in path else "completion", data), data["choices"][0]["finish_reason"], 200
    async with client.stream("POST", path, json=body) as response:
        events = [line.removeprefix("data: ") async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
    text = "".join(c["delta"].get("content", "") if "delta" in c else c["text"] for c in chunks)
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    return text, chunks[-1]["finish_reason"], response.status_code


def test_health_and_models(server):
    url, _ = server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == TENANTS and models["object"] == "list"


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_answers_equal_generate_for_the_task_alone(server, tokenizer, expected, kind, stream):
    url, _ = server
    path, body = body_for(kind, 6, PROMPTS[3], max_tokens=12, stream=stream)
    text, finish_reason, status = asyncio.run(ask(httpx.AsyncClient(base_url=url), path, body))
    tokens = expected(kind, 6, PROMPTS[3])
    assert status == 200 and text == decode(tokenizer, tokens[:12])
    assert finish_reason == ("length" if len(tokens) >= 12 else "stop")


def test_usage_and_stop_strings(server, tokenizer, expected):
    url, _ = server
    tokens = expected("completion", 0, PROMPTS[0])
    full = decode(tokenizer, tokens)
    assert len(full) > 5
    stop = full[3:5]
    response = httpx.post(f"{url}/v1/completions", json={"model": TENANTS[0], "prompt": PROMPTS[0], "max_tokens": 16})
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == len(tokens) and usage["prompt_tokens"] == len(
        tokenizer(PROMPTS[0])["input_ids"]
    )
    body = {"model": TENANTS[0], "prompt": PROMPTS[0], "max_tokens": 16, "stop": [stop]}
    choice = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_chat_stream_opens_with_the_assistant_role(server):
    url, _ = server
    body = {"model": TENANTS[1], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        first = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


LONG_PROMPT = "x" * (MAX_PROMPT_TOKENS + 1)
BAD_REQUESTS = {
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    "prompt too long": ("/v1/completions", {"model": TENANTS[0], "prompt": LONG_PROMPT}, 400, "prompt"),
    "chat too long": (
        "/v1/chat/completions",
        {"model": TENANTS[0], "messages": [{"role": "user", "content": LONG_PROMPT}]},
        400,
        "messages",
    ),
    "max_tokens too large": (
        "/v1/completions",
        {"model": TENANTS[0], "prompt": "hi", "max_tokens": 17},
        400,
        "max_tokens",
    ),
    "max_tokens zero": ("/v1/completions", {"model": TENANTS[0], "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens string": (
        "/v1/completions",
        {"model": TENANTS[0], "prompt": "hi", "max_tokens": "8"},
        400,
        "max_tokens",
    ),
    "temperature string": (
        "/v1/completions",
        {"model": TENANTS[0], "prompt": "hi", "temperature": "hot"},
        400,
        "temperature",
    ),
    "stream string": ("/v1/completions", {"model": TENANTS[0], "prompt": "hi", "stream": "yes"}, 400, "stream"),
    "prompt number": ("/v1/completions", {"model": TENANTS[0], "prompt": 5}, 400, "prompt"),
    "missing model": ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    "messages string": ("/v1/chat/completions", {"model": TENANTS[0], "messages": "hi"}, 400, "messages"),
    "unknown role": (
        "/v1/chat/completions",
        {"model": TENANTS[0], "messages": [{"role": "x", "content": "a"}]},
        400,
        None,
    ),
    "n = 2": ("/v1/completions", {"model": TENANTS[0], "prompt": "hi", "n": 2}, 400, "n"),
    "seed too large": ("/v1/completions", {"model": TENANTS[0], "prompt": "hi", "seed": 2**64}, 400, "seed"),
    "stop too long": ("/v1/completions", {"model": TENANTS[0], "prompt": "hi", "stop": "s" * 300}, 400, "stop"),
    "five stops": ("/v1/completions", {"model": TENANTS[0], "prompt": "hi", "stop": list("abcde")}, 400, "stop"),
    "huge prompt": ("/v1/completions", {"model": TENANTS[0], "prompt": "y" * 10**6}, 400, "prompt"),
    "malformed JSON": ("/v1/completions", b'{"model": "tenant0", "prompt": ', 400, None),
    "not an object": ("/v1/completions", b"[1, 2]", 400, None),
    "unknown path": ("/v1/embeddings", {"model": TENANTS[0]}, 404, None),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_an_openai_error(server, case):
    url, _ = server
    path, body, status, param = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    assert httpx.get(f"{url}/health").status_code == 200


def test_concurrent_load_over_eight_tenants(server, tokenizer, expected):
    """200 requests over 8 tenants, 16 at a time: no failure, each answer that of the request alone."""
    assert_answers_alone_under_load(*server, tokenizer, expected)


METHOD_TENANTS = {  # the methods served in mixed batches, with tiny configs
    "adalink": lambda: AdaLinkConfig(rank=2, num_tasks=len(TENANTS)),  # each row its tenant's embedding adapter
    "pedro": lambda: PedroConfig(bottleneck=4),  # each row its own prompt's vectors
    "iapt": lambda: IaptConfig(bottleneck=4),  # each row its own prompt's soft tokens
}


@pytest.mark.parametrize("name", list(METHOD_TENANTS))
def test_method_tenants_under_concurrent_load(tokenizer, name):
    """The same 200-request load for PEDRO, IAPT and AdaLink: each answer that of the request alone."""

    def adapted() -> AdaptedModel:
        model = loramix.wrap(tiny_llama().eval(), METHOD_TENANTS[name]())
        randomise_adapter(model)
        return model.double().eval()

    expected = answers_alone(adapted(), tokenizer)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    base = reference(tiny_llama().double().eval(), tokenizer, ids, None, MAX_NEW_TOKENS)
    assert expected("completion", 0, PROMPTS[0]) != base  # the adapter matters
    if name == "adalink":
        assert len({tuple(expected("completion", tenant, PROMPTS[0])) for tenant in range(8)}) == 8
    engine = Engine(adapted(), tokenizer, TENANTS, max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=MAX_PROMPT_TOKENS)
    with serving(engine) as (url, steps):
        assert_answers_alone_under_load(url, steps, tokenizer, expected)


def assert_answers_alone_under_load(url: str, steps: list, tokenizer, expected) -> None:
    """200 requests (chat and completion, streamed or not) over 8 tenants, 16 at a time."""
    cases = [
        ("chat" if i % 3 == 0 else "completion", i % 8, PROMPTS[(i // 8) % len(PROMPTS)], 4 + i % 13, i % 5 == 0)
        for i in range(200)
    ]

    async def load() -> list:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one(kind, tenant, prompt, max_tokens, stream):
                async with limit:
                    return await ask(client, *body_for(kind, tenant, prompt, max_tokens=max_tokens, stream=stream))

            return await asyncio.gather(*(one(*case) for case in cases))

    steps.clear()
    results = asyncio.run(load())
    for (kind, tenant, prompt, max_tokens, _), (text, finish_reason, status) in zip(cases, results, strict=True):
        tokens = expected(kind, tenant, prompt)
        assert status == 200
        assert (text, finish_reason) == (
            decode(tokenizer, tokens[:max_tokens]),
            "length" if len(tokens) >= max_tokens else "stop",
        ), (kind, tenant, prompt, max_tokens)
    assert max(len(set(batch)) for batch in steps) > 1  # tenants shared decoding steps
    assert max(map(len, steps)) > 8  # requests decoded together, not one by one


def test_a_failing_request_fails_alone_and_the_server_lives_on(tokenizer, expected):
    engine = Engine(mixture(), tokenizer, TENANTS, max_new_tokens=8, max_prompt_tokens=MAX_PROMPT_TOKENS)
    runner, poison, sizes = engine.runners["model"], tokenizer("poison")["input_ids"], []
    forward = runner.forward

    def failing(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:  # a prompt's forward
            sizes.append(len(input_ids))
            if any(row[-len(poison) :] == poison for row in input_ids.tolist()):
                raise RuntimeError("out of memory")
        return forward(input_ids, *args, **kwargs)

    runner.forward = failing
    prompts = ["poison", *PROMPTS[:3]]

    async def send(url: str) -> list:
        async with httpx.AsyncClient(base_url=url) as client:
            bodies = [{"model": TENANTS[i], "prompt": p, "max_tokens": 8} for i, p in enumerate(prompts)]
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))

    with running(create_app(engine)) as url:
        responses = asyncio.run(send(url))
        assert httpx.get(f"{url}/health").status_code == 200
    assert responses[0].status_code == 500 and "out of memory" in responses[0].json()["error"]["message"]
    for tenant, (prompt, response) in enumerate(zip(prompts[1:], responses[1:], strict=True), start=1):
        assert response.json()["choices"][0]["text"] == decode(tokenizer, expected("completion", tenant, prompt)[:8])


def test_a_client_leaving_a_stream_harms_nobody(server, tokenizer, expected):
    url, _ = server
    body = {"model": TENANTS[2], "prompt": PROMPTS[2], "max_tokens": 16, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        next(response.iter_lines())
    answer = httpx.post(f"{url}/v1/completions", json=body | {"stream": False}).json()["choices"][0]["text"]
    assert answer == decode(tokenizer, expected("completion", 2, PROMPTS[2]))


def test_serving_core_imports_without_the_http_extra():
    """Engine, TaskRows and load_engine need no fastapi/uvicorn (the `serve` extra); create_app says it needs them."""
    code = """
import sys
sys.modules["fastapi"] = sys.modules["uvicorn"] = None  # as if not installed
from loramix.serve import Engine, TaskRows, load_engine
import loramix.serve
try:
    loramix.serve.create_app
except ModuleNotFoundError as error:
    print("needs", error.name)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "needs fastapi"
