"""LoRAHub (arXiv 2307.13269) for causal LMs: a gradient-free weighted combination of trained LoRA adapters.

Given N peft LoRA adapters of the same shapes and a few examples of a new task, find weights w (N) with
A_hat = sum_i w_i A_i and B_hat = sum_i w_i B_i (the factors are combined separately, not Delta W) that minimise
the mean cross-entropy of the examples' answer tokens + l1 * mean_i |w_i|, with nevergrad's NGOpt (seed 0 from
w = 0 as LoRAHub, other seeds from their own random start).
Each adapter's scaling (lora_alpha / r, rslora, alpha_pattern) is folded into its B first, so adapters trained
with different alphas combine correctly; with equal scalings this is exactly LoRAHub's combination.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import Tensor, nn

from loramix.data import Example, collate, encode_example
from loramix.data.jsonl import read_jsonl
from loramix.export import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, save_peft_adapter
from loramix.extras import requires
from loramix.models import load_model

WEIGHT_BOUND = 1.5
START_SPREAD = 0.5  # seeds other than 0 start from a uniform draw in [-0.5, 0.5]^N


# ---- upstream adapters ----------------------------------------------------------------------------------------
@dataclass
class Upstream:
    """N validated peft LoRA adapters: per module the stacked factors A (N, r, d_in) and B (N, d_out, r), each
    adapter's scaling folded into its B. `config` (the first adapter's) decides which modules peft adapts."""

    paths: list[Path]
    config: LoraConfig
    factors: dict[str, tuple[Tensor, Tensor]]

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, device: torch.device | str) -> Upstream:
        factors = {name: (a.to(device), b.to(device)) for name, (a, b) in self.factors.items()}
        return dataclasses.replace(self, factors=factors)

    def combine(self, weights: Sequence[float]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per module (A_hat, B_hat) = (sum_i w_i A_i, sum_i w_i s_i B_i)."""
        factors = {}
        for name, (a, b) in self.factors.items():
            w = torch.as_tensor(weights, dtype=a.dtype, device=a.device)
            factors[name] = (torch.tensordot(w, a, dims=1), torch.tensordot(w, b, dims=1))
        return factors

    def composed_config(self) -> LoraConfig:
        """The first adapter's config with scaling 1 everywhere (the scalings are folded into B)."""
        config = self.config
        return dataclasses.replace(
            config,
            lora_alpha=config.r,
            alpha_pattern=dict(config.rank_pattern),
            use_rslora=False,
            inference_mode=True,
        )

    def save(self, directory: str | Path, weights: Sequence[float]) -> Path:
        """The combination with these weights as a peft adapter (adapter_config.json + adapter_model.safetensors)."""
        return save_peft_adapter(directory, self.combine(weights), self.composed_config())


@dataclass
class _Adapter:
    path: Path
    config: LoraConfig
    factors: dict[str, tuple[Tensor, Tensor]]  # per module (A, scaling * B)


