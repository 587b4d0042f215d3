"""Regional compilation: `torch.compile` of each decoder block, the way large models are compiled for training
(one graph per block, shared by every block, so compiling costs one block's time, not the model's).

The routing context's state reaches a block only through attributes (a router's `step_route`, a block's
`loramix_block_input`), so a block compiles without a graph break for every router, and blocks that differ only
in their layers' names run the same graph. Sequence lengths become dynamic on the first new length (dynamo's
automatic dynamic shapes), so varying lengths cost one more compilation, not one per length. The loss, the
auxiliary losses and the hooks outside the blocks stay eager. Generation and loramix's evaluation run the blocks
eagerly (`eager_if_compiled`): a growing key-value cache would recompile them per step.

Decoding compiles differently: `static_decoding` gives `generate` a static key-value cache, whose shapes do not
change from step to step, and transformers compiles the whole forward of a decoding step once.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from loramix.models import decoder_blocks

BACKENDS = ("inductor", "aot_eager", "eager")  # inductor compiles kernels; the others trace only (for checks)


def compile_problem(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot compile here (None if it can): the platform, or a missing C++ compiler / Triton."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "the inductor backend needs Triton on CUDA (pip install triton)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # inductor raises its own error type when no compiler is found
        return f"the inductor backend needs a C++ compiler on the CPU (install g++ or set CXX): {error}"
    return None


def compile_blocks(model: nn.Module, backend: str = "inductor", *, mode: str | None = None) -> bool:
    """Compile every decoder block of `model` (a MixLoraModel or any Hugging Face causal LM, peft's included) in
    place, each as one graph (`fullgraph=True`). Returns False, with a warning that says why, where `backend`
    cannot compile on this machine: the model then trains eagerly."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
    blocks = decoder_blocks(model, "compiling")
    device = next(model.parameters()).device
    problem = compile_problem(backend, device)
    if problem is not None:
        warnings.warn(f"not compiling, training eagerly: {problem}", stacklevel=2)
        return False
    for block in blocks:
        block.compile(backend=backend, mode=mode, fullgraph=True)
    return True


def static_decoding(model: nn.Module, backend: str = "inductor") -> dict:
    """Keyword arguments for `generate` that decode with a static key-value cache and a compiled forward
    (transformers' own compilation in `generate`): CUDA graphs on a GPU (inductor's `reduce-overhead` mode),
    compiled kernels on a CPU. The prompt's forward runs eagerly; every later step runs the compiled graph, and
    what is computed once per prompt (`prompt` and sequence-level routes, task ids) enters it as inputs. {}
    (eager decoding), with a warning that says why, where `backend` cannot compile here or the model's blocks
    are compiled for training (`generate` runs those eagerly)."""
    from transformers import CompileConfig

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
    device = next(model.parameters()).device
    problem = compile_problem(backend, device)
    if problem is None and is_compiled(model):
        problem = "its decoder blocks are compiled for training; load the adapter on a fresh base model to decode"
    if problem is not None:
        warnings.warn(f"decoding eagerly: {problem}", stacklevel=2)
        return {}
    graphs = device.type == "cuda" and backend == "inductor"
    config = CompileConfig(backend=backend, mode="reduce-overhead" if graphs else None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told to
    return {"cache_implementation": "static", "compile_config": config}


def is_compiled(model: nn.Module) -> bool:
    modules = model.modules() if isinstance(model, nn.Module) else ()
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in modules)


def eager_if_compiled(model: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which compiled blocks run eagerly (for generation and evaluation)."""
    return torch.compiler.set_stance("force_eager") if is_compiled(model) else contextlib.nullcontext()
