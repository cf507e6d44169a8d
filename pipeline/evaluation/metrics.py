"""Scores: bits per byte, perplexity, BLEU, ROUGE-1/2/L, and a batched torch scorer.

ROUGE is Google's ``rouge-score`` (n-gram and LCS F1) fed our tokens: its own tokenizer keeps
only [a-z0-9] runs, so CJK text scores 0 and "os.path.join" becomes three words.

Window convention for models: the held-out stream t[0..N-1] is cut into consecutive,
non-overlapping windows ``t[s : s+B+1]`` (s = 0, B, 2B, ...); each window predicts its last
B tokens from the ones before them inside the window. Every token t[1..N-1] is scored once,
t[0] by nobody, and the n-gram baseline scores the very same tokens.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

from pipeline.filters.text import cjk_fraction

LN2 = math.log(2.0)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Tokenizer-independent: total -ln p over the text, in bits, divided by its UTF-8 bytes."""
    if n_bytes <= 0:
        raise ValueError("bits_per_byte needs a positive byte count")
    return float(total_nats) / (LN2 * n_bytes)


def perplexity(total_nats: float, n_tokens: int) -> float:
    if n_tokens <= 0:
        raise ValueError("perplexity needs a positive token count")
    return math.exp(float(total_nats) / n_tokens)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100): 13a tokens, or sacrebleu's `zh` tokens (each CJK
    character one token, the rest as 13a) where a reference holds Chinese or Japanese, which
    have no spaces: under 13a a whole Chinese sentence is one token and BLEU is ~0."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    tokenize = "zh" if any(cjk_fraction(r) > 0 for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score)


def _tokens(text: str) -> list[str]:
    """ROUGE tokens: lowercased whitespace words; CJK characters count one token each, since
    Chinese has no spaces and a whole sentence would otherwise be a single "word"."""
    out = []
    for word in text.lower().split():
        out.extend(_CJK.findall(word) if _CJK.search(word) else [word])
    return out


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")


class _Tokens:
    """``_tokens`` as a rouge-score tokenizer."""

    def tokenize(self, text: str) -> list[str]:
        return _tokens(text)


@functools.cache
def _scorer(kind: str):
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer([kind], tokenizer=_Tokens())


def _rouge(hypothesis: str, reference: str, kind: str) -> float:
    return float(_scorer(kind).score(reference, hypothesis)[kind].fmeasure)


def rouge_n_f1(hypothesis: str, reference: str, n: int) -> float:
    """ROUGE-N F1 of one pair: clipped n-gram overlap (multiset intersection), in [0, 1]."""
    return _rouge(hypothesis, reference, f"rouge{int(n)}")


def rouge_n(hypotheses: list[str], references: list[str], n: int) -> float:
    """Mean per-pair ROUGE-N F1, scaled to 0-100 like BLEU."""
    if not hypotheses:
        return 0.0
    return 100.0 * sum(rouge_n_f1(h, r, n) for h, r in zip(hypotheses, references, strict=True)) / len(hypotheses)


def rouge_l_f1(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) of one pair: LCS over the ROUGE tokens, in [0, 1]."""
    return _rouge(hypothesis, reference, "rougeL")


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean per-pair ROUGE-L F1, scaled to 0-100 like BLEU."""
    if not hypotheses:
        return 0.0
    return 100.0 * sum(rouge_l_f1(h, r) for h, r in zip(hypotheses, references, strict=True)) / len(hypotheses)


def generation_scores(answers: list[str], references: list[str]) -> dict[str, float]:
    """BLEU and ROUGE-1/2/L (0-100, rounded to 4 places) of generated answers against references."""
    return {
        "bleu": round(bleu(answers, references), 4),
        "rouge1": round(rouge_n(answers, references, 1), 4),
        "rouge2": round(rouge_n(answers, references, 2), 4),
        "rougeL": round(rouge_l(answers, references), 4),
    }


def score_model(
    model, tokens: np.ndarray, block_size: int, batch_size: int = 8, stride: int | None = None
) -> tuple[float, int]:
    """Total -ln p (nats) and count of tokens[1:] under ``model`` (idx [B,T] -> logits [B,T,V]).

    Windows of ``block_size`` tokens advance by ``stride`` (default: block_size, no overlap);
    each window scores only the targets the previous one did not, so every token after the
    first is scored exactly once and, with stride < block_size, with at least
    block_size - stride tokens of context (the usual sliding-window perplexity).
    """
    import torch
    import torch.nn.functional as F

    tokens = np.asarray(tokens).astype(np.int64)
    B = int(block_size)
    stride = min(B, int(stride or B))
    n = len(tokens)
    windows = []  # (start, end, score_from): x = tokens[start:end], y = tokens[start+1:end+1]
    start, prev_end = 0, 0
    while prev_end < n - 1:
        end = min(start + B, n - 1)
        windows.append((start, end, max(0, prev_end - start)))
        prev_end, start = end, start + stride
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = first.device if first is not None else torch.device("cpu")  # windows go where the model is
    total, count = 0.0, 0
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, len(windows), batch_size):
                group = windows[lo : lo + batch_size]
                by_len: dict[int, list] = {}
                for w in group:
                    by_len.setdefault(w[1] - w[0], []).append(w)
                for length, ws in by_len.items():
                    x = torch.from_numpy(np.stack([tokens[s:e] for s, e, _ in ws])).to(device)
                    y = torch.from_numpy(np.stack([tokens[s + 1 : e + 1] for s, e, _ in ws])).to(device)
                    logits = model(x)
                    if isinstance(logits, (tuple, list)):  # (logits, loss)-style forwards
                        logits = logits[0]
                    nll = F.cross_entropy(
                        logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
                    ).reshape(len(ws), length)
                    keep = (torch.arange(length)[None, :] >= torch.tensor([f for _, _, f in ws])[:, None]).to(device)
                    total += float(nll[keep].sum())
                    count += int(keep.sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return total, count
