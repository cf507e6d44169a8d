"""Continuous (in-flight) batching: every decode step advances all running requests at once.

Each request owns a slot of a preallocated KV cache (`serve.max_batch` slots of the model's
context). At every step the worker admits waiting requests into free slots (their prompts
prefilled one by one, at most `serve.prefill_tokens_per_step` prompt tokens per step, so a
long prompt never stalls the others for long), decodes one token for every running request in
one forward pass, and lets finished, stopped and cancelled requests go, freeing their slots at
once. Sampling is per request (temperature, top-k, top-p, its own seeded generator).

The decode batch has 4, 8, 16 ... rows (the smallest that covers the busy slots; idle rows
compute on a dummy token). From 4 rows up, a row's arithmetic does not depend on the batch
size or on the other rows (checked by the tests), so greedy output equals what the request
gets alone, whatever else runs.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import torch

from pipeline.apps.serve.engine import DONE, EngineBase, Job, TextOut, deliver
from pipeline.model.sampling import sample_next


@dataclass
class _Running:
    job: Job
    out: TextOut
    gen: torch.Generator
    pos: int          # cache position the next token is written at
    last: int         # the token fed at the next step
    started: float


class BatchEngine(EngineBase):
    """The same interface as `Engine` (`submit`, `encode`, `status`), serving up to
    `max_batch` requests at once with at most `max_tokens_in_flight` prompt + completion
    tokens reserved in total; beyond that requests wait in a queue of `max_queue` (then 429)."""

    def __init__(self, model, tokenizer, meta: dict, max_queue: int = 64, max_batch: int = 16,
                 max_tokens_in_flight: int = 0, prefill_tokens_per_step: int = 512, metrics=None) -> None:
        super().__init__(model, tokenizer, meta, max_queue, metrics)
        cfg = model.cfg
        self.max_batch = max(1, int(max_batch))
        self.budget = int(max_tokens_in_flight) or self.max_batch * self.block_size
        self.prefill_budget = max(1, int(prefill_tokens_per_step))
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        shape = (self.max_batch, cfg.n_head, self.block_size, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in model.blocks]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in model.blocks]
        self.slots: list[_Running | None] = [None] * self.max_batch
        # decode batches of 4, 8, 16, ... rows over the lowest slots (requests take the lowest
        # free one): any size from 4 computes a row exactly alike, and few rows cost less
        self.buckets = sorted({min(self.max_batch, 4 << i) for i in range(16)} | {self.max_batch})
        self._waiting: Job | None = None  # admitted next, when a slot and the token budget allow
        self._outbox: list = []
        self._start_worker("batch-worker")

    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def queued(self) -> int:
        return self.jobs.qsize() + (self._waiting is not None)

    def status(self) -> dict:
        return {"queued": self.queued(), "running": self.running(), "max_batch": self.max_batch,
                "active": [s.job.id for s in self.slots if s is not None], "served": self.served,
                "max_queue": self.jobs.maxsize, "batching": True}

    # -------------------------------------------------------------- worker side

    def _in_flight(self) -> int:
        return sum(len(s.job.ids) + s.job.max_tokens for s in self.slots if s is not None)

    def _next_job(self) -> Job | None:
        while True:
            if self._waiting is None:
                try:
                    self._waiting = self.jobs.get_nowait()
                except queue.Empty:
                    return None
            if self._waiting.cancelled.is_set():
                self._finish_unstarted(self._waiting)
                self._waiting = None
                continue
            return self._waiting

    def _admit(self) -> None:
        """Waiting requests into free slots, within the token budget and this step's prefill budget."""
        prefilled = 0
        while prefilled < self.prefill_budget:
            free = [i for i, s in enumerate(self.slots) if s is None]
            job = self._next_job()
            if job is None or not free:
                return
            if self._in_flight() + len(job.ids) + job.max_tokens > self.budget and self.running():
                return
            self._waiting = None
            job.outbox = self._outbox
            prefilled += len(job.ids)
            try:
                self._start(free[0], job)
            except Exception as e:  # noqa: BLE001 - reported to its request, the worker lives on
                job.emit(e)
                self.served += 1

    @torch.no_grad()
    def _start(self, slot: int, job: Job) -> None:
        """Prefill the prompt into the slot's cache and sample the first token."""
        ids = list(job.ids)[-self.block_size:] or [0]
        caches = [{} for _ in self.model.blocks]
        logits = self.model(torch.tensor([ids], device=self.device), caches=caches)
        for layer, c in enumerate(caches):
            n = c["k"].shape[2]
            self.k[layer][slot].zero_()
            self.v[layer][slot].zero_()
            self.k[layer][slot, :, :n] = c["k"][0]
            self.v[layer][slot, :, :n] = c["v"][0]
        run = _Running(job, TextOut(job, self.tokenizer), torch.Generator(device="cpu").manual_seed(int(job.seed)),
                       len(ids), 0, time.perf_counter())
        self.slots[slot] = run
        self._emit_token(slot, logits[0, -1])

    def _emit_token(self, slot: int, logits: torch.Tensor) -> None:
        run = self.slots[slot]
        job = run.job
        nxt = sample_next(logits.float().cpu(), job.temperature, job.top_k, job.top_p, run.gen)
        if self.metrics is not None and job.completion_tokens == 0:
            self.metrics.first_token(time.perf_counter() - job.enqueued)
        if nxt in self.stop_ids:
            return self._end(slot)
        if self.metrics is not None:
            self.metrics.tokens(1)
        if run.out.push(nxt):
            return self._end(slot)
        if job.completion_tokens >= job.max_tokens or run.pos >= self.block_size:
            return self._end(slot)
        run.last = nxt

    def _end(self, slot: int, reason: str | None = None) -> None:
        run = self.slots[slot]
        self.slots[slot] = None
        if reason:
            run.job.finish_reason = reason
        run.out.close()
        run.job.emit(DONE)
        self.served += 1
        if self.metrics is not None:
            self.metrics.finished(time.perf_counter() - run.job.enqueued, run.job.finish_reason)

    def _finish_unstarted(self, job: Job) -> None:
        job.finish_reason = "cancelled"
        job.emit(DONE)
        self.served += 1

    def _flush(self) -> None:
        """A step's text pieces and endings to their event loops, one wake-up per loop."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._outbox.clear()
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(deliver, items)

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every running request, in one forward pass of `max_batch` rows."""
        for i, s in enumerate(self.slots):
            if s is not None and s.job.cancelled.is_set():
                self._end(i, "cancelled")
        active = [i for i, s in enumerate(self.slots) if s is not None]
        if not active:
            return
        B = next(b for b in self.buckets if b > active[-1])
        tokens = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.zeros(B, dtype=torch.long)
        for i in active:
            tokens[i, 0], pos[i] = self.slots[i].last, self.slots[i].pos
        mask = torch.arange(self.block_size)[None, :] <= pos[:, None]  # each row sees its own past
        tokens, pos, mask = tokens.to(self.device), pos.to(self.device), mask.to(self.device)[:, None, None, :]
        caches = [{"slot_k": k[:B], "slot_v": v[:B], "pos": pos, "mask": mask} for k, v in zip(self.k, self.v)]
        logits = self.model(tokens, caches=caches, positions=pos[:, None])
        for i in active:
            self.slots[i].pos += 1
            self._emit_token(i, logits[i, -1])

    def _loop(self) -> None:
        self.model.eval()
        while True:
            self._admit()
            self._flush()
            if self.running():
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - every running request learns it; the worker lives on
                    for i, s in enumerate(self.slots):
                        if s is not None:
                            self.slots[i] = None
                            s.job.emit(e)
                            self.served += 1
                self._flush()
                if self.metrics is not None:
                    self.metrics.gauges(self.queued(), self.running())
                continue
            if self.metrics is not None:
                self.metrics.gauges(self.queued(), 0)
            self._wake.wait(0.05)
            self._wake.clear()
