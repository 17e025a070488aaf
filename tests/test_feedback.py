"""The per-user α posterior and the offline feedback benchmark, on hand-made candidates."""

from __future__ import annotations

import math
import random

import pytest

from pmgen.stages.feedback import GRID, AlphaPosterior, WeightStats, choice_log_likelihood, z_values


def cands():
    # w = 0 keeps the item (high d_t), w = 2 is all taste (high d_p)
    return [0.80, 0.74, 0.62], [0.50, 0.60, 0.72]


def test_prior_is_centred_on_the_preset_alpha():
    p = AlphaPosterior.prior(2 / 3)
    assert abs(p.mean - 2 / 3) < 0.02 and 0.1 < p.std < 0.3
    assert abs(sum(p.probs) - 1) < 1e-9 and len(p.log_p) == len(GRID)


def test_picks_move_alpha_towards_what_the_user_chose():
    d_t, d_p = cands()
    keeper, seeker = AlphaPosterior.prior(2 / 3), AlphaPosterior.prior(2 / 3)
    for _ in range(5):
        keeper.update(d_t, d_p, 0, "pick")
        seeker.update(d_t, d_p, 2, "pick")
    assert keeper.mean < 0.45 < 2 / 3 < seeker.mean
    assert keeper.std < AlphaPosterior.prior(2 / 3).std  # more sure than the prior
    assert keeper.n_events == 5


def test_like_and_dislike_are_pairwise_and_opposite():
    d_t, d_p = cands()
    liked = AlphaPosterior.prior(0.5).update(d_t, d_p, 2, "like")
    disliked = AlphaPosterior.prior(0.5).update(d_t, d_p, 2, "dislike")
    assert liked.mean > 0.5 > disliked.mean
    # a like of i is the product of the comparisons with every other candidate
    a = 0.3
    z = z_values(d_t, d_p, a)
    manual = sum(math.log(1 / (1 + math.exp(-(z[2] - z[j]) / 0.02))) for j in (0, 1))
    assert choice_log_likelihood(d_t, d_p, 2, "like", a, 0.02) == pytest.approx(manual)


def test_pick_likelihood_is_a_softmax_over_the_shown_candidates():
    d_t, d_p = cands()
    total = sum(math.exp(choice_log_likelihood(d_t, d_p, i, "pick", 0.4)) for i in range(3))
    assert total == pytest.approx(1.0)
    with pytest.raises(ValueError):
        choice_log_likelihood(d_t, d_p, 3, "pick", 0.4)
    with pytest.raises(ValueError):
        choice_log_likelihood(d_t, d_p, 0, "love", 0.4)


def test_posterior_round_trips_and_thompson_samples_from_it():
    d_t, d_p = cands()
    p = AlphaPosterior.prior(0.6).update(d_t, d_p, 0, "pick")
    q = AlphaPosterior.from_json(p.to_json())
    assert q.mean == pytest.approx(p.mean, abs=1e-4) and q.n_events == 1
    rng = random.Random(0)
    draws = [p.sample(rng) for _ in range(2000)]
    assert abs(sum(draws) / len(draws) - p.mean) < 0.03


def test_weights_never_chosen_are_skipped_after_enough_feedback():
    ws = [0.0, 0.5, 1.0, 1.5, 2.0]
    st = WeightStats()
    assert st.worth_generating(ws) == ws  # cold start: everything
    for _ in range(6):
        st.update(ws, 1, "pick")  # always w = 0.5
    st.update(ws, 4, "dislike")  # dislikes say nothing about which weights to keep
    assert st.worth_generating(ws) == [0.0, 0.5, 1.0]
    assert WeightStats.from_json(st.to_json()).counts == st.counts


