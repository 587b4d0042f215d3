"""Metrics: the server's Prometheus metrics (`GET /metrics`), named and shaped as vLLM's are, per model.

Counters of requests (by finish reason), prompt and generated tokens, requests that joined a running batch and
decoding steps; gauges of waiting requests and running rows; histograms of the time to the first token, the
time per output token (each gap between two tokens of a request) and the whole request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loramix.serve.decoding import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


class Metrics:
    """The metrics of one server, in a registry of their own (several servers may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        model = ["model_name"]
        r = self.registry
        self.requests = Counter(
            "loramix_request_success", "Requests finished, by finish reason.", [*model, "finished_reason"], registry=r
        )
        self.failures = Counter("loramix_request_failure", "Requests that failed in generation.", model, registry=r)
        self.prompt_tokens = Counter("loramix_prompt_tokens", "Prompt tokens processed.", model, registry=r)
        self.generation_tokens = Counter("loramix_generation_tokens", "Tokens generated.", model, registry=r)
        self.joined = Counter(
            "loramix_requests_joined_running", "Requests admitted while other rows were decoding.", registry=r
        )
        self.admitted_requests = Counter(
            "loramix_requests_admitted", "Requests whose prompt was processed.", registry=r
        )
        self.steps = Gauge("loramix_decoding_steps", "Decoding steps run since the server started.", registry=r)
        self.waiting = Gauge("loramix_num_requests_waiting", "Requests waiting for a free row.", registry=r)
        self.running = Gauge("loramix_num_requests_running", "Rows decoding.", registry=r)
        self.first_token = Histogram(
            "loramix_time_to_first_token_seconds",
            "From arrival to the first token.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "loramix_time_per_output_token_seconds",
            "Between two tokens of a request.",
            model,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loramix_e2e_request_latency_seconds",
            "From arrival to the last token.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def admitted(self, count: int, beside_running: bool) -> None:
        self.admitted_requests.inc(count)
        if beside_running:
            self.joined.inc(count)

    def load(self, waiting: int, running: int, steps: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.steps.set(steps)

    def finished(self, model: str, sequence: Sequence) -> None:
        completion, times = sequence.completion, sequence.token_times
        self.requests.labels(model, completion.finish_reason).inc()
        self.prompt_tokens.labels(model).inc(completion.prompt_tokens)
        self.generation_tokens.labels(model).inc(len(completion.token_ids))
        if times:
            self.first_token.labels(model).observe(times[0] - sequence.arrived)
            self.e2e.labels(model).observe(times[-1] - sequence.arrived)
            per_token = self.per_token.labels(model)
            for before, after in zip(times[:-1], times[1:], strict=True):
                per_token.observe(after - before)

    def failed(self, model: str) -> None:
        self.failures.labels(model).inc()