def _read_adapter(path: Path) -> _Adapter:
    """A peft LoRA adapter folder, each module's scaling folded into its B."""
    config_path, weights_path = path / PEFT_CONFIG_NAME, path / PEFT_WEIGHTS_NAME
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} is missing: an upstream adapter is a peft LoRA folder ({path})")
    raw = json.loads(config_path.read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {raw.get('peft_type')} adapter; LoRAHub composes LoRA adapters")
    config = LoraConfig.from_pretrained(str(path))
    if config.use_dora:
        raise ValueError(f"{path} is a DoRA adapter (use_dora=true); LoRAHub composes plain LoRA adapters")
    pairs: dict[str, list] = {}
    for key, tensor in load_file(weights_path).items():
        module, dot, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or not dot or kind not in ("A.weight", "B.weight"):
            raise ValueError(
                f"{weights_path} holds {key!r}: only LoRA factors ({PEFT_PREFIX}<module>.lora_A/lora_B.weight) "
                f"can be composed, not biases, DoRA magnitudes or modules_to_save"
            )
        pairs.setdefault(module, [None, None])[kind == "B.weight"] = tensor.float()
    factors = {}
    for module, (a, b) in pairs.items():
        if a is None or b is None:
            raise ValueError(f"{weights_path}: module {module!r} has only one of lora_A and lora_B")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        rank = a.shape[0]
        factors[module] = (a, b * (alpha / math.sqrt(rank) if config.use_rslora else alpha / rank))
    return _Adapter(path, config, factors)


def _model_name(config: LoraConfig) -> str | None:
    """The base model's last path part: 'org/Model' and '/cache/Model' name the same model."""
    name = config.base_model_name_or_path
    return Path(name.rstrip("/")).name if name else None


def _difference(adapter: _Adapter, first: _Adapter) -> str | None:
    """How `adapter` differs from `first` in a way that forbids combining them, or None."""
    name, first_name = _model_name(adapter.config), _model_name(first.config)
    if name and first_name and name != first_name:
        return (
            f"base models differ: {adapter.config.base_model_name_or_path!r} vs "
            f"{first.config.base_model_name_or_path!r}"
        )
    modules, first_modules = set(adapter.factors), set(first.factors)
    if modules != first_modules:
        return (
            f"target modules differ: only {adapter.path} adapts {sorted(modules - first_modules)[:3]}, "
            f"only {first.path} adapts {sorted(first_modules - modules)[:3]}"
        )
    for module, (a, b) in adapter.factors.items():
        first_a, first_b = first.factors[module]
        if a.shape[0] != first_a.shape[0]:
            return f"ranks differ: r={a.shape[0]} vs r={first_a.shape[0]} (module {module})"
        if a.shape != first_a.shape or b.shape != first_b.shape:
            return (
                f"shapes differ at {module}: A {tuple(a.shape)}, B {tuple(b.shape)} vs "
                f"A {tuple(first_a.shape)}, B {tuple(first_b.shape)}"
            )
    return None


def load_upstream(paths: Sequence[str | Path]) -> Upstream:
    """Read and check N >= 2 peft LoRA adapters: same base model, target modules, ranks and shapes."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"LoRAHub composes at least 2 upstream adapters, got {len(paths)}: {[str(p) for p in paths]}")
    adapters = [_read_adapter(path) for path in paths]
    first = adapters[0]
    for adapter in adapters[1:]:
        difference = _difference(adapter, first)
        if difference:
            raise ValueError(f"upstream adapters {first.path} and {adapter.path} cannot be combined: {difference}")
    stacked = {
        module: tuple(torch.stack([adapter.factors[module][i] for adapter in adapters]) for i in (0, 1))
        for module in first.factors
    }
    return Upstream(paths, first.config, stacked)


# ---- examples -------------------------------------------------------------------------------------------------
def _example(row: object, where: str) -> Example:
    if isinstance(row, Example):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
    for key in ("prompt", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {row.get(key)!r}")
    return Example(str(row.get("task", "composed")), row["prompt"], row["answer"])


def read_examples(examples: str | Path | Sequence[Example | dict]) -> list[Example]:
    """Examples from a JSONL file of {"prompt", "answer"} rows, or a list of Example or such dicts."""
    if isinstance(examples, (str, Path)):
        path = Path(examples)
        if not path.is_file():
            raise FileNotFoundError(f"no examples file at {path}")
        rows = [_example(row, f"{path}:{number}") for number, row in read_jsonl(path)]
        source = str(path)
    else:
        rows = [_example(row, f"examples[{index}]") for index, row in enumerate(examples)]
        source = "the examples list"
    if not rows:
        raise ValueError(f"{source} holds no examples: LoRAHub needs a few prompt/answer pairs of the new task")
    return rows


def encode_examples(examples: list[Example], tokenizer, max_length: int) -> dict[str, Tensor]:
    """One right-padded batch with labels on the answer tokens only."""
    rows = [encode_example(example, tokenizer, max_length) for example in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(rows, pad)


# ---- in-place evaluation --------------------------------------------------------------------------------------
class Composer:
    """The base model with one peft LoRA whose factors each candidate's combination overwrites in place.

    A context manager: leaving it removes the LoRA and gives the model back as it was.
    """

    def __init__(self, model: nn.Module, upstream: Upstream) -> None:
        device = next(model.parameters()).device
        self.model, self.upstream = model, upstream.to(device)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._was_training = model.training
        self.peft_model = get_peft_model(model, upstream.composed_config()).eval()
        self.layers = {
            name: module
            for name, module in self.peft_model.base_model.model.named_modules()
            if isinstance(module, LoraLayer)
        }
        if set(self.layers) != set(upstream.factors):
            self.close()
            raise ValueError(
                f"the config of {upstream.paths[0]} targets {len(self.layers)} modules of this model "
                f"(e.g. {sorted(self.layers)[:2]}) but the adapters hold {len(upstream.factors)} "
                f"(e.g. {sorted(upstream.factors)[:2]}): is this their base model?"
            )

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float]) -> None:
        for name, (a, b) in self.upstream.combine(weights).items():
            layer = self.layers[name]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)

    def cross_entropy(self, weights: Sequence[float], batch: dict[str, Tensor]) -> float:
        """Mean cross-entropy of the labelled tokens of `batch` under the combination with these weights."""
        self.set_weights(weights)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.peft_model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            labels = batch["labels"][:, 1:].to(device)
            return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100))

    def close(self) -> None:
        self.peft_model.unload()
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))
        self.model.train(self._was_training)

    def __enter__(self) -> Composer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- search ---------------------------------------------------------------------------------------------------
def search_start(dimension: int, seed: int) -> np.ndarray:
    """Where the search of `seed` starts: w = 0 (LoRAHub's start) for seed 0, else a uniform draw from
    [-START_SPREAD, START_SPREAD]^dimension. At LoRAHub's budgets NGOpt picks Cobyla, which is deterministic: the
    start is what makes seeds different searches."""
    if seed == 0:
        return np.zeros(dimension)
    return np.random.default_rng(seed).uniform(-START_SPREAD, START_SPREAD, dimension)


def _nevergrad():
    """nevergrad, LoRAHub's optimizer: the `compose` extra, which the core install lacks."""
    with requires("compose", "LoRAHub composition"):
        import nevergrad

    return nevergrad


def nevergrad_search(objective: Callable[[np.ndarray], float], start: np.ndarray, budget: int, seed: int) -> None:
    """Minimise `objective` over [-1.5, 1.5]^dimension from `start` with NGOpt, `budget` evaluations, seeded."""
    ng = _nevergrad()
    parametrization = ng.p.Array(init=start, lower=-WEIGHT_BOUND, upper=WEIGHT_BOUND)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    try:
        with warnings.catch_warnings():  # scipy's COBYLA complains about nevergrad's (valid) settings
            warnings.filterwarnings("ignore", message="COBYLA: Invalid", category=UserWarning)
            for _ in range(budget):
                candidate = optimizer.ask()
                optimizer.tell(candidate, objective(candidate.value))
    finally:
        # NGOpt's recast optimizers (Cobyla at small budgets) run in a thread that stops only once collected.
        del optimizer, parametrization
        gc.collect()


@dataclass
class CompositionResult:
    """The best weights found, their objective (`loss`) and cross-entropy (`ce`), and every evaluation."""

    upstream: Upstream
    weights: list[float]
    loss: float
    ce: float
    history: list[dict] = field(repr=False)
    settings: dict

    @property
    def losses(self) -> list[float]:
        """The objective of each evaluation, in order (the loss curve)."""
        return [h["loss"] for h in self.history]

    def save(self, directory: str | Path) -> Path:
        """Write the composed peft adapter, weights.json, search.json and search.png into `directory`."""
        directory = Path(directory)
        self.upstream.save(directory, self.weights)
        adapters = [{"adapter": str(p), "weight": w} for p, w in zip(self.upstream.paths, self.weights, strict=True)]
        summary = {"upstream": adapters, "loss": self.loss, "ce": self.ce, **self.settings}
        (directory / "weights.json").write_text(json.dumps(summary, indent=2))
        search = {**self.settings, "best": summary, "evaluations": self.history}
        (directory / "search.json").write_text(json.dumps(search, indent=2))
        plot_search(self.history, directory / "search.png")
        return directory


def plot_search(history: list[dict], path: Path) -> Path:
    """The objective of each evaluation and the best so far."""
    from matplotlib.figure import Figure

    losses = [h["loss"] for h in history]
    steps = range(1, len(losses) + 1)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.plot(steps, losses, "o", markersize=3, alpha=0.6, label="evaluation")
    axes.plot(steps, np.minimum.accumulate(losses), label="best so far")
    axes.set(xlabel="evaluation", ylabel="cross-entropy + l1 term", title="LoRAHub search")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def compose(
    model: nn.Module,
    upstream: Sequence[str | Path] | Upstream,
    examples: str | Path | Sequence[Example | dict],
    budget: int = 40,
    l1: float = 0.05,
    seed: int = 0,
    *,
    tokenizer,
    max_length: int = 1024,
) -> CompositionResult:
    """LoRAHub: weights for the `upstream` peft LoRA adapters (folders, or `load_upstream`'s result) that fit
    `examples` (a JSONL file or a list of Example / {"prompt", "answer"}) on the base causal LM `model`.

    Minimises the mean answer-token cross-entropy + l1 * mean |w| with NGOpt over `budget` evaluations within
    [-1.5, 1.5], from w = 0 for seed 0 and from a random point of the seed otherwise (`search_start`). `model` is
    left as it was; `result.save(dir)` writes the composed adapter.
    """
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    if not l1 >= 0:
        raise ValueError(f"l1 must be >= 0, got {l1!r}")
    adapters = upstream if isinstance(upstream, Upstream) else load_upstream(upstream)
    batch = encode_examples(read_examples(examples), tokenizer, max_length)
    history: list[dict] = []
    with Composer(model, adapters) as composer:

        def objective(weights: np.ndarray) -> float:
            ce = composer.cross_entropy(weights, batch)
            loss = ce + l1 * float(np.abs(weights).mean())
            history.append({"evaluation": len(history) + 1, "loss": loss, "ce": ce, "weights": weights.tolist()})
            return loss

        nevergrad_search(objective, search_start(len(adapters), seed), budget, seed)
    best = min(history, key=lambda h: h["loss"])
    settings = {"budget": budget, "l1": l1, "seed": seed, "examples": len(batch["input_ids"])}
    return CompositionResult(adapters, best["weights"], best["loss"], best["ce"], history, settings)


def compose_command(
    upstream: list[Path],
    examples: Path,
    out: Path,
    model: str | None = None,
    budget: int = 40,
    l1: float = 0.05,
    seed: int = 0,
) -> CompositionResult:
    """`loramix compose`: compose the upstream adapters for the examples and save the result in `out`.

    The base model is `model`, else the one the adapters name (base_model_name_or_path).
    """
    _nevergrad()  # a missing extra fails before the model loads
    adapters = load_upstream(upstream)
    read_examples(examples)  # fail on a bad file before loading the model
    model = model or adapters.config.base_model_name_or_path
    if not model:
        raise ValueError(f"{adapters.paths[0]} does not name its base model (base_model_name_or_path): pass --model")
    base, tokenizer = load_model(model)
    result = compose(base, adapters, examples, budget, l1, seed, tokenizer=tokenizer)
    result.save(out)
    return result
