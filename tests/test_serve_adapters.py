"""Many adapters on one backbone: peft LoRA folders of several ranks and run folders of several methods, served by
name in shared decoding steps (LoRA-like ones) or steps of their own, loaded and unloaded at run time.

Float64 tiny models, so that an answer decoded beside others is exactly the answer of the request alone.
"""

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from test_methods import randomise_adapter
from test_serve import PROMPTS, reference

import loramix
from loramix.methods.pedro import PedroConfig
from loramix.models import tiny_llama, tiny_tokenizer
from loramix.serve import Engine, RequestError
from loramix.serve.adapters import AdapterSet

PEFT_RANKS = {"p2": 2, "p4": 4, "p8": 8}
MAX_NEW_TOKENS = 12


def save_peft(folder, rank: int, seed: int, targets=("q_proj", "v_proj", "down_proj")):
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


def save_run(folder, config, tasks: list[str], seed: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"name": folder.name, "model": "tiny-llama", "tasks": tasks}))
    model = loramix.wrap(tiny_llama(), config)
    randomise_adapter(model, seed)
    if isinstance(model, loramix.MixLoraModel):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    model.save_pretrained(folder / "adapter")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    found = {name: save_peft(root / name, rank, seed=rank) for name, rank in PEFT_RANKS.items()}
    task_config = loramix.MixLoraConfig("all-linear", router="task", num_experts=4, expert_rank=2, num_tasks=3)
    found["moe"] = save_run(root / "moe", task_config, ["a", "b", "c"])
    found["topk"] = save_run(
        root / "topk", loramix.MixLoraConfig("all-linear", router="topk", num_experts=4, expert_rank=2), ["t"]
    )
    found["pedro"] = save_run(root / "pedro", PedroConfig(bottleneck=4), ["x", "a"])
    found["wrong"] = save_peft(root / "wrong", 2, seed=3)
    return found


MODELS, ANSWERS = {}, {}


def alone(folders, tokenizer, name: str, task: int | None, prompt: str, max_tokens: int) -> list[int]:
    """The request alone, through peft or loramix's own generate on a float64 base of its own."""
    path = folders[name]
    if path not in MODELS:
        if (path / "adapter_config.json").is_file():
            MODELS[path] = PeftModel.from_pretrained(tiny_llama().double(), path).double().eval()
        else:
            MODELS[path] = loramix.load(tiny_llama().double(), path / "adapter").double().eval()
    plain = (path / "adapter_config.json").is_file()
    key = (path, task, prompt)
    if key not in ANSWERS:  # the whole answer, once: a shorter one is its beginning
        ids = tokenizer(prompt)["input_ids"]
        ANSWERS[key] = reference(MODELS[path], tokenizer, ids, None if plain else task or 0, MAX_NEW_TOKENS)
    return ANSWERS[key][:max_tokens]


def engine_for(folders, names, max_adapters=None) -> Engine:
    base = tiny_llama().double().eval()
    engine = Engine(
        base,
        tiny_tokenizer(),
        [],
        max_new_tokens=MAX_NEW_TOKENS,
        max_prompt_tokens=48,
        adapters=AdapterSet(base, "tiny-llama", max_adapters),
    )
    for name in names:
        engine.load_adapter(name, folders[name])
    return engine


def test_adapters_of_every_kind_share_an_engine_and_answer_as_alone(folders):
    tokenizer = tiny_tokenizer()
    engine = engine_for(folders, ["p2", "p4", "p8", "moe", "topk", "pedro"])
    assert engine.model_ids == ["p2", "p4", "p8", "moe/a", "moe/b", "moe/c", "topk", "pedro/x", "pedro/a"]
    cases = [
        (model, prompt, 3 + (i % 9))
        for i, (model, prompt) in enumerate(
            (m, p) for p in PROMPTS[:3] for m in ["p2", "p4", "p8", "moe/a", "b", "moe/c", "topk", "pedro/x", "pedro/a"]
        )
    ]
    steps = []
    step = engine.step
    engine.step = lambda: (steps.append({key: len(b) for key, b in engine.batches.items() if len(b)}), step())
    completions = engine.generate([engine.request(m, tokenizer(p)["input_ids"], max_tokens=n) for m, p, n in cases])
    for (model, prompt, max_tokens), completion in zip(cases, completions, strict=True):
        name, _, task = model.rpartition("/") if "/" in model else (model, "", "")
        if model == "b":
            name, task = "moe", "b"
        tasks = {"moe": ["a", "b", "c"], "pedro": ["x", "a"]}.get(name, [])
        expected = alone(folders, tokenizer, name, tasks.index(task) if task else None, prompt, max_tokens)
        assert completion.token_ids == expected, model
    assert max(step.get("lora", 0) for step in steps) == 3 * 6  # peft LoRAs and task-router tasks share steps
    assert any(len(step) == 3 for step in steps)  # the LoRA batch, top-k's and PEDRO's alternate


