"""The wheel as a user installs it (README, "Install"): built from a copy of the checkout with no deprecation,
installed without extras into a fresh virtual environment without warnings, it trains, and `loramix serve` says
in one line which extra it needs; with the `serve` extra the server answers /health. About two minutes."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.install

ROOT = Path(__file__).parents[1]
WHEEL = "dist/loramix-0.1.0-py3-none-any.whl"
# The README's install lines; each runs as written, its `pip` being `python -m pip` of the environment at hand.
TORCH = "pip install torch==2.13.0"
BUILD = "pip wheel --no-deps --wheel-dir dist ."
CORE = f"pip install {WHEEL}"
SERVE = f"pip install '{WHEEL}[serve]'"
# this machine's pip configuration names local indexes that lack some packages; pip says so for each one
MACHINE_NOTE = "is ignored: it is neither a file nor a directory"
# without PYTHONPATH: a test run's `PYTHONPATH=src` would import the checkout instead of the installed wheel
ENVIRONMENT = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(command: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, env=ENVIRONMENT, capture_output=True, text=True, timeout=timeout
    )


def pip(python: Path, line: str, cwd: Path, *options: str) -> str:
    done = run([python, "-m", *shlex.split(line), *options], cwd)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def warnings(output: str) -> list[str]:
    lines = [line for line in output.splitlines() if MACHINE_NOTE not in line]
    return [line for line in lines if "warning" in line.lower() or "deprecat" in line.lower()]


def test_the_readme_install_lines_are_the_ones_tested():
    readme = (ROOT / "README.md").read_text()
    assert all(line in readme for line in (TORCH, BUILD, CORE, SERVE))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the checkout (what a clone holds: no build or egg-info folders)."""
    checkout = tmp_path_factory.mktemp("checkout")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, checkout)
    shutil.copytree(ROOT / "src", checkout / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    # -v shows the build backend's output, where setuptools prints its deprecations
    output = pip(Path(sys.executable), BUILD, checkout, "-v")
    assert not [line for line in output.splitlines() if "deprecat" in line.lower()], output
    return checkout / WHEEL


def test_the_wheel_states_its_licence(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("loramix-0.1.0.dist-info/METADATA").decode()
        licence = archive.read("loramix-0.1.0.dist-info/licenses/LICENSE").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence


def test_the_core_install_trains_and_serve_names_its_extra(tmp_path, wheel):
    # 1.3 GB with torch, left to pytest's clean-up of old temporary folders: removing it here took a minute
    # on a busy machine
    environment = tmp_path / "venv"
    run([sys.executable, "-m", "venv", environment], tmp_path).check_returncode()
    python, loramix = environment / "bin" / "python", environment / "bin" / "loramix"
    checkout = wheel.parents[1]
    pip(python, TORCH, checkout)
    output = pip(python, CORE, checkout)
    assert not warnings(output), output
    installed = next(line for line in output.splitlines() if line.startswith("Successfully installed"))
    assert " loramix-0.1.0" in installed and " torch-" not in installed  # the torch installed first is kept

    shown = run([loramix, "--help"], tmp_path)
    assert shown.returncode == 0 and all(c in shown.stdout for c in ("train", "serve", "compose")), shown.stderr
    rows = [{"task": "parity", "prompt": f"{n}?", "answer": ["even", "odd"][n % 2]} for n in range(20)]
    (tmp_path / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {
        "model": "tiny-llama",
        "tasks": ["parity"],
        "task_files": [str(tmp_path / "parity.jsonl")],
        "max_length": 32,
        "eval_examples": 3,
        "training": {"steps": 2, "batch_size": 2, "warmup_steps": 1},
        "mixlora": {"target_modules": ["q_proj"], "num_experts": 2, "expert_rank": 2},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    trained = run([loramix, "train", "-c", tmp_path / "tiny.yaml", "--run", tmp_path / "run"], tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert {"metrics.json", "report.md", "adapter"} <= {p.name for p in (tmp_path / "run").iterdir()}

    served = run([loramix, "serve", "--run", tmp_path / "run"], tmp_path)
    assert served.returncode == 1 and served.stdout == "", served.stdout + served.stderr
    message = "error: the HTTP server needs uvicorn, which is not installed: pip install 'loramix[serve]'"
    assert served.stderr.splitlines() == [message]

    assert not warnings(pip(python, SERVE, checkout)), "the serve extra installs with warnings"
    assert health(loramix, tmp_path / "run", tmp_path) == 200


def health(loramix: Path, run_dir: Path, cwd: Path) -> int:
    """Start `loramix serve` on a free loopback port; the status of its first answer to GET /health."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(loramix), "serve", "--run", str(run_dir), "--port", str(port), "--max-new-tokens", "16"]
    log = cwd / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=cwd, env=ENVIRONMENT, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    return response.status
            except OSError:  # not listening yet
                time.sleep(0.5)
        raise AssertionError("the server did not answer /health within 120 s")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
