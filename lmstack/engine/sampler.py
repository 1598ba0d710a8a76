"""Turns one decode step's logits [B, V] into one token per sequence.

Per row, in order: repetition / frequency / presence penalties, logit_bias, the
structured-output mask, then greedy argmax or temperature -> top-k -> top-p -> min-p ->
draw. Work is grouped by what the batch asks for: no penalties or biases requested means
no such code runs, an all-greedy batch is one argmax, and logprobs are computed only for
rows that want them.

Draws use inverse-CDF sampling with one uniform number per row, so a seeded request's token
depends only on its own logits and its own generator, never on its batch neighbours.

Logprobs follow vLLM's default "raw_logprobs" semantics: they come from log_softmax of the
model's raw logits, before penalties, temperature, masks or truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.engine.sequence import Sequence

# Top-p looks for its nucleus among this many highest-probability tokens first, widening
# only for rows whose nucleus is bigger (flat distributions, high temperature). A full sort
# of a 49k vocabulary costs ~6 ms per row on a small CPU, topk(256) about 0.3 ms.
_NUCLEUS_TIERS = (256, 4096, 16384)
# Temperatures this small are greedy in effect, and dividing by them overflows to inf/NaN.
GREEDY_BELOW = 1e-5


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # chosen token's raw log-prob; None when logprobs is off
    top_logprobs: list[tuple[int, float]] | None = None  # top-N (token_id, logprob), best first


class Sampler:
    def __init__(self, vocab_size: int, seed: int | None = None):
        self.vocab_size = vocab_size
        # Shared by every unseeded request; seeded ones get their own (seq.generator).
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        allowed_mask: torch.Tensor | None = None,
    ) -> list[SampleResult]:
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(seqs)} sequences")
        # Columns past the tokenizer's vocabulary are padding, never real tokens.
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, : self.vocab_size]
            if allowed_mask is not None:
                allowed_mask = allowed_mask[:, : self.vocab_size]
        logits = logits.float()
        params = [s.params for s in seqs]

        # Never modify `logits` in place: raw logprobs are computed from it at the end.
        work = apply_logit_bias(apply_penalties(logits, seqs), logits, seqs)
        if allowed_mask is not None:
            work = _apply_mask(work, logits, allowed_mask)

        tokens = torch.empty(len(seqs), dtype=torch.long)
        greedy = [i for i, p in enumerate(params) if p.temperature < GREEDY_BELOW]
        sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
        if len(greedy) == len(seqs):
            tokens = work.argmax(dim=-1)
        elif greedy:
            tokens[greedy] = work[greedy].argmax(dim=-1)
        if sampled:
            tokens[sampled] = self._sample(work, [seqs[i] for i in sampled], sampled)
        return _results(logits, tokens, params)

    def _sample(self, work: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
        params = [s.params for s in seqs]
        temperature = torch.tensor([p.temperature for p in params]).unsqueeze(1)
        probs = torch.softmax(_take(work, rows) / temperature, dim=-1)
        uniform = self._uniforms(seqs)
        vocab = probs.shape[1]
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        truncated = [i for i, p in enumerate(params) if top_k[i] < vocab or p.top_p < 1]
        plain = [i for i, p in enumerate(params) if top_k[i] >= vocab and p.top_p >= 1]
        out = torch.empty(len(params), dtype=torch.long)
        if truncated:
            out[truncated] = _sample_truncated(
                _take(probs, truncated), [params[i] for i in truncated],
                [top_k[i] for i in truncated], uniform[truncated],
            )  # fmt: skip
        if plain:
            out[plain] = _sample_full(
                _take(probs, plain),
                torch.tensor([params[i].min_p for i in plain]),
                uniform[plain],
            )
        return out

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One U[0, 1) per row: from the row's own generator when the request is seeded."""
        u = torch.rand(len(seqs), dtype=torch.float64, generator=self.generator)
        for i, seq in enumerate(seqs):
            seed = seq.params.seed
            if seed is None:
                continue
            gen = seq.generator
            if gen is None:
                gen = torch.Generator().manual_seed(seed)
                seq.generator = gen
            u[i] = torch.rand(1, dtype=torch.float64, generator=gen)[0]
        return u


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Logits after each row's penalties; `logits` itself when no row asks for any.

    repetition_penalty (HF): for every token in prompt + output, logit / p if > 0 else
    logit * p. frequency/presence (OpenAI), output tokens only:
    logit -= count * frequency_penalty + (count > 0) * presence_penalty.
    """
    rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    freq = [
        i
        for i, s in enumerate(seqs)
        if (s.params.frequency_penalty != 0 or s.params.presence_penalty != 0)
        and s.num_output_tokens
    ]
    if not rep and not freq:
        return logits
    vocab = logits.shape[1]
    out = logits.clone()
    # Sparse updates keyed by row * V + token: cost scales with the tokens seen, not B x V.
    if rep:
        keys = _row_token_keys([seqs[i].token_ids for i in rep], rep, vocab).unique()
        row, tok = keys // vocab, keys % vocab
        penalty = torch.zeros(len(seqs))
        penalty[rep] = torch.tensor([seqs[i].params.repetition_penalty for i in rep])
        penalty = penalty[row]
        values = out[row, tok]
        out[row, tok] = torch.where(values > 0, values / penalty, values * penalty)
    if freq:
        keys = _row_token_keys([seqs[i].output_token_ids for i in freq], freq, vocab)
        keys, counts = keys.unique(return_counts=True)
        row, tok = keys // vocab, keys % vocab
        fp = torch.zeros(len(seqs), 2)
        fp[freq] = torch.tensor(
            [[seqs[i].params.frequency_penalty, seqs[i].params.presence_penalty] for i in freq]
        )
        out[row, tok] -= counts * fp[row, 0] + fp[row, 1]
    return out


def apply_logit_bias(work: torch.Tensor, logits: torch.Tensor, seqs: list[Sequence]):
    """`work` with each row's logit_bias added (one scatter for the batch); `work` itself
    when no row has one. Never writes to `logits`, whose raw values give the logprobs."""
    rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    if not rows:
        return work
    if work is logits:
        work = logits.clone()
    biases = [seqs[i].params.logit_bias for i in rows]
    lengths = torch.tensor([len(b) for b in biases])
    row = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    tok = torch.tensor([t for b in biases for t in b], dtype=torch.long)
    value = torch.tensor([v for b in biases for v in b.values()], dtype=work.dtype)
    work.index_put_((row, tok), value, accumulate=True)
    return work


def _row_token_keys(token_lists: list[list[int]], rows: list[int], vocab: int) -> torch.Tensor:
    lengths = torch.tensor([len(t) for t in token_lists])
    tokens = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    return row_ids * vocab + tokens


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of `t`, without the copy when that is every row (callers never write to it)."""
    # Advanced indexing, not index_select: the latter is ~50x slower on wide CPU rows.
    return t if len(rows) == t.shape[0] else t[rows]


