"""Distributed data parallel for real: two CPU processes (gloo) launched by Lightning from
`python -m pipeline pretrain hardware.strategy=ddp hardware.devices=2`, as a user would.

The ranks must read distinct windows (each rank's stream is replayed here and its hash
compared with what the rank itself hashed while training) and must end with identical
weights (DDP all-reduces gradients, so any divergence is a bug)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xxhash
from conftest import run_cli
from fixtures import make_project

from pipeline.training.lightning import WindowBatches
from pipeline.tokenize.shards import open_split, read_index


def test_two_process_ddp_reads_distinct_data_and_ends_with_identical_weights(tmp_path):
    overrides = make_project(tmp_path)
    steps = 6
    proc = run_cli("pretrain", *overrides, "hardware.strategy=ddp", "hardware.devices=2", "hardware.accelerator=cpu",
                   f"pretrain.max_steps={steps}", "pretrain.val_every=3", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "models" / "pretrain"
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps
    assert summary["tokens_seen"] == steps * 8 * 64 * 2 and summary["tokens_per_step"] == 8 * 64 * 2
    assert 0 < summary["mfu"] < 1
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["batches"] == steps for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"], "DDP ranks diverged"
    assert ranks[0]["data_xxh64"] != ranks[1]["data_xxh64"]

    shards = Path(tmp_path / "data" / "shards")
    train = open_split(shards, "train", read_index(shards))
    seen = []
    for rank in (0, 1):
        ds = WindowBatches(train, 64, 8, seed=int(summary["config"]["seed"]), rank=rank, world=2)
        h = xxhash.xxh64()
        for s in range(steps):
            h.update(ds[s][0].numpy().tobytes())
        assert h.hexdigest() == ranks[rank]["data_xxh64"], f"rank {rank} did not train on its own stream"
        seen.append({(int(f), int(o)) for s in range(steps) for f, o in zip(*ds.starts(s))})
    assert not seen[0] & seen[1], "the ranks' windows overlap"
    assert len(seen[0]) == len(seen[1]) == steps * 8

    # rank 0 alone wrote the run directory; its checkpoint is the shared final state
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    assert not list(tmp_path.glob("models/pretrain.tmp-*"))
    assert np.isfinite(summary["final_val_loss"])
