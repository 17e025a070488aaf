"""Generated content as recommendation features: PMG's downstream experiment (``pmgen evaluate-recommendation``).

A recommender from a real library (`Cornac <https://cornac.preferred.ai>`_ 3.0.1) is trained with and
without pmgen's outputs as side features, and the same users' rankings are compared:

* **data** — MovieLens-100k (all 100,000 ratings, from the copy in the ``recbole`` wheel; every rating
  is an implicit interaction) or ``sticker-users`` (each user's distinct sent / clicked stickers);
* **protocol** — RecBole's (its README's quick start): every user's interactions shuffled and split
  8:1:1 into train / validation / test (:func:`split_by_user`, RecBole's rounding), **full ranking**
  of every item the user has not interacted with in train or validation, NDCG@10 and Recall@10 on
  test. One split (``SPLIT_SEED``); ``seeds`` re-train every model with other initial weights and
  negative samples; ``users`` may pick a subset, whose split stays the whole data's;
* **features** (:mod:`pmgen.eval.recommendation_features`) come from each user's **training**
  history only (:func:`training_histories`: every event on a validation or test item removed);
* **feature sets** (:data:`FEATURE_SETS`) — ``none``; ``text`` (preference keywords of users and target
  keywords of items, embedded by the text encoder); ``soft`` (soft preference embeddings of users);
  ``generated-images`` (image embeddings of pmgen's personalized sticker of each item); ``real-images``
  (the item's own image). The image sets exist on ``sticker-users`` only (MovieLens has no images);
* **base models** (:data:`BASE_MODELS`) — ``VBPR`` (He & McAuley 2016: BPR + a linear map of dense item
  features; user features reach it as each item's training audience, see
  :func:`~pmgen.eval.recommendation_features.audience_mean`; ``none`` = zero features, i.e. BPR trained
  the same way; Cornac 3.0.1's VBPR adds its visual-bias term with a ``[B, 1]`` shape to a ``[B]`` one, so
  its loss runs over all B×B pairs of a batch — used unmodified) and ``BiVAECF`` (Truong et al. 2021: a
  bilateral VAE whose user and item priors are conditioned on the features, *CAP priors*; ``none`` = standard
  priors);
* **statistics** — per user, each metric is averaged over the seeds; means and the paired
  differences against ``none`` carry 95% bootstrap intervals over users (:func:`pmgen.eval.stats.mean_ci`).

:func:`reproduce_baseline` first checks the protocol against a published figure: RecBole's README
reports BPR on ml-100k at NDCG@10 0.2768, Recall@10 0.2368 (:data:`PUBLISHED_BASELINE`). The tables, the
report and the plot are in :mod:`pmgen.eval.recommendation_report`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmgen.data.schema import Event, Item

__all__ = ["BASE_MODELS", "DATASETS", "FEATURE_SETS", "PUBLISHED_BASELINE", "SPLIT_SEED", "RecData", "Split",
           "feature_matrices", "fit_and_rank", "load_rec_data", "reproduce_baseline", "run_experiment", "split_by_user",
           "summarize", "training_histories", "user_slice"]

DATASETS = ("movielens-100k", "sticker-users")
FEATURE_SETS = ("none", "text", "soft", "generated-images", "real-images")
IMAGE_SETS = ("generated-images", "real-images")
SPLIT_SEED = 2020
"""The one data split (RecBole's default seed); ``seeds`` vary the models, not the split."""
RATIOS = (0.8, 0.1, 0.1)
PUBLISHED_BASELINE = {"source": "RecBole README, quick start: BPR on ml-100k (random 8:1:1 split per user, "
                                "full ranking)", "ndcg@10": 0.2768, "recall@10": 0.2368}
STICKER_TYPES = ("social", "click")
"""The sticker-users events that are interactions (a sticker sent or clicked)."""


# ------------------------------------------------------------------------------------------- data


@dataclass
class RecData:
    """Interactions plus everything a feature may be built from.

    Attributes:
        name: ``movielens-100k`` or ``sticker-users`` (or a test's own name).
        pairs: distinct ``(user_id, item_id)`` interactions, in a fixed order.
        events: every behavior of each user, oldest first (ratings, stickers sent, searches, chat) —
            :func:`training_histories` removes the held-out ones before any feature sees them.
        items: the catalog, ``item_id → Item``.
        image_path: an item's image file, or ``None`` (MovieLens has no images).
        credit: the data's license line, printed in every report.
    """

    name: str
    pairs: list[tuple[str, str]]
    events: dict[str, list[Event]]
    items: dict[str, Item]
    image_path: Callable[[Item], Path | None] | None = None
    credit: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_images(self) -> bool:
        return self.image_path is not None


def _first_pairs(rows: Iterable[tuple[str, str, float]]) -> list[tuple[str, str]]:
    """Distinct ``(user, item)`` pairs of ``(user, item, time)`` rows, each at its first time, in (user, time) order."""
    first: dict[tuple[str, str], float] = {}
    for u, i, t in rows:
        if (u, i) not in first or t < first[(u, i)]:
            first[(u, i)] = t
    return sorted(first, key=lambda p: (len(p[0]), p[0], first[p], p[1]))


def load_movielens_100k(data_dir: str | Path | None = None) -> RecData:
    """All 100,000 MovieLens-100k ratings as interactions; each user's events are their ratings."""
    from pmgen.data import datasets
    from pmgen.data.datasets import movielens

    ds = datasets.load("movielens", data_dir)  # the items (titles, genres); its user split is not used here
    events: dict[str, list[Event]] = {}
    rows = movielens.ratings()
    for u, i, r, t in sorted(rows, key=lambda x: (x[3], x[1])):
        events.setdefault(u, []).append(Event("rating", item_id=i, value=r, time=t))
    return RecData("movielens-100k", _first_pairs((u, i, t) for u, i, _, t in rows), events, ds.items,
                   credit=movielens.CREDIT)


def load_sticker_users(data_dir: str | Path | None = None) -> RecData:
    """``sticker-users``: a user's distinct sent or clicked stickers are the interactions; all their events
    (searches and chat lines too) are what features may read."""
    from pmgen.data import datasets

    ds = datasets.load("sticker-users", data_dir)
    events = {u.user_id: list(u.events) for u in ds.users.values()}
    rows = [(u, e.item_id, float(e.time or 0)) for u, evs in events.items() for e in evs
            if e.type in STICKER_TYPES and e.item_id in ds.items]
    return RecData("sticker-users", _first_pairs(rows), events, ds.items, image_path=ds.image_path,
                   credit=str(ds.meta.get("license", "")))


def load_rec_data(name: str, data_dir: str | Path | None = None) -> RecData:
    """One of :data:`DATASETS`. Raises ``ValueError`` naming the valid ones."""
    if name == "movielens-100k":
        return load_movielens_100k(data_dir)
    if name == "sticker-users":
        return load_sticker_users(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def user_slice(data: RecData, spec: str) -> list[str]:
    """The users of a Python-style slice ``"a:b"`` of ``data``'s users in id order (``":150"``, ``"599:"``).

    Raises ``ValueError`` on a malformed slice or one that selects nobody.
    """
    users = sorted({u for u, _ in data.pairs}, key=lambda u: (len(u), u))
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = (int(x) if x.strip() else None for x in parts)
    except ValueError:
        raise ValueError(f"users must be a slice 'a:b' of the users in id order (e.g. ':150', '599:'), got {spec!r}")
    picked = users[a:b]
    if not picked:
        raise ValueError(f"the slice {spec!r} selects none of the {len(users)} users")
    return picked


# ------------------------------------------------------------------------------------------ split


@dataclass(frozen=True)
class Split:
    """Train / validation / test interactions (``(user, item)`` lists); every user is in train."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    seed: int

    def restrict(self, users: Iterable[str]) -> "Split":
        """The same split of ``users`` only (each keeps exactly the interactions it has in the whole split)."""
        keep = set(users)
        return Split(*([p for p in part if p[0] in keep] for part in (self.train, self.val, self.test)), seed=self.seed)

    def heldout(self) -> dict[str, set[str]]:
        """``user → items`` of validation and test: what no feature may see."""
        out: dict[str, set[str]] = {}
        for u, i in [*self.val, *self.test]:
            out.setdefault(u, set()).add(i)
        return out


def _split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """RecBole's per-group counts: ``int(r·n)`` for the later parts, the rest to train, then a part whose
    share is between 0 and 1 interaction gets one while train keeps more than one."""
    cnt = [int(r * n) for r in ratios]
    cnt[0] = n - sum(cnt[1:])
    for i in range(1, len(ratios)):
        if cnt[0] <= 1:
            break
        if 0 < ratios[-i] * n < 1:
            cnt[-i] += 1
            cnt[0] -= 1
    return cnt


def split_by_user(pairs: Sequence[tuple[str, str]], ratios: Sequence[float] = RATIOS, seed: int = SPLIT_SEED) -> Split:
    """Each user's interactions shuffled (seeded) and cut by ``ratios`` (RecBole's ``RS`` + ``RO``, grouped
    by user). Raises ``ValueError`` unless there are three positive ratios."""
    if len(ratios) != 3 or any(r <= 0 for r in ratios):
        raise ValueError(f"ratios must be three positive shares (train, val, test), got {tuple(ratios)}")
    total = sum(ratios)
    ratios = [r / total for r in ratios]
    by_user: dict[str, list[str]] = {}
    for u, i in pairs:
        by_user.setdefault(u, []).append(i)
    rng = random.Random(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for u in sorted(by_user, key=lambda x: (len(x), x)):
        items = list(by_user[u])
        rng.shuffle(items)
        cnt = _split_counts(len(items), ratios)
        bounds = [0, cnt[0], cnt[0] + cnt[1], len(items)]
        for k in range(3):
            parts[k].extend((u, i) for i in items[bounds[k]:bounds[k + 1]])
    return Split(*parts, seed=seed)


def training_histories(data: RecData, split: Split) -> dict[str, list[Event]]:
    """Each user's events without any event on one of their validation or test items: the only history
    the features are built from. Searches and chat lines stay (they are not ranked)."""
    heldout = split.heldout()
    train_users = {u for u, _ in split.train}
    return {u: [e for e in data.events[u] if e.item_id is None or e.item_id not in heldout.get(u, ())]
            for u in sorted(train_users, key=lambda x: (len(x), x))}


# ----------------------------------------------------------------------------------------- models

SET_FEATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "none": ((), ()),
    "text": (("keywords",), ("target-keywords",)),
    "soft": (("soft",), ()),
    "generated-images": ((), ("generated-images",)),
    "real-images": ((), ("real-images",)),
}
"""Feature set → (user features, item features) of :func:`pmgen.eval.recommendation_features.build_features`."""
BASE_MODELS = ("VBPR", "BiVAECF")
PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "movielens-100k": {"VBPR": dict(k=64, k2=16, n_epochs=10, batch_size=100, learning_rate=0.001, lambda_w=0.01),
                       "BiVAECF": dict(k=50, encoder_structure=[100], n_epochs=200, batch_size=128,
                                       learning_rate=0.001)},
    "sticker-users": {"VBPR": dict(k=32, k2=16, n_epochs=30, batch_size=100, learning_rate=0.001, lambda_w=0.01),
                      "BiVAECF": dict(k=20, encoder_structure=[40], n_epochs=200, batch_size=64, learning_rate=0.001)},
}
"""Hyperparameters per dataset, the same for every feature set and not tuned per set: set from short validation
trials without features (VBPR on MovieLens: validation NDCG@10 0.227 at 10 epochs) — each model's ``none`` row is a
baseline, not its best; Cornac's BPR, tuned, stays above both (see the report's reference rows)."""
BPR_PARAMS = dict(k=64, max_iter=400, learning_rate=0.01, lambda_reg=0.01)
"""Cornac BPR for the reproduction, chosen on validation NDCG@10 (max_iter 100/200/400 × learning rate
0.01/0.05 × λ 0.01/0.001, seed 0)."""
K = 10


def _block(vectors: Mapping[str, Any], ids: Sequence[str]) -> Any:
    """``[len(ids), d]`` rows of ``vectors`` (zeros for a missing id), centered and scaled to mean row norm 1."""
    import numpy as np

    dim = len(next(iter(vectors.values())))
    m = np.stack([np.asarray(vectors[i], np.float32) if i in vectors else np.zeros(dim, np.float32) for i in ids])
    m = m - m.mean(0, keepdims=True)
    return m / max(float(np.linalg.norm(m, axis=1).mean()), 1e-8)


def feature_matrices(feature_set: str, features: Any, split: Split, item_only: bool,
                     users: Sequence[str], items: Sequence[str]) -> tuple[Any, Any]:
    """``(user matrix or None, item matrix or None)`` of a feature set, rows in ``users`` / ``items`` order.

    For an ``item_only`` model, user features move to the item side as each item's training audience mean
    (:func:`~pmgen.eval.recommendation_features.audience_mean`); ``none`` is then one zero column.
    """
    import numpy as np

    from pmgen.eval.recommendation_features import audience_mean

    user_names, item_names = SET_FEATURES[feature_set]
    item_blocks = [_block(features.item[n], items) for n in item_names]
    user_blocks = [_block(features.user[n], users) for n in user_names]
    if item_only:
        item_blocks += [_block(audience_mean(split.train, features.user[n], items), items) for n in user_names]
        return None, (np.concatenate(item_blocks, 1) if item_blocks else np.zeros((len(items), 1), np.float32))
    return (np.concatenate(user_blocks, 1) if user_blocks else None,
            np.concatenate(item_blocks, 1) if item_blocks else None)


def _model(name: str, params: Mapping[str, Any], seed: int, user_f: Any, item_f: Any) -> Any:
    from cornac.models import BPR, VBPR, BiVAECF, MostPop

    if name == "VBPR":
        return VBPR(seed=seed, verbose=False, **params)
    if name == "BiVAECF":
        return BiVAECF(seed=seed, verbose=False, use_gpu=False, **params,
                       cap_priors={"user": user_f is not None, "item": item_f is not None})
    if name == "BPR":
        return BPR(seed=seed, verbose=False, num_threads=1, **params)
    if name == "MostPop":
        return MostPop()
    raise ValueError(f"unknown model {name!r}; choose from {', '.join((*BASE_MODELS, 'BPR', 'MostPop'))}")


def fit_and_rank(name: str, params: Mapping[str, Any], split: Split, seed: int, user_f: Any = None,
                 item_f: Any = None, users: Sequence[str] = (), items: Sequence[str] = (), k: int = K
                 ) -> dict[str, dict[str, dict[str, float]]]:
    """Train one Cornac model on ``split.train`` and rank every unseen item for each user.

    Returns ``{"val": {user: {"ndcg", "recall"}}, "test": {...}}`` at ``k`` (Cornac's ``ranking_eval``:
    validation ranks all items but the user's train ones; test all but train and validation ones).
    """
    from cornac.data import FeatureModality, ImageModality
    from cornac.eval_methods import BaseMethod, ranking_eval
    from cornac.metrics import NDCG, Recall

    mods: dict[str, Any] = {}
    if name == "VBPR":
        mods["item_image"] = ImageModality(features=item_f, ids=list(items))
    elif name == "BiVAECF":
        if user_f is not None:
            mods["user_feature"] = FeatureModality(features=user_f, ids=list(users))
        if item_f is not None:
            mods["item_feature"] = FeatureModality(features=item_f, ids=list(items))
    trip = lambda pairs: [(u, i, 1.0) for u, i in pairs]  # noqa: E731
    method = BaseMethod.from_splits(trip(split.train), trip(split.test), trip(split.val), exclude_unknowns=True,
                                    seed=seed, **mods)
    model = _model(name, params, seed, user_f, item_f).fit(method.train_set, method.val_set)
    raw = {idx: u for u, idx in method.train_set.uid_map.items()}
    metrics = [NDCG(k=k), Recall(k=k)]
    out = {}
    for part, kwargs in (("val", dict(test_set=method.val_set)),
                         ("test", dict(test_set=method.test_set, val_set=method.val_set))):
        _, per_user = ranking_eval(model, metrics, method.train_set, **kwargs)
        out[part] = {raw[i]: {"ndcg": float(per_user[0][i]), "recall": float(per_user[1][i])} for i in per_user[0]}
    return out


# ------------------------------------------------------------------------------------- experiment


def _per_user_mean(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per user, each metric averaged over the seeds' runs (users of the first run; all runs rank the same users)."""
    users = list(runs[0])
    for r in runs[1:]:
        if set(r) != set(users):
            raise ValueError("runs of one experiment ranked different users; they must share the split")
    return {u: {m: sum(r[u][m] for r in runs) / len(runs) for m in ("ndcg", "recall")} for u in users}


def summarize(per_user: Mapping[str, Mapping[str, Mapping[str, float]]], seed: int = 0,
              reference: str = "none") -> dict[str, Any]:
    """Means and paired differences against ``reference``, with 95% bootstrap intervals over users.

    ``per_user[name][user] = {"ndcg", "recall"}`` (already averaged over seeds). Returns
    ``{"summary": {name: {metric: mean_ci}}, "paired": {name: {metric: mean_ci of name − reference}}}``.
    """
    from pmgen.eval.stats import mean_ci

    out: dict[str, Any] = {"summary": {}, "paired": {}}
    for name, rows in per_user.items():
        users = sorted(rows)
        out["summary"][name] = {m: mean_ci([rows[u][m] for u in users], users, seed) for m in ("ndcg", "recall")}
        if name != reference and reference in per_user:
            ref = per_user[reference]
            out["paired"][name] = {m: mean_ci([rows[u][m] - ref[u][m] for u in users], users, seed)
                                   for m in ("ndcg", "recall")}
    return out


def available_sets(data: RecData, feature_sets: Sequence[str], models: Any) -> list[str]:
    """The feature sets this data and these models can build (the image sets need images and an image model)."""
    out = []
    for s in feature_sets:
        if s in IMAGE_SETS and (not data.has_images or models.image_vectors is None
                                or (s == "generated-images" and models.generate is None)):
            continue
        if s == "soft" and models.soft is None:
            continue
        out.append(s)
    return out


def run_experiment(data: RecData, models: Any, seeds: Sequence[int] = (0, 1, 2, 3, 4),
                   base_models: Sequence[str] = BASE_MODELS, feature_sets: Sequence[str] = FEATURE_SETS,
                   params: Mapping[str, Mapping[str, Any]] | None = None,
                   references: Sequence[str] = ("MostPop", "BPR"),
                   users: Sequence[str] | None = None, cache_root: Path | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Every base model × feature set × seed on one split of ``data`` (see the module docstring).

    Args:
        data: the interactions and histories (:func:`load_rec_data`).
        models: a :class:`~pmgen.eval.recommendation_features.FeatureModels`.
        seeds: model seeds (initial weights, negative samples); the split is always :data:`SPLIT_SEED`.
        base_models: from :data:`BASE_MODELS`.
        feature_sets: from :data:`FEATURE_SETS`; those the data cannot have are left out and listed.
        params: ``model → hyperparameters`` (default: :data:`PARAMS` of the dataset).
        references: models without features reported beside (``MostPop``, ``BPR``).
        users: only these users (e.g. :func:`user_slice`); the split is still the whole data's, so each keeps
            its interactions and its features (and their caches) of a whole-data run.

    Returns:
        ``{"dataset", "protocol", "seeds", "base_models", "feature_sets", "skipped_sets", "counts",
        "results": {model: summarize(...)}, "references": summarize(...), "features", "timing_s"}``.
    """
    import time

    from pmgen.eval.recommendation_features import build_features

    bad = [s for s in feature_sets if s not in FEATURE_SETS] + [m for m in base_models if m not in BASE_MODELS]
    if bad or not seeds:
        raise ValueError(f"unknown feature sets / models {bad} or no seeds; sets: {', '.join(FEATURE_SETS)}; "
                         f"models: {', '.join(BASE_MODELS)}")
    params = params or PARAMS.get(data.name) or PARAMS["sticker-users"]
    sets = available_sets(data, feature_sets, models)
    if "none" not in sets:
        sets.insert(0, "none")
    t0 = time.perf_counter()
    split = split_by_user(data.pairs)
    if users is not None:
        split = split.restrict(users)
    histories = training_histories(data, split)
    names = sorted({n for s in sets for part in SET_FEATURES[s] for n in part})
    features = build_features(histories, split.train, data.items, models, names, cache_root, progress)
    t_features = time.perf_counter() - t0
    user_ids = sorted({u for u, _ in split.train}, key=lambda x: (len(x), x))
    item_ids = sorted({i for _, i in split.train}, key=lambda x: (len(x), x))
    per_model: dict[str, dict[str, Any]] = {}
    total = len(base_models) * len(sets) * len(seeds) + len(references) * len(seeds)
    done = 0
    t1 = time.perf_counter()
    for name in [*base_models, *references]:
        per_model[name] = {}
        for s in (sets if name in base_models else ["none"]):
            user_f, item_f = feature_matrices(s, features, split, name == "VBPR", user_ids, item_ids)
            p = BPR_PARAMS if name == "BPR" else params.get(name, {})
            runs = []
            for seed in seeds:
                runs.append(fit_and_rank(name, p, split, seed, user_f, item_f, user_ids, item_ids)["test"])
                done += 1
                if progress is not None:
                    progress("models", done, total)
            per_model[name][s] = _per_user_mean(runs)
    t_models = time.perf_counter() - t1
    n_test_users = len(per_model[base_models[0]]["none"])
    return {
        "dataset": data.name, "credit": data.credit, "k": K,
        "protocol": ("RecBole's: each user's interactions shuffled and split 8:1:1 (train/val/test, split seed "
                     f"{split.seed}); full ranking of every item not in the user's train or val part; NDCG@{K} and "
                     f"Recall@{K} per test user, averaged over {len(seeds)} model seeds; 95% bootstrap intervals "
                     "over users; features from training interactions only"),
        "seeds": list(seeds), "base_models": list(base_models), "feature_sets": sets,
        "skipped_sets": [s for s in feature_sets if s not in sets],
        "params": {m: dict(BPR_PARAMS if m == "BPR" else params.get(m, {})) for m in [*base_models, *references]},
        "users": "all" if users is None else f"{len(user_ids)} chosen",
        "counts": {"users": len(user_ids), "items": len(item_ids), "train": len(split.train), "val": len(split.val),
                   "test": len(split.test), "test_users_ranked": n_test_users},
        "results": {m: summarize(per_model[m]) for m in base_models},
        "references": summarize({m: per_model[m]["none"] for m in references}, reference="") if references else {},
        "features": {k: v for k, v in features.info.items()},
        "timing_s": {"features": t_features, "models": t_models},
    }


def reproduce_baseline(data: RecData, seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    """Cornac's BPR (:data:`BPR_PARAMS`) under RecBole's protocol on MovieLens-100k, against
    :data:`PUBLISHED_BASELINE`: test NDCG@10 and Recall@10 (mean over seeds, 95% interval over users),
    their ratio to the published figure and whether it is within ±10%."""
    import time

    t0 = time.perf_counter()
    split = split_by_user(data.pairs)
    runs = [fit_and_rank("BPR", BPR_PARAMS, split, seed)["test"] for seed in seeds]
    st = summarize({"BPR": _per_user_mean(runs)})["summary"]["BPR"]
    per_seed = [{m: sum(r[u][m] for u in r) / len(r) for m in ("ndcg", "recall")} for r in runs]
    out: dict[str, Any] = {"published": PUBLISHED_BASELINE, "params": BPR_PARAMS, "seeds": list(seeds),
                           "per_seed": per_seed, "seconds": time.perf_counter() - t0}
    for m, key in (("ndcg", "ndcg@10"), ("recall", "recall@10")):
        ratio = st[m]["mean"] / PUBLISHED_BASELINE[key]
        out[key] = {**st[m], "ratio": ratio, "within_10pct": abs(ratio - 1) <= 0.10}
    return out
