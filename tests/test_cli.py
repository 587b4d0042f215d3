"""The command line on a tiny recipe: train end to end, inspect, resume, and one-line errors for users."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from loramix.cli import app


@pytest.fixture
def config(tmp_path):
    """A tiny recipe file (tiny Llama, a JSONL task, 2 steps)."""
    rows = [{"task": "parity", "prompt": f"{n}?", "answer": ["even", "odd"][n % 2]} for n in range(20)]
    (tmp_path / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {
        "model": "tiny-llama",
        "tasks": ["parity"],
        "task_files": [str(tmp_path / "parity.jsonl")],
        "max_length": 32,
        "eval_examples": 3,
        "training": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "save_every": 1},
        "mixlora": {"target_modules": ["q_proj"], "router": "remix", "num_experts": 4, "expert_rank": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_evaluates_reports_and_inspect_prints_the_table(tmp_path, config):
    run = tmp_path / "run[serve]"  # printed literally, not read as rich markup
    result = invoke("train", "--config", config, "--run", run, "training.steps=3", "mixlora.top_k=1")
    assert result.exit_code == 0, result.output
    assert "parity" in result.output and "zero-shot" in result.output and "majority" in result.output
    assert {"metrics.json", "report.md", "adapter"} <= {p.name for p in run.iterdir()}
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["training"]["steps"] == 3 and saved["mixlora"]["top_k"] == 1
    result = invoke("inspect", run)
    assert result.exit_code == 0 and "parity" in result.output and "trained 3 steps" in result.output
    assert "run[serve]: test scores" in result.output


def test_resume_continues_a_run_with_its_own_recipe(tmp_path, config):
    run = tmp_path / "run"
    assert invoke("train", "-c", config, "--run", run, "--no-evaluate").exit_code == 0
    result = invoke("train", "--run", run, "--resume", "--no-evaluate", "training.steps=4")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["training.steps=0"], "training.steps=0 is invalid"),
        (["mixlora.router=magic"], "MixLoraConfig.router='magic' is invalid"),
        (["tasks=[pubmedqa]", "data_dir=/nowhere"], "no medical data folder"),
        (["--config", "/nowhere.yaml"], "no recipe at /nowhere.yaml"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, config, arguments, message):
    arguments = arguments if "--config" in arguments else ["--config", config, *arguments]
    result = invoke("train", "--run", tmp_path / "run", "--no-evaluate", *arguments)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_eval_and_inspect_need_a_run_folder(tmp_path):
    assert "is missing" in invoke("eval", "--run", tmp_path).output
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 1 and "metrics.json is missing" in result.output


@pytest.fixture
def task_run(tmp_path, config):
    """A trained 2-task run of the `task` router (MOELoRA), without evaluation."""
    rows = [{"task": "parity2", "prompt": f"{n}!", "answer": ["even", "odd"][n % 2]} for n in range(20)]
    (tmp_path / "parity2.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "task-run"
    settings = ["tasks=[parity, parity2]", f"task_files=[{tmp_path / 'parity.jsonl'}, {tmp_path / 'parity2.jsonl'}]"]
    settings += ["mixlora.router=task", "mixlora.num_tasks=2", "mixlora.top_k=1"]
    result = invoke("train", "-c", config, "--run", run, "--no-evaluate", *settings)
    assert result.exit_code == 0, result.output
    return run


def test_export_writes_a_peft_adapter_per_task_and_compose_combines_them(tmp_path, task_run):
    for task in ("parity", "parity2"):
        result = invoke("export", "--run", task_run, "--task", task, "--out", tmp_path / task)
        assert result.exit_code == 0, result.output
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / task).iterdir()}
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"{n}?", "answer": "even"}) + "\n" for n in (2, 4, 6)))
    upstream = [item for task in ("parity", "parity2") for item in ("--upstream", tmp_path / task)]
    arguments = ["--examples", examples, "--out", tmp_path / "composed", "--model", "tiny-llama", "--budget", 3]
    result = invoke("compose", *upstream, *arguments)
    assert result.exit_code == 0, result.output
    weights = json.loads((tmp_path / "composed" / "weights.json").read_text())
    assert [entry["adapter"] for entry in weights["upstream"]] == [str(tmp_path / t) for t in ("parity", "parity2")]
    assert "weights: parity " in result.output and (tmp_path / "composed" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["export", "--task", "nope", "--out", "x"], "was not trained on task 'nope'"),
        (["compose", "--upstream", "/nowhere", "--examples", "/nowhere.jsonl", "--out", "x"], "/nowhere"),
        (["serve", "--run", "/nowhere"], "/nowhere"),
    ],
)
def test_export_compose_and_serve_errors_are_one_line(tmp_path, task_run, command, message):
    if command[0] == "export":
        command = [*command, "--run", task_run]
    result = invoke(*command)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
