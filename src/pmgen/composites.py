"""Composite training pairs for the generator: "the target, in this user's taste".

The catalog almost never shows two concepts together, so a generator trained on it alone draws
either the target or a blob of the taste. This module makes deterministic (seeded) pairs of
(target sticker, taste) whose **image** shows both, and whose **condition** is exactly what PMG
feeds at inference (:meth:`pmgen.stages.condition.ConditionBuilder.build` on the target's keywords,
the taste's preference keywords and a weight ``w`` of the inference grid):

* ``badge``   — a small sticker of the taste (its catalog items) in a corner of the full-size target;
* ``side``    — the target a little smaller and shifted, a taste sticker held at its side;
* ``palette`` — the target recoloured towards the taste's dominant hue (from its catalog stickers);
* ``pattern`` — faint taste stickers tiled in the background, the target on top;
* ``natural`` — the catalog's own "X in Y" families: faces ↔ cat faces, man / woman / person ↔
  their sport and music activities (sports, music), hearts / circles / squares in colours
  (preference ``"green"``), skin-tone variants (preference ``"medium skin tone"``).

The element size, opacity and blend grow with ``w`` (0.5 … 2), so the weight means "how much of
the taste". Nothing here is used at inference: it is training data only.

Honesty rule: no composite uses, as its target, an item that is the target of a ``val`` / ``test``
sample of ``sticker-users`` or one of the generator's own held-out items; those items, and the
ground-truth personalized items of val/test samples, never appear as taste elements or natural
results either. Evaluation therefore judges catalog stickers the generator never saw composed.
(:func:`validation_composites` builds a few composites *of* held-out targets for a validation loss
and the sample grid; they are never trained on.)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

MODES = ("badge", "side", "palette", "pattern", "natural")
DEFAULT_WEIGHTS = (0.5, 1.0, 1.5, 2.0)  # the inference grid of pmgen.pipeline without w = 0
N_TARGET_KEYWORDS = 5  # pmgen.pipeline.Settings.n_target_keywords
KEYWORD_SETS_PER_TASTE = 40
RENDER_VERSION = 2  # bump when render() changes: cached composite latents are keyed by it
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "pink",
           "light blue", "grey")
# face ↔ cat face (the catalog's own "X in Y" pairs for the cats taste)
CAT_FACES = (("grinning face", "grinning cat"), ("grinning face with smiling eyes", "grinning cat with smiling eyes"),
             ("face with tears of joy", "cat with tears of joy"), ("smiling face with heart-eyes", "smiling cat with heart-eyes"),
             ("smirking face", "cat with wry smile"), ("kissing face", "kissing cat"), ("weary face", "weary cat"),
             ("crying face", "crying cat"), ("enraged face", "pouting cat"), ("neutral face", "cat face"),
             ("man technologist", "hacker cat"))
# other taste pairs where one catalog sticker is the target drawn in the taste
TASTE_PAIRS = (("envelope", "hearts", "love letter"), ("wrapped gift", "hearts", "heart with ribbon"),
               ("fire", "hearts", "heart on fire"), ("smiling face", "hearts", "smiling face with hearts"),
               ("smiling face", "weather", "sun with face"), ("smiling face", "space", "full moon face"),
               ("neutral face", "space", "new moon face"), ("grinning face", "spooky", "jack-o-lantern"))
_STOP = {"a", "an", "and", "the", "of", "with", "all", "time", "sends", "loves", "into", "things", "person",
         "who", "fan", "watches", "fascinated", "by", "sky", "sticker", "stickers"}


@dataclass(frozen=True)
class CompositeSpec:
    """One composite: everything needed to render its image and build its condition.

    ``target`` / ``element`` are catalog item ids (``element`` is the natural result for ``natural``);
    ``taste`` is one of the 12 hidden tastes, or ``"colour"`` / ``"skin tone"`` for the families.
    ``place`` picks the corner / side (0..3). ``weight`` is the preference weight of the condition.
    """

    target: str
    taste: str
    mode: str
    element: str
    place: int
    weight: float
    target_keywords: tuple[str, ...]
    preference_keywords: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- images
def _mask(img: np.ndarray) -> np.ndarray:
    """Float ``[H, W]`` in [0, 1]: the sticker's silhouette on its white background, holes filled
    (white eyes stay opaque). ``img`` is uint8 ``[H, W, 3]``."""
    from PIL import Image, ImageDraw

    ink = (255 - img.astype(np.int16)).max(-1) > 24
    pad = np.pad(ink, 1).astype(np.uint8) * 255
    m = Image.fromarray(pad).copy()  # a copy: flood-filling an image that shares numpy memory does nothing
    ImageDraw.floodfill(m, (0, 0), 128)
    return (np.asarray(m)[1:-1, 1:-1] != 128).astype(np.float32)


def _resized(img: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``img`` (uint8 ``[H, W, 3]``) and its mask at ``size``×``size`` (float arrays)."""
    from PIL import Image

    rgb = np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS), dtype=np.float32)
    m = Image.fromarray((_mask(img) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return rgb, np.asarray(m, dtype=np.float32)[..., None] / 255


def _paste(canvas: np.ndarray, img: np.ndarray, size: int, x: int, y: int, opacity: float = 1.0) -> None:
    rgb, m = _resized(img, size)
    h, w = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
    if x1 <= x0 or y1 <= y0:
        return
    sub_rgb, sub_m = rgb[y0 - y:y1 - y, x0 - x:x1 - x], m[y0 - y:y1 - y, x0 - x:x1 - x] * opacity
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - sub_m) + sub_rgb * sub_m


def dominant_hue(images: Iterable[np.ndarray]) -> float:
    """The most common hue (0..1) of the saturated pixels of ``images`` (uint8 ``[H, W, 3]``)."""
    hist = np.zeros(36)
    for img in images:
        hsv = _rgb_to_hsv(img.astype(np.float32) / 255)
        keep = (hsv[..., 1] > 0.35) & (hsv[..., 2] > 0.25)
        hist += np.bincount((hsv[..., 0][keep] * 36).astype(int).clip(0, 35), weights=hsv[..., 1][keep], minlength=36)
    return (float(np.argmax(hist)) + 0.5) / 36


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = mx - mn
    h = np.zeros_like(mx)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    nz = d > 1e-6
    rm = nz & (mx == r)
    gm = nz & (mx == g) & ~rm
    bm = nz & ~rm & ~gm
    h[rm] = ((g - b)[rm] / d[rm]) % 6
    h[gm] = (b - r)[gm] / d[gm] + 2
    h[bm] = (r - g)[bm] / d[bm] + 4
    s = np.where(mx > 1e-6, d / np.maximum(mx, 1e-6), 0)
    return np.stack([h / 6, s, mx], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] * 6, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, dtype=np.float32)
    for k, (a, b, c) in enumerate(table):
        sel = i == k
        out[sel] = np.stack([a[sel], b[sel], c[sel]], -1)
    return out


