"""A loramix run as an lm-evaluation-harness model (`pip install 'loramix[harness]'`):

    loramix lm-eval --model loramix --model_args run=runs/demo,task=pubmedqa --tasks pubmedqa

or, from Python, `lm_eval.simple_evaluate(model=LoramixLM(run="runs/demo", task="pubmedqa"), tasks=[...])`.

`LoramixLM` is the harness's HFLM (tokenisation, batching of generation, rolling windows, caching) with the
run's adapted model in place of the Hugging Face one: every forward and `generate` gets the task id of
`task` (its index in the run's recipe; needed by the `task` router, optional otherwise), and a
log-likelihood request routes sequence-level routers on its context alone (with the white space the harness
moves from the context's end into the continuation), as `loramix eval` does. The
harness's own CLI has no plugin hook for models, so `loramix lm-eval` registers "loramix" and hands the rest
of its arguments to `lm_eval`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loramix.extras import requires

with requires("harness", "loramix.harness"):
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

from loramix.methods import AdaptedModel
from loramix.precision import use_bf16
from loramix.recipe import load_recipe

logger = logging.getLogger(__name__)


@register_model("loramix")
class LoramixLM(HFLM):
    """A trained loramix run (its recipe's base model and its adapter, loramix's or peft's) for the harness."""

    def __init__(
        self,
        run: str,
        task: str | None = None,
        batch_size: int | str = 8,
        device: str = "cpu",
        bf16: bool | str = "auto",
        max_length: int | None = None,
        **kwargs,
    ) -> None:
        from loramix.evaluate import _load_adapter  # evaluate imports the models; keep `lm_eval --help` light
        from loramix.models import load_model

        run_dir = Path(run)
        recipe = load_recipe(run_dir / "recipe.yaml")
        if task is not None and task not in recipe.tasks:
            raise ValueError(f"task={task!r} is not one the run {run_dir} was trained on: {recipe.tasks}")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size={batch_size!r}: give a number of requests per forward")
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # the harness's default device
            logger.warning("device %r is not available here; using the CPU", device)
            device = "cpu"
        base, tokenizer = load_model(recipe.model, device=device, quantization=recipe.quantization)
        model = _load_adapter(base, run_dir / "adapter").eval()
        bf16 = bf16 if isinstance(bf16, bool) else {"true": True, "false": False}.get(str(bf16).lower(), bf16)
        precision = torch.bfloat16 if use_bf16(bf16, device) else None
        super().__init__(
            pretrained=base,
            tokenizer=tokenizer,
            batch_size=int(batch_size),
            max_length=max_length,
            mixed_precision_dtype=precision,
            **kwargs,
        )
        self._model = model  # every call goes through the adapter's wrapper, which routes
        self._texts: dict[int, str] = {}  # token id -> its text
        self.task_id = None if task is None else recipe.tasks.index(task)
        if isinstance(model, AdaptedModel) and model.needs_task_ids and self.task_id is None:
            raise ValueError(f"the run {run_dir} uses the task router: name its task, e.g. task={recipe.tasks[0]}")

    def _routing(self, rows: int) -> dict[str, torch.Tensor]:
        """The task ids of a batch of `rows` rows, for a loramix model with a task."""
        if self.task_id is None or not isinstance(self._model, AdaptedModel):
            return {}
        return {"task_ids": torch.full((rows,), self.task_id, dtype=torch.long, device=self.device)}

    def _autocast(self):
        precision = self.mixed_precision_dtype
        return torch.autocast(self.device.type, dtype=precision or torch.float32, enabled=precision is not None)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self._model(input_ids=inps, **self._routing(len(inps))).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        return super()._model_generate(context, max_length, stop, **generation_kwargs, **self._routing(len(context)))

    def _leading_space(self, continuation: list[int]) -> int:
        """How many white-space tokens start a continuation (the last token aside): the harness moves a context's
        trailing white space (a chat prompt's final newline) into the continuation, and routing counts it as the
        prompt's, as loramix's own scoring does."""
        count = 0
        while count < len(continuation) - 1 and not self._token_text(continuation[count]).strip():
            count += 1
        return count

    def _token_text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tok_decode([token], skip_special_tokens=False)
        return self._texts[token]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(log-likelihood of the continuation, whether greedy decoding gives it) per (key, context, continuation)
        request: batches of right-padded rows, the longest first, each routed on its context tokens."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        size = override_bs or self.batch_size
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), size), disable=disable_tqdm, desc="loramix loglikelihood"):
            chunk = order[start : start + size]
            rows, context_lengths = [], []
            for index in chunk:
                _, context, continuation = requests[index]
                row = (context + continuation)[-(self.max_length + 1) :][:-1]
                rows.append(row)
                context_lengths.append(len(row) - len(continuation) + 1 + self._leading_space(continuation))
            length = max(len(row) for row in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
            mask = torch.zeros_like(ids)
            for number, row in enumerate(rows):
                ids[number, : len(row)] = torch.tensor(row, device=self.device)
                mask[number, : len(row)] = 1
            positions = torch.arange(length, device=self.device)
            prompt = (positions < torch.tensor(context_lengths, device=self.device)[:, None]) & mask.bool()
            routing = self._routing(len(rows))
            if isinstance(self._model, AdaptedModel):
                routing["prompt_mask"] = prompt
            with torch.no_grad(), self._autocast():
                logits = self._model(input_ids=ids, attention_mask=mask, **routing).logits
            for number, index in enumerate(chunk):
                key, _, continuation = requests[index]
                end = len(rows[number])
                scores = F.log_softmax(logits[number, end - len(continuation) : end].float(), dim=-1)
                targets = torch.tensor(continuation, device=self.device)
                answer = (float(scores.gather(1, targets[:, None]).sum()), bool((scores.argmax(-1) == targets).all()))
                results[index] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results