def _apply_mask(work: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """-inf where not allowed, only on rows the mask actually constrains."""
    constrained = (~allowed.all(dim=1)).nonzero().flatten()
    if constrained.numel() == 0:
        return work
    row_mask = allowed[constrained]
    # A row with nothing allowed (a grammar in its error state) samples unconstrained
    # rather than from NaNs; the engine sees the rejection when it feeds the token back.
    row_mask[~row_mask.any(dim=1)] = True
    if work is logits:
        work = logits.clone()
    if constrained.numel() == work.shape[0]:
        return work.masked_fill_(~row_mask, float("-inf"))
    work[constrained] = work[constrained].masked_fill_(~row_mask, float("-inf"))
    return work


def _sample_truncated(
    probs: torch.Tensor, params: list, top_k: list[int], uniform: torch.Tensor
) -> torch.Tensor:
    """Top-k / top-p / min-p rows: find and draw from the kept set among sorted candidates.

    A row's candidate count depends only on its own params and distribution, so a seeded row
    sees the same candidates (same tie order) whatever batch it is in.
    """
    vocab = probs.shape[1]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)
    min_p = torch.tensor([p.min_p for p in params])
    out = torch.empty(len(params), dtype=torch.long)
    # Top-k rows need exactly k candidates; top-p-only rows start with the smallest tier.
    width = [k if k < vocab else min(_NUCLEUS_TIERS[0], vocab) for k in top_k]
    pending = list(range(len(params)))
    while pending:
        retry: list[int] = []
        for k in sorted({width[i] for i in pending}):
            group = [i for i in pending if width[i] == k]
            values, ids = _take(probs, group).topk(k, dim=-1)
            cum = values.double().cumsum(dim=-1)
            has_k = torch.tensor([top_k[i] <= k for i in group])
            # With top-k the kept set is all in hand, so top-p renormalises over it; without,
            # the candidates are a prefix of the whole distribution, which sums to 1.
            total = torch.where(has_k, cum[:, -1], 1.0)
            need = top_p[group] * total
            tail = values[:, -1].double()
            resolved = has_k | (cum[:, -1] >= need) | (tail == 0) | (k >= vocab)
            if not bool(resolved.all()):
                # Every token left has prob <= tail, so at least (need - mass) / tail more are
                # needed: skip straight past tiers that cannot hold the nucleus.
                at_least = (k + (need - cum[:, -1]) / tail).tolist()
                for j in (~resolved).nonzero().flatten().tolist():
                    i = group[j]
                    width[i] = next((t for t in _NUCLEUS_TIERS if t >= at_least[j]), vocab)
                    width[i] = min(width[i], vocab)
                    retry.append(i)
            done = resolved.nonzero().flatten()
            if done.numel() == 0:
                continue
            if done.numel() < len(group):
                values, ids, cum, need = values[done], ids[done], cum[done], need[done]
            rows = [group[j] for j in done.tolist()]
            # Top-p keeps tokens whose preceding mass is below p (so at least the first);
            # min-p keeps prob >= min_p * max. Both keep a prefix of the sorted candidates.
            keep = (cum - values.double()) < need.unsqueeze(1)
            keep &= values >= min_p[rows].unsqueeze(1) * values[:, :1]
            keep[:, 0] = True
            out[rows] = _draw(values * keep, uniform[rows], ids)
        pending = retry
    return out


