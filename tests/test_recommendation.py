"""``pmgen evaluate-recommendation``: split, leak-free features, paired statistics, the Cornac runs, the CLI."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmgen.data.schema import Event, Item
from pmgen.eval import recommendation as rec
from pmgen.eval import recommendation_report as report
from pmgen.eval.recommendation_features import (
    FeatureModels,
    VectorCache,
    audience_keywords,
    audience_mean,
    build_features,
)
from test_preference_eval import DIM, hashing_vectors  # bag-of-words text vectors (crc32 buckets)

pytest.importorskip("cornac")

TOY_PARAMS = {"VBPR": dict(k=16, k2=8, n_epochs=10, batch_size=64, learning_rate=0.005, lambda_w=0.01),
              "BiVAECF": dict(k=8, encoder_structure=[16], n_epochs=60, batch_size=32, learning_rate=0.005)}


@pytest.fixture(autouse=True)
def one_thread():
    """Cornac's small torch models: one thread (two threads on a busy 2-core CPU run ~10× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GENRES = ("space", "cats", "food", "music")
COLORS = {"space": (20, 20, 120), "cats": (240, 160, 40), "food": (200, 30, 30), "music": (30, 170, 60)}


def genre_keywords(events, items):
    """Stand-in for the LLM: the genres of the history's items, most frequent first."""
    counts: dict[str, int] = {}
    for e in events:
        if e.item_id in items:
            g = items[e.item_id].attributes["genre"]
            counts[g] = counts.get(g, 0) + 1
    return sorted(counts, key=lambda g: (-counts[g], g))


def soft_of(events, items):
    """Stand-in soft embeddings ``[2, DIM]``: hashing vectors of the history's titles."""
    titles = " ".join(items[e.item_id].title for e in events if e.item_id in items)
    v = hashing_vectors([titles])[0]
    return torch.stack([v, v.roll(1)])


def pixel_vectors(images):
    """Stand-in image tower: the mean colour and a coarse 2×2 pooling."""
    return torch.cat([images.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)], 1)


def toy_data(tmp_path: Path, n_users: int = 80, n_items: int = 48, seed: int = 0) -> rec.RecData:
    """Users who each love one genre (80% of their ~10 items from it); items with a genre in the title and
    a genre-coloured image. Recommenders and every feature have something real to find."""
    rng = random.Random(seed)
    (tmp_path / "img").mkdir(parents=True, exist_ok=True)
    items = {}
    for n in range(n_items):
        g = GENRES[n % len(GENRES)]
        iid = f"i{n:02d}"
        Image.new("RGB", (16, 16), COLORS[g]).save(tmp_path / "img" / f"{iid}.png")
        items[iid] = Item(iid, f"{g} sticker {n}", f"tags: {g}", image=f"img/{iid}.png", attributes={"genre": g})
    by_genre = {g: [i for i, it in items.items() if it.attributes["genre"] == g] for g in GENRES}
    events, pairs = {}, []
    for u in range(n_users):
        uid, g = f"u{u:03d}", GENRES[u % len(GENRES)]
        chosen: list[str] = []
        while len(chosen) < 10:
            pool = by_genre[g] if rng.random() < 0.8 else list(items)
            i = rng.choice(pool)
            if i not in chosen:
                chosen.append(i)
        events[uid] = [Event("social", item_id=i, value="send", time=float(t)) for t, i in enumerate(chosen)]
        events[uid].insert(0, Event("search", text=f"{g} stickers", time=-1.0))
        pairs += [(uid, i) for i in chosen]
    return rec.RecData("toy", pairs, events, items, image_path=lambda it: tmp_path / it.image, credit="toy data")


