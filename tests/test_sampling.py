"""Logits processors and the token chooser, on small hand-made tensors (no model)."""
from __future__ import annotations

import math

import pytest
import torch

from app.engine.params import SamplingParams
from app.engine.sampling import LogitBias, Penalties, Picks, Temperature, TokenChooser, TopP, build_processors

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def probs_logits(probs: list[float]) -> torch.Tensor:
    """A [1, vocab] logits row whose softmax is ``probs``."""
    return torch.tensor([probs]).log()


# -- build_processors -----------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_p=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, top_p=0.5),  # greedy ignores top_p
    ],
)
def test_neutral_settings_build_no_processors(params):
    """Neutral sampling settings add nothing to the decode loop."""
    assert build_processors(params, 10, CPU) == []


def test_all_settings_build_processors_in_order():
    """Bias, penalties, temperature and top_p each add their processor, in application order."""
    params = SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.0,
                            logit_bias=((1, 2.0),))
    chain = build_processors(params, 10, CPU)
    assert [type(p) for p in chain] == [LogitBias, Penalties, Temperature, TopP]
    assert chain[1].presence == 0.5 and chain[1].frequency == 0.0
    assert chain[2].temperature == 0.7
    assert chain[3].top_p == 0.9


@pytest.mark.parametrize(
    "params, kinds",
    [
        (SamplingParams(logit_bias=((3, -1.0),)), [LogitBias]),
        (SamplingParams(frequency_penalty=-0.5), [Penalties]),
        (SamplingParams(temperature=0.5), [Temperature]),
        (SamplingParams(top_p=0.5), [TopP]),
        (SamplingParams(temperature=0.0, presence_penalty=1.0), [Penalties]),
    ],
)
def test_single_setting_builds_single_processor(params, kinds):
    """Each non-neutral setting adds exactly its own processor."""
    assert [type(p) for p in build_processors(params, 10, CPU)] == kinds


# -- the processors -------------------------------------------------------------


def test_logit_bias_adds_at_chosen_ids():
    """LogitBias adds each bias at its token id and leaves the others unchanged, on every row."""
    bias = LogitBias(((1, 2.0), (3, -1.5)), vocab_size=5, device=CPU)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    out = bias(logits, None)
    expected = torch.tensor([[0.0, 3.0, 2.0, 1.5, 4.0], [1.0, 3.0, 1.0, -0.5, 1.0]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.25), (-1.0, -0.5), (2.0, 0.0), (0.0, 2.0)])
