"""torchrun with 2 CPU processes (gloo): each rank draws other data, all ranks end with the same adapter."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROUTERS = ["remix", "topk", "task", "prompt", "soft", "contrastive", "lora"]
WORKER = """
import os, sys
from pathlib import Path
from safetensors.torch import save_file
import loramix.train as training
from loramix.recipe import load_recipe

folder = Path(sys.argv[1])
built = []
build = training.build_model
training.build_model = lambda *args: built.append(build(*args)) or built[-1]
for adapter in sys.argv[2:]:
    training.train(load_recipe(folder / f"{adapter}.yaml"), folder / f"run-{adapter}", evaluate=False)
    model = built[-1][0]
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, folder / f"{adapter}-rank{os.environ['RANK']}.safetensors")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipes(folder) -> None:
    rows = [{"task": t, "prompt": f"{n}?", "answer": ["even", "odd"][n % 2]} for t in ("a", "b") for n in range(30)]
    (folder / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for adapter in ROUTERS:
        mixlora = {"target_modules": "all-linear", "router": adapter, "num_experts": 4, "expert_rank": 2, "top_k": 2}
        if adapter == "contrastive":
            mixlora |= {"router": "topk", "contrastive_loss_weight": 0.1, "memory_queue_size": 8}
        recipe = {
            "name": adapter,
            "model": "tiny-llama",
            "tasks": ["a", "b"],
            "task_files": [str(folder / "parity.jsonl")],
            "max_length": 40,
            "training": {"steps": 3, "batch_size": 2, "grad_accumulation": 2, "warmup_steps": 1, "lr": 1e-2},
            **({"lora": {"r": 2}} if adapter == "lora" else {"mixlora": mixlora}),
        }
        (folder / f"{adapter}.yaml").write_text(yaml.safe_dump(recipe))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_processes_end_with_identical_weights_for_every_router(tmp_path):
    write_recipes(tmp_path)
    (tmp_path / "worker.py").write_text(WORKER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launcher = subprocess.Popen(
        [*command, str(tmp_path / "worker.py"), str(tmp_path), *ROUTERS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,  # so that a hang can be ended with the workers
    )
    try:
        _, stderr = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr[-4000:]
    for adapter in ROUTERS:
        zero, one = (load_file(tmp_path / f"{adapter}-rank{rank}.safetensors") for rank in (0, 1))
        assert zero.keys() == one.keys()
        assert all(torch.equal(zero[name], one[name]) for name in zero), adapter
        lora_b = [name for name in zero if "lora_B" in name]
        assert lora_b and any(zero[name].abs().sum() > 0 for name in lora_b), f"{adapter}: nothing trained"
        state = json.loads((tmp_path / f"run-{adapter}" / "checkpoint" / "state.json").read_text())
        samplers = [rank["sampler"] for rank in state["ranks"]]
        assert state["world_size"] == 2 and samplers[0] != samplers[1]  # the ranks drew different data
