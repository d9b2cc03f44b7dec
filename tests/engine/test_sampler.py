from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.sampler import SamplingState, process_logits, sample
from pdserve.engine.sampling_params import SamplingParams

VOCAB = 64


def make_state(prompt=(), eos=(), **params) -> SamplingState:
    return SamplingState.create(SamplingParams(**params), list(prompt), eos)


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - row.max() - np.log(np.exp(row - row.max()).sum())


def logits_from_probs(probs: dict[int, float], vocab: int = 16) -> np.ndarray:
    """A [1, vocab] row whose softmax puts `probs` on the given ids and ~0 elsewhere."""
    row = np.full(vocab, -1e4, dtype=np.float32)
    for token, p in probs.items():
        row[token] = np.log(p)
    return row[None, :]


def draw_many(logits: np.ndarray, state: SamplingState, steps: int) -> np.ndarray:
    """Sample `steps` tokens from the same row without appending them (no penalties here)."""
    return np.array([sample(logits, [state]).token_ids[0] for _ in range(steps)])


def run_steps(position: int, batch: int, steps: int, params: dict, eos=()) -> list[int]:
    """Generate `steps` tokens for one seeded request at `position` among unseeded neighbours.

    The request's logits only depend on the step, so its tokens must not depend on the batch.
    """
    target_rng = np.random.default_rng(1234)
    noise_rng = np.random.default_rng()
    target = make_state(prompt=[1, 2, 3, 5, 8], eos=eos, **params)
    others = [make_state(temperature=0.8, top_p=0.9) for _ in range(batch - 1)]
    states = others[:position] + [target] + others[position:]
    tokens = []
    for _ in range(steps):
        logits = noise_rng.normal(size=(batch, VOCAB)).astype(np.float32)
        logits[position] = target_rng.normal(size=VOCAB).astype(np.float32)
        out = sample(logits, states)
        for state, token in zip(states, out.token_ids, strict=True):
            state.append(token)
        tokens.append(int(out.token_ids[position]))
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        {"seed": 7},
        {"seed": 7, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.01},
        {"seed": 7, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.5},
    ],
)
def test_seed_gives_same_tokens_in_any_batch_position(params):
    alone = run_steps(position=0, batch=1, steps=50, params=params)
    assert run_steps(position=0, batch=1, steps=50, params=params) == alone
    assert run_steps(position=3, batch=6, steps=50, params=params) == alone
    assert run_steps(position=7, batch=8, steps=50, params=params) == alone


def test_different_seeds_give_different_tokens():
    assert run_steps(0, 1, 50, {"seed": 1}) != run_steps(0, 1, 50, {"seed": 2})


def test_unseeded_requests_differ():
    assert run_steps(0, 1, 50, {}) != run_steps(0, 1, 50, {})


def test_one_draw_per_step_even_when_greedy():
    state = make_state(seed=3, temperature=0.0)
    sample(np.zeros((1, VOCAB), dtype=np.float32), [state])
    sample(np.zeros((1, VOCAB), dtype=np.float32), [state])
    expected = np.random.default_rng(3)
    expected.random(2)
    assert state.generator.random() == expected.random()


@pytest.mark.parametrize(
    ("probs", "params", "allowed"),
    [
        # top_k=3 keeps the three most likely ids, wherever they sit in the vocabulary.
        ({9: 0.3, 2: 0.25, 14: 0.2, 5: 0.15, 0: 0.1}, {"top_k": 3}, {9, 2, 14}),
        ({9: 0.3, 2: 0.25, 14: 0.2, 5: 0.15, 0: 0.1}, {"top_k": -1}, {9, 2, 14, 5, 0}),
        # cumulative 0.4, 0.7: the smallest set with mass >= 0.6 is {11, 3}.
        ({11: 0.4, 3: 0.3, 7: 0.2, 1: 0.1}, {"top_p": 0.6}, {11, 3}),
        ({11: 0.4, 3: 0.3, 7: 0.2, 1: 0.1}, {"top_p": 0.75}, {11, 3, 7}),
        # A top_p below the top token's probability still keeps the top token.
        ({11: 0.4, 3: 0.3, 7: 0.2, 1: 0.1}, {"top_p": 0.01}, {11}),
        # min_p=0.25 of p_max=0.5 drops everything below 0.125.
        ({4: 0.5, 12: 0.2, 6: 0.15, 8: 0.1, 10: 0.05}, {"min_p": 0.25}, {4, 12, 6}),
        # top_k keeps {4, 12, 6, 8}; renormalized, top_p=0.8 then keeps {4, 12, 6}.
        ({4: 0.5, 12: 0.2, 6: 0.15, 8: 0.1, 10: 0.05}, {"top_k": 4, "top_p": 0.8}, {4, 12, 6}),
    ],
)
def test_truncation_never_emits_excluded_tokens(probs, params, allowed):
    logits = logits_from_probs(probs)
    tokens = draw_many(logits, make_state(seed=11, **params), steps=2000)
    assert set(tokens.tolist()) == allowed


