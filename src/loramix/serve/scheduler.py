"""Scheduler: the server's continuous-batching loop, on a background thread, fed by `submit` from the event loop.

Each iteration admits waiting requests (their prompts processed in one forward, then they join the running
batch) while fewer than `max_batch_size` rows run, and then runs one decoding step of every running row. A
request never waits for another to finish: it joins at the next step and leaves at the step that ends it.
Text pieces and completions go back to the event loop of each submitter.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from loramix.serve.decoding import Completion, GenerationRequest, Sequence, TokenLogprob
from loramix.serve.engine import Engine, RequestError

if TYPE_CHECKING:
    from loramix.serve.metrics import Metrics

logger = logging.getLogger(__name__)

Piece = tuple[str, list[TokenLogprob]]


class Ticket:
    """A submitted request; its text pieces and completion arrive in the submitter's event loop."""

    def __init__(self, request: GenerationRequest, model: str, stream: bool) -> None:
        self.request, self.model, self.stream = request, model, stream
        self.completion: Completion | None = None
        self.sequence: Sequence | None = None  # set by the scheduler
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()

    def post(self, event: Piece | Completion | RequestError) -> None:
        """Deliver an event from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            self.cancel()

    def cancel(self) -> None:
        """Stop generating for this request (the client has gone): its row leaves at the next step."""
        self.request.cancelled = True

    async def pieces(self) -> AsyncIterator[Piece]:
        """(text, logprobs of its tokens) as they are generated; afterwards `completion` is set. Raises
        RequestError on failure."""
        while True:
            event = await self._events.get()
            if isinstance(event, RequestError):
                raise event
            if isinstance(event, Completion):
                self.completion = event
                return
            yield event

    async def result(self) -> Completion:
        """Wait for the completion."""
        async for _ in self.pieces():
            pass
        return self.completion


class Scheduler:
    """Runs the engine's continuous batching on one background thread."""

    def __init__(
        self, engine: Engine, *, max_batch_size: int = 16, max_pending: int = 1024, metrics: Metrics | None = None
    ) -> None:
        if max_batch_size < 1 or max_pending < 1:
            raise ValueError(f"invalid scheduling: {max_batch_size=} and {max_pending=} must be >= 1")
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.max_pending = max_batch_size, max_pending
        self.steps = 0  # decoding steps run
        self.joined_running = 0  # requests admitted while other rows were decoding
        self._queue: queue.Queue[Ticket] = queue.Queue()
        self._stopping = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="loramix-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Take no new requests (503); those already submitted run to their end (a drain)."""
        self._closed = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still waiting or running get an error (503)."""
        self._closed = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        shutting_down = RequestError("the server is shutting down", status=503, kind="server_error")
        while not self._queue.empty():
            self._queue.get_nowait().post(shutting_down)
        for batch in self.engine.batches.values():
            batch.fail(shutting_down)

    def submit(self, request: GenerationRequest, model: str, stream: bool = False) -> Ticket:
        """Queue a request (call from the event loop); RequestError (503) while closed or too many wait."""
        if self._closed:
            raise RequestError("the server is shutting down", status=503, kind="server_error")
        if self._queue.qsize() >= self.max_pending:
            raise RequestError("the server is overloaded: try again later", status=503, kind="server_error")
        ticket = Ticket(request, model, stream)
        ticket.sequence = self.engine.sequence(
            request,
            on_text=(lambda text, logprobs: ticket.post((text, logprobs))) if stream else None,
            on_done=lambda completion: self._done(ticket, completion),
            on_error=lambda error: self._failed(ticket, error),
        )
        self._queue.put(ticket)
        self._update_gauges()
        return ticket

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            tickets = self._take(block=not self.engine.running)
            if tickets:
                running = self.engine.running
                self.joined_running += len(tickets) if running else 0
                logger.debug("admitting %d requests beside %d running rows", len(tickets), running)
                self.engine.admit([ticket.sequence for ticket in tickets])
                if self.metrics is not None:
                    self.metrics.admitted(len(tickets), beside_running=running > 0)
            if self.engine.running:
                self.engine.step()
                self.steps += 1
            self._update_gauges()

    def _take(self, block: bool) -> list[Ticket]:
        """Waiting requests, as many as free rows allow; waits a little for the first one when `block`."""
        tickets = []
        free = self.max_batch_size - self.engine.running
        while len(tickets) < free:
            try:
                ticket = self._queue.get(timeout=0.1) if block and not tickets else self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket.request.cancelled:  # the client left while it waited
                ticket.sequence.finish("cancelled")
            else:
                tickets.append(ticket)
        return tickets

    def _done(self, ticket: Ticket, completion: Completion) -> None:
        ticket.post(completion)
        if self.metrics is not None:
            self.metrics.finished(ticket.model, ticket.sequence)

    def _failed(self, ticket: Ticket, error: Exception) -> None:
        if not isinstance(error, RequestError):
            error = RequestError(f"generation failed: {error}", status=500, kind="server_error")
        ticket.post(error)
        if self.metrics is not None:
            self.metrics.failed(ticket.model)

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.load(waiting=self.waiting, running=self.engine.running, steps=self.steps)
