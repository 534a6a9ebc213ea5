"""The server's batcher: one thread that takes every request waiting, runs them as one batch,
and hands each caller its own answer (or its own error).

No request waits for company: the thread takes what is queued the moment it is free, so a
request alone runs at once, and requests that arrive while a batch runs form the next batch.
`window_s` (0 by default) may hold a lone request that long for others to join it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Job = TypeVar("Job")
Answer = TypeVar("Answer")


@dataclass
class _Ticket(Generic[Job, Answer]):
    job: Job
    done: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None
    error: BaseException | None = None


class Batcher(Generic[Job, Answer]):
    """`submit` blocks until `run` has answered the job in some batch. `run` takes a list of
    jobs and returns, in order, each one's answer or the exception to raise to its caller."""

    def __init__(
        self, run: Callable[[list[Job]], Sequence[Answer | BaseException]], max_batch: int = 32, window_s: float = 0.0, name: str = "btsearch-batcher",
    ):
        self._run = run
        self.max_batch = max_batch
        self.window_s = window_s
        self._waiting: deque[_Ticket[Job, Answer]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self.batches = 0  # batches taken (run or running), and the jobs in them
        self.jobs = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs queued for the next batch."""
        with self._changed:
            return len(self._waiting)

    def submit(self, job: Job) -> Answer:
        ticket: _Ticket[Job, Answer] = _Ticket(job)
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(ticket)
            self._changed.notify()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.answer  # type: ignore[return-value]

    def close(self) -> None:
        """Answer what waits, then stop the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _next_batch(self) -> list[_Ticket[Job, Answer]]:
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if self.window_s > 0 and len(self._waiting) < self.max_batch and not self._closed:
                self._changed.wait(self.window_s)  # one bounded wait for company (a notify ends it early)
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            if batch:
                self.batches += 1
                self.jobs += len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return  # closed, and nothing waits
            try:
                answers = list(self._run([ticket.job for ticket in batch]))
                if len(answers) != len(batch):
                    raise RuntimeError(f"the batch of {len(batch)} got {len(answers)} answers")
            except BaseException as error:  # the whole batch failed: each caller hears why
                answers = [error] * len(batch)
            for ticket, answer in zip(batch, answers):
                if isinstance(answer, BaseException):
                    ticket.error = answer
                else:
                    ticket.answer = answer
                ticket.done.set()
