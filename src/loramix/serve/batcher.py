"""Batcher: a background loop that groups concurrent requests, of any tenants, into batches for the engine.

The loop waits for a request, then gathers more for a short window (a few milliseconds) or until the batch is
full, and runs the batch; requests that arrive meanwhile form the next one. Under load, batches grow up to
`max_batch_size`, so throughput grows with load. Results go back to the event loop of each submitter.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from loramix.serve.decoding import Completion, GenerationRequest
from loramix.serve.engine import Engine, RequestError

logger = logging.getLogger(__name__)


class Ticket:
    """A submitted request; its text pieces and completion arrive in the submitter's event loop."""

    def __init__(self, request: GenerationRequest, stream: bool) -> None:
        self.request = request
        self.stream = stream  # whether to deliver text pieces, or only the completion
        self.completion: Completion | None = None
        self.answered = False  # whether anything has been delivered
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()

    def post(self, event: str | Completion | RequestError) -> None:
        """Deliver an event from any thread."""
        self.answered = True
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            self.cancel()

    def cancel(self) -> None:
        """Stop generating for this request (the client has gone); a no-op once it has finished."""
        self.request.cancelled = True

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces as they are generated; afterwards `completion` is set. Raises RequestError on failure."""
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


class Batcher:
    """Runs the engine's batches on one background thread, fed by `submit` from the event loop."""

    def __init__(
        self, engine: Engine, *, max_batch_size: int = 16, window_s: float = 0.005, max_pending: int = 1024
    ) -> None:
        if max_batch_size < 1 or window_s < 0 or max_pending < 1:
            raise ValueError(f"invalid batching: {max_batch_size=}, {window_s=}, {max_pending=}")
        self.engine = engine
        self.max_batch_size, self.window_s, self.max_pending = max_batch_size, window_s, max_pending
        self._queue: queue.Queue[Ticket] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="loramix-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch and stop; requests still queued get an error."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while not self._queue.empty():
            self._queue.get_nowait().post(RequestError("the server is shutting down", status=503, kind="server_error"))

    def submit(self, request: GenerationRequest, stream: bool = False) -> Ticket:
        """Queue a request (call from the event loop); RequestError (503) when too many are waiting."""
        if self._queue.qsize() >= self.max_pending:
            raise RequestError("the server is overloaded: try again later", status=503, kind="server_error")
        ticket = Ticket(request, stream)
        self._queue.put(ticket)
        return ticket

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = [t for t in self._collect() if not t.request.cancelled]
            if batch:
                self._run(batch)

    def _collect(self) -> list[Ticket]:
        """Wait for one request, then up to `window_s` for more, up to `max_batch_size`."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self, batch: list[Ticket]) -> None:
        def on_text(row: int, piece: str) -> None:
            if batch[row].stream:
                batch[row].post(piece)

        def on_done(row: int, completion: Completion) -> None:
            batch[row].post(completion)

        try:
            self.engine.generate([ticket.request for ticket in batch], on_text, on_done)
        except Exception as error:  # a failed batch fails its requests, never the server
            logger.exception("generation failed for a batch of %d requests", len(batch))
            failure = RequestError(f"generation failed: {error}", status=500, kind="server_error")
            for ticket in batch:
                if len(batch) > 1 and not ticket.answered:
                    self._run([ticket])  # alone: only a request at fault fails
                else:
                    ticket.post(failure)
