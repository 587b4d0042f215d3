"""lm-evaluation-harness drives a loramix run: its scores equal loramix's own, offline, on a tiny model."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import loramix  # noqa: E402
from loramix import MixLoraConfig  # noqa: E402
from loramix.data import get_task, load_jsonl_tasks  # noqa: E402
from loramix.data.encode import template_parts  # noqa: E402
from loramix.evaluate import score_choices  # noqa: E402
from loramix.harness import LoramixLM  # noqa: E402
from loramix.models import tiny_llama, tiny_tokenizer  # noqa: E402

ROUTERS = {
    "sequence-topk": dict(router="topk", routing_level="sequence"),
    "task": dict(router="task", num_tasks=2),
}


def write_run(run, task_file, router: str) -> loramix.MixLoraModel:
    """A run folder (recipe and adapter with random experts) of a tiny Llama on the two parity tasks."""
    config = MixLoraConfig("all-linear", num_experts=4, expert_rank=2, top_k=2, **ROUTERS[router])
    model = loramix.wrap(tiny_llama(), config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    run.mkdir()
    recipe = {"name": "run", "model": "tiny-llama", "tasks": ["parity", "parity2"], "task_files": [str(task_file)]}
    (run / "recipe.yaml").write_text(json.dumps(recipe | {"max_length": 64, "mixlora": config.to_dict()}))
    model.save_pretrained(run / "adapter")
    return model


def write_harness_task(folder, examples, tokenizer) -> None:
    """A harness multiple-choice task over a local JSONL file: the contexts are the chat-template prompts that
    loramix scores and the choices the answers as loramix writes them (with the end of turn). The harness moves a
    context's trailing white space into the continuation, so the prompt's final newline is written there."""
    before, after, lead, end = template_parts(tokenizer)
    newline = after[len(after.rstrip()) :]
    docs = [
        {
            "context": before + example.prompt + after.rstrip(),
            "choices": [newline + lead + choice + end for choice in example.choices],
            "gold": example.choices.index(example.answer),
        }
        for example in examples
    ]
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(doc) for doc in docs))
    (folder / "parity.yaml").write_text(
        "\n".join(
            [
                "task: loramix_parity",
                "dataset_path: json",
                "dataset_kwargs:",
                f"  data_files: {{test: {folder / 'docs.jsonl'}}}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{context}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{gold}}"',
                'target_delimiter: ""',
                "metric_list:",
                "  - metric: acc",
            ]
        )
    )


@pytest.mark.parametrize("router", ROUTERS)
def test_harness_accuracy_equals_loramix_choice_scoring(tmp_path, task_file, router):
    model = write_run(tmp_path / "run", task_file, router)
    load_jsonl_tasks(task_file)
    tokenizer = tiny_tokenizer()
    examples = get_task("parity").load()["test"]
    write_harness_task(tmp_path, examples, tokenizer)
    ours = score_choices(model, tokenizer, examples, task_id=0)
    ours_right = [
        max(range(2), key=lambda i: scores[i][0]) == e.choices.index(e.answer)
        for e, scores in zip(examples, ours, strict=True)
    ]

    lm = LoramixLM(run=str(tmp_path / "run"), task="parity", batch_size=3, bf16=False)
    results = simple_evaluate(
        model=lm, tasks=["loramix_parity"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True
    )
    samples = sorted(results["samples"]["loramix_parity"], key=lambda sample: sample["doc_id"])
    for sample, scores in zip(samples, ours, strict=True):
        harness_scores = [float(response[0]) for response in sample["filtered_resps"]]
        # the harness's scores add the prompt's final newline, the same log-probability for every choice
        shifts = [theirs - total for theirs, (total, _) in zip(harness_scores, scores, strict=True)]
        assert shifts == pytest.approx([shifts[0]] * len(shifts), abs=1e-4) and shifts[0] < 0
    assert results["results"]["loramix_parity"]["acc,none"] == pytest.approx(sum(ours_right) / len(examples))


def per_request_scores(model, requests, task_id: int, max_length: int) -> list[tuple[float, bool]]:
    """The reference: one forward per request over its context and continuation (left-truncated to
    `max_length`), sequence-level routes pooled over the context and the white space that starts the
    continuation."""
    scores = []
    for _, context, continuation in requests:
        row = (context + continuation)[-(max_length + 1) :][:-1]
        lead = next(i for i, token in enumerate(continuation) if token not in WHITE_SPACE or i == len(continuation) - 1)
        prompt = torch.arange(len(row))[None] < len(row) - len(continuation) + 1 + lead
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row]), task_ids=torch.tensor([task_id]), prompt_mask=prompt).logits
        log_probs = logits[0, len(row) - len(continuation) :].float().log_softmax(-1)
        targets = torch.tensor(continuation)
        scores.append(
            (float(log_probs[torch.arange(len(targets)), targets].sum()), bool((log_probs.argmax(-1) == targets).all()))
        )
    return scores


WHITE_SPACE = (3, 4)  # "\n" and " " in tiny_tokenizer()


def grouped_requests() -> list:
    """Requests over a few contexts, as multiple-choice tasks give them: one-token and longer continuations,
    continuations that start with white space, a context too long for the model, a repeated request."""
    generator = torch.Generator().manual_seed(3)

    def tokens(count: int) -> list[int]:
        return torch.randint(5, 99, (count,), generator=generator).tolist()  # no white space, every id a character

    requests = []
    for length in (6, 9, 40):
        context = tokens(length)
        continuations = [[token] for token in tokens(4)] + [tokens(n) for n in (2, 3, 5)]
        continuations += [[3, *tokens(1)], [3, 4, *tokens(3)]]
        requests += [(("context", str(i)), context, continuation) for i, continuation in enumerate(continuations)]
    requests.append(requests[1])
    order = torch.randperm(len(requests), generator=generator).tolist()
    return [requests[i] for i in order]


@pytest.mark.parametrize("router", ROUTERS)
def test_requests_sharing_a_context_score_as_one_forward_each(tmp_path, task_file, router):
    model = write_run(tmp_path / "run", task_file, router)
    lm = LoramixLM(run=str(tmp_path / "run"), task="parity2", batch_size=2, bf16=False, max_length=24)
    requests = grouped_requests()
    got = lm._loglikelihood_tokens(requests)
    expected = per_request_scores(model, requests, task_id=1, max_length=24)
    assert [total for total, _ in got] == pytest.approx([total for total, _ in expected], abs=1e-4)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]

    shapes = []  # each forward's input: the context once, then one row per continuation longer than a token
    hook = lm._model.base_model.model.embed_tokens.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))
    context = requests[0][1][:5]
    lm._loglikelihood_tokens([(None, context, [token]) for token in (7, 8, 9)] + [(None, context, [7, 8, 9])])
    hook.remove()
    assert shapes == [(1, 5), (4, 2)]


def test_a_merged_task_scores_as_the_adapter(tmp_path, task_file):
    model = write_run(tmp_path / "run", task_file, "task")
    lm = LoramixLM(run=str(tmp_path / "run"), task="parity2", batch_size=4, bf16=False, max_length=24, merge="true")
    assert not isinstance(lm._model, loramix.MixLoraModel)
    requests = grouped_requests()
    got = lm._loglikelihood_tokens(requests)
    expected = per_request_scores(model, requests, task_id=1, max_length=24)
    assert [total for total, _ in got] == pytest.approx([total for total, _ in expected], abs=1e-4)
    with pytest.raises(ValueError, match="give true or false"):
        LoramixLM(run=str(tmp_path / "run"), task="parity2", merge="yes")
    write_run(tmp_path / "topk", task_file, "sequence-topk")
    with pytest.raises(ValueError, match="merging by task needs router='task'"):
        LoramixLM(run=str(tmp_path / "topk"), task="parity2", merge=True)


def test_rolling_loglikelihood_and_generation_follow_the_run(tmp_path, task_file):
    model = write_run(tmp_path / "run", task_file, "task")
    lm = LoramixLM(run=str(tmp_path / "run"), task="parity2", batch_size=2, bf16=False)
    text = "the quick brown fox jumps over the lazy dog"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = lm.tok_encode(text)
    ids = torch.tensor([[lm.prefix_token_id, *tokens[:-1]]])
    with torch.no_grad():
        log_probs = model(input_ids=ids, task_ids=torch.tensor([1])).logits[0].float().log_softmax(-1)
    assert rolling == pytest.approx(float(log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum()), abs=1e-4)

    prompt = "12?"
    (generated,) = lm.generate_until(
        [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6}), 0)]
    )
    prompt_ids = torch.tensor([lm.tok_encode(prompt)])
    expected = model.generate(
        input_ids=prompt_ids, task_ids=torch.tensor([1]), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert generated == tiny_tokenizer().decode(expected[0, prompt_ids.shape[1] :]).split("\n")[0]


def test_a_task_router_run_needs_its_task(tmp_path, task_file):
    write_run(tmp_path / "run", task_file, "task")
    with pytest.raises(ValueError, match="task router: name its task"):
        LoramixLM(run=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="not one the run"):
        LoramixLM(run=str(tmp_path / "run"), task="pubmedqa")


def test_the_cli_hands_its_arguments_to_the_harness(tmp_path, task_file):
    from typer.testing import CliRunner

    from loramix.cli import app

    write_run(tmp_path / "run", task_file, "task")
    load_jsonl_tasks(task_file)
    write_harness_task(tmp_path, get_task("parity").load()["test"], tiny_tokenizer())
    arguments = ["--model", "loramix", "--model_args", f"run={tmp_path / 'run'},task=parity,bf16=false"]
    arguments += ["--tasks", "loramix_parity", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["lm-eval", *arguments])
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert "acc,none" in json.loads(written.read_text())["results"]["loramix_parity"]