def toy_models(data: rec.RecData) -> FeatureModels:
    from pmgen.data.images import load_image

    def generate(events, item, keywords, soft):
        # the audience's soft embeddings keep the per-user shape; events are training events of the audience
        assert soft is None or tuple(soft.shape) == (2, DIM), soft.shape
        assert all(e.item_id is None or e.item_id in data.items for e in events)
        # "personalized": the item's own colour, tinted towards the audience's first keyword's colour
        base = load_image(data.image_path(item), 16)
        tint = torch.tensor(COLORS.get(keywords[0], (128, 128, 128)) if keywords else (128, 128, 128)) / 255
        return 0.7 * base + 0.3 * tint.view(1, 3, 1, 1), 1.0

    return FeatureModels(keywords=genre_keywords, text_vectors=hashing_vectors, soft=soft_of,
                         image_vectors=pixel_vectors, load_image=lambda it: load_image(data.image_path(it), 16),
                         generate=generate, ids={"soft": "toy", "images": "pixels", "generator": "tint"})


# ----------------------------------------------------------------------------------------- split


def test_split_follows_recbole_rounding_and_is_seeded():
    pairs = [(f"u{u}", f"i{i}") for u in range(3) for i in range(10 + 5 * u)] + [("v", "a"), ("v", "b"), ("v", "c")]
    s = rec.split_by_user(pairs, seed=7)
    count = lambda part, u: sum(1 for x, _ in part if x == u)  # noqa: E731
    assert [(count(s.train, u), count(s.val, u), count(s.test, u)) for u in ("u0", "u1", "u2")] == \
        [(8, 1, 1), (13, 1, 1), (16, 2, 2)]
    assert (count(s.train, "v"), count(s.val, "v"), count(s.test, "v")) == (1, 1, 1)  # RecBole: 0 < 0.1·3 < 1 → 1
    assert sorted(s.train + s.val + s.test) == sorted(pairs)
    assert rec.split_by_user(pairs, seed=7) == s and rec.split_by_user(pairs, seed=8) != s
    assert rec._split_counts(2, (0.8, 0.1, 0.1)) == [1, 0, 1]  # train keeps one
    with pytest.raises(ValueError, match="three positive shares"):
        rec.split_by_user(pairs, ratios=(0.8, 0.2))


def test_a_user_slice_keeps_the_whole_data_split(tmp_path):
    data = toy_data(tmp_path, n_users=30)
    whole = rec.split_by_user(data.pairs)
    users = rec.user_slice(data, "10:20")
    assert users == [f"u{n:03d}" for n in range(10, 20)] and rec.user_slice(data, ":3") == ["u000", "u001", "u002"]
    part = whole.restrict(users)
    assert part.test == [p for p in whole.test if p[0] in users] and {u for u, _ in part.train} == set(users)
    for bad in ("3", "a:b", "40:"):
        with pytest.raises(ValueError, match="slice"):
            rec.user_slice(data, bad)


def test_training_histories_drop_every_event_on_a_heldout_item(tmp_path):
    data = toy_data(tmp_path, n_users=8)
    uid = "u000"
    data.events[uid].append(Event("click", item_id=data.events[uid][1].item_id, time=99.0))  # a repeat of one item
    split = rec.split_by_user(data.pairs)
    hist = rec.training_histories(data, split)
    held = split.heldout()[uid]
    assert held and not {e.item_id for e in hist[uid]} & held
    assert {e.item_id for e in hist[uid] if e.item_id} == {i for u, i in split.train if u == uid}
    assert any(e.type == "search" for e in hist[uid])  # behaviors that are not interactions stay


# ------------------------------------------------------------------------------------ no leakage