def _sample_full(probs: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Rows without top-k/top-p: draw over the whole vocabulary (after min-p)."""
    if bool((min_p > 0).any()):
        top = probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < min_p.unsqueeze(1) * top, 0.0)
    return _draw(probs, uniform)


def _draw(
    weights: torch.Tensor, uniform: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse-CDF draw per row from non-negative weights; maps positions through `ids`."""
    cum = weights.cumsum(dim=-1)
    target = (uniform * cum[:, -1].double()).to(cum.dtype).unsqueeze(1)
    pos = torch.searchsorted(cum, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)
    # Rounding can put the target at the very top of the CDF, past the last non-zero weight.
    bad = weights.gather(1, pos.unsqueeze(1)).squeeze(1) <= 0
    if bool(bad.any()):
        pos[bad] = weights[bad].argmax(dim=-1)
    return pos if ids is None else ids.gather(1, pos.unsqueeze(1)).squeeze(1)


def _results(logits: torch.Tensor, tokens: torch.Tensor, params: list) -> list[SampleResult]:
    token_list = tokens.tolist()
    results = [SampleResult(token_id=t) for t in token_list]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return results
    # Raw logprobs: the model's own distribution, before penalties, temperature and masks.
    logprobs = torch.log_softmax(_take(logits, want), dim=-1)
    chosen = logprobs.gather(1, tokens[want].unsqueeze(1)).squeeze(1).tolist()
    n_max = max(params[i].logprobs for i in want)
    top_values, top_ids = logprobs.topk(min(n_max, logprobs.shape[1]), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(want):
        n = params[i].logprobs
        results[i].logprob = chosen[j]
        results[i].top_logprobs = list(zip(top_ids[j][:n], top_values[j][:n], strict=True))
    return results
