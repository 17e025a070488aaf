"""The built-in dataset builders: counts, user-disjoint splits, ground truth, determinism."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from pmgen.data import datasets
from pmgen.data.schema import SPLITS
from pmgen.data.validate import load_dataset
from pmgen.data.datasets import sticker_users
from pmgen.data.datasets.base import file_sha256, user_disjoint_splits


def test_stickers_catalog(data_root):
    ds = datasets.load("stickers", data_root)
    assert len(ds.items) >= 3000
    meta = ds.meta
    assert meta["counts"]["items"] == len(ds.items) and meta["counts"]["blank_skipped"] == 0
    grin = ds.items["1F600"]
    assert grin.title == "grinning face"
    assert grin.attributes["group"] == "smileys-emotion" and "happy" in grin.attributes["tags"]
    assert "grinning" in grin.attributes["aliases"] or grin.attributes["aliases"]
    # the one broken name in openmoji.json 17.0.0 is repaired
    assert not any("\ufffd" in it.title for it in ds.items.values())
    # images: 64x64 RGB on white, with a colored glyph in the middle
    im = np.asarray(Image.open(ds.image_path(grin)))
    assert im.shape == (64, 64, 3)
    assert (im[0, 0] == 255).all() and (im[-1, -1] == 255).all()
    center = im[24:40, 24:40].reshape(-1, 3)
    assert (np.abs(center[:, 0].astype(int) - center[:, 2].astype(int)) > 60).mean() > 0.3  # yellow face
    # every image differs from a blank canvas
    for it in list(ds.items.values())[::200]:
        assert np.asarray(Image.open(ds.image_path(it))).min() < 200


def test_stickers_extra_size(tmp_path):
    from pmgen.data.datasets import stickers

    r = stickers.GlyphRenderer()
    imgs = r.render("1F431", sizes=(64, 128))
    assert imgs[64].size == (64, 64) and imgs[128].size == (128, 128) and imgs[128].mode == "RGB"


def test_sticker_users_counts_and_tastes(data_root):
    ds = datasets.load("sticker-users", data_root)
    tastes = {u.attributes["taste"] for u in ds.users.values()}
    assert len(tastes) >= 8
    assert len(ds.users) == 1000 and len(ds.samples) == 3000
    for u in ds.users.values():
        assert len(u.events) >= 5
        assert sum(e.type == "social" and e.value == "send" for e in u.events) >= 5
        assert u.attributes["taste_description"]
    for s in ds.samples:
        assert s.context and s.context[-1].speaker == "user"


def test_sticker_users_splits_are_user_disjoint(data_root):
    ds = datasets.load("sticker-users", data_root)
    by_split = {s: set(ds.user_split(s)) for s in SPLITS}
    assert by_split["train"] and by_split["val"] and by_split["test"]
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    for s in ds.samples:
        assert ds.users[s.user_id].attributes["split"] == s.split


def test_sticker_users_ground_truth(data_root):
    ds = datasets.load("sticker-users", data_root)
    with_gt = [s for s in ds.samples if s.ground_truth_personalized]
    assert len(with_gt) >= 0.3 * len(ds.samples)
    assert any(s.split == "test" for s in with_gt)
    targets = {t.key: t for t in sticker_users.TARGETS}
    for s in with_gt:
        user = ds.users[s.user_id]
        taste = sticker_users.taste_by_name(user.attributes["taste"])
        tg = targets[s.attributes["target_key"]]
        gt = ds.items[s.ground_truth_personalized]
        assert gt.title == tg.personalized[taste.name]
        assert ds.items[s.target_id].title == tg.item_title
        # the personalized ground truth never appears in that user's own history
        assert s.ground_truth_personalized not in {e.item_id for e in user.events}
    # grinning face + cat lover -> grinning cat
    cats = [s for s in with_gt if ds.items[s.target_id].title == "grinning face"
            and ds.users[s.user_id].attributes["taste"] == "cats"]
    assert cats and all(ds.items[s.ground_truth_personalized].title == "grinning cat" for s in cats)


def test_sticker_users_history_reflects_taste(data_root):
    ds = datasets.load("sticker-users", data_root)
    n_match = n_sent = 0
    for u in ds.users.values():
        taste = sticker_users.taste_by_name(u.attributes["taste"])
        sent = [ds.items[e.item_id] for e in u.events if e.type == "social"]
        matching = sum(taste.matches(it) for it in sent)
        assert matching >= 5
        n_match, n_sent = n_match + matching, n_sent + len(sent)
    assert n_match / n_sent > 0.7


def test_sticker_users_deterministic(data_root):
    path = data_root / "sticker-users" / "samples.jsonl"
    before = file_sha256(path), file_sha256(data_root / "sticker-users" / "users.jsonl")
    sticker_users.build(data_root, force=True)
    assert (file_sha256(path), file_sha256(data_root / "sticker-users" / "users.jsonl")) == before


def test_sticker_users_another_seed_is_a_new_population_beside_the_shipped_one(data_root):
    shipped = data_root / "sticker-users" / "users.jsonl"
    before = file_sha256(shipped)
    fresh = datasets.load("sticker-users", data_root, seed=7)
    assert (data_root / "sticker-users-seed7" / "dataset.json").is_file()
    assert file_sha256(shipped) == before  # the shipped users are neither rebuilt nor replaced
    base = datasets.load("sticker-users", data_root)
    assert fresh.users.keys() == base.users.keys()  # the same ids …
    assert sum(fresh.users[u].events != base.users[u].events for u in base.users) > 0.9 * len(base.users)  # … new users
    assert datasets.load("sticker-users", data_root, build_if_missing=False, seed=7).samples == fresh.samples
    with pytest.raises(FileNotFoundError, match="sticker-users-seed8"):
        datasets.load("sticker-users", data_root, build_if_missing=False, seed=8)
    for bad in (-1, 2**31, 1.5, True, "1"):
        with pytest.raises(ValueError, match="seed"):
            sticker_users.folder_name(bad)


def test_user_disjoint_splits_fixed_seed():
    ids = [f"u{i}" for i in range(100)]
    a = user_disjoint_splits(ids, seed=3)
    assert a == user_disjoint_splits(list(reversed(ids)), seed=3)
    assert a != user_disjoint_splits(ids, seed=4)
    assert sorted(list(a.values()).count(s) for s in SPLITS) == [10, 10, 80]


def test_movielens(data_root):
    ds = datasets.load("movielens", data_root)
    assert len(ds.items) == 1682 and len(ds.users) == 943
    assert ds.meta["counts"]["ratings"] == 100_000
    toy = ds.items["1"]
    assert toy.title == "Toy Story (1995)" and "Animation" in toy.attributes["genres"]
    for u in ds.users.values():
        assert all(e.type == "rating" and 1 <= e.value <= 5 for e in u.events)
        times = [e.time for e in u.events]
        assert times == sorted(times)
    by_split = {s: set(ds.user_split(s)) for s in SPLITS}
    assert not (by_split["train"] & by_split["test"]) and len(by_split["test"]) > 50
    # held-out likes come later than the user's whole history and are not in it
    raw = {}
    with open(data_root / "movielens" / "users.jsonl") as f:
        for line in f:
            r = json.loads(line)
            raw[r["user_id"]] = {e["item_id"] for e in r["events"]}
    for s in ds.samples:
        assert s.heldout and s.target_id == s.heldout[0]
        assert not set(s.heldout) & raw[s.user_id]


def test_conversations(data_root):
    ds = datasets.load("conversations", data_root)
    assert len(ds.users) > 1000
    u = next(iter(ds.users.values()))
    assert all(e.type == "conversation" for e in u.events)
    assert [e.speaker for e in u.events[:2]] == ["user", "bot"]
    assert re.match(r"^[a-z_]+-\d{4}$", u.user_id)


def test_built_datasets_validate_clean(data_root):
    for name in datasets.NAMES:
        ds = load_dataset(data_root / name)
        assert ds.items or ds.users


def test_build_is_skipped_when_present(data_root):
    folder = data_root / "movielens"
    mtime = (folder / "dataset.json").stat().st_mtime_ns
    datasets.build("movielens", data_root)
    assert (folder / "dataset.json").stat().st_mtime_ns == mtime


def test_demo_picks_users_of_different_tastes_for_one_target(data_root):
    import pytest as _pytest

    from pmgen.data import datasets
    from pmgen.demo import pick_samples

    ds = datasets.load("sticker-users", data_root)
    picked = pick_samples(ds, 4, target_key="love")
    assert len(picked) == 4
    assert len({ds.users[s.user_id].attributes["taste"] for s in picked}) == 4
    assert {s.attributes["target_key"] for s in picked} == {"love"}
    assert all(s.split == "test" for s in picked)
    auto = pick_samples(ds, 3)
    assert len({s.attributes["target_key"] for s in auto}) == 1
    with _pytest.raises(KeyError, match="no test sample with target"):
        pick_samples(ds, 2, target_key="nonexistent")


def test_concurrent_builds_do_not_break_each_other(tmp_path):
    """Two builds of the same dataset at once (two processes): each writes its own temp folder."""
    import threading

    from pmgen.data.datasets.base import build_atomically

    barrier = threading.Barrier(2)
    errors = []

    def write(tmp):
        for i in range(50):
            (tmp / f"{i}.txt").write_text(str(i))
        barrier.wait(timeout=10)  # both builds are half-way at the same time
        return {"counts": {"files": 50}}

    def run():
        try:
            build_atomically(tmp_path / "ds", write, version=1)
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(list((tmp_path / "ds").glob("*.txt"))) == 50
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp folder left behind