@pytest.mark.parametrize("top_k", [0, 3000])
def test_top_p_over_a_flat_row_keeps_exactly_the_likeliest_prefix(top_k):
    # Thousands of tokens are needed to reach top_p, more than the sampler sorts at first.
    vocab, top_p = 4000, 0.5
    perm = np.random.default_rng(8).permutation(vocab)
    row = np.empty(vocab, dtype=np.float32)
    row[perm] = -0.0002 * np.arange(vocab)  # perm[0] is the likeliest, perm[1] next, ...
    probs = np.exp(log_softmax(row[perm][:top_k] if top_k else row[perm]))
    keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1  # reference prefix length
    state = make_state(seed=9, top_p=top_p, top_k=top_k)
    tokens = draw_many(row[None, :], state, steps=2000)
    rank = np.argsort(perm)[tokens]  # likelihood rank of each emitted token
    assert keep > 1000 and rank.max() < keep and rank.max() > 0.95 * keep


def test_truncated_draws_follow_the_renormalized_distribution():
    logits = logits_from_probs({11: 0.4, 3: 0.3, 7: 0.2, 1: 0.1})
    tokens = draw_many(logits, make_state(seed=5, top_p=0.6), steps=4000)
    assert abs(np.mean(tokens == 11) - 0.4 / 0.7) < 0.03


def test_frequencies_match_softmax_at_temperature_one():
    rng = np.random.default_rng(0)
    row = rng.normal(size=10).astype(np.float32)
    expected = np.exp(log_softmax(row))
    states = [make_state(seed=100 + i) for i in range(100)]
    logits = np.repeat(row[None, :], len(states), axis=0)
    tokens = np.concatenate([sample(logits, states).token_ids for _ in range(200)])  # 20000
    freq = np.bincount(tokens, minlength=10) / tokens.size
    sigma = np.sqrt(expected * (1 - expected) / tokens.size)
    assert np.all(np.abs(freq - expected) < 5 * sigma + 1e-3), (freq, expected)


def test_temperature_flattens_the_distribution():
    logits = logits_from_probs({0: 0.9, 1: 0.1}, vocab=2)
    hot = draw_many(logits, make_state(seed=2, temperature=3.0), steps=2000)
    # p(1) at T=3 is 1 / (1 + 9 ** (1/3)) ~= 0.325, not 0.1.
    assert abs(np.mean(hot == 1) - 1 / (1 + 9 ** (1 / 3))) < 0.04


