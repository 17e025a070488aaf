"""pmgen's outputs as recommender side features: :func:`build_features` (``pmgen evaluate-recommendation``).

Every feature is computed from what the caller passes: each user's **training** history (the
experiment removes every event on a validation or test item first,
:func:`pmgen.eval.recommendation.training_histories`) and the training interactions. Nothing here
reads a held-out interaction.

| feature | for | what |
|---|---|---|
| ``keywords`` | users | the LLM's preference keywords (cached in the :class:`~pmgen.stages.keywords.KeywordCache`), embedded by the text encoder |
| ``soft`` | users | the soft preference embeddings (``[n_img, D]``, cached here), their mean |
| ``target-keywords`` | items | the target keywords (title + tags, deterministic), embedded |
| ``real-images`` | items | the image embedding of the item's own image |
| ``generated-images`` | items | the image embedding of pmgen's sticker of the item personalized for its **audience** (the users who chose it in training: their most common keywords, their mean soft embeddings), one per item at preference weight 1 |

Models take their parts as plain functions (:class:`FeatureModels`), so tests run with stand-ins;
the CLI passes the preset's (``sticker-tiny``'s evaluator scores no image here: image embeddings
come from its image tower only). Soft embeddings and generated-image embeddings are cached in
``<cache dir>/recommendation/`` (:class:`VectorCache`, keyed by the model and the exact input), so a
re-run only computes what is new.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmgen.data.schema import Event, Item
from pmgen.eval.keyword_bench import KeywordsFn, keywords_of
from pmgen.eval.movielens import TextVectorsFn
from pmgen.paths import cache_dir, write_file_atomically

__all__ = ["FeatureModels", "Features", "VectorCache", "audience_keywords", "audience_mean", "audiences",
           "build_features", "history_key"]

GENERATION_WEIGHT = 1.0
"""Preference weight of each item's generated sticker: one candidate per item, the personalized one (no
selection among weights), which bounds the cost at one generator call per item."""
AUDIENCE_KEYWORDS = 8
BATCH = 8
"""Users whose keywords go through the LLM in one batched call (``extract_many``) when it has one."""

Progress = Callable[[str, int, int], None]
"""``progress(label, done, total)``."""
GenerateFn = Callable[[Sequence[Event], Item, list[str], "torch.Tensor | None"], tuple[torch.Tensor, float]]
"""``(audience events, item, audience keywords, audience soft [n_img, D] or None)`` → (image ``[1, 3, H, W]`` in
[0, 1], its preference weight: :data:`GENERATION_WEIGHT`, or 0 when nothing personalizes the item)."""


@dataclass
class FeatureModels:
    """Where the features come from.

    Attributes:
        keywords: ``(events, items)`` → preference keywords (list or ``Keywords``); an object with
            ``extract_many`` (a :class:`~pmgen.stages.keywords.PreferenceExtractor`) is batched.
        text_vectors: texts → ``[N, d]`` vectors (e.g. :func:`pmgen.eval.movielens.encoder_text_vectors`).
        soft: ``(events, items)`` → ``[n_img, D]`` soft preference embeddings, or ``None`` (no ``soft`` set).
        image_vectors: images ``[B, 3, H, W]`` in [0, 1] → ``[B, d]`` embeddings, or ``None`` (no image sets).
        load_image: an item → its image ``[1, 3, H, W]`` in [0, 1], or ``None`` when it has none.
        generate: see :data:`GenerateFn`, or ``None`` (no ``generated-images`` set).
        ids: ``name@hash`` of the soft prompt, the image tower and the generator: part of the cache keys.
        extractor: the object whose ``extract_many`` batches the keywords (optional).
    """

    keywords: KeywordsFn
    text_vectors: TextVectorsFn
    soft: Callable[[Sequence[Event], Mapping[str, Item]], torch.Tensor] | None = None
    image_vectors: Callable[[torch.Tensor], torch.Tensor] | None = None
    load_image: Callable[[Item], torch.Tensor | None] | None = None
    generate: GenerateFn | None = None
    ids: Mapping[str, str] = field(default_factory=dict)
    extractor: Any = None


@dataclass
class Features:
    """Feature vectors by name: ``user[name][user_id]`` and ``item[name][item_id]`` (float32 arrays)."""

    user: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    item: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ cache


class VectorCache:
    """``key → float32 array`` in one ``.npz`` file, loaded once, written (temp + rename) by :meth:`flush`.

    A flush first merges what another process wrote meanwhile, so two writers lose nothing but time.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._data: dict[str, np.ndarray] = self._read()
        self._dirty = False

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        with np.load(self.path) as z:
            return {k: z[k] for k in z.files}

    def get(self, key: str) -> np.ndarray | None:
        return self._data.get(key)

    def put(self, key: str, value: np.ndarray) -> None:
        self._data[key] = np.asarray(value, dtype=np.float32)
        self._dirty = True

    def __len__(self) -> int:
        return len(self._data)

    def flush(self) -> None:
        if not self._dirty:
            return
        data = {**self._read(), **self._data}

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, **data)

        write_file_atomically(self.path, write)
        self._data, self._dirty = data, False


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:40]