def test_penalties_follow_openai_formula(presence, frequency):
    """logit - count * frequency - (count > 0) * presence, per row, for positive and negative values."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    out = Penalties(presence, frequency)(logits, counts)
    expected = [
        [logits[r, c].item() - counts[r, c].item() * frequency - (counts[r, c].item() > 0) * presence
         for c in range(4)]
        for r in range(2)
    ]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_penalties_concrete_values():
    """A worked example: presence 0.5, frequency 0.25 on counts 0, 1, 3."""
    out = Penalties(0.5, 0.25)(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[0.0, 1.0, 3.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.25, -0.25]]))


def test_temperature_divides_logits():
    """Temperature divides every logit."""
    logits = torch.tensor([[1.0, -2.0, 4.0]])
    torch.testing.assert_close(Temperature(0.5)(logits, None), torch.tensor([[2.0, -4.0, 8.0]]))
    torch.testing.assert_close(Temperature(2.0)(logits, None), torch.tensor([[0.5, -1.0, 2.0]]))


def test_top_p_keeps_smallest_set_reaching_top_p():
    """TopP keeps the most likely tokens until their mass reaches top_p, at their original positions."""
    # probabilities 0.15, 0.5, 0.05, 0.3: order by likelihood is ids 1, 3, 0, 2
    logits = probs_logits([0.15, 0.5, 0.05, 0.3])
    out = TopP(0.75)(logits, None)  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert torch.isinf(out[0, [0, 2]]).all() and (out[0, [0, 2]] < 0).all()
    torch.testing.assert_close(out[0, [1, 3]], logits[0, [1, 3]])

    out = TopP(0.85)(logits, None)  # needs the third token as well
    assert torch.isfinite(out[0, [1, 3, 0]]).all()
    assert out[0, 2] == NEG_INF


def test_top_p_below_float32s_smallest_value_keeps_the_most_likely_token():
    """A top_p that rounds to 0 in float32 (the fuzzer sent 1.4e-109 to /infill) still leaves one token to sample."""
    logits = probs_logits([0.15, 0.5, 0.05, 0.3])
    out = TopP(1.421936353602447e-109)(logits, None)
    assert torch.isfinite(out[0, 1]) and torch.isinf(out[0, [0, 2, 3]]).all()
    chooser = TokenChooser(SamplingParams(temperature=0.8, top_p=1e-109, seed=1), 4, 1, torch.device("cpu"))
    assert chooser(logits).token_ids.tolist() == [1]


def test_top_p_always_keeps_the_top_token():
    """Even a tiny top_p keeps the single most likely token."""
    logits = probs_logits([0.2, 0.4, 0.4 - 1e-3, 1e-3])
    out = TopP(0.01)(logits, None)
    assert torch.isfinite(out).sum() == 1
    assert out[0, 1] == logits[0, 1]


def test_top_p_with_ties_keeps_only_as_many_as_needed():
    """With equally likely tokens, exactly enough of them are kept to reach top_p."""
    logits = torch.zeros(1, 4)  # four tokens at 0.25 each
    for top_p, kept in [(0.2, 1), (0.3, 2), (0.5, 2), (0.6, 3), (0.99, 4)]:
        out = TopP(top_p)(logits, None)
        finite = torch.isfinite(out)
        assert finite.sum() == kept, top_p
        assert (out[finite] == 0).all()


def test_top_p_filters_each_row_independently():
    """Rows of a batch are filtered on their own distributions."""
    logits = torch.cat([probs_logits([0.9, 0.05, 0.05]), probs_logits([0.4, 0.3, 0.3])])
    out = TopP(0.8)(logits, None)
    assert torch.isfinite(out[0]).tolist() == [True, False, False]
    assert torch.isfinite(out[1]).sum() == 3


# -- TokenChooser ---------------------------------------------------------------


def chooser(vocab: int = 4, batch: int = 1, **settings) -> TokenChooser:
    """A TokenChooser for ``SamplingParams(**settings)``."""
    return TokenChooser(SamplingParams(**settings), vocab, batch, CPU)


def test_greedy_picks_argmax():
    """Temperature 0 picks the most likely token of each row."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 1.0, 2.0]])
    assert chooser(batch=2, temperature=0.0)(logits).token_ids.tolist() == [1, 0]


def test_greedy_bias_forces_and_forbids_tokens():
    """A +100 bias forces a token and a -100 bias forbids the argmax."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    assert chooser(temperature=0.0, logit_bias=((0, 100.0),))(logits).token_ids.tolist() == [0]
    assert chooser(temperature=0.0, logit_bias=((1, -100.0),))(logits).token_ids.tolist() == [3]


def test_sampling_bias_forbids_tokens():
    """With sampling, a -100 bias makes a token (practically) never chosen."""
    pick = chooser(vocab=3, temperature=1.0, seed=0, logit_bias=((0, -100.0), (1, -100.0)))
    logits = torch.zeros(1, 3)
    assert {pick(logits).token_ids.item() for _ in range(50)} == {2}


def test_greedy_presence_penalty_changes_the_argmax_once():
    """A presence penalty moves greedy off a generated token, and does not grow with repeats."""
    pick = chooser(vocab=3, temperature=0.0, presence_penalty=2.0)
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert pick(logits).token_ids.item() == 0
    assert pick(logits).token_ids.item() == 1  # 3 - 2 < 2
    assert pick(logits).token_ids.item() == 0  # both penalised once: 1 > 0
    assert pick(logits).token_ids.item() == 0  # token 0 seen twice, still penalised only once


def test_logprobs_are_raw_log_softmax_at_chosen_ids():
    """Reported logprobs come from the model's own distribution, before bias/penalties/temperature."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [1.0, 1.0, 3.0, 0.0]])
    picks = chooser(batch=2, temperature=0.0, logit_bias=((3, 100.0),))(logits)
    assert isinstance(picks, Picks)
    assert picks.token_ids.tolist() == [3, 3]
    expected = logits.log_softmax(dim=-1)[:, 3]
    torch.testing.assert_close(picks.logprobs, expected)
    assert picks.top_ids is None and picks.top_logprobs is None and picks.top_pairs() == []


