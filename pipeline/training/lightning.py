"""Lightning wrappers: the training module and the data modules over token shards / SFT rows.

Batches are indexed by the optimizer step: batch `s` on rank `r` is drawn from a generator
seeded with (seed, r, s) (with gradient accumulation over k micro-batches, micro-batch
`s*k + j` stands in for `s`). The sampler starts at the trainer's restored `global_step`, so a run
resumed from `last.ckpt` sees exactly the batches it would have seen had it never stopped,
without any dataloader state to checkpoint. Ranks draw disjoint streams (distributed-aware),
and Lightning's own distributed sampler is turned off (`use_distributed_sampler=False`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPTConfig
from pipeline.tokenize.shards import open_split, read_index
from pipeline.training.optim import build_optimizer
from pipeline.training.schedule import SCHEDULES, lr_at

IGNORE = -100


# ---------------------------------------------------------------- module

OBJECTIVES = ("clm", "mlm")


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT's estimate:
    6 per parameter (a matmul is 2 FLOPs per weight forward, 4 backward) plus attention's
    score and value products, 12 * layers * context * width. The tied embedding is counted
    once: its lookup is free, its use as the output layer is a matmul."""
    n = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "cfg", None)
    attn = 12 * cfg.n_layer * cfg.block_size * cfg.d_model if isinstance(cfg, GPTConfig) else 0
    return float(6 * n + attn)


def mlm_mask(x: torch.Tensor, mask_id: int, vocab: int, generator: torch.Generator, prob: float = 0.15):
    """BERT's corruption: pick `prob` of the positions; of those 80 % become the mask token,
    10 % a random token, 10 % stay. Returns (inputs, labels with -100 off the picked positions)."""
    u = torch.rand(x.shape, generator=generator, device=x.device)
    picked = u < prob
    r = torch.rand(x.shape, generator=generator, device=x.device)
    rand_tok = torch.randint(0, vocab, x.shape, generator=generator, device=x.device)
    inp = torch.where(picked & (r < 0.8), torch.full_like(x, mask_id), x)
    inp = torch.where(picked & (r >= 0.8) & (r < 0.9), rand_tok, inp)
    labels = torch.where(picked, x, torch.full_like(x, IGNORE))
    return inp, labels