def test_simulation_learned_alpha_beats_fixed_on_separable_users():
    from pmgen.eval.feedback import Round, simulate, summarize

    # users whose best candidate depends on α*: the learner should find it within a few rounds
    rounds, stars = {}, {}
    rng = random.Random(1)
    for u in range(12):
        uid = f"u{u}"
        stars[uid] = (0.2, 0.85)[u % 2]
        rs = []
        for k in range(8):
            acc = [0.8 - 0.1 * i + rng.uniform(-0.02, 0.02) for i in range(4)]
            taste = [0.1 + 0.15 * i + rng.uniform(-0.02, 0.02) for i in range(4)]
            d_t = [(1 + a) / 2 for a in acc]
            d_p = [(1 + t) / 2 for t in taste]
            rs.append(Round(uid, k, "t", [0, 1, 2, 3], d_t, d_p, acc, taste))
        rounds[uid] = rs
    rows = simulate(rounds, stars, noise=0.0)
    s = summarize(rows)
    assert s["learned"][8]["regret"]["mean"] < s["fixed"][8]["regret"]["mean"]
    assert s["learned"][8]["alpha_error"]["mean"] < s["learned"][1]["alpha_error"]["mean"]
    assert s["learned"][8]["agree"]["mean"] >= 0.8


def test_candidate_rounds_are_generated_once_and_cached(tiny_pmg, data_root, tmp_path):
    from pmgen.data import datasets
    from pmgen.data.datasets.sticker_users import TASTES
    from pmgen.eval.grading import Grader
    from pmgen.eval.feedback import candidate_rounds

    ds = datasets.load("sticker-users", data_root)
    grader = Grader(tiny_pmg.selector, datasets.load("stickers", data_root), perceptual=False,
                    tastes=[t.description for t in TASTES])
    cache = tmp_path / "c.jsonl"
    calls = []
    real = tiny_pmg.generate

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k, weights=(0.0, 1.0))

    tiny_pmg.generate = counted
    try:
        first = candidate_rounds(tiny_pmg, grader, ds, "val", n_users=2, n_rounds=4, cache=cache)
        again = candidate_rounds(tiny_pmg, grader, ds, "val", n_users=2, n_rounds=4, cache=cache)
    finally:
        del tiny_pmg.generate
    assert len(calls) == 8 and len(cache.read_text().splitlines()) == 8  # the second run read the cache
    assert {u: [r.to_json() for r in rs] for u, rs in first.items()} == \
        {u: [r.to_json() for r in rs] for u, rs in again.items()}
    for rs in first.values():
        assert [r.round for r in rs] == [0, 1, 2, 3] and all(len(r.d_t) == len(r.taste) == 2 for r in rs)
        own = {s.target_id for s in ds.split("val") if s.user_id == rs[0].user_id}
        assert {r.target_id for r in rs[:3]} <= own  # the user's own requests come first


def test_cli_feedback_is_stored_and_moves_only_that_users_alpha(tiny_pmg, toy_data, tmp_path):
    from typer.testing import CliRunner

    from pmgen.cli import _learned_alpha, app
    from pmgen.data.schema import User

    root, items, user = toy_data
    res = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png")
    run = res.save(tmp_path / "run")
    data = tmp_path / "data"
    runner = CliRunner()
    assert _learned_alpha(tiny_pmg, data)(user.user_id) is None  # no store yet: the preset's α
    for _ in range(2):
        r = runner.invoke(app, ["feedback", str(run), "--pick", "0", "--data-dir", str(data)])
        assert r.exit_code == 0, r.output
    assert "from 2 feedback event(s)" in r.output
    alpha, source = _learned_alpha(tiny_pmg, data)(user.user_id)
    assert source.startswith("learned from 2") and 0 <= alpha <= 1
    assert _learned_alpha(tiny_pmg, data)("someone-else") is None
    # the next generation of this user records the learned α
    nxt = tiny_pmg.generate(user, items["a"], items, alpha=alpha, alpha_source=source)
    assert nxt.record.alpha == alpha and nxt.record.alpha_source == source
    other = tiny_pmg.generate(User("x", user.events), items["a"], items)
    assert other.record.alpha_source == "preset"
    for args, msg in ((["--pick", "0", "--like", "1"], "exactly one"), (["--pick", "9"], "candidates 0..")):
        r = runner.invoke(app, ["feedback", str(run), *args, "--data-dir", str(data)])
        assert r.exit_code == 2 and msg in r.output
    r = runner.invoke(app, ["feedback", str(tmp_path / "nope"), "--pick", "0", "--data-dir", str(data)])
    assert r.exit_code == 2 and "not found" in r.output
