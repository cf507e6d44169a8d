"""One model, one generation worker, a bounded FIFO of requests.

A small CPU/GPU model generates fastest one sequence at a time, and a single worker makes
the guarantee trivial: no request's tokens can leak into another's output. Requests wait
in a bounded queue (full -> the API answers 429); a request whose client went away is
cancelled between two tokens, so its slot is freed at once. Text goes out through
``TextOut``: pieces never split a UTF-8 character, and joined they equal the final decode, so
a streamed answer is identical to the non-streamed one. ``serve.batching=true`` (the default)
uses ``batching.BatchEngine`` instead; this engine is the one-at-a-time reference.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from pipeline.model.sampling import encode_prompt, iter_ids, token_id
from pipeline.tokenize.special import ASSISTANT, END, EOT, PAD, SYSTEM, USER


class QueueFull(Exception):
    pass


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    outbox: list | None = None  # set by a batching worker: items leave once per step, not once per token

    def emit(self, item) -> None:
        if self.outbox is not None:
            self.outbox.append((self, item))
        else:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def deliver(items: list) -> None:
    """On the event loop: hand a step's items to their requests' queues."""
    for job, item in items:
        job.out.put_nowait(item)


DONE = object()


class EngineBase:
    """What both engines share: the model and tokenizer, the stop tokens, the bounded queue,
    `encode` and `submit` (a Job whose ``out`` queue yields text pieces then ``DONE`` or an
    Exception)."""

    def __init__(self, model, tokenizer, meta: dict, max_queue: int, metrics=None) -> None:
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.metrics = metrics
        self.block_size = int(model.cfg.block_size)
        eot = token_id(tokenizer, EOT)
        # the answer ends at <|end|> / <|endoftext|>, and also where the model starts another turn
        self.stop_ids = {i for i in (token_id(tokenizer, t) for t in (EOT, END, USER, SYSTEM, ASSISTANT, PAD))
                         if i is not None}
        self.bos = [eot] if eot is not None else []
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max(1, int(max_queue)))
        self.served = 0
        self._ids = itertools.count(1)
        self._wake = threading.Event()

    def encode(self, text: str) -> list[int]:
        return self.bos + encode_prompt(self.tokenizer, text)

    def submit(self, job: Job) -> Job:
        job.id = next(self._ids)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.jobs.maxsize} requests are already waiting") from None
        self._wake.set()
        return job

    def _start_worker(self, name: str) -> None:
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()


class Engine(EngineBase):
    """One request at a time, in arrival order."""

    def __init__(self, model, tokenizer, meta: dict, max_queue: int = 16, metrics=None) -> None:
        super().__init__(model, tokenizer, meta, max_queue, metrics)
        self.active: Job | None = None
        self._start_worker("generation-worker")

    def status(self) -> dict:
        return {"queued": self.jobs.qsize(), "running": int(self.active is not None), "max_batch": 1,
                "active": [self.active.id] if self.active else [], "served": self.served,
                "max_queue": self.jobs.maxsize, "batching": False}

    # -------------------------------------------------------------- worker side

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue
            self.active = job
            if self.metrics is not None:
                self.metrics.gauges(self.jobs.qsize(), 1)
            try:
                self._run(job)
                job.emit(DONE)
                if self.metrics is not None:
                    self.metrics.finished(time.perf_counter() - job.enqueued, job.finish_reason)
            except Exception as e:  # noqa: BLE001 - reported to the waiting request, the worker lives on
                job.emit(e)
            finally:
                self.active = None
                self.served += 1
                if self.metrics is not None:
                    self.metrics.gauges(self.jobs.qsize(), 0)

    def _run(self, job: Job) -> None:
        out = TextOut(job, self.tokenizer)
        ids = iter_ids(self.model, job.ids, job.max_tokens, job.temperature, job.top_k, job.seed,
                       self.stop_ids, job.top_p)
        for i in ids:
            if self.metrics is not None:
                if job.completion_tokens == 0:
                    self.metrics.first_token(time.perf_counter() - job.enqueued)
                self.metrics.tokens(1)
            if job.cancelled.is_set():
                job.finish_reason = "cancelled"
                break
            if out.push(i):
                break
        ids.close()
        out.close()


class TextOut:
    """A job's token ids in, its text out: pieces never split a UTF-8 character (byte-level
    tokens can), a stop string ends the answer and is never sent, and the start of a possible
    stop string is held back until it is decided. Joined, the pieces equal the final decode."""

    def __init__(self, job: Job, tokenizer) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token: int) -> bool:
        """Add one generated token; True when the answer is complete (a stop string)."""
        self.ids.append(int(token))
        self.job.completion_tokens += 1
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return False
        self.text = text
        if self._cut_at_stop():
            return True
        safe = len(text) - _stop_prefix_len(text, self.job.stop)
        if safe > self.emitted:
            self.job.emit(text[self.emitted:safe])
            self.emitted = safe
        return False

    def _cut_at_stop(self) -> bool:
        """When a stop string has completed: send what precedes it, never the string itself."""
        text = self.text
        hits = [text.find(s) for s in self.job.stop if s and s in text]
        if not hits:
            return False
        cut = min(hits)
        if cut > self.emitted:
            self.job.emit(text[self.emitted:cut])
        self.emitted = len(text)
        self.job.finish_reason = "stop"
        return True

    def close(self) -> None:
        """The answer ended (a stop token, max_tokens, a cancel): send what was held back."""
        job = self.job
        if job.finish_reason != "stop":
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if text != self.text and text.startswith(self.text):  # the last character, even if incomplete
                self.text = text
                if self._cut_at_stop():
                    return
            if len(self.text) > self.emitted:
                job.emit(self.text[self.emitted:])
                self.emitted = len(self.text)
        if job.finish_reason is None:
            job.finish_reason = "length" if job.completion_tokens >= job.max_tokens else "stop"


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
