"""The baselines the transformers are compared with, fit on the train split here and scored on
the same held-out tokens: an interpolated Kneser-Ney n-gram model and an LSTM."""

from __future__ import annotations

import numpy as np

from pipeline.evaluation import scoring
from pipeline.evaluation.heldout import HeldOut
from pipeline.evaluation.ngram import KneserNey, stream_chunks


def ngram(train: list[np.ndarray], heldout: HeldOut, vocab_size: int, ec) -> tuple[dict, dict]:
    """(scores, info) of the Kneser-Ney baseline; info: order, discount, train_tokens and the
    ``eval.ngram_max_train_tokens`` cap (0 = none)."""
    cap = int(ec.get("ngram_max_train_tokens", 0) or 0)
    kn = KneserNey(int(ec.ngram_order), float(ec.ngram_discount), vocab_size)
    kn.fit(stream_chunks(train, cap or None), vocab_size)
    nats, count = kn.nats(heldout.tokens, start=1)
    info = {"order": kn.order, "discount": kn.discount, "train_tokens": kn.train_tokens, "cap": cap}
    return scoring.scores(nats, count, heldout), info


def lstm_enabled(ec) -> bool:
    """``eval.lstm`` is present and not disabled."""
    lc = ec.get("lstm")
    return lc is not None and bool(lc.get("enabled", True))


def lstm(train: list[np.ndarray], heldout: HeldOut, vocab_size: int, ec, seed: int,
         device: str = "cpu") -> tuple[dict, dict]:
    """(scores, info) of the LSTM baseline trained and scored on ``device`` with ``eval.lstm``
    (info: params, steps, tokens_seen, config, ...)."""
    from pipeline.evaluation.lstm_baseline import train_lstm

    lc = ec.lstm
    model, info = train_lstm(train, vocab_size, lc, seed, device=device)
    return scoring.score(model, heldout, int(lc.get("score_block", 256)), int(ec.get("batch_size", 8)),
                         ec.get("stride")), info
