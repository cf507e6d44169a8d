"""One model, one generation worker, a bounded FIFO of requests.

A small CPU/GPU model generates fastest one sequence at a time, and a single worker makes
the guarantee trivial: no request's tokens can leak into another's output. Requests wait
in a bounded queue (full -> the API answers 429); a request whose client went away is
cancelled between two tokens, so its slot is freed at once. Text is streamed with
``pipeline.model.sampling.stream_text``: pieces never split a UTF-8 character, and joined they
equal the final decode, so a streamed answer is identical to the non-streamed one.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from pipeline.model.sampling import encode_prompt, iter_ids, stream_text, token_id
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

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


DONE = object()


class Engine:
    """Owns the model and tokenizer; ``submit`` returns a Job whose ``out`` queue yields text
    pieces then ``DONE`` (or an Exception)."""

    def __init__(self, model, tokenizer, meta: dict, max_queue: int = 16) -> None:
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.block_size = int(model.cfg.block_size)
        eot = token_id(tokenizer, EOT)
        # the answer ends at <|end|> / <|endoftext|>, and also where the model starts another turn
        self.stop_ids = {i for i in (token_id(tokenizer, t) for t in (EOT, END, USER, SYSTEM, ASSISTANT, PAD))
                         if i is not None}
        self.bos = [eot] if eot is not None else []
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max(1, int(max_queue)))
        self.active: Job | None = None
        self.served = 0
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._worker.start()

    # -------------------------------------------------------------- API side

    def encode(self, text: str) -> list[int]:
        return self.bos + encode_prompt(self.tokenizer, text)

    def submit(self, job: Job) -> Job:
        job.id = next(self._ids)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.jobs.maxsize} requests are already waiting") from None
        return job

    def status(self) -> dict:
        return {"queued": self.jobs.qsize(), "active": self.active.id if self.active else None,
                "served": self.served, "max_queue": self.jobs.maxsize}

    # -------------------------------------------------------------- worker side

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue
            self.active = job
            try:
                self._run(job)
                job.emit(DONE)
            except Exception as e:  # noqa: BLE001 - reported to the waiting request, the worker lives on
                job.emit(e)
            finally:
                self.active = None
                self.served += 1

    def _run(self, job: Job) -> None:
        ids = iter_ids(self.model, job.ids, job.max_tokens, job.temperature, job.top_k, job.seed,
                       self.stop_ids, job.top_p)

        def counted():
            for i in ids:
                if job.cancelled.is_set():
                    job.finish_reason = "cancelled"
                    return
                job.completion_tokens += 1
                yield i

        text, emitted = "", 0
        for piece in stream_text(self.tokenizer, counted()):
            text += piece
            hits = [text.find(s) for s in job.stop if s and s in text]
            if hits:  # a stop string completed: send what precedes it, never the string itself
                cut = min(hits)
                if cut > emitted:
                    job.emit(text[emitted:cut])
                job.finish_reason = "stop"
                ids.close()
                return
            safe = len(text) - _stop_prefix_len(text, job.stop)  # hold back a possible stop's start
            if safe > emitted:
                job.emit(text[emitted:safe])
                emitted = safe
        if len(text) > emitted:
            job.emit(text[emitted:])
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
