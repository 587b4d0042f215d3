"""Gather the parts of a GPU benchmark script (benchmarks/gpu.sh, gpu_llama8b.sh) into one JSON file.

    python benchmarks/gpu_summary.py OUT.json PARTS_DIR

Each part left NAME.rc (its exit code: 124 when stopped at its time limit), NAME.txt (what it printed),
NAME.err and, for the training parts, NAME.json (the results as the script wrote them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def summarize(out: Path, folder: Path) -> dict:
    parts = {}
    for rc in sorted(folder.glob("*.rc")):
        name = rc.stem
        data = folder / f"{name}.json"
        parts[name] = {
            "exit_code": int(rc.read_text()),
            "results": json.loads(data.read_text()) if data.is_file() else None,
            "printed": (folder / f"{name}.txt").read_text(),
            "errors_tail": (folder / f"{name}.err").read_text()[-2000:],
        }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {"device": device, "torch": torch.__version__, "parts": parts}
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}: " + ", ".join(f"{n} exit {p['exit_code']}" for n, p in parts.items()))
    return summary


if __name__ == "__main__":
    summarize(Path(sys.argv[1]), Path(sys.argv[2]))