def test_top_logprobs_are_sorted_and_raw():
    """logprobs=k returns the k most likely raw tokens per row, best first."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, -1.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    picks = chooser(vocab=5, batch=2, temperature=0.7, seed=1, logprobs=3)(logits)
    assert picks.top_ids.tolist() == [[1, 3, 2], [0, 1, 2]]
    raw = logits.log_softmax(dim=-1)
    torch.testing.assert_close(picks.top_logprobs, raw.gather(1, picks.top_ids))
    assert (picks.top_logprobs[:, :-1] >= picks.top_logprobs[:, 1:]).all()
    pairs = picks.top_pairs()  # per row, (token id, logprob) best first
    assert [tuple(token for token, _ in row) for row in pairs] == [(1, 3, 2), (0, 1, 2)]
    torch.testing.assert_close(torch.tensor([[lp for _, lp in row] for row in pairs]), raw.gather(1, picks.top_ids))


def draws(seed: int, steps: int = 20, batch: int = 3) -> list[list[int]]:
    """Token ids sampled from a flat distribution over 1000 tokens."""
    pick = chooser(vocab=1000, batch=batch, temperature=1.0, seed=seed)
    logits = torch.zeros(batch, 1000)
    return [pick(logits).token_ids.tolist() for _ in range(steps)]


def test_same_seed_same_samples_different_seed_differs():
    """A seed makes sampling reproducible; another seed gives other samples."""
    first = draws(seed=1234)
    assert draws(seed=1234) == first
    assert draws(seed=4321) != first
    assert len({t for row in first for t in row}) > 10  # the distribution really was sampled


def test_sampling_respects_top_p():
    """Tokens outside the nucleus are never sampled."""
    pick = chooser(vocab=4, temperature=1.0, top_p=0.5, seed=3)
    logits = probs_logits([0.1, 0.6, 0.2, 0.1])
    assert {pick(logits).token_ids.item() for _ in range(50)} == {1}


def test_counts_track_generated_tokens_and_feed_frequency_penalty():
    """Chosen tokens are counted per row, and the frequency penalty then changes later choices."""
    pick = chooser(vocab=3, batch=2, temperature=0.0, frequency_penalty=1.5)
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    picks = [pick(logits).token_ids.tolist() for _ in range(3)]
    # row 0: 3 > 2, then 3 - 1.5 < 2, then 1.5 > 2 - 1.5; row 1: 5, 3.5, 2 all beat 0
    assert picks == [[0, 2], [1, 2], [0, 2]]
    assert pick.counts.tolist() == [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]


def test_keep_rows_shrinks_counts():
    """keep_rows keeps only the surviving rows' counts, in order."""
    pick = chooser(vocab=3, batch=3, temperature=0.0, presence_penalty=1.0)
    pick(torch.eye(3))  # row r picks token r
    pick.keep_rows(torch.tensor([0, 2]))
    assert pick.counts.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert pick(torch.eye(3)[[0, 2]] * 0.5).token_ids.tolist() == [1, 0]  # penalised own token loses


def test_no_penalties_keep_no_counts():
    """Without penalties no counts are kept, and keep_rows is harmless."""
    pick = chooser(batch=2, temperature=0.0)
    assert pick.counts is None
    pick.keep_rows(torch.tensor([1]))
    assert pick(torch.tensor([[0.0, 0.0, 9.0, 0.0]])).token_ids.tolist() == [2]


def test_logprob_of_greedy_choice_is_the_max():
    """The greedy choice's logprob is the largest log-probability of its row."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    picks = chooser(vocab=50, batch=3, temperature=0.0, logprobs=1)(logits)
    torch.testing.assert_close(picks.logprobs, logits.log_softmax(-1).max(-1).values)
    torch.testing.assert_close(picks.top_logprobs[:, 0], picks.logprobs)
    assert all(math.isfinite(v) for v in picks.logprobs.tolist())
