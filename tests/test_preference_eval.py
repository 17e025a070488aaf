"""Preference-extractor benchmarks: metrics on hand-made cases, the MovieLens ranking protocol (with a
hashing bag-of-words encoder instead of MiniLM), popularity without held-out data, keyword stability
with deterministic fake extractors, and the two CLI commands with fake models."""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from pmgen.data.schema import Dataset, Event, Item, Sample, User
from pmgen.eval.keyword_bench import evaluation_users
from pmgen.eval.movielens import (
    MOVIELENS_METHODS,
    hr_ndcg_at_k,
    movie_text,
    movielens_benchmark,
    movielens_markdown,
    popularity_counts,
    write_movielens_outputs,
)
from pmgen.eval.stability import jaccard, keyword_stability, shuffled_order, stability_markdown
from pmgen.stages.keywords import Keywords
from pmgen.stages.verbalize import newest_first

DIM = 512


def hashing_vectors(texts):
    """Bag-of-words vectors (crc32 buckets): identical texts → cosine 1, shared words → overlap."""
    out = torch.zeros(len(texts), DIM)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z0-9']+", t.lower()):
            out[i, zlib.crc32(w.encode()) % DIM] += 1.0
    return out


def top_genres(events, items, n=3):
    """Fake keywords: the most common genres of the history (order-insensitive)."""
    c = Counter(g for e in events if e.item_id in items for g in items[e.item_id].attributes.get("genres", []))
    return [g for g, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


@pytest.fixture(scope="module")
def ml_root(tmp_path_factory) -> Path:
    """A data directory with only ``movielens`` built (~1 s; the full ``data_root`` takes ~20 s)."""
    from pmgen.data import datasets

    root = tmp_path_factory.mktemp("ml-data")
    datasets.build("movielens", root)
    return root


@pytest.fixture(scope="module")
def ml(ml_root):
    from pmgen.data import datasets

    return datasets.load("movielens", ml_root)


# ------------------------------------------------------------------------------------- metrics


def test_hr_ndcg_hand_computed():
    ranked = ["a", "b", "c", "d"]
    assert hr_ndcg_at_k(ranked, {"a"}, 10) == (1.0, 1.0)
    hr, ndcg = hr_ndcg_at_k(ranked, {"c"}, 10)
    assert hr == 1.0 and ndcg == pytest.approx(1 / math.log2(4)) and ndcg == pytest.approx(0.5)
    assert hr_ndcg_at_k(ranked, {"z"}, 10) == (0.0, 0.0)
    assert hr_ndcg_at_k(ranked, set(), 10) == (0.0, 0.0)
    # two relevant at ranks 1 and 3: DCG = 1 + 1/2, IDCG = 1 + 1/log2(3)
    hr, ndcg = hr_ndcg_at_k(ranked, {"a", "c"}, 10)
    assert hr == 1.0 and ndcg == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # relevant only beyond the cut-off
    assert hr_ndcg_at_k(ranked, {"c"}, 2) == (0.0, 0.0)
    # more relevant than k: the ideal has only k ones, so a full top-k is perfect
    assert hr_ndcg_at_k(ranked, {"a", "b", "c", "d"}, 2) == (1.0, pytest.approx(1.0))
    # relevant at rank 2 of 2 relevant (one missing): DCG = 1/log2(3), IDCG = 1 + 1/log2(3)
    assert hr_ndcg_at_k(ranked, {"b", "z"}, 3)[1] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    with pytest.raises(ValueError, match="k must be >= 1"):
        hr_ndcg_at_k(ranked, {"a"}, 0)


def test_jaccard_lowercased_sets():
    assert jaccard(["Cats", "space"], ["cats", "SPACE "]) == 1.0
    assert jaccard(["a", "b"], ["A", "c"]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0
    assert jaccard(["a"], []) == 0.0


def test_movie_text_is_title_year_genres():
    it = Item("1", "Toy Story (1995)", "genres: Animation, Children's, Comedy",
              attributes={"genres": ["Animation", "Children's", "Comedy"]})
    assert movie_text(it) == "Toy Story (1995): Animation, Children's, Comedy"
    assert movie_text(Item("2", "Heat (1995)", "genres: Action, Crime")) == "Heat (1995): Action, Crime"


# ------------------------------------------------------------------------------- MovieLens


def test_movielens_benchmark_structure_and_ranges(ml):
    calls = []

    def kw(events, items):
        calls.append(len(events))
        return Keywords(keywords=top_genres(events, items), fallback=None, cached=False, n_events=len(events),
                        n_kept=len(events))

    seen_progress = []
    res = movielens_benchmark(ml, hashing_vectors, kw, n_users=12, k=10, seed=3,
                              progress=lambda i, n: seen_progress.append((i, n)), rerank=None)
    assert res["n_users"] == 12 and len(res["users"]) == 12 and len(calls) == 12
    assert seen_progress[-1] == (12, 12)
    methods = [m for m in MOVIELENS_METHODS if m != "popularity>keywords"]
    assert res["methods"] == methods and set(res["summary"]) == set(methods)
    test_users = {s.user_id for s in ml.split("test") if s.heldout}
    for row in res["users"]:
        assert row["user_id"] in test_users
        user = ml.users[row["user_id"]]
        assert row["n_candidates"] == len(ml.items) - len({e.item_id for e in user.events})
        assert row["n_heldout"] >= 1 and row["keyword_info"]["n_kept"] == len(user.events)
        for m in methods:
            hr, ndcg = row["metrics"][m]["hr@10"], row["metrics"][m]["ndcg@10"]
            assert hr in (0.0, 1.0) and 0.0 <= ndcg <= 1.0 and (ndcg > 0) == (hr > 0)
    for m, st in res["summary"].items():
        for name in ("hr@10", "ndcg@10"):
            lo, hi = st[name]["ci95"]
            assert 0.0 <= lo <= st[name]["mean"] <= hi <= 1.0 and st[name]["n"] == 12
    assert set(res["paired"]) == {"keywords - history-embedding", "keywords+history - history-embedding",
                                  "keywords - popularity", "popularity+keywords - popularity",
                                  "popularity+keywords - popularity+history"}
    # deterministic: same seed, same users and numbers
    again = movielens_benchmark(ml, hashing_vectors, top_genres, n_users=12, k=10, seed=3, rerank=None)
    assert [r["user_id"] for r in again["users"]] == [r["user_id"] for r in res["users"]]
    assert again["summary"] == res["summary"]
    md = movielens_markdown(res)
    assert "| random |" in md and "| keywords+history |" in md and "NDCG@10" in md


def test_movielens_defaults_to_every_test_user_and_writes_outputs(ml, tmp_path):
    res = movielens_benchmark(ml, hashing_vectors, top_genres, k=5)
    assert res["n_users"] == len({s.user_id for s in ml.split("test") if s.heldout}) > 50
    assert "hr@5" in res["summary"]["popularity"]
    js, md = write_movielens_outputs(res, tmp_path / "out")
    assert json.loads(js.read_text())["n_users"] == res["n_users"]
    assert md.read_text().startswith("# Preference keywords vs. real MovieLens users")
    # sanity of the protocol on real users: popularity and the history profile beat random ranking
    s = res["summary"]
    assert s["popularity"]["hr@5"]["mean"] > s["random"]["hr@5"]["mean"]
    assert s["history-embedding"]["hr@5"]["mean"] > s["random"]["hr@5"]["mean"]


def _toy(n_users: int = 4) -> Dataset:
    """15 movies with distinct titles plus ``z``; every test user's only held-out like is ``z``, which is in
    no history (13 candidates per test user, so a last-ranked ``z`` is outside the top 10)."""
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "War", "Western", "Musical", "Crime", "Mystery",
              "Fantasy", "Animation", "Thriller", "Adventure", "Noir"]
    items = {f"m{i}": Item(f"m{i}", f"Movie {chr(97 + i) * 3} (1990)", f"genres: {g}", attributes={"genres": [g]})
             for i, g in enumerate(genres)}
    items["z"] = Item("z", "Zebra zoo zeppelin (1999)", "genres: Documentary", attributes={"genres": ["Documentary"]})
    users, samples = {}, []
    for u in range(n_users):
        uid = str(u + 1)
        hist = [Event("rating", item_id=f"m{(u + j) % 15}", value=5.0 if j else 2.0, time=float(j)) for j in range(3)]
        users[uid] = User(uid, hist)
        samples.append(Sample(f"t{uid}", uid, "z", split="test", heldout=["z"]))
    # train users: they like z a lot — but only *later*, in held-out data, never in a history
    for u in range(n_users, n_users + 20):
        uid = str(u + 1)
        users[uid] = User(uid, [Event("rating", item_id=f"m{u % 15}", value=4.0, time=1.0)])
        samples.append(Sample(f"t{uid}", uid, "z", split="train", heldout=["z"]))
    return Dataset("toy", Path("."), items, users, samples)


def test_popularity_never_counts_held_out_likes():
    ds = _toy()
    counts = popularity_counts(ds.users.values())
    assert counts["z"] == 0 and all(counts[f"m{i}"] > 0 for i in range(15))
    res = movielens_benchmark(ds, hashing_vectors, lambda ev, it: ["comedy"], k=10)
    assert all(r["n_candidates"] == 13 for r in res["users"])
    # z is held out by all 24 users; had popularity read held-out data it would rank first (HR = 1)
    assert res["summary"]["popularity"]["hr@10"]["mean"] == 0.0
    assert res["summary"]["popularity"]["ndcg@10"]["mean"] == 0.0


def test_keywords_that_describe_the_held_out_movie_rank_it_first():
    ds = _toy()
    oracle = movie_text(ds.items["z"])
    res = movielens_benchmark(ds, hashing_vectors, lambda ev, it: [oracle], k=1)
    assert res["summary"]["keywords"]["hr@1"]["mean"] == 1.0
    assert res["summary"]["keywords"]["ndcg@1"]["mean"] == pytest.approx(1.0)
    # z shares no word with the history movies ("movie", "1990"), so the history profile ranks it last
    assert res["summary"]["history-embedding"]["hr@1"]["mean"] == 0.0
    assert res["summary"]["random"]["ndcg@1"]["mean"] <= 0.5


def test_history_embedding_uses_liked_movies():
    """Profile = mean over history movies rated >= 4: a disliked movie's twin must not tie with the liked one's."""
    items = {"d": Item("d", "Alpha alpha (1990)", attributes={"genres": ["Horror"]}),
             "l": Item("l", "Beta beta (1991)", attributes={"genres": ["Comedy"]}),
             "x": Item("x", "Alpha alpha (1990)", attributes={"genres": ["Horror"]}),  # twin of the disliked one
             "y": Item("y", "Beta beta (1991)", attributes={"genres": ["Comedy"]}),  # twin of the liked one
             **{f"f{i}": Item(f"f{i}", f"Filler {i} (2000)", attributes={"genres": ["War"]}) for i in range(5)}}
    users = {"1": User("1", [Event("rating", item_id="d", value=1.0, time=1.0),
                             Event("rating", item_id="l", value=5.0, time=2.0)])}
    ds = Dataset("toy2", Path("."), items, users, [Sample("s1", "1", "y", split="test", heldout=["y"])])
    res = movielens_benchmark(ds, hashing_vectors, lambda ev, it: ["war"], k=1)
    assert res["users"][0]["n_history_liked"] == 1
    # averaging the disliked movie in would tie x and y, and the stable sort would put x (catalog order) first
    assert res["summary"]["history-embedding"]["hr@1"]["mean"] == 1.0
    assert res["summary"]["keywords"]["hr@1"]["mean"] == 0.0


def test_movielens_benchmark_errors(ml):
    with pytest.raises(ValueError, match="k must be >= 1"):
        movielens_benchmark(ml, hashing_vectors, top_genres, k=0)
    no_heldout = Dataset("x", Path("."), ml.items, ml.users, [Sample("s", "1", "1", split="test")])
    with pytest.raises(ValueError, match="no test samples with held-out likes"):
        movielens_benchmark(no_heldout, hashing_vectors, top_genres)
    with pytest.raises(ValueError, match="expected \\[1682, d\\]"):
        movielens_benchmark(ml, lambda texts: torch.zeros(3, 4), top_genres, n_users=1)


# ------------------------------------------------------------------------------- stability


def test_shuffled_order_reassigns_sorted_times():
    events = [Event("click", item_id=f"i{j}", time=float(10 + j)) for j in range(6)]
    out = shuffled_order(events, random.Random(0))
    assert sorted(e.time for e in out) == [e.time for e in events]
    assert Counter(e.item_id for e in out) == Counter(e.item_id for e in events)
    assert [e.item_id for e in newest_first(out)] != [e.item_id for e in newest_first(events)]
    untimed = [Event("click", item_id=f"i{j}") for j in range(5)]
    out = shuffled_order(untimed, random.Random(1))
    assert out != untimed and sorted(e.item_id for e in out) == [e.item_id for e in untimed]
    assert shuffled_order(events[:1], random.Random(0)) == events[:1]


def frequent_title_words(events, items, n=5):
    """Order-insensitive fake: the n most frequent title words (ties alphabetical)."""
    c = Counter(w for e in events if e.item_id in items for w in re.findall(r"[a-z]+", items[e.item_id].title.lower()))
    return [w for w, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def newest_titles(events, items, n=3):
    """Order-sensitive fake: the titles of the n newest events."""
    return [items[e.item_id].title for e in newest_first(events)[:n]]


def test_stability_is_one_for_an_order_insensitive_extractor(ml):
    users = evaluation_users(ml, 8, seed=1)
    res = keyword_stability(users, ml.items, frequent_title_words, seed=0)
    s = res["summary"]
    assert res["n_users"] == 8 and s["jaccard_shuffled"]["mean"] == 1.0 and s["identical_shuffled"]["mean"] == 1.0
    assert s["jaccard_shuffled"]["ci95"] == [1.0, 1.0]
    assert 0.0 <= s["jaccard_dropped"]["mean"] <= 1.0 and s["jaccard_dropped"]["n"] == 8
    for row in res["users"]:
        assert 0 <= row["dropped_event"]["index"] < row["n_events"]
        assert row["original"] == frequent_title_words(ml.users[row["user_id"]].events, ml.items)
    assert "| shuffled order |" in stability_markdown({**res, "dataset": "movielens"})


def test_stability_drops_for_an_order_sensitive_extractor(ml):
    users = evaluation_users(ml, 8, seed=1)
    res = keyword_stability(users, ml.items, newest_titles, seed=0)
    assert res["summary"]["jaccard_shuffled"]["mean"] < 1.0
    assert res["summary"]["identical_shuffled"]["mean"] < 1.0
    # reproducible perturbations
    assert keyword_stability(users, ml.items, newest_titles, seed=0)["summary"] == res["summary"]


def test_stability_records_keyword_details_and_single_event_users():
    items = {"a": Item("a", "cat face"), "b": Item("b", "dog face")}
    users = [User("u1", [Event("click", item_id="a", time=1.0)]),
             User("u2", [Event("click", item_id="a", time=1.0), Event("click", item_id="b", time=2.0)])]
    res = keyword_stability(users, items, lambda ev, it: Keywords(keywords=["cat"], fallback="padded: x",
                                                                   n_events=len(ev), n_kept=1))
    assert res["summary"]["jaccard_shuffled"]["n"] == 2 and res["summary"]["jaccard_dropped"]["n"] == 1
    assert "dropped" not in res["users"][0] and res["counts"]["keyword_fallbacks"] == 5
    assert res["counts"]["histories_truncated"] == 1
    with pytest.raises(ValueError, match="at least one user"):
        keyword_stability([], items, lambda ev, it: [])
    with pytest.raises(ValueError, match="user u3 has no events"):
        keyword_stability([User("u3", [])], items, lambda ev, it: [])


# ------------------------------------------------------------------------------------------ CLI


class FakeLLM:
    name = "fake-llm"
    content_hash = "0"

    def chat(self, messages, max_new_tokens=48, **kw):
        return "comedy, drama, action, thriller, romance, war, crime, horror"


class FakeEncoder:
    name = "hashing"
    hidden_size = DIM

    def pooled(self, texts):
        return torch.nn.functional.normalize(hashing_vectors(texts), dim=-1)


def test_cli_commands_with_fake_models(ml_root, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import pmgen.presets
    from pmgen.cli import app

    monkeypatch.setenv("PMGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pmgen.presets, "load_llm", lambda preset: FakeLLM())
    monkeypatch.setattr(pmgen.presets, "load_text_encoder", lambda preset, gen=None: FakeEncoder())
    runner = CliRunner()
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate-movielens", "--n-users", "3", "--out", str(out), "--data-dir", str(ml_root)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "movielens.json").read_text())
    assert res["n_users"] == 3 and res["models"] == {"llm": "fake-llm@0", "text_encoder": "hashing"}
    genres = {"comedy", "drama", "action", "thriller", "romance", "war", "crime", "horror"}  # the fake LLM's answer
    assert set(res["users"][0]["keywords"][:2]) <= genres and "keywords+history" in r.output
    assert (tmp_path / "cache" / "keywords.sqlite").is_file()
    r = runner.invoke(app, ["evaluate-stability", "--dataset", "movielens", "--n-users", "2", "--out", str(out),
                            "--data-dir", str(ml_root)])
    assert r.exit_code == 0, r.output
    st = json.loads((out / "stability.json").read_text())
    assert st["dataset"] == "movielens" and st["models"]["llm"] == "fake-llm@0"
    assert st["summary"]["jaccard_shuffled"]["mean"] == 1.0  # the fake LLM ignores the history
    r = runner.invoke(app, ["evaluate-stability", "--dataset", "imagenet", "--data-dir", str(ml_root)])
    assert r.exit_code == 2 and "choose sticker-users or movielens" in r.output


def test_popularity_blend_reranks_the_popular_by_the_profile():
    from pmgen.eval.movielens import _standardize

    pop = _standardize(torch.log1p(torch.tensor([100.0, 90.0, 1.0, 0.0])))
    cos = torch.tensor([0.5, 0.9, 0.95, 0.1])
    blend = pop + _standardize(cos)
    # the two popular movies stay on top; the profile decides their order
    assert torch.argsort(blend, descending=True)[:2].tolist() == [1, 0]
    assert torch.equal(_standardize(torch.ones(3)), torch.zeros(3))


# ------------------------------------------------ leak check, taste hits, re-ranking, multilingual (issue 20)


def _sticker_users() -> tuple[list[User], dict[str, Item]]:
    items = {"c": Item("c", "cat face", "tags: cat, kitten", attributes={"tags": ["cat", "kitten"]}),
             "r": Item("r", "rocket", "tags: space, launch", attributes={"tags": ["space", "launch"]}),
             "b": Item("b", "open book", "tags: book, reading", attributes={"tags": ["book", "reading"]})}
    users = [User("u1", [Event("social", item_id="c", value="send", time=1.0)], {"taste": "cats"}),
             User("u2", [Event("social", item_id="r", value="send", time=1.0)], {"taste": "space"}),
             User("u3", [Event("social", item_id="b", value="send", time=1.0)], {"taste": "cats"})]
    return users, items


def test_taste_hit_uses_direct_synonyms():
    from pmgen.eval.leaks import taste_hit

    assert taste_hit(["Kittens", "fun"], "cats") and taste_hit(["cute cats"], "cats")
    assert taste_hit(["outer space"], "space") and taste_hit(["rockets"], "space")
    assert not taste_hit(["catalog", "category"], "cats") and not taste_hit(["dogs"], "cats")


def test_leak_check_counts_unsupported_few_shot_words_fallbacks_and_tastes():
    from pmgen.eval.leaks import leak_check, leak_markdown

    users, items = _sticker_users()
    answers = {"u1": Keywords(["cats", "fashion"], fallback=None),  # fashion: a few-shot word, unsupported
               "u2": Keywords(["space", "books"], fallback="padded: model gave 1 of 2; 1 history keywords added"),
               "u3": Keywords(["books", "reading"], fallback=None)}  # books: a few-shot word, but supported here
    res = leak_check(users, items, lambda ev, it: answers[next(u.user_id for u in users if u.events == ev)],
                     shot_keywords=["fashion", "books", "reading"])
    rows = {r["user_id"]: r for r in res["users"]}
    assert rows["u1"]["leaked"] == ["fashion"] and rows["u2"]["leaked"] == ["books"] and rows["u3"]["leaked"] == []
    s = res["summary"]
    assert s["leak_rate"]["mean"] == pytest.approx(2 / 3) and s["fallback_rate"]["mean"] == pytest.approx(1 / 3)
    assert s["taste_hit_rate"]["mean"] == pytest.approx(2 / 3) and s["replaced_rate"]["mean"] == 0.0
    assert res["counts"]["leaked_words"] == {"fashion": 1, "books": 1}
    assert "| few-shot leak (users) |" in leak_markdown(res)
    answers["u1"].n_from_model, answers["u2"].n_from_model, answers["u3"].n_from_model = 2, 1, 0
    res = leak_check(users, items, lambda ev, it: answers[next(u.user_id for u in users if u.events == ev)],
                     shot_keywords=["fashion"])
    assert res["summary"]["model_share"]["mean"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert "| share of keywords named by the model |" in leak_markdown(res)


def test_rerank_with_full_popularity_weight_is_popularity():
    from pmgen.eval.movielens import rerank_scores

    pop = torch.tensor([5.0, 50.0, 20.0, 1.0, 0.0, 30.0])
    sims = torch.tensor([0.9, 0.1, 0.2, 0.95, 0.3, 0.8])
    mask = torch.tensor([True, True, True, True, True, False])  # item 5 is in the history
    order = lambda sc: torch.argsort(sc.masked_fill(~mask, float("-inf")), descending=True, stable=True)[:5].tolist()  # noqa: E731
    assert order(rerank_scores(pop, sims, mask, 3, 1.0)) == order(pop) == [1, 2, 0, 3, 4]
    # w = 0: the top 3 popular are re-ordered by the keywords only; the rest stay below in popularity order
    assert order(rerank_scores(pop, sims, mask, 3, 0.0)) == [0, 2, 1, 3, 4]


def test_tune_rerank_reads_val_users_only_and_the_benchmark_reports_the_choice(ml):
    from pmgen.eval.movielens import tune_rerank

    seen = []

    def kw(events, items):
        seen.append(tuple(events))
        return top_genres(events, items)

    val_users = {s.user_id for s in ml.split("val") if s.heldout}
    t = tune_rerank(ml, hashing_vectors, kw, k=10, n_users=8)
    assert t["split"] == "val" and t["n_users"] == 8 and len(seen) == 8
    assert all(any(ml.users[u].events == list(ev) for u in val_users) for ev in seen)
    assert t["ndcg"] >= t["popularity_ndcg"] - 1e-12  # w = 1 (popularity) is in the grid
    res = movielens_benchmark(ml, hashing_vectors, top_genres, n_users=6, k=10, rerank=(t["top_n"], t["w"]))
    assert "popularity>keywords" in res["summary"] and "popularity>keywords - popularity" in res["paired"]
    assert res["rerank"] == {"top_n": t["top_n"], "w": t["w"]}


def test_multilingual_set_and_english_keywords():
    from pmgen.eval.leaks import multilingual_check, multilingual_users

    users = multilingual_users()
    assert len(users) == 12 and len({u.attributes["language"] for u in users}) >= 6
    items = {"1F600": Item("1F600", "grinning face", "tags: face, smile"),
             "1F44D": Item("1F44D", "thumbs up", "tags: hand, ok"),
             "d": Item("d", "dog face", "tags: dog, puppy")}
    res = multilingual_check(items, lambda ev, it: ["dog", "perrito", "felis"], users=users[:2])
    assert res["summary"]["english_rate"]["mean"] == pytest.approx(1 / 3)
    assert res["summary"]["taste_hit_rate"]["mean"] == 1.0 and res["users"][0]["non_english"] == ["perrito", "felis"]
    from pmgen.eval.leaks import leak_check, leak_markdown

    both = {**leak_check(users[:1], items, lambda ev, it: ["dog"], shot_keywords=[]), "multilingual": res}
    md = leak_markdown(both)
    assert "| non-English histories: keywords in English | 0.333" in md and "perrito, felis" in md
