"""What the clean stage's Parquet files hold: kept documents, rejected ones, and the
candidates a filtering worker hands to dedup and decontamination."""

from __future__ import annotations

import pyarrow as pa

CLEAN_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("language", pa.string()),
    ]
)
# ``id`` of a rejected document is its raw id: rejected docs may have no cleaned text.
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("step", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),  # input size (HTML or text), for the byte funnel
        pa.field("text", pa.string()),  # the text as the rejecting step saw it (null before extraction)
    ]
)
# A document that passed the steps, keyed for dedup (pipeline.dedup.minhash.make_key).
CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("language", pa.string()),
        pa.field("bytes_in", pa.int64(), nullable=False),
    ]
)