def test_features_never_see_a_test_interaction(tmp_path):
    """Every feature function is spied on: none may ever receive a validation or test item of its user, and the
    features must not change when the test interactions change (fails if test interactions reach them)."""
    data = toy_data(tmp_path, n_users=24)
    split = rec.split_by_user(data.pairs)
    held = split.heldout()
    seen: list[tuple[frozenset, set]] = []
    base = toy_models(data)

    def spy(fn):
        def wrapped(events, items, *rest):
            seen.append((frozenset(e.item_id for e in events if e.item_id), set()))
            return fn(events, items, *rest)
        return wrapped

    models = FeatureModels(keywords=spy(genre_keywords), text_vectors=hashing_vectors, soft=spy(soft_of),
                           image_vectors=base.image_vectors, load_image=base.load_image, generate=base.generate,
                           ids=base.ids)
    names = ["keywords", "soft", "target-keywords", "real-images", "generated-images"]
    f = build_features(rec.training_histories(data, split), split.train, data.items, models, names, tmp_path / "c")
    assert len(seen) >= 2 * 24
    users_items = {}
    for u, evs in rec.training_histories(data, split).items():
        users_items[frozenset(e.item_id for e in evs if e.item_id)] = u
    for items_seen, _ in seen:
        u = users_items[items_seen]  # each call saw exactly one user's training items …
        assert not items_seen & held[u]  # … and none of their held-out ones
    # items only ranked in test (never in train) get no feature; test interactions change nothing
    assert set(f.item["generated-images"]) == {i for _, i in split.train}
    # one more test interaction per user, on a new item of a new genre: no feature may change
    items2 = {**data.items, **{f"t{u}": Item(f"t{u}", "zz sticker", "tags: zz", attributes={"genre": "zz"})
                               for u in data.events}}
    data2 = rec.RecData(data.name, [*data.pairs, *((u, f"t{u}") for u in data.events)],
                        {u: [*evs, Event("social", item_id=f"t{u}", value="send", time=1e9)]
                         for u, evs in data.events.items()}, items2, data.image_path)
    split2 = rec.Split(split.train, split.val, [*split.test, *((u, f"t{u}") for u in data.events)], split.seed)
    f2 = build_features(rec.training_histories(data2, split2), split2.train, items2, base, names, tmp_path / "c")
    for kind in ("keywords", "soft"):
        assert set(f2.user[kind]) == set(f.user[kind])
        for u in f.user[kind]:
            np.testing.assert_array_equal(f.user[kind][u], f2.user[kind][u])
    for kind in ("target-keywords", "real-images", "generated-images"):
        assert set(f2.item[kind]) == set(f.item[kind])


def test_audience_keywords_and_means():
    kws = {"a": ["cats", "sun"], "b": ["cats", "moon"], "c": ["moon", "cats", "cats"]}
    assert audience_keywords(["a", "b", "c"], kws, k=2) == ["cats", "moon"]
    assert audience_keywords([], kws) == []
    m = audience_mean([("a", "x"), ("b", "x"), ("c", "y")],
                      {"a": np.array([1.0, 0]), "b": np.array([0.0, 1]), "c": np.array([2.0, 2])}, ["x", "y", "z"])
    np.testing.assert_allclose(m["x"], [0.5, 0.5])
    np.testing.assert_allclose(m["y"], [2, 2])
    np.testing.assert_allclose(m["z"], [0, 0])


def test_vector_cache_round_trip_and_merge(tmp_path):
    a, b = VectorCache(tmp_path / "v.npz"), VectorCache(tmp_path / "v.npz")
    a.put("k1", np.arange(3))
    a.flush()
    b.put("k2", np.ones((2, 2)))
    b.flush()  # merges a's row written meanwhile
    c = VectorCache(tmp_path / "v.npz")
    assert len(c) == 2 and c.get("k1").tolist() == [0, 1, 2] and c.get("k2").shape == (2, 2)
    assert c.get("k3") is None


def test_soft_and_generated_features_are_cached(tmp_path):
    data = toy_data(tmp_path, n_users=12)
    split = rec.split_by_user(data.pairs)
    hist = rec.training_histories(data, split)
    calls = {"soft": 0, "gen": 0}
    base = toy_models(data)

    def soft(ev, it):
        calls["soft"] += 1
        return soft_of(ev, it)

    def gen(*a):
        calls["gen"] += 1
        return base.generate(*a)

    models = FeatureModels(keywords=genre_keywords, text_vectors=hashing_vectors, soft=soft,
                           image_vectors=pixel_vectors, generate=gen, ids=base.ids)
    for _ in range(2):
        f = build_features(hist, split.train, data.items, models, ["soft", "generated-images"], tmp_path / "c")
    n_items = len({i for _, i in split.train})
    assert calls == {"soft": 12, "gen": n_items}
    assert f.info["generated"]["chosen_weights"] == {"1.0": n_items}
    with pytest.raises(ValueError, match="unknown feature"):
        build_features(hist, split.train, data.items, models, ["colour"])
    with pytest.raises(ValueError, match="no model for"):
        build_features(hist, split.train, data.items, FeatureModels(genre_keywords, hashing_vectors), ["soft"])


