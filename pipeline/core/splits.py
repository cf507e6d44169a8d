"""The train/validation split, by document id, shared by every stage that needs it.

A document is held out when its id hashes below ``fraction``: the decision depends only on
the document's content, so it is stable across reruns, shard layouts and machines.
"""

from __future__ import annotations


def is_val(doc_id: str, fraction: float) -> bool:
    return int(doc_id[:8], 16) / 0x1_0000_0000 < float(fraction)