def history_key(events: Sequence[Event]) -> str:
    """A hash of a history's exact events (order included)."""
    return _sha([e.to_json() for e in events])


def _cache(name: str, model_id: str, root: Path | None) -> VectorCache:
    folder = (root or cache_dir()) / "recommendation"
    return VectorCache(folder / f"{name}-{_sha(model_id)[:16]}.npz")


# ---------------------------------------------------------------------------------------- helpers


def _unit_rows(fn: TextVectorsFn | Callable[[torch.Tensor], torch.Tensor], x: Any, n: int) -> np.ndarray:
    v = torch.as_tensor(fn(x), dtype=torch.float32)
    if v.ndim != 2 or v.shape[0] != n:
        raise ValueError(f"a feature function returned shape {tuple(v.shape)} for {n} inputs; expected [{n}, d]")
    return torch.nn.functional.normalize(v, dim=-1).numpy()


def audiences(train_pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """``item → the users who interacted with it in training`` (sorted ids)."""
    out: dict[str, set[str]] = {}
    for u, i in train_pairs:
        out.setdefault(i, set()).add(u)
    return {i: sorted(us, key=lambda x: (len(x), x)) for i, us in out.items()}


def audience_mean(train_pairs: Sequence[tuple[str, str]], user_vectors: Mapping[str, np.ndarray],
                  items: Sequence[str]) -> dict[str, np.ndarray]:
    """Each item's mean user vector over its training audience (zeros for an item nobody chose in training):
    how user features reach a model that reads item features only."""
    aud = audiences(train_pairs)
    dim = len(next(iter(user_vectors.values())))
    out = {}
    for i in items:
        vs = [user_vectors[u] for u in aud.get(i, ()) if u in user_vectors]
        out[i] = np.mean(vs, axis=0).astype(np.float32) if vs else np.zeros(dim, np.float32)
    return out


def audience_keywords(members: Sequence[str], keywords: Mapping[str, Sequence[str]], k: int = AUDIENCE_KEYWORDS
                      ) -> list[str]:
    """The ``k`` keywords most members have (ties: the order they first appear in, members in order)."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for u in members:
        for w in dict.fromkeys(keywords.get(u, ())):
            counts[w] += 1
            first.setdefault(w, len(first))
    return sorted(counts, key=lambda w: (-counts[w], first[w]))[:k]


def _tick(progress: Progress | None, label: str, done: int, total: int) -> None:
    if progress is not None:
        progress(label, done, total)


# ------------------------------------------------------------------------------------- per feature


def user_keywords(histories: Mapping[str, Sequence[Event]], items: Mapping[str, Item], models: FeatureModels,
                  progress: Progress | None = None) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Preference keywords of every user with a non-empty history (batched when the extractor can)."""
    users = [u for u, ev in histories.items() if ev]
    out: dict[str, list[str]] = {}
    n_fallback = n_cached = 0
    many = getattr(models.extractor, "extract_many", None)
    step = BATCH if many is not None else 1
    for s in range(0, len(users), step):
        part = users[s:s + step]
        results = many([(histories[u], items) for u in part]) if many else [models.keywords(histories[part[0]], items)]
        for u, r in zip(part, results):
            if isinstance(r, Exception):
                raise ValueError(f"keywords of user {u} failed: {r}") from r
            kws, info = keywords_of(r)
            out[u] = kws
            n_fallback += bool(info.get("fallback"))
            n_cached += bool(info.get("cached"))
        _tick(progress, "preference keywords", len(out), len(users))
    return out, {"users": len(users), "fallbacks": n_fallback, "cached": n_cached}


def user_soft(histories: Mapping[str, Sequence[Event]], items: Mapping[str, Item], models: FeatureModels,
              cache_root: Path | None = None, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """``user → [n_img, D]`` soft preference embeddings (cached by the soft prompt and the exact history)."""
    assert models.soft is not None
    cache = _cache("soft", models.ids.get("soft", "soft"), cache_root)
    users = [u for u, ev in histories.items() if ev]
    out = {}
    for n, u in enumerate(users):
        key = history_key(histories[u])
        vec = cache.get(key)
        if vec is None:
            vec = torch.as_tensor(models.soft(histories[u], items), dtype=torch.float32).numpy()
            cache.put(key, vec)
            if n % 50 == 49:
                cache.flush()
        out[u] = vec
        _tick(progress, "soft embeddings", n + 1, len(users))
    cache.flush()
    return out


def item_text(items: Mapping[str, Item], item_ids: Sequence[str], models: FeatureModels) -> dict[str, np.ndarray]:
    """``item → embedded target keywords`` (title + tags,
    :func:`~pmgen.stages.keywords.deterministic_target_keywords`)."""
    from pmgen.stages.keywords import deterministic_target_keywords

    texts = [", ".join(keywords_of(deterministic_target_keywords(item=items[i]))[0]) or items[i].title
             for i in item_ids]
    return dict(zip(item_ids, _unit_rows(models.text_vectors, texts, len(texts))))


def item_real_images(items: Mapping[str, Item], item_ids: Sequence[str], models: FeatureModels,
                     batch: int = 64) -> dict[str, np.ndarray]:
    """``item → image embedding`` of each item's own image. Raises ``ValueError`` for an item without one."""
    assert models.image_vectors is not None and models.load_image is not None
    out: dict[str, np.ndarray] = {}
    for s in range(0, len(item_ids), batch):
        ids = item_ids[s:s + batch]
        ims = [models.load_image(items[i]) for i in ids]
        missing = [i for i, im in zip(ids, ims) if im is None]
        if missing:
            raise ValueError(f"items without an image: {missing[:5]} (real-images needs every item's image)")
        out.update(zip(ids, _unit_rows(models.image_vectors, torch.cat(ims), len(ids))))
    return out


def item_generated_images(histories: Mapping[str, Sequence[Event]], train_pairs: Sequence[tuple[str, str]],
                          items: Mapping[str, Item], item_ids: Sequence[str], keywords: Mapping[str, list[str]],
                          soft: Mapping[str, np.ndarray] | None, models: FeatureModels,
                          cache_root: Path | None = None, progress: Progress | None = None
                          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``item → image embedding`` of the item's sticker personalized for its training audience.

    The audience's keywords are :func:`audience_keywords` of its members; its soft embeddings the
    members' mean (each vector rescaled to the members' mean norm); its history (what the selector's
    preference side reads) the members' training events, oldest first. Cached per item by the models
    and this exact input; the PNG is kept beside the cache for inspection.
    """
    assert models.generate is not None and models.image_vectors is not None
    key_models = (models.ids.get("generator", "generator"), models.ids.get("images", "images"))
    cache = _cache("generated", "|".join(key_models), cache_root)
    png_dir = cache.path.with_suffix("")
    aud = audiences(train_pairs)
    out: dict[str, np.ndarray] = {}
    weights: Counter[float] = Counter()
    for n, i in enumerate(item_ids):
        members = aud.get(i, [])
        kws = audience_keywords(members, keywords)
        s = None
        if soft is not None and any(u in soft for u in members):
            stack = np.stack([soft[u] for u in members if u in soft])
            mean = stack.mean(0)
            norm = np.linalg.norm(stack, axis=-1).mean(0)[..., None]  # [n_img, 1]: the members' mean norms
            s = torch.from_numpy(mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-8) * norm)
        events = sorted((e for u in members for e in histories.get(u, ())), key=lambda e: e.time or 0)
        key = _sha(i, kws, history_key(events), None if s is None else hashlib.sha256(s.numpy().tobytes()).hexdigest())
        hit = cache.get(key)
        if hit is None:
            image, w = models.generate(events, items[i], kws, s)
            emb = _unit_rows(models.image_vectors, image, 1)[0]
            hit = np.concatenate([emb, np.float32([w])])
            cache.put(key, hit)
            _save_png(png_dir / f"{key}.png", image)
            if n % 20 == 19:
                cache.flush()
        out[i] = hit[:-1]
        weights[float(hit[-1])] += 1
        _tick(progress, "generated stickers", n + 1, len(item_ids))
    cache.flush()
    return out, {"items": len(item_ids), "chosen_weights": {str(k): v for k, v in sorted(weights.items())},
                 "png_dir": str(png_dir)}


def _save_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    arr = (image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    write_file_atomically(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------------ build


def build_features(histories: Mapping[str, Sequence[Event]], train_pairs: Sequence[tuple[str, str]],
                   items: Mapping[str, Item], models: FeatureModels, names: Sequence[str],
                   cache_root: Path | None = None, progress: Progress | None = None) -> Features:
    """The features ``names`` (any of ``keywords``, ``soft``, ``target-keywords``, ``real-images``,
    ``generated-images``) for the users of ``histories`` and the items of ``train_pairs``.

    ``histories`` must hold training events only and ``train_pairs`` training interactions only: they
    are all this function reads. Raises ``ValueError`` for an unknown name or a missing model.
    """
    known = ("keywords", "soft", "target-keywords", "real-images", "generated-images")
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown feature(s) {bad}; known: {', '.join(known)}")
    need = {"soft": models.soft, "real-images": models.image_vectors, "generated-images": models.generate}
    missing = [n for n in names if n in need and need[n] is None]
    if missing:
        raise ValueError(f"no model for feature(s) {missing}")
    item_ids = sorted({i for _, i in train_pairs}, key=lambda x: (len(x), x))
    f = Features()
    t: dict[str, float] = {}
    kws: dict[str, list[str]] = {}
    if "keywords" in names or "generated-images" in names:
        t0 = time.perf_counter()
        kws, f.info["keywords"] = user_keywords(histories, items, models, progress)
        t["keywords"] = time.perf_counter() - t0
        f.info["keyword_examples"] = {u: kws[u] for u in list(kws)[:3]}
        if "keywords" in names:
            f.user["keywords"] = dict(zip(kws, _unit_rows(models.text_vectors, [", ".join(k) for k in kws.values()],
                                                          len(kws))))
    soft: dict[str, np.ndarray] | None = None
    if "soft" in names or ("generated-images" in names and models.soft is not None):
        t0 = time.perf_counter()
        soft = user_soft(histories, items, models, cache_root, progress)
        t["soft"] = time.perf_counter() - t0
        if "soft" in names:
            f.user["soft"] = {u: v.reshape(-1, v.shape[-1]).mean(0) for u, v in soft.items()}
    if "target-keywords" in names:
        f.item["target-keywords"] = item_text(items, item_ids, models)
    if "real-images" in names:
        t0 = time.perf_counter()
        f.item["real-images"] = item_real_images(items, item_ids, models)
        t["real-images"] = time.perf_counter() - t0
    if "generated-images" in names:
        t0 = time.perf_counter()
        f.item["generated-images"], f.info["generated"] = item_generated_images(
            histories, train_pairs, items, item_ids, kws, soft, models, cache_root, progress)
        t["generated-images"] = time.perf_counter() - t0
    f.info["timing_s"] = t
    return f

