"""Optional features without their extra: `import loramix` works, and each feature fails in one line that names
the extra installing what it lacks, from Python (an ImportError) and from the command line (no traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loramix.models import tiny_llama, tiny_tokenizer

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
HIDDEN = [
    "fastapi",
    "uvicorn",
    "prometheus_client",
    "lm_eval",
    "trl",
    "bitsandbytes",
    "nevergrad",
]  # every extra's packages

# Run in a fresh interpreter with HIDDEN blocked from import; prints {check: [python error, exit code, output]}.
CHECKS = """
import json, sys

for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed
base, recipe = sys.argv[2:]

import loramix  # the core needs no extra
from typer.testing import CliRunner

from loramix.cli import app


def python_error(call):
    try:
        call()
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def cli(*args):
    result = CliRunner().invoke(app, list(args))
    return [result.exit_code, result.output]


def serve_run():
    from loramix.serve import serve_run

    serve_run("/nowhere", "127.0.0.1", 0)


def create_app():
    import loramix.serve

    loramix.serve.create_app


def harness():
    import loramix.harness


def sft_trainer():
    from loramix.trainer import sft_trainer_class

    sft_trainer_class()


def quantized():
    from loramix.models import load_model

    load_model(base, quantization="8bit")


def compose():
    from loramix.compose import nevergrad_search

    nevergrad_search(lambda weights: 0.0, 2, 1, 0)


compose_cli = ["compose", "--upstream", "/nowhere", "--examples", "/nowhere.jsonl", "--out", "/nowhere"]
results = {
    "serve": [python_error(serve_run), *cli("serve", "--run", "/nowhere")],
    "serve-app": [python_error(create_app), None, None],
    "harness": [python_error(harness), *cli("lm-eval", "--help")],
    "trainer": [python_error(sft_trainer), None, None],
    "quant": [python_error(quantized), *cli("train", "-c", recipe, "--run", base + "-run", "--no-evaluate")],
    "compose": [python_error(compose), *cli(*compose_cli)],
}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory):
    """The results of CHECKS (one interpreter for all of them: each start imports torch and transformers)."""
    folder = tmp_path_factory.mktemp("extras")
    base = folder / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    (folder / "parity.jsonl").write_text(json.dumps({"task": "parity", "prompt": "2?", "answer": "even"}))
    recipe = {
        "model": str(base),
        "quantization": "8bit",
        "tasks": ["parity"],
        "task_files": [str(folder / "parity.jsonl")],
        "mixlora": {"target_modules": ["q_proj"], "num_experts": 2, "expert_rank": 2},
    }
    (folder / "quant.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-c", CHECKS, ",".join(HIDDEN), str(base), str(folder / "quant.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("check", "extra", "missing"),
    [
        ("serve", "serve", "uvicorn"),
        ("serve-app", "serve", "fastapi"),
        ("harness", "harness", "lm_eval"),
        ("trainer", "trainer", "trl"),
        ("quant", "quant", "bitsandbytes"),
        ("compose", "compose", "nevergrad"),
    ],
)
def test_a_feature_without_its_extra_names_the_extra_in_one_line(without_extras, check, extra, missing):
    python, exit_code, output = without_extras[check]
    advice = f"needs {missing}, which is not installed: pip install 'loramix[{extra}]'"
    assert python.startswith("MissingExtra: ") and python.endswith(advice) and "\n" not in python
    if exit_code is not None:  # the feature has a command
        assert exit_code == 1 and "Traceback" not in output, output
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(advice), output
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert canonicalize_name(missing) in {canonicalize_name(Requirement(r).name) for r in extras[extra]}