def recolour(img: np.ndarray, hue: float, amount: float) -> np.ndarray:
    """Shift the target's coloured pixels towards ``hue`` (0..1); ``amount`` in [0, 1]. uint8 in/out."""
    rgb = img.astype(np.float32) / 255
    hsv = _rgb_to_hsv(rgb)
    coloured = (hsv[..., 1] > 0.2) & (hsv[..., 2] > 0.15)
    if not coloured.any():
        return img.copy()
    weights = hsv[..., 1][coloured]
    base = float(np.angle(np.sum(weights * np.exp(2j * np.pi * hsv[..., 0][coloured]))) / (2 * np.pi)) % 1
    shift = ((hue - base + 0.5) % 1 - 0.5) * amount
    out = hsv.copy()
    out[..., 0] = np.where(coloured, (hsv[..., 0] + shift) % 1, hsv[..., 0])
    return (np.clip(_hsv_to_rgb(out), 0, 1) * 255 + 0.5).astype(np.uint8)


def render(spec: CompositeSpec, image_of: Mapping[str, np.ndarray], hues: Mapping[str, float]) -> np.ndarray:
    """The composite image, uint8 ``[H, W, 3]``; a pure function of ``spec`` and the catalog images."""
    target = image_of[spec.target]
    size = target.shape[0]
    u = (spec.weight - 0.5) / 1.5  # 0 at w = 0.5, 1 at w = 2
    if spec.mode == "natural":
        return image_of[spec.element].copy()
    if spec.mode == "palette":
        return recolour(target, hues[spec.taste], 0.55 + 0.45 * u)
    canvas = np.full((size, size, 3), 255.0, dtype=np.float32)
    element = image_of[spec.element]
    s = size / 64
    if spec.mode == "badge":
        canvas[:] = target
        b = round((20 + 8 * u) * s)
        x = 0 if spec.place % 2 == 0 else size - b
        y = 0 if spec.place < 2 else size - b
        _paste(canvas, element, b, x, y)
    elif spec.mode == "side":
        t = round(50 * s)
        b = round((26 + 8 * u) * s)
        right = spec.place % 2 == 1
        _paste(canvas, target, t, size - t if not right else 0, (size - t) // 2)
        _paste(canvas, element, b, size - b if right else 0, size - b)
    elif spec.mode == "pattern":
        b = round(18 * s)
        for row in range(4):
            for col in range(5):
                _paste(canvas, element, b, col * b - (b // 2 if row % 2 else 0), row * b - b // 4, 0.4 + 0.3 * u)
        _paste(canvas, target, size, 0, 0)
    else:
        raise ValueError(f"unknown composite mode {spec.mode!r}; known: {', '.join(MODES)}")
    return (canvas.clip(0, 255) + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- keywords
def taste_keyword_pool(taste: object, items: Sequence[object]) -> list[str]:
    """Words an LLM might extract for a taste: its name, searches, description words, frequent tags
    and names of its stickers (``taste`` is a :class:`~pmgen.data.datasets.sticker_users.Taste`)."""
    words: list[str] = [taste.name, *taste.searches]  # type: ignore[attr-defined]
    words += [w for w in re.findall(r"[a-z]+", taste.description.lower()) if w not in _STOP and len(w) > 2]  # type: ignore[attr-defined]
    tags = Counter(t for it in items for t in it.attributes.get("tags") or [])  # type: ignore[attr-defined]
    words += [t for t, _ in tags.most_common(12) if t not in _STOP]
    words += sorted({it.title for it in items if ":" not in it.title and len(it.title) <= 24})[:40]  # type: ignore[attr-defined]
    return list(dict.fromkeys(w.strip() for w in words if w.strip()))


def pick_keywords(pool: Sequence[str], rng: random.Random, core: str, k_min: int = 3, k_max: int = 8) -> tuple[str, ...]:
    """``k`` keywords (``k_min..k_max``) from ``pool``, the taste's name always among them, shuffled."""
    k = rng.randint(k_min, k_max)
    rest = [w for w in pool if w != core]
    chosen = [core, *rng.sample(rest, k=min(k - 1, len(rest)))]
    rng.shuffle(chosen)
    return tuple(chosen)


# ---------------------------------------------------------------------------------------------- specs
@dataclass
class Catalog:
    """What composites are made from: catalog items, their images, and the held-out sets.

    Attributes:
        items: item id → :class:`pmgen.data.Item`.
        images: item id → uint8 ``[64, 64, 3]``.
        heldout_targets: never a composite target (val/test sample targets, the generator's held-out items).
        heldout_images: never a taste element or natural result (the above + val/test ground truths).
    """

    items: Mapping[str, object]
    images: Mapping[str, np.ndarray]
    heldout_targets: frozenset[str]
    heldout_images: frozenset[str]


def _target_keywords(item: object) -> tuple[str, ...]:
    from pmgen.stages.keywords import target_keywords

    return tuple(target_keywords(item=item, k=N_TARGET_KEYWORDS).keywords)  # type: ignore[arg-type]


def natural_pairs(catalog: Catalog, tastes: Sequence[object]) -> list[tuple[str, str, str, tuple[str, ...] | None]]:
    """``(target id, taste, result id, fixed preference keywords or None)`` of the catalog's own families."""
    items = catalog.items
    by_title: dict[str, str] = {}
    for iid in sorted(items):
        by_title.setdefault(items[iid].title, iid)  # type: ignore[attr-defined]
    out: list[tuple[str, str, str, tuple[str, ...] | None]] = []
    for a, b in CAT_FACES:
        if a in by_title and b in by_title:
            out.append((by_title[a], "cats", by_title[b], None))
    for a, taste, b in TASTE_PAIRS:
        if a in by_title and b in by_title:
            out.append((by_title[a], taste, by_title[b], None))
    # man / woman / person ↔ the activities of the sports and music tastes
    for t in tastes:
        if t.name not in ("sports", "music"):  # type: ignore[attr-defined]
            continue
        for iid in sorted(items):
            it = items[iid]
            m = re.match(r"^(man|woman|person) (.+)$", it.title)  # type: ignore[attr-defined]
            if m and ":" not in it.title and t.matches(it) and m.group(1) in by_title:  # type: ignore[attr-defined]
                out.append((by_title[m.group(1)], t.name, iid, None))  # type: ignore[attr-defined]
    # hearts / circles / squares / hexagons / books in colours: "red heart" + "green" → "green heart"
    families: dict[str, dict[str, str]] = {}
    for title, iid in by_title.items():
        m = re.match(rf"^({'|'.join(COLOURS)}) (heart|circle|square|hexagon|book)$", title)
        if m:
            families.setdefault(m.group(2), {})[m.group(1)] = iid
    for noun, members in sorted(families.items()):
        for src in sorted(members):
            for dst in sorted(members):
                if src != dst:
                    out.append((members[src], "colour", members[dst], (dst,)))
    # skin tones: "waving hand" + "medium skin tone" → "waving hand: medium skin tone"
    for iid in sorted(items):
        attrs = items[iid].attributes  # type: ignore[attr-defined]
        base = attrs.get("skintone_base")
        title = items[iid].title  # type: ignore[attr-defined]
        if attrs.get("skintone") and base in items and title.count(":") == 1 and "," not in title:
            out.append((base, "skin tone", iid, (title.split(": ", 1)[1],)))
    return [p for p in out if p[0] not in catalog.heldout_targets and p[2] not in catalog.heldout_images
            and p[0] in catalog.images and p[2] in catalog.images]


def _eligible_targets(catalog: Catalog) -> list[str]:
    out = []
    for iid in sorted(catalog.items):
        it = catalog.items[iid]
        a = it.attributes  # type: ignore[attr-defined]
        if iid in catalog.heldout_targets or iid not in catalog.images or a.get("skintone"):
            continue
        if a.get("group") in ("flags", "component") or "facing right" in it.title:  # type: ignore[attr-defined]
            continue
        out.append(iid)
    return out


def make_specs(catalog: Catalog, n: int, seed: int = 0, modes: Sequence[str] = MODES,
               weights: Sequence[float] = DEFAULT_WEIGHTS, targets: Sequence[str] | None = None) -> list[CompositeSpec]:
    """``n`` composites drawn deterministically from ``seed``.

    Args:
        targets: restrict targets to these ids (default: every eligible catalog item not held out);
            the held-out rule is not applied to an explicit list (used for validation composites).
    """
    from pmgen.data.datasets.sticker_users import TASTES

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"composite modes {list(modes)}: expected a non-empty subset of {MODES}")
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"composite weights must be > 0, got {list(weights)}")
    rng = random.Random(f"pmgen-composites-{seed}")
    tastes = list(TASTES)
    pools = {t.name: [iid for iid in sorted(catalog.items) if iid not in catalog.heldout_images and iid in catalog.images
                      and not catalog.items[iid].attributes.get("skintone") and t.matches(catalog.items[iid])]  # type: ignore[attr-defined]
             for t in tastes}
    keyword_pools = {t.name: taste_keyword_pool(t, [catalog.items[i] for i in pools[t.name]]) for t in tastes}
    # a fixed number of keyword lists per taste, like that many users' extracted keywords (this also
    # bounds the condition builder's text cache)
    keyword_sets = {name: [pick_keywords(pool, rng, name) for _ in range(KEYWORD_SETS_PER_TASTE)]
                    for name, pool in keyword_pools.items()}
    pool_targets = list(targets) if targets is not None else _eligible_targets(catalog)
    naturals = natural_pairs(catalog, tastes) if "natural" in modes and targets is None else []
    if not pool_targets:
        raise ValueError("no eligible composite targets")
    natural_groups: dict[str, list[tuple[str, str, str, tuple[str, ...] | None]]] = {}
    for pair in naturals:
        natural_groups.setdefault(pair[1], []).append(pair)
    tkw: dict[str, tuple[str, ...]] = {}
    specs: list[CompositeSpec] = []
    usable = [m for m in modes if m != "natural" or naturals]
    while len(specs) < n:
        mode = rng.choice(usable)
        weight = float(rng.choice(list(weights)))
        place = rng.randrange(4)
        if mode == "natural":  # a family first (so 1,500 skin-tone pairs do not crowd out 11 cat faces)
            target, taste, element, fixed = rng.choice(natural_groups[rng.choice(sorted(natural_groups))])
        else:
            taste_obj = rng.choice(tastes)
            taste = taste_obj.name
            target = rng.choice(pool_targets)
            if taste_obj.matches(catalog.items[target]) or not pools[taste]:
                continue  # a cat sticker with a cat badge teaches nothing
            element, fixed = rng.choice(pools[taste]), None
        pref = fixed if fixed is not None else rng.choice(keyword_sets[taste])
        if target not in tkw:
            tkw[target] = _target_keywords(catalog.items[target])
        specs.append(CompositeSpec(target, taste, mode, element, place, weight, tkw[target], pref))
    return specs


def taste_hues(catalog: Catalog) -> dict[str, float]:
    """Dominant hue of each taste's catalog stickers (the ``palette`` mode's colour)."""
    from pmgen.data.datasets.sticker_users import TASTES

    return {t.name: dominant_hue(catalog.images[i] for i in sorted(catalog.items)
                                 if i in catalog.images and t.matches(catalog.items[i]))  # type: ignore[arg-type]
            for t in TASTES}


def fingerprint(specs: Sequence[CompositeSpec]) -> str:
    return hashlib.sha1(json.dumps([asdict(s) for s in specs]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the set
@dataclass
class CompositeSet:
    """Training composites and a few validation composites of held-out targets.

    ``train`` never has a target in ``catalog.heldout_targets`` (checked on construction);
    ``val`` has only such targets and is never trained on.
    """

    catalog: Catalog
    train: list[CompositeSpec]
    val: list[CompositeSpec]
    hues: dict[str, float]

    def __post_init__(self) -> None:
        leaked = sorted({s.target for s in self.train} & self.catalog.heldout_targets)
        leaked += sorted({s.element for s in self.train} & self.catalog.heldout_images)
        if leaked:
            raise ValueError(f"held-out items in training composites: {leaked[:10]}")

    def images(self, specs: Sequence[CompositeSpec]) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]``."""
        arr = np.stack([render(s, self.catalog.images, self.hues) for s in specs])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def fingerprint(self) -> str:
        """Hash of the specs and of the renderer's version (cached latents depend on both)."""
        return fingerprint([*self.train, *self.val]) + f"-r{RENDER_VERSION}"


def build_composite_set(catalog: Catalog, n: int, n_val: int = 48, seed: int = 0, modes: Sequence[str] = MODES,
                        weights: Sequence[float] = DEFAULT_WEIGHTS, val_targets: Sequence[str] = ()) -> CompositeSet:
    """``n`` training composites and ``n_val`` validation composites (targets from ``val_targets``,
    non-natural modes)."""
    train = make_specs(catalog, n, seed, modes, weights)
    val_modes = [m for m in modes if m != "natural"] or ["badge"]
    val = make_specs(catalog, n_val, seed + 1, val_modes, weights, targets=list(val_targets)) if val_targets else []
    return CompositeSet(catalog, train, val, taste_hues(catalog))


def heldout_from_sticker_users(samples: Iterable[object]) -> tuple[set[str], set[str]]:
    """(targets, ground truths) of the ``val`` and ``test`` samples of ``sticker-users``."""
    targets, truths = set(), set()
    for s in samples:
        if s.split in ("val", "test"):  # type: ignore[attr-defined]
            targets.add(s.target_id)  # type: ignore[attr-defined]
            if s.ground_truth_personalized:  # type: ignore[attr-defined]
                truths.add(s.ground_truth_personalized)  # type: ignore[attr-defined]
    return targets, truths


def catalog_from_training_data(items: Mapping[str, object], ids: Sequence[str], images: torch.Tensor,
                               generator_heldout: Iterable[str], samples: Iterable[object]) -> Catalog:
    """A :class:`Catalog` from the generator trainer's data (ids, uint8 ``[N, 3, H, W]`` images, held-out
    items) and the ``sticker-users`` samples."""
    targets, truths = heldout_from_sticker_users(samples)
    held = set(generator_heldout) | targets
    arr = images.permute(0, 2, 3, 1).numpy()
    return Catalog(items, {i: arr[k] for k, i in enumerate(ids)}, frozenset(held), frozenset(held | truths))


def load_composites(cfg: object, ids: Sequence[str], images: torch.Tensor, heldout: np.ndarray) -> CompositeSet:
    """The composite set of a generator training run (``cfg``: a ``GeneratorTrainConfig``): builds the
    ``stickers`` and ``sticker-users`` datasets under ``cfg.data_dir`` if needed."""
    from pmgen.data.validate import load_dataset
    from pmgen.data.datasets import sticker_users, stickers
    from pmgen.paths import data_dir

    root = data_dir(cfg.data_dir)  # type: ignore[attr-defined]
    items = load_dataset(stickers.build(root)).items
    users = load_dataset(sticker_users.build(root))
    gen_held = [i for k, i in enumerate(ids) if heldout[k]]
    catalog = catalog_from_training_data(items, ids, images, gen_held, users.samples)
    val_targets, _ = heldout_from_sticker_users(users.samples)
    return build_composite_set(catalog, cfg.composite_count, seed=cfg.seed, modes=cfg.composite_modes,  # type: ignore[attr-defined]
                               weights=cfg.composite_weights, val_targets=sorted(val_targets))  # type: ignore[attr-defined]