def _chunk_nats(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                reduction: str) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight, bias).float(), y, ignore_index=IGNORE, reduction=reduction)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0,
                          bias: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T + bias` against `targets` (IGNORE: no loss),
    without holding the float32 logits of every position at once.

    The flattened positions go through the output layer `chunk_tokens` rows at a time; with
    gradients on, each chunk is checkpointed, so backward recomputes its logits instead of
    keeping them (memory: one chunk x vocab, not batch x context x vocab, for one extra
    output-layer matmul per step). `reduction` as in `F.cross_entropy`; "mean" is over the
    targets that are not IGNORE. `chunk_tokens <= 0` (or at least all positions): one plain pass.
    """
    h = hidden.reshape(-1, hidden.size(-1))
    y = targets.reshape(-1)
    n = h.size(0)
    if chunk_tokens <= 0 or chunk_tokens >= n:
        return _chunk_nats(h, weight, bias, y, reduction)
    part = "none" if reduction == "none" else "sum"
    recompute = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts = []
    for lo in range(0, n, chunk_tokens):
        hc, yc = h[lo : lo + chunk_tokens], y[lo : lo + chunk_tokens]
        if recompute:
            parts.append(checkpoint(_chunk_nats, hc, weight, bias, yc, part, use_reentrant=False,
                                    preserve_rng_state=False))
        else:
            parts.append(_chunk_nats(hc, weight, bias, yc, part))
    if reduction == "none":
        return torch.cat(parts)
    total = torch.stack(parts).sum()
    if reduction == "sum":
        return total
    return total / (y != IGNORE).sum()


def output_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The Linear that turns a model's `return_hidden=True` output into logits."""
    return model.lm_head if hasattr(model, "lm_head") else model.head


class LitGPT(L.LightningModule):
    """Cross-entropy on (x, y) batches; y = -100 marks positions without loss.

    `objective="clm"`: next-token prediction with causal attention. `objective="mlm"`: the
    same backbone without the causal mask, trained BERT-style to recover 15 % corrupted
    tokens of x (y is unused); the mask token is one extra id past the tokenizer's vocabulary.
    `token_bytes` (UTF-8 bytes per token id) turns the validation loss into bits per byte.
    `loss_chunk_tokens` > 0: the loss applies the output layer that many positions at a time
    (`chunked_cross_entropy`); 0: full logits. Same loss and gradients either way.
    """

    def __init__(
        self,
        model: dict,
        vocab_size: int,
        lr: float = 3e-3,
        min_lr: float = 3e-4,
        warmup_steps: int = 0,
        max_steps: int = 1000,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        compile: bool = False,
        optimizer: str = "adamw",
        fingerprint: str = "",
        stage: str = "pretrain",
        schedule: str = "cosine",
        decay_frac: float = 0.2,
        objective: str = "clm",
        mask_prob: float = 0.15,
        seed: int = 0,
        token_bytes: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["token_bytes"])
        if objective not in OBJECTIVES:
            raise PipelineError(f"unknown pretrain.objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if schedule not in SCHEDULES:
            raise PipelineError(f"unknown pretrain.schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        from pipeline.model.runs import build_model

        self.model = build_model(model, vocab_size)
        # compiled forward kept outside the module tree so state_dict keys stay plain
        self._fwd: list[Callable] = [torch.compile(self.model) if compile else self.model]
        self.register_buffer("token_bytes", None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.long),
                             persistent=False)
        self._val_sums: list[float] = [0.0, 0.0]  # nats, bytes over the current validation pass

    def forward(self, idx: torch.Tensor, segments: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        kw = {"return_hidden": True} if return_hidden else {}
        if segments is None:
            return self._fwd[0](idx, **kw)
        return self._fwd[0](idx, segments=segments, **kw)

    def _targets(self, batch, step: int, salt: int):
        """(inputs, labels, segments) for the objective; MLM masks are seeded by (seed, step, salt)
        so a resumed run corrupts exactly the tokens it would have."""
        x, y, *seg = batch  # packed fine-tuning rows also carry per-token example ids
        if self.hparams.objective == "mlm":
            g = torch.Generator(device=x.device)
            g.manual_seed(hash((int(self.hparams.seed), int(step), int(salt), self.global_rank)) & (2**62 - 1))
            vocab = self.model.cfg.vocab_size - 1  # the last id is the mask token
            x, y = mlm_mask(x, vocab, vocab, g, float(self.hparams.mask_prob))
        return x, y, seg[0] if seg else None

    def _loss(self, batch, step: int = 0, salt: int = 0, reduction: str = "mean"):
        x, y, seg = self._targets(batch, step, salt)
        chunk = int(self.hparams.get("loss_chunk_tokens", 0) or 0)
        if chunk <= 0:
            logits = self(x, seg)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE,
                                   reduction=reduction)
            return loss, y
        head = output_layer(self.model)
        loss = chunked_cross_entropy(self(x, seg, return_hidden=True), head.weight, y, chunk, head.bias, reduction)
        return loss, y

    def training_step(self, batch, batch_idx):
        # batch_idx restarts at 0 on resume, always at a step boundary: its remainder is stable
        loss, _ = self._loss(batch, self.global_step, batch_idx % max(1, self.trainer.accumulate_grad_batches))
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = [0.0, 0.0]

    def validation_step(self, batch, batch_idx):
        nats, y = self._loss(batch, -1, batch_idx, reduction="none")
        valid = y.view(-1) != IGNORE
        loss = nats.sum() / valid.sum().clamp(min=1)
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        if self.token_bytes is not None:
            ids = y.view(-1)[valid]
            self._val_sums[0] += float(nats.sum())
            self._val_sums[1] += float(self.token_bytes[ids.clamp(max=len(self.token_bytes) - 1)].sum())
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.token_bytes is None:
            return
        sums = torch.tensor(self._val_sums, dtype=torch.float64, device=self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[1]) > 0:
            self.log("val_bpb", float(sums[0] / sums[1]) / math.log(2), prog_bar=True, sync_dist=True)  # equal on all ranks

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(self.model, hp.optimizer, hp.lr, hp.betas, hp.weight_decay)
        total, warmup = int(hp.max_steps), int(hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, 1.0, hp.min_lr / hp.lr, warmup, total, hp.schedule, hp.decay_frac)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Throughput(L.Callback):
    """Wall time spent in training steps (validation excluded), for tokens/s in the summary;
    every `log_every` optimizer steps it also logs tokens/s and MFU (model FLOPs utilisation:
    achieved FLOPs / `peak_flops` per device) to the loggers and the progress bar.

    The per-step cost is two `perf_counter` calls; the rest happens once per log interval.
    """

    def __init__(self, tokens_per_step: int = 0, flops_per_token: float = 0.0, peak_flops: float | None = None,
                 log_every: int = 0) -> None:
        self.train_seconds = 0.0
        self.steps = 0
        self.tokens_per_step, self.flops_per_token = int(tokens_per_step), float(flops_per_token)
        self.peak_flops = float(peak_flops) if peak_flops else None
        self.log_every = int(log_every)
        self._t = None
        self._start_step = 0
        self._mark = (0, 0.0)  # (global step, train seconds) at the last log
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module):
        self._start_step = int(trainer.global_step)
        self._mark = (self._start_step, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t is None:
            return
        self.train_seconds += time.perf_counter() - self._t
        self._t = None
        step = int(trainer.global_step)
        self.steps = step - self._start_step
        if not (self.log_every and self.tokens_per_step) or step % self.log_every or step == self._mark[0]:
            return
        secs = self.train_seconds - self._mark[1]
        tps = (step - self._mark[0]) * self.tokens_per_step * trainer.world_size / max(secs, 1e-9)  # all ranks
        self._mark = (step, self.train_seconds)
        self.last = {"tokens_per_s": tps}
        if self.peak_flops and self.flops_per_token:
            self.last["mfu"] = tps * self.flops_per_token / (self.peak_flops * trainer.world_size)
        for k, v in self.last.items():
            pl_module.log(k, v, on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)


class DataDigest:
    """A running hash of the token ids this rank trained on (cheap: xxhash over each batch's
    bytes), so a distributed run can show that its ranks read distinct data. Fed by the
    data module before the batch moves to the device, so a GPU run never syncs for it."""

    def __init__(self) -> None:
        import xxhash

        self._h = xxhash.xxh64()
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        self._h.update(x.numpy().tobytes())
        self.batches += 1

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# ---------------------------------------------------------------- step-indexed data


class StepSampler(Sampler[int]):
    """Yields step numbers from the trainer's current step to `end` (resume = skip nothing twice)."""

    def __init__(self, start: Callable[[], int], end: int) -> None:
        self.start, self.end = start, int(end)

    def __iter__(self):
        return iter(range(self.start(), self.end))

    def __len__(self) -> int:
        return max(0, self.end - self.start())


class WindowBatches(Dataset):
    """`batches[step]` -> (x, y): windows of block_size+1 tokens from memory-mapped arrays.

    `sampling="epoch"`: every epoch cuts the split into back-to-back windows at a random
    offset and visits them in a seeded random order, so each token is trained on once per
    epoch; step s on rank r takes windows (s*world + r)*B ... +B of that sequence.
    `sampling="random"`: B window starts drawn uniformly, from a generator seeded with
    (seed, rank, step). Either way a batch depends only on (seed, step, rank, world).
    """

    def __init__(self, arrays: list[np.ndarray], block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, sampling: str = "epoch") -> None:
        self.arrays = [a for a in arrays if len(a) > block_size]
        self.T, self.B, self.seed, self.rank, self.world = block_size, batch_size, int(seed), int(rank), int(world)
        if sampling not in ("epoch", "random"):
            raise PipelineError(f"unknown sampling {sampling!r}; expected epoch or random")
        self.sampling = sampling
        self.counts = np.array([len(a) - block_size for a in self.arrays], dtype=np.int64)
        self.cum = np.cumsum(self.counts)
        if not len(self.arrays):
            total = sum(len(a) for a in arrays)
            raise PipelineError(
                f"the train split has {total} tokens, fewer than block_size+1={block_size + 1}: "
                "add data or lower model.block_size"
            )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:  # steps are unbounded; the sampler decides
        return 2**62

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            if len(self._epochs) > 1:
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng([self.seed, e])
            off = int(rng.integers(0, self.T))
            files, starts = [], []
            for f, a in enumerate(self.arrays):
                o = off if len(a) - off > self.T else 0
                s = np.arange(o, len(a) - self.T, self.T, dtype=np.int64)
                files.append(np.full(len(s), f, dtype=np.int64))
                starts.append(s)
            files_a, starts_a = np.concatenate(files), np.concatenate(starts)
            perm = rng.permutation(len(starts_a))
            self._epochs[e] = (files_a[perm], starts_a[perm])
        return self._epochs[e]

    def starts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, self.rank, int(step)])
            g = rng.integers(0, int(self.cum[-1]), size=self.B)
            f = np.searchsorted(self.cum, g, side="right")
            return f, g - (self.cum[f] - self.counts[f])
        n = len(self._epoch(0)[0])
        first = (int(step) * self.world + self.rank) * self.B
        fs, os_ = [], []
        for k in range(first, first + self.B):
            files, starts = self._epoch(k // n)
            fs.append(files[k % n])
            os_.append(starts[k % n])
        return np.array(fs), np.array(os_)

    def __getitem__(self, step: int):
        files, offs = self.starts(step)
        rows = np.stack([np.asarray(self.arrays[f][o : o + self.T + 1], dtype=np.int64) for f, o in zip(files, offs)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def fixed_windows(arrays: list[np.ndarray], block_size: int, n: int) -> list[np.ndarray]:
    """`n` windows evenly spaced over a split (deterministic; windows never cross files)."""
    arrays = [a for a in arrays if len(a) >= 2]
    if not arrays or n <= 0:
        return []
    T = min(block_size, max(len(a) for a in arrays) - 1)
    usable = [a for a in arrays if len(a) > T]
    counts = np.array([len(a) - T for a in usable], dtype=np.int64)
    cum = np.cumsum(counts)
    g = np.unique(np.linspace(0, cum[-1] - 1, num=min(n, int(cum[-1]))).round().astype(np.int64))
    f = np.searchsorted(cum, g, side="right")
    offs = g - (cum[f] - counts[f])
    return [np.asarray(usable[i][o : o + T + 1], dtype=np.int64) for i, o in zip(f, offs)]


class FixedBatches(Dataset):
    """Pre-built (x, y) batches; this rank's share is every world-th batch."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int = 0, world: int = 1) -> None:
        self.batches = batches[rank::world] if len(batches) >= world else batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def windows_to_batches(windows: list[np.ndarray], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, len(windows), batch_size):
        t = torch.from_numpy(np.stack(windows[i : i + batch_size]))
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def _world(trainer) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class _StepDataModule(L.LightningDataModule):
    """Shared plumbing: step-indexed train loader, fixed validation batches."""

    max_steps: int
    accumulate: int = 1  # micro-batches per optimizer step (set by `trainer.fit` from the config)
    digest: DataDigest | None = None  # hashes the training batches when set (by `trainer.fit`)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = getattr(self, "trainer", None)
        if self.digest is not None and trainer is not None and trainer.training:
            self.digest.update(batch[0])
        return batch

    def _train_dataset(self, rank: int, world: int) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def _val_batches(self) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _current_step(self) -> int:
        """Index of the next micro-batch: optimizer steps done x micro-batches per step."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) * int(self.accumulate) if trainer is not None else 0

    def train_dataloader(self):
        rank, world = _world(getattr(self, "trainer", None))
        end = self.max_steps * int(self.accumulate)
        return DataLoader(self._train_dataset(rank, world), batch_size=None, sampler=StepSampler(self._current_step, end))

    def val_dataloader(self):
        rank, world = _world(getattr(self, "trainer", None))
        return DataLoader(FixedBatches(self._val_batches(), rank, world), batch_size=None, shuffle=False)


class ShardDataModule(_StepDataModule):
    """Pretraining data: random train windows and fixed val windows over `index.json` shards."""

    def __init__(
        self, shards_dir: Path, block_size: int, batch_size: int, seed: int, max_steps: int, val_batches: int,
        sampling: str = "epoch",
    ) -> None:
        super().__init__()
        self.shards_dir = Path(shards_dir)
        self.index = read_index(self.shards_dir)
        self.block_size, self.batch_size, self.seed = int(block_size), int(batch_size), int(seed)
        self.max_steps, self.val_batches, self.sampling = int(max_steps), int(val_batches), sampling
        self.train = open_split(self.shards_dir, "train", self.index)
        self.val = open_split(self.shards_dir, "val", self.index)
        self._val_cache: list | None = None

    def _train_dataset(self, rank: int, world: int) -> Dataset:
        return WindowBatches(self.train, self.block_size, self.batch_size, self.seed, rank, world, self.sampling)

    def _val_batches(self) -> list:
        if self._val_cache is None:
            wins = fixed_windows(self.val, self.block_size, self.val_batches * self.batch_size)
            self._val_cache = windows_to_batches(wins, self.batch_size)
        return self._val_cache

    def has_val(self) -> bool:
        return self.val_batches > 0 and bool(self._val_batches())


class RowsDataModule(_StepDataModule):
    """Fine-tuning data: pre-packed (x, y) rows; step `s` takes the next batch of a seeded
    per-epoch permutation, so every row is seen once per epoch and resuming is exact."""

    def __init__(self, train_rows: list, val_rows: list, batch_size: int, seed: int, max_steps: int, val_batches: int, pad_id: int):
        super().__init__()
        self.train_rows, self.val_rows = train_rows, val_rows
        self.batch_size, self.seed, self.max_steps = int(batch_size), int(seed), int(max_steps)
        self.val_batches, self.pad_id = int(val_batches), int(pad_id)

    def _train_dataset(self, rank: int, world: int) -> Dataset:
        return RowBatches(self.train_rows, self.batch_size, self.seed, self.pad_id, rank, world)

    def _val_batches(self) -> list:
        rows = self.val_rows[: self.val_batches * self.batch_size]
        return [collate(rows[i : i + self.batch_size], self.pad_id) for i in range(0, len(rows), self.batch_size)]

    def has_val(self) -> bool:
        return self.val_batches > 0 and bool(self.val_rows)


def collate(rows: list[tuple], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(ids, labels) rows -> right-padded x, y shifted by one; padding gets label -100.

    Packed rows (ids, labels, segments) also give the inputs' segment ids (padding: -1, a
    segment of its own, so no real token attends to it)."""
    T = max(len(r[0]) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    packed = any(len(r) > 2 for r in rows)
    seg = torch.full((len(rows), T), -1, dtype=torch.long) if packed else None
    for i, (ids, labels, *rest) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        y[i, :n] = torch.tensor(labels[1:], dtype=torch.long)
        if seg is not None:
            seg[i, :n] = torch.tensor(rest[0][:-1] if rest else [0] * n, dtype=torch.long)
    return (x, y) if seg is None else (x, y, seg)


class RowBatches(Dataset):
    """Step `s` on rank `r` takes slots (s*world + r)*B ... +B of a seeded per-epoch permutation."""

    def __init__(self, rows: list, batch_size: int, seed: int, pad_id: int, rank: int = 0, world: int = 1) -> None:
        if not rows:
            raise PipelineError("no fine-tuning rows to train on")
        self.rows, self.B, self.seed, self.pad_id = rows, batch_size, int(seed), pad_id
        self.rank, self.world = int(rank), int(world)
        self._perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 2**62

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 1:
                self._perm.pop(min(self._perm))
            self._perm[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self._perm[epoch]

    def indices(self, step: int) -> list[int]:
        n = len(self.rows)
        out = []
        first = (int(step) * self.world + self.rank) * self.B
        for k in range(first, first + self.B):
            out.append(int(self._epoch_perm(k // n)[k % n]))
        return out

    def __getitem__(self, step: int):
        return collate([self.rows[i] for i in self.indices(step)], self.pad_id)