# ------------------------------------------------------------------------------------- statistics


def test_paired_ci_on_a_hand_case():
    """Three users, hand-computable: the paired mean is the mean of per-user differences, and a gain every user
    shares has an interval that excludes 0 while the unpaired intervals overlap."""
    per_user = {"none": {"a": {"ndcg": 0.1, "recall": 0.0}, "b": {"ndcg": 0.5, "recall": 0.5},
                         "c": {"ndcg": 0.9, "recall": 1.0}},
                "text": {"a": {"ndcg": 0.2, "recall": 0.0}, "b": {"ndcg": 0.6, "recall": 0.5},
                         "c": {"ndcg": 1.0, "recall": 1.0}}}
    s = rec.summarize(per_user)
    assert s["summary"]["none"]["ndcg"]["mean"] == pytest.approx(0.5)
    d = s["paired"]["text"]["ndcg"]
    assert d["mean"] == pytest.approx(0.1) and d["ci95"] == pytest.approx([0.1, 0.1]) and d["n"] == 3
    assert s["paired"]["text"]["recall"]["mean"] == 0.0 and "none" not in s["paired"]
    lo_text = s["summary"]["text"]["ndcg"]["ci95"][0]
    assert lo_text < s["summary"]["none"]["ndcg"]["ci95"][1]  # unpaired intervals overlap


def test_per_user_mean_over_seeds_and_mismatched_users():
    runs = [{"a": {"ndcg": 0.2, "recall": 1.0}}, {"a": {"ndcg": 0.4, "recall": 0.0}}]
    assert rec._per_user_mean(runs) == {"a": {"ndcg": pytest.approx(0.3), "recall": 0.5}}
    with pytest.raises(ValueError, match="different users"):
        rec._per_user_mean([runs[0], {"b": {"ndcg": 0.0, "recall": 0.0}}])


def test_feature_matrices_move_user_features_to_the_item_side_for_vbpr(tmp_path):
    data = toy_data(tmp_path, n_users=12)
    split = rec.split_by_user(data.pairs)
    f = build_features(rec.training_histories(data, split), split.train, data.items, toy_models(data),
                       ["keywords", "target-keywords", "soft"], tmp_path / "c")
    users = sorted({u for u, _ in split.train})
    items = sorted({i for _, i in split.train})
    uf, itf = rec.feature_matrices("text", f, split, False, users, items)
    assert uf.shape == (len(users), DIM) and itf.shape == (len(items), DIM)
    assert np.linalg.norm(itf, axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    assert abs(itf.mean(0)).max() < 1e-5  # centered
    uf, itf = rec.feature_matrices("text", f, split, True, users, items)
    assert uf is None and itf.shape == (len(items), 2 * DIM)
    assert rec.feature_matrices("none", f, split, True, users, items)[1].shape == (len(items), 1)
    assert rec.feature_matrices("none", f, split, False, users, items) == (None, None)
    assert rec.feature_matrices("soft", f, split, False, users, items)[1] is None


# ------------------------------------------------------------------------------------ end to end


def _random_ndcg(split: rec.Split, k: int = 10) -> float:
    """Expected NDCG@k of a uniformly random ranking of each test user's candidates."""
    n_items = len({i for _, i in split.train})
    seen: dict[str, set] = {}
    for u, i in [*split.train, *split.val]:
        seen.setdefault(u, set()).add(i)
    train_items = {i for _, i in split.train}
    test: dict[str, set] = {}
    for u, i in split.test:
        if i in train_items:
            test.setdefault(u, set()).add(i)
    vals = []
    for u, pos in test.items():
        n_cand = n_items - len(seen[u] - pos)
        p = len(pos) / n_cand
        dcg = sum(p / math.log2(r + 2) for r in range(min(k, n_cand)))
        vals.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(pos), k))))
    return sum(vals) / len(vals)