def test_names_ambiguity_and_base_mismatch(folders, tmp_path):
    engine = engine_for(folders, ["moe", "pedro"])
    with pytest.raises(RequestError, match="ambiguous.*moe/a.*pedro/a"):
        engine.request("a", [5])
    with pytest.raises(RequestError, match="does not exist"):
        engine.request("moe/z", [5])
    bigger = tmp_path / "bigger"
    model = get_peft_model(tiny_llama(hidden_size=48), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(bigger)
    with pytest.raises(RequestError, match="base-model mismatch: .*q_proj is 32 -> 32 here") as error:
        engine.load_adapter("bigger", bigger)
    assert error.value.param == "lora_path"
    with pytest.raises(RequestError, match="neither a peft LoRA folder nor a loramix run folder"):
        engine.load_adapter("empty", tmp_path)


def test_unloading_lets_running_rows_finish_and_refuses_new_ones(folders):
    tokenizer = tiny_tokenizer()
    engine = engine_for(folders, ["p4", "topk"])
    ids = tokenizer(PROMPTS[1])["input_ids"]
    running = [engine.sequence(engine.request(name, ids, max_tokens=MAX_NEW_TOKENS)) for name in ("p4", "topk")]
    engine.admit(running)
    engine.step()
    engine.unload_adapter("p4")
    engine.unload_adapter("topk")
    with pytest.raises(RequestError, match="does not exist"):
        engine.request("p4", ids)
    while engine.running:
        engine.step()
    assert running[0].completion.token_ids == alone(folders, tokenizer, "p4", None, PROMPTS[1], MAX_NEW_TOKENS)
    assert running[1].completion.token_ids == alone(folders, tokenizer, "topk", None, PROMPTS[1], MAX_NEW_TOKENS)
    assert not any(isinstance(key, tuple) and key[0] == "adapter" for key in engine.runners)  # topk's runner is gone


def test_at_most_max_adapters_stay_loaded_and_others_come_back_on_demand(folders):
    tokenizer = tiny_tokenizer()
    engine = engine_for(folders, ["p2", "p4", "p8"], max_adapters=2)
    assert list(engine.adapters.served) == ["p4", "p8"] and engine.model_ids == ["p2", "p4", "p8"]
    engine.ensure_resident("p2")  # what the server does before a request
    assert list(engine.adapters.served) == ["p8", "p2"]
    ids = tokenizer(PROMPTS[0])["input_ids"]
    (completion,) = engine.generate([engine.request("p2", ids, max_tokens=6)])
    assert completion.token_ids == alone(folders, tokenizer, "p2", None, PROMPTS[0], 6)


def test_sixteen_adapters_in_one_server_process_with_loads_and_unloads(folders, tmp_path):
    """The real server with 10 peft LoRA folders and three runs (MOELoRA, top-k MixLoRA, PEDRO): 16 model ids,
    mixed requests 16 at a time through the openai client while one adapter is unloaded and another loaded."""
    import asyncio

    import httpx
    import openai
    from test_serve_openai import API_KEY, start_server

    tokenizer = tiny_tokenizer()
    options = []
    for index in range(10):
        name = f"lora{index}"
        targets = [("q_proj", "v_proj"), ("q_proj", "k_proj", "o_proj", "up_proj"), ("down_proj", "gate_proj")][
            index % 3
        ]
        folders[name] = save_peft(tmp_path / name, [2, 4, 8][index % 3], seed=10 + index, targets=targets)
        options += ["--adapter", f"{name}={folders[name]}"]
    for name in ("moe", "topk", "pedro"):
        options += ["--adapter", f"{name}={folders[name]}"]
    folders["late"] = save_peft(tmp_path / "late", 4, seed=99)
    process, url = start_server(None, *options, "--model", "tiny-llama")
    models = [f"lora{i}" for i in range(10)] + ["moe/a", "moe/b", "moe/c", "topk", "pedro/x", "pedro/a"]
    task_of = {"moe/a": 0, "moe/b": 1, "moe/c": 2, "pedro/x": 0, "pedro/a": 1}
    cases = [(models[i % 16], PROMPTS[i % 5], 2 + i % 10) for i in range(96)]

    def expected(model: str, prompt: str, max_tokens: int) -> str:
        name = model.split("/")[0]
        tokens = alone(folders, tokenizer, name, task_of.get(model), prompt, max_tokens)
        return tokenizer.decode(tokens, skip_special_tokens=True)

    async def load() -> tuple[list, list, str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as api:
            listed = [model.id async for model in api.models.list()]
            limit = asyncio.Semaphore(16)

            async def one(model, prompt, max_tokens):
                async with limit:
                    answer = await api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
                    return answer.choices[0].text

            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                requests = [asyncio.create_task(one(*case)) for case in cases]
                await asyncio.sleep(0.2)
                unloaded = await http.post("/v1/unload_lora_adapter", json={"lora_name": "lora9"})
                loaded = await http.post(
                    "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(folders["late"])}
                )
                bad = await http.post(
                    "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "nothing")}
                )
                assert (unloaded.status_code, loaded.status_code, bad.status_code) == (200, 200, 400)
                assert "nothing" in bad.json()["error"]["message"]
                answers = await asyncio.gather(*requests, return_exceptions=True)
                late = await one("late", PROMPTS[0], 8)
                with pytest.raises(openai.NotFoundError):
                    await one("lora9", PROMPTS[0], 8)
            return listed, answers, late

    try:
        listed, answers, late = asyncio.run(load())
    finally:
        process.kill()
        process.wait(30)
    assert listed == models
    for (model, prompt, max_tokens), answer in zip(cases, answers, strict=True):
        if isinstance(answer, openai.NotFoundError):  # sent to lora9 after it was unloaded
            assert model == "lora9"
            continue
        assert answer == expected(model, prompt, max_tokens), model
    assert late == tokenizer.decode(alone(folders, tokenizer, "late", None, PROMPTS[0], 8), skip_special_tokens=True)


def test_a_request_waiting_for_an_unloaded_adapter_gets_a_clear_error(folders):
    tokenizer = tiny_tokenizer()
    engine = engine_for(folders, ["p4", "p8"])
    errors = []
    waiting = engine.sequence(engine.request("p4", tokenizer(PROMPTS[0])["input_ids"]), on_error=errors.append)
    engine.unload_adapter("p4")  # after the request was accepted, before it was admitted
    engine.admit([waiting])
    assert [(e.status, "unloaded" in e.message) for e in errors] == [(503, True)] and not engine.running
