"""Batched NumPy sampler: penalties, temperature, top-k / top-p / min-p and a seeded draw.

Each request owns a `SamplingState` (its generator and the token counts that penalties read).
`sample` only advances each state's generator; the caller records each token it keeps with
`state.append`, so the counts never hold a token the engine did not accept.

A request's token depends only on its own logits row and its own generator, which advances by
exactly one `random()` per step; so the same seed and logits give the same tokens whatever else
shares the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pdserve.engine.sampling_params import SamplingParams

# Candidates top-p sorts first; most rows reach their top_p mass within far fewer tokens.
_TOP_P_FIRST_GUESS = 256


@dataclass
class SamplingState:
    """One request's sampling state. Build it with `create`; feed it with `append`."""

    params: SamplingParams
    generator: np.random.Generator
    eos_token_ids: tuple[int, ...]
    prompt_token_ids: np.ndarray  # [P] int64, sorted and unique: the repetition penalty needs a set
    output_counts: dict[int, int] = field(default_factory=dict)  # token id -> times in the output
    # Kept beside output_counts because summing the counts every step is O(distinct tokens).
    num_output_tokens: int = 0

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] | np.ndarray,
        eos_token_ids: Iterable[int] = (),
    ) -> SamplingState:
        """State for a new request; eos_token_ids are masked until params.min_tokens are out.

        The generator is seeded from params.seed when given, else from fresh OS entropy.
        """
        generator = np.random.default_rng(params.seed)
        prompt = np.unique(np.asarray(prompt_token_ids, dtype=np.int64))  # [P]
        return cls(params, generator, tuple(int(t) for t in eos_token_ids), prompt)

    def append(self, token_id: int) -> None:
        """Record one output token the request kept."""
        token_id = int(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        self.num_output_tokens += 1

    def output_ids_and_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct output token ids [N] int64 and how often each occurred [N] int64."""
        n = len(self.output_counts)
        ids = np.fromiter(self.output_counts.keys(), dtype=np.int64, count=n)  # [N]
        counts = np.fromiter(self.output_counts.values(), dtype=np.int64, count=n)  # [N]
        return ids, counts


@dataclass
class SamplerOutput:
    """One sampled token per request, with logprobs taken from the raw model logits."""

    token_ids: np.ndarray  # [B] int64
    logprobs: np.ndarray  # [B] float32, log_softmax(raw logits) at the chosen token
    # Per row: (ids [n] int64, logprobs [n] float32) sorted by logprob descending, where
    # n = params.logprobs; None when params.logprobs is None or 0.
    top_logprobs: list[tuple[np.ndarray, np.ndarray] | None]


def sample(logits: np.ndarray, states: Sequence[SamplingState]) -> SamplerOutput:
    """Pick one token per row of logits [B, V] (B = len(states)).

    The logits are not modified. Each state's generator advances by one draw; nothing else in
    the states changes, so the caller must `append` the token it keeps.
    """
    assert logits.ndim == 2 and logits.shape[0] == len(states), (logits.shape, len(states))
    batch = logits.shape[0]
    x = process_logits(logits, states)  # [B, V] float32
    # One draw per request per step, greedy ones included, so a seeded request's stream of
    # uniforms depends only on how many steps it has taken.
    uniforms = np.array([s.generator.random() for s in states], dtype=np.float64)  # [B]
    greedy = np.array([s.params.greedy for s in states], dtype=bool)  # [B]

    token_ids = np.empty(batch, dtype=np.int64)  # [B]
    if greedy.any():
        token_ids[greedy] = np.argmax(x[greedy], axis=-1)  # argmax keeps the lowest id on ties
    rows = np.flatnonzero(~greedy)  # [S]
    if rows.size:
        temperature = np.array([states[i].params.temperature for i in rows], dtype=np.float32)
        scaled = x[rows] / temperature[:, None]  # [S, V]
        for j, i in enumerate(rows):
            p = states[i].params
            token_ids[i] = _sample_row(scaled[j], p.top_k, p.top_p, p.min_p, uniforms[i])

    logprobs, top_logprobs = _logprobs(logits, token_ids, states)
    return SamplerOutput(token_ids, logprobs, top_logprobs)


def process_logits(logits: np.ndarray, states: Sequence[SamplingState]) -> np.ndarray:
    """A float32 copy of logits [B, V] with penalties applied and min_tokens bans set to -inf.

    Order: repetition penalty (HF style, over prompt and output tokens), then frequency and
    presence penalties (OpenAI style, over output tokens), then the min_tokens mask.
    """
    x = np.array(logits, dtype=np.float32, copy=True)  # [B, V]
    _apply_repetition_penalty(x, states)
    _apply_frequency_presence_penalties(x, states)
    _ban_stop_tokens_before_min_tokens(x, states)
    return x


def _apply_repetition_penalty(x: np.ndarray, states: Sequence[SamplingState]) -> None:
    rows, ids, penalties = [], [], []
    for i, s in enumerate(states):
        penalty = s.params.repetition_penalty
        if penalty == 1.0:
            continue
        # A token in both prompt and output appears twice here; the fancy-index write below
        # stores the same value for both copies, so it is still penalized once.
        seen = np.concatenate([s.prompt_token_ids, s.output_ids_and_counts()[0]])  # [N]
        rows.append(np.full(seen.size, i, dtype=np.int64))
        ids.append(seen)
        penalties.append(np.full(seen.size, penalty, dtype=np.float32))
    if not rows:
        return
    r, c, p = np.concatenate(rows), np.concatenate(ids), np.concatenate(penalties)  # [M] each
    vals = x[r, c]  # [M]
    x[r, c] = np.where(vals > 0, vals / p, vals * p)


def _apply_frequency_presence_penalties(x: np.ndarray, states: Sequence[SamplingState]) -> None:
    rows, ids, deltas = [], [], []
    for i, s in enumerate(states):
        frequency, presence = s.params.frequency_penalty, s.params.presence_penalty
        if (frequency == 0.0 and presence == 0.0) or not s.output_counts:
            continue
        out_ids, counts = s.output_ids_and_counts()  # [N] each
        rows.append(np.full(out_ids.size, i, dtype=np.int64))
        ids.append(out_ids)
        deltas.append((frequency * counts + presence).astype(np.float32))
    if not rows:
        return
    # Ids are distinct within a row, so no subtraction is lost to a repeated index.
    x[np.concatenate(rows), np.concatenate(ids)] -= np.concatenate(deltas)


def _ban_stop_tokens_before_min_tokens(x: np.ndarray, states: Sequence[SamplingState]) -> None:
    vocab = x.shape[1]
    for i, s in enumerate(states):
        if s.num_output_tokens >= s.params.min_tokens:
            continue
        # Stop ids come from the client and may lie outside the vocabulary; they cannot be
        # sampled anyway, so skip them rather than fail the whole batch.
        banned = [t for t in (*s.eos_token_ids, *s.params.stop_token_ids) if 0 <= t < vocab]
        x[i, banned] = -np.inf


def _sample_row(logits: np.ndarray, top_k: int, top_p: float, min_p: float, u: float) -> int:
    """Draw a token id from one row of temperature-scaled logits [V], given u in [0, 1)."""
    vocab = logits.shape[0]
    ids = None  # None: the candidates are all ids, in order
    vals = logits  # [N] logits of the candidates
    if 0 < top_k < vocab:
        ids = np.argpartition(logits, vocab - top_k)[vocab - top_k :]  # [k], unordered
        vals = logits[ids]
    probs = np.exp(vals.astype(np.float64) - vals.max())  # [N], unnormalized, top one is 1
    if top_p < 1.0:
        ids, probs = _top_p(ids, probs, top_p)
    if min_p > 0.0:
        kept = probs >= min_p * probs.max()  # [N] bool; the ratio survives renormalization
        ids = np.flatnonzero(kept) if ids is None else ids[kept]
        probs = probs[kept]
    cum = np.cumsum(probs)  # [N]
    # Inverse CDF: take the first i with cum[i] > u * total. A zero-probability token has
    # cum[i] == cum[i - 1] and is never taken; u < 1 makes u * total < total even after
    # rounding, so the pick never runs into trailing zero-probability tokens.
    pick = int(np.searchsorted(cum, u * cum[-1], side="right"))
    return int(pick if ids is None else ids[pick])


def _top_p(
    ids: np.ndarray | None, probs: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-likely set with mass >= top_p, as (ids [K], probs [K]) descending.

    probs [N] are unnormalized; ids None means the candidates are ids 0..N-1.
    """
    n = probs.size
    target = top_p * probs.sum()
    k = min(n, _TOP_P_FIRST_GUESS)
    while True:
        # Sort only the k likeliest: that keeps a typical row O(N). k grows until they hold
        # enough mass, so a flat row costs at worst a full O(N log N) sort.
        likeliest = np.argpartition(-probs, k - 1)[:k] if k < n else np.arange(n)  # [k]
        order = likeliest[np.argsort(-probs[likeliest], kind="stable")]  # [k] descending
        cum = np.cumsum(probs[order])  # [k]
        if cum[-1] >= target or k == n:
            break
        k = min(n, 4 * k)
    # The first index where the mass reaches top_p is kept, so the top token always is.
    order = order[: int(np.searchsorted(cum, target)) + 1]
    return (order if ids is None else ids[order]), probs[order]


def _logprobs(
    logits: np.ndarray, token_ids: np.ndarray, states: Sequence[SamplingState]
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray] | None]]:
    """log_softmax of the raw logits [B, V] at the chosen tokens, and the top alternatives."""
    batch, vocab = logits.shape
    raw = np.asarray(logits, dtype=np.float32)  # [B, V]
    peak = raw.max(axis=-1, keepdims=True)  # [B, 1]
    lse = peak[:, 0] + np.log(np.exp(raw - peak).sum(axis=-1))  # [B]
    chosen = (raw[np.arange(batch), token_ids] - lse).astype(np.float32)  # [B]

    top: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i, s in enumerate(states):
        n = min(s.params.logprobs or 0, vocab)
        if n == 0:
            top.append(None)
            continue
        ids = np.argpartition(raw[i], vocab - n)[vocab - n :]  # [n], unordered
        ids = ids[np.lexsort((ids, -raw[i, ids]))].astype(np.int64)  # descending, ties by id
        top.append((ids, (raw[i, ids] - lse[i]).astype(np.float32)))
    return chosen, top