class FixedUniform:
    """Stands in for a request's generator to pin the inverse-CDF draw at its edges."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


@pytest.mark.parametrize(("u", "expected"), [(0.0, 1), (np.nextafter(1.0, 0.0), 2)])
def test_extreme_uniforms_never_pick_masked_tokens(u, expected):
    logits = np.array([[-np.inf, 1.0, 2.0, -np.inf]], dtype=np.float32)
    state = make_state()
    state.generator = FixedUniform(u)
    assert sample(logits, [state]).token_ids[0] == expected


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(16, VOCAB)).astype(np.float32)
    states = [make_state(temperature=0.0, top_k=5, top_p=0.5) for _ in range(16)]
    np.testing.assert_array_equal(sample(logits, states).token_ids, logits.argmax(axis=1))


def test_greedy_ties_take_the_lowest_id():
    logits = np.array([[0.0, 2.0, 1.0, 2.0]], dtype=np.float32)
    assert sample(logits, [make_state(temperature=0.0)]).token_ids[0] == 1


def test_mixed_batch_greedy_and_sampled_rows():
    logits = np.tile(np.arange(8, dtype=np.float32), (3, 1))
    states = [make_state(temperature=0.0), make_state(seed=1, top_k=2), make_state(top_k=1)]
    for _ in range(100):
        out = sample(logits, states).token_ids
        assert out[0] == 7 and out[1] in (6, 7) and out[2] == 7


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([[2.0, -1.0, 0.5, 3.0, -2.0]], dtype=np.float32)
    state = make_state(prompt=[0, 1, 1], repetition_penalty=2.0)
    state.append(4)
    state.append(4)
    np.testing.assert_array_equal(process_logits(logits, [state]), [[1.0, -2.0, 0.5, 3.0, -4.0]])


def test_repetition_penalty_flips_greedy_choice():
    logits = np.array([[2.0, 1.5, -1.0, -1.5]], dtype=np.float32)
    assert sample(logits, [make_state(temperature=0.0)]).token_ids[0] == 0
    state = make_state(prompt=[0], temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [state]).token_ids[0] == 1
    # Negative logits move down: with 0 and 1 masked out, -1.0 * 2 falls below -1.5.
    negative = np.array([[-1e9, -1e9, -1.0, -1.5]], dtype=np.float32)
    state = make_state(prompt=[2], temperature=0.0, repetition_penalty=2.0)
    assert sample(negative, [state]).token_ids[0] == 3


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = np.zeros((1, 6), dtype=np.float32)
    state = make_state(prompt=[0, 1], frequency_penalty=0.5, presence_penalty=0.25)
    for token in (3, 3, 5):
        state.append(token)
    np.testing.assert_allclose(process_logits(logits, [state]), [[0, 0, 0, -1.25, 0, -0.75]])


def test_negative_presence_penalty_encourages_and_flips_greedy_choice():
    logits = np.array([[1.0, 0.8]], dtype=np.float32)
    state = make_state(temperature=0.0, presence_penalty=-0.5)
    assert sample(logits, [state]).token_ids[0] == 0
    state.append(1)
    assert sample(logits, [state]).token_ids[0] == 1


def test_penalties_only_touch_their_own_row():
    logits = np.ones((3, 4), dtype=np.float32)
    penalized = make_state(prompt=[1], repetition_penalty=4.0, frequency_penalty=1.0)
    penalized.append(2)
    states = [make_state(prompt=[1, 2]), penalized, make_state(prompt=[1, 2])]
    expected = np.ones((3, 4), dtype=np.float32)
    expected[1, 1] = 0.25
    expected[1, 2] = 0.25 - 1.0
    np.testing.assert_allclose(process_logits(logits, states), expected)


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = np.zeros((1, 8), dtype=np.float32)
    logits[0, [2, 5]] = 10.0  # eos and stop token dominate
    logits[0, 6] = 5.0
    state = make_state(eos=(2,), temperature=0.0, min_tokens=3, stop_token_ids=(5, 99))
    tokens = []
    for _ in range(4):
        token = int(sample(logits, [state]).token_ids[0])
        state.append(token)
        tokens.append(token)
    assert tokens == [6, 6, 6, 2]


def test_min_tokens_mask_holds_when_sampling():
    logits = logits_from_probs({2: 0.98, 4: 0.01, 7: 0.01}, vocab=8)
    state = make_state(eos=(2,), seed=0, min_tokens=1)
    assert 2 not in draw_many(logits, state, steps=500)


def test_logprobs_come_from_raw_logits():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, VOCAB)).astype(np.float32) * 4
    states = [
        make_state(prompt=range(VOCAB), repetition_penalty=1.8, temperature=0.5, logprobs=5),
        make_state(temperature=0.0, logprobs=0),
        make_state(seed=1),
    ]
    out = sample(logits, states)
    assert out.token_ids.dtype == np.int64 and out.logprobs.dtype == np.float32
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(log_softmax(logits[i])[token], abs=1e-5)
    ids, values = out.top_logprobs[0]
    reference = log_softmax(logits[0])
    np.testing.assert_array_equal(ids, np.argsort(-reference)[:5])
    np.testing.assert_allclose(values, reference[ids], atol=1e-5)
    assert np.all(np.diff(values) <= 0)
    assert out.top_logprobs[1] is None and out.top_logprobs[2] is None


def test_top_logprobs_ties_sorted_by_id():
    logits = np.array([[1.0, 3.0, 1.0, 3.0, 0.0]], dtype=np.float32)
    ids, _ = sample(logits, [make_state(logprobs=4)]).top_logprobs[0]
    assert ids.tolist() == [1, 3, 0, 2]


def test_sample_modifies_neither_logits_nor_states():
    logits = np.random.default_rng(5).normal(size=(2, VOCAB)).astype(np.float32)
    before = logits.copy()
    states = [make_state(prompt=[1, 2], repetition_penalty=2.0, min_tokens=2, eos=(0,))] * 2
    sample(logits, states)
    np.testing.assert_array_equal(logits, before)
    assert states[0].num_output_tokens == 0 and states[0].output_counts == {}


def test_sampling_params_defaults_and_greedy():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 1.0, 0, 16)
    assert not params.greedy and SamplingParams(temperature=0.0).greedy
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop_token_ids": (1, -2)}, "stop_token_ids"),
    ],
)
def test_sampling_params_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"top_k": -1},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"max_tokens": 1, "min_tokens": 1},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": 2**64 - 1},
        {"seed": 0},
    ],
)
def test_sampling_params_accepts_boundary_values(kwargs):
    SamplingParams(**kwargs)