def test_quick_experiment_end_to_end(tmp_path):
    """The whole experiment on toy data with stand-in feature models: table structure, BPR far above random,
    the planted genre found by the features, outputs written."""
    data = toy_data(tmp_path)
    r = rec.run_experiment(data, toy_models(data), seeds=(0, 1), params=TOY_PARAMS, cache_root=tmp_path / "c")
    assert r["feature_sets"] == list(rec.FEATURE_SETS) and r["skipped_sets"] == []
    header, rows = report.recommendation_rows(r)
    assert header == ["model", "features", "NDCG@10", "Recall@10", "Δ NDCG@10 vs none", "Δ Recall@10 vs none"]
    assert [(x[0], x[1]) for x in rows] == [(m, s) for m in rec.BASE_MODELS for s in rec.FEATURE_SETS] + \
        [("MostPop", "none (reference)"), ("BPR", "none (reference)")]
    assert all(re.fullmatch(r"-?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]", c) for x in rows for c in x[2:4])
    bpr = r["references"]["summary"]["BPR"]["ndcg"]["mean"]
    assert bpr > 3 * _random_ndcg(rec.split_by_user(data.pairs))
    for m in rec.BASE_MODELS:
        assert set(r["results"][m]["paired"]) == set(rec.FEATURE_SETS) - {"none"}
        assert r["results"][m]["summary"]["none"]["ndcg"]["n"] == r["counts"]["test_users_ranked"]
    js, md, png = report.write_recommendation_outputs([r], tmp_path / "out")
    assert json.loads(js.read_text())["results"][0]["dataset"] == "toy"
    assert "| VBPR | real-images |" in md.read_text() and png.stat().st_size > 1000


def test_image_sets_are_skipped_without_images(tmp_path):
    data = toy_data(tmp_path, n_users=16)
    data.image_path = None
    assert rec.available_sets(data, rec.FEATURE_SETS, toy_models(data)) == ["none", "text", "soft"]
    with pytest.raises(ValueError, match="unknown feature sets"):
        rec.run_experiment(data, toy_models(data), feature_sets=["none", "colour"])


def test_cli_quick_run_with_tiny_models(tmp_path, monkeypatch, tiny_pmg):
    """`pmgen evaluate-recommendation --quick` through the CLI: the pipeline's tiny models generate the stickers,
    the toy data stands in for the dataset; the three output files and the table come out."""
    from typer.testing import CliRunner

    import pmgen.cli.recommend as cli_rec
    from pmgen.cli import app

    data = toy_data(tmp_path / "data", n_users=24, n_items=24)
    monkeypatch.setenv("PMGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_rec, "_load_pmg", lambda preset, overrides: tiny_pmg)
    monkeypatch.setattr(rec, "load_rec_data", lambda name, data_dir=None: data)
    monkeypatch.setattr(rec, "PARAMS", {"toy": TOY_PARAMS})
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["evaluate-recommendation", "--dataset", "sticker-users", "--quick", "--models",
                                 "BiVAECF", "--features", "none,text,generated-images,real-images", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "recommendation.json").read_text())["results"][0]
    assert res["quick"] and res["seeds"] == [0, 1] and res["feature_sets"] == ["none", "text", "generated-images",
                                                                               "real-images"]
    assert res["features"]["generated"]["items"] == res["counts"]["items"]
    assert (out / "recommendation.png").is_file() and "| BiVAECF | generated-images |" in (
        out / "recommendation.md").read_text()
    r = CliRunner().invoke(app, ["evaluate-recommendation", "--models", "LightGCN"])
    assert r.exit_code == 2 and "unknown model or feature set" in r.output
