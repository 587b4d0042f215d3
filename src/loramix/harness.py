"""A loramix run as an lm-evaluation-harness model (`pip install 'loramix[harness]'`):

    loramix lm-eval --model loramix --model_args run=runs/demo,task=pubmedqa --tasks pubmedqa

or, from Python, `lm_eval.simple_evaluate(model=LoramixLM(run="runs/demo", task="pubmedqa"), tasks=[...])`.

`LoramixLM` is the harness's HFLM (tokenisation, batching of generation, rolling windows, caching) with the
run's adapted model in place of the Hugging Face one: every forward and `generate` gets the task id of
`task` (its index in the run's recipe; needed by the `task` router, optional otherwise), and a
log-likelihood request routes sequence-level routers on its context alone (with the white space the harness
moves from the context's end into the continuation), as `loramix eval` does. Log-likelihood requests that
share a context share its forward, as HFLM's one-token continuations do, longer continuations too (through the
context's key-value cache). `merge=true` merges a `task`-router run's task into the base model's weights, which
then runs at the base model's speed. The
harness's own CLI has no plugin hook for models, so `loramix lm-eval` registers "loramix" and hands the rest
of its arguments to `lm_eval`.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from loramix.extras import requires

with requires("harness", "loramix.harness"):
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

from loramix.evaluate import _prompt_chunks, _score_chunk
from loramix.methods import AdaptedModel
from loramix.models import load_model
from loramix.precision import use_bf16
from loramix.recipe import load_recipe
from loramix.run_folder import RunFolder

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
        merge: bool | str = False,
        **kwargs,
    ) -> None:
        folder = RunFolder(run)
        recipe = load_recipe(folder.recipe_file)
        if task is not None and task not in recipe.tasks:
            raise ValueError(f"task={task!r} is not one the run {folder.path} was trained on: {recipe.tasks}")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size={batch_size!r}: give a number of requests per forward")
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # the harness's default device
            logger.warning("device %r is not available here; using the CPU", device)
            device = "cpu"
        base, tokenizer = load_model(recipe.model, device=device, quantization=recipe.quantization)
        model = folder.load_adapter(base).eval()
        task_id = None if task is None else recipe.tasks.index(task)
        if isinstance(model, AdaptedModel) and model.needs_task_ids and task_id is None:
            raise ValueError(f"the run {folder.path} uses the task router: name its task, e.g. task={recipe.tasks[0]}")
        if str(merge).lower() not in ("true", "false"):
            raise ValueError(f"merge={merge!r}: give true or false")
        if str(merge).lower() == "true":
            if task_id is None or not hasattr(model, "merge_task"):
                raise ValueError(
                    f"merge=true merges a task of a `task`-router run into the base: {folder.path} with {task=}"
                )
            model = model.merge_task(task_id).eval()
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
        self._model = model  # every call goes through the adapter's wrapper, which routes (or the merged model)
        self._texts: dict[int, str] = {}  # token id -> its text
        self.task_id = task_id

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
        request, scored as `loramix eval` scores choices: requests that share a prompt (the context and the white
        space that starts the continuation, cut on the left to fit the model's length) share one forward over it,
        which routes them; a continuation's first token after that white space is read from the prompt's last
        position and its later ones are scored through the prompt's key-value cache. Longest prompts first."""
        prompts: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (prompt, its white-space tail) -> requests
        rests = []  # per request: its continuation after the prompt
        for index, (_, context, continuation) in enumerate(requests):
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens; at most {self.max_length} score")
            lead = self._leading_space(continuation)
            rests.append(continuation[lead:])
            prompt = (context + continuation[:lead])[-(self.max_length + 1 - len(rests[-1])) :]
            prompts.setdefault((tuple(prompt), lead), []).append(index)
        order = sorted(prompts, key=lambda key: (-len(key[0]) - max(len(rests[i]) for i in prompts[key]), key))
        size = override_bs or self.batch_size
        longer = [sum(len(rests[index]) > 1 for index in prompts[key]) for key in order]  # rows of the 2nd forward
        chunks = _prompt_chunks(list(range(len(order))), longer, size)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        adapted = isinstance(self._model, AdaptedModel)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for chunk in tqdm(chunks, disable=disable_tqdm, desc="loramix loglikelihood"):
            keys = [order[number] for number in chunk]
            routing = self._model.prompt_routing(self._routing(len(keys)).get("task_ids")) if adapted else nullcontext()
            with torch.no_grad(), self._autocast(), routing:
                scored = _score_chunk(
                    self._model,
                    [{"input_ids": list(prompt), "attention_mask": [1] * len(prompt)} for prompt, _ in keys],
                    [[rests[index] for index in prompts[key]] for key in keys],
                    pad,
                    self.device,
                    tails=[lead for _, lead in keys],
                )
            for key, choices in zip(keys, scored, strict=True):
                for index, (total, _, greedy) in zip(prompts[key], choices, strict=True):
                    results[index] = (total, greedy)
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
        return results
