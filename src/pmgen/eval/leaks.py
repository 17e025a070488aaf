"""Checks of the preference keywords of users whose hidden taste is known (``pmgen evaluate-leaks``).

* :func:`leak_check` — on sticker users: *few-shot leaks* (a keyword of the prompt's examples that
  the history does not support), *fallbacks* (keywords padded or replaced by history words) and
  *taste hits* (the hidden taste word or a direct synonym among the keywords, :func:`taste_hit`);
* :func:`multilingual_check` — on :func:`multilingual_users`, whose taste is written only in
  another language: are the keywords English, and do they name the taste?

Rates are means with 95% bootstrap intervals over users (:func:`pmgen.eval.stats.mean_ci`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pmgen.data.schema import Event, Item, User
from pmgen.eval.keyword_bench import (
    KeywordsFn,
    Progress,
    keywords_of,
    md_table,
    write_result,
)
from pmgen.eval.stats import format_ci, mean_ci

__all__ = ["TASTE_SYNONYMS", "is_english_keyword", "leak_check", "leak_markdown", "leak_table", "multilingual_check",
           "multilingual_users", "taste_hit", "write_leak_outputs"]

TASTE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "cats": ("cat", "kitten", "kitty", "feline", "cat face"),
    "dogs": ("dog", "puppy", "pup", "doggy", "canine", "dog face"),
    "hearts": ("heart", "love", "romance", "romantic", "valentine"),
    "food": ("food", "fruit", "snack", "dessert", "sweets", "dish", "meal", "cooking", "cuisine", "foodie"),
    "space": ("space", "outer space", "rocket", "planet", "astronomy", "cosmos", "galaxy", "universe", "spaceship"),
    "sports": ("sport", "athletics", "athlete", "ball game", "fitness", "workout"),
    "plants": ("plant", "flower", "garden", "gardening", "botany", "tree"),
    "ocean": ("ocean", "sea", "marine", "sea life", "sea animal", "underwater"),
    "music": ("music", "musical", "musician", "musical instrument", "instrument", "song"),
    "weather": ("weather", "sky", "climate", "rain", "cloud", "sun"),
    "spooky": ("spooky", "halloween", "ghost", "horror", "scary", "creepy", "monster"),
    "vehicles": ("vehicle", "car", "transport", "transportation", "automobile"),
}
"""Each hidden sticker-user taste → its direct synonyms (the taste word itself included by :func:`taste_hit`).
Compared by :func:`pmgen.stages.keywords.keyword_key` (plural/case-insensitive) against whole keywords and their words."""


def taste_hit(keywords: Sequence[str], taste: str) -> bool:
    """Whether a keyword (or one word of a keyword) is the hidden taste word or a direct synonym of it."""
    from pmgen.stages.keywords import keyword_key

    wanted = {keyword_key(x) for x in (taste, *TASTE_SYNONYMS.get(taste, ()))}
    for kw in keywords:
        if keyword_key(kw) in wanted or any(keyword_key(w) in wanted for w in kw.split()):
            return True
    return False


def leak_check(users: Sequence[User], items: Mapping[str, Item], extract_fn: KeywordsFn,
               shot_keywords: Iterable[str], seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Keywords of each user's history checked for few-shot leaks, fallbacks and the hidden taste.

    A *leak* is a keyword equal (:func:`~pmgen.stages.keywords.keyword_key`) to a few-shot answer keyword
    (``shot_keywords``) that the user's history does not support (:func:`~pmgen.stages.keywords.is_grounded`
    over :func:`~pmgen.stages.keywords.history_vocabulary`). A *fallback* is a record whose ``fallback`` is
    set (``padded``/``short``: the model gave fewer than ``k``; ``history``: it gave none). A *taste hit*
    is :func:`taste_hit` with the user's hidden ``attributes.taste`` (users without one are not counted).

    Returns:
        ``{"benchmark", "protocol", "n_users", "seed", "summary", "counts", "timing_s", "users"}``;
        ``summary`` holds ``leak_rate``, ``fallback_rate``, ``replaced_rate`` (no model keyword at all),
        ``taste_hit_rate`` and (for ``Keywords`` records) ``model_share`` — the share of each user's
        keywords the model named — as ``{"mean", "ci95", "n"}``.
    """
    from pmgen.stages.keywords import history_vocabulary, is_grounded, keyword_key

    if not users:
        raise ValueError("leak_check needs at least one user")
    shots = {keyword_key(s) for s in shot_keywords}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n, u in enumerate(users):
        try:
            kws, info = keywords_of(extract_fn(u.events, items))
        except ValueError as e:
            raise ValueError(f"keywords of user {u.user_id} failed: {e}") from e
        vocab = history_vocabulary(u.events, items)
        leaked = [kw for kw in kws if keyword_key(kw) in shots and not is_grounded(kw, vocab)]
        fb = info.get("fallback") or None
        taste = u.attributes.get("taste")
        rows.append({"user_id": u.user_id, "taste": taste, "keywords": kws, "leaked": leaked, "fallback": fb,
                     "taste_hit": taste_hit(kws, taste) if taste else None, "n_from_model": info.get("n_from_model")})
        if progress is not None:
            progress(n + 1, len(users))
    elapsed = time.perf_counter() - t0
    uids = [r["user_id"] for r in rows]
    tasted = [r for r in rows if r["taste_hit"] is not None]
    summary = {
        "leak_rate": mean_ci([float(bool(r["leaked"])) for r in rows], uids, seed),
        "fallback_rate": mean_ci([float(r["fallback"] is not None) for r in rows], uids, seed),
        "replaced_rate": mean_ci([float(str(r["fallback"] or "").startswith("history:")) for r in rows], uids, seed),
        "taste_hit_rate": mean_ci([float(r["taste_hit"]) for r in tasted], [r["user_id"] for r in tasted], seed)
        if tasted else {"mean": float("nan"), "ci95": [float("nan")] * 2, "n": 0},
    }
    counted = [r for r in rows if r["n_from_model"] is not None and r["keywords"]]
    if counted:  # how much of the keyword set the LLM named (the rest: the history's tags, ranked in)
        summary["model_share"] = mean_ci([r["n_from_model"] / len(r["keywords"]) for r in counted],
                                         [r["user_id"] for r in counted], seed)
    leaked_words = Counter(w for r in rows for w in r["leaked"])
    return {
        "benchmark": "keyword-leaks",
        "protocol": ("keywords of each user's full history; leak = a few-shot answer keyword the history does not "
                     "support; fallback = keywords padded or replaced by history words; taste hit = the hidden taste "
                     "word or a direct synonym among the keywords; rates with 95% bootstrap intervals over users"),
        "n_users": len(rows), "seed": seed, "summary": summary,
        "counts": {"leaked_words": dict(leaked_words.most_common()),
                   "users_with_leaks": sum(1 for r in rows if r["leaked"])},
        "timing_s": {"total": elapsed, "per_user": elapsed / len(rows)},
        "users": rows,
    }


def leak_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leak-check summary: measure, rate (mean [95% CI]), users."""
    s = result["summary"]
    names = (("few-shot leak (users)", "leak_rate"), ("fallback used (users)", "fallback_rate"),
             ("model gave no keyword (users)", "replaced_rate"), ("hidden taste in keywords", "taste_hit_rate"),
             ("share of keywords named by the model", "model_share"))
    rows = [[label, format_ci(s[key]), str(s[key]["n"])] for label, key in names if key in s]
    ml = result.get("multilingual")
    if ml:
        m = ml["summary"]
        rows += [["non-English histories: keywords in English", format_ci(m["english_rate"]), str(m["english_rate"]["n"])],
                 ["non-English histories: taste in keywords", format_ci(m["taste_hit_rate"]), str(m["taste_hit_rate"]["n"])]]
    return ["measure", "rate", "users"], rows


def leak_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report of :func:`leak_check`."""
    header, rows = leak_table(result)
    models = result.get("models", {})
    lines = ["# Preference keywords: few-shot leaks, fallbacks, hidden taste", "", result["protocol"] + ".", "",
             f"{result['n_users']} users of `{result.get('dataset', '?')}` ({result.get('split', '?')} split); "
             f"seed {result['seed']}; {result['timing_s']['per_user']:.2f} s per user."]
    if models:
        lines.append("Models: " + ", ".join(f"{k} `{v}`" for k, v in models.items()) + ".")
    leaked = result["counts"]["leaked_words"]
    lines += ["", md_table(header, rows), "",
              "Leaked words: " + (", ".join(f"{w} ({n})" for w, n in leaked.items()) if leaked else "none") + ".", ""]
    ml = result.get("multilingual")
    if ml:
        lines += ["## Histories in other languages", "",
                  f"{ml['n_users']} hand-written users (`multilingual_users`) whose taste is written only in "
                  "another language; keywords should be English (the catalog's language) and name the taste.", "",
                  md_table(["user", "language", "taste", "keywords", "not English"],
                           [[r["user_id"], str(r["language"]), r["taste"], ", ".join(r["keywords"]),
                             ", ".join(r["non_english"]) or "–"] for r in ml["users"]]), ""]
    return "\n".join(lines)


def write_leak_outputs(result: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out/leaks.json`` and ``out/leaks.md``; returns both paths."""
    return write_result(result, out, "leaks", leak_markdown(result))



_MULTILINGUAL: tuple[tuple[str, str, str, tuple[str, str, str]], ...] = (
    # (user id, hidden taste, language, (a chat turn, a search, another chat turn))
    ("ml-es-dogs", "dogs", "es", ("perrito feliz", "pegatinas de perros", "me encantan los perros")),
    ("ml-zh-dogs", "dogs", "zh", ("我非常喜欢小狗的表情包", "小狗", "狗狗太可爱了")),
    ("ml-fr-cats", "cats", "fr", ("j'adore les chats", "chat mignon", "mon chat dort")),
    ("ml-de-cats", "cats", "de", ("Ich liebe Katzen", "Katze Sticker", "meine Katze ist süß")),
    ("ml-ja-cats", "cats", "ja", ("猫が大好き", "猫", "子猫かわいい")),
    ("ml-es-food", "food", "es", ("me encanta la comida", "pastel de chocolate", "tengo hambre, quiero pizza")),
    ("ml-it-food", "food", "it", ("amo la pizza e la pasta", "gelato", "che fame!")),
    ("ml-pt-music", "music", "pt", ("adoro música", "guitarra", "vamos dançar")),
    ("ml-fr-space", "space", "fr", ("j'adore les fusées et les planètes", "fusée", "la lune est belle")),
    ("ml-de-plants", "plants", "de", ("ich liebe Blumen", "Blume", "mein Garten blüht")),
    ("ml-es-ocean", "ocean", "es", ("me encanta el mar", "pez", "ballenas y delfines")),
    ("ml-zh-space", "space", "zh", ("我喜欢火箭和月亮", "火箭", "太空很酷")),
)


def multilingual_users(generic_items: Sequence[str] = ("1F600", "1F44D")) -> list[User]:
    """A small hand-written set of 12 users whose taste is written only in another language.

    Spanish, French, German, Italian, Portuguese, Chinese and Japanese; each user has two chat turns
    and a search in that language (the taste: dogs, cats, food, music, space, plants, ocean) and
    sent two generic stickers (``generic_items``: grinning face, thumbs up), so only the
    non-English text says what the person likes. ``attributes``: ``taste``, ``language``.
    """
    users = []
    for uid, taste, lang, (chat1, search, chat2) in _MULTILINGUAL:
        events = [Event("social", item_id=generic_items[0], value="send", time=1.0),
                  Event("conversation", speaker="user", text=chat1, time=2.0),
                  Event("search", text=search, time=3.0),
                  Event("social", item_id=generic_items[-1], value="send", time=4.0),
                  Event("conversation", speaker="user", text=chat2, time=5.0)]
        users.append(User(uid, events, attributes={"taste": taste, "language": lang}))
    return users


def is_english_keyword(keyword: str, english: Collection[str]) -> bool:
    """Whether every word of a keyword is an English word (``english``: catalog and emoji-name words)."""
    from pmgen.stages.keywords import STOPWORDS, keyword_key

    words = [w for w in keyword.lower().replace("-", " ").split() if w]
    return bool(words) and all(w in STOPWORDS or w in english or keyword_key(w) in english for w in words)


def multilingual_check(items: Mapping[str, Item], extract_fn: KeywordsFn, users: Sequence[User] | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """Keywords of :func:`multilingual_users`: are they English, and do they name the taste?

    English words: every word of the catalog (titles, texts) and of the ``emoji`` package's English
    names, keyed with :func:`~pmgen.stages.keywords.keyword_key`. Reported per user and as
    ``english_rate`` (mean share of a user's keywords that are English) and ``taste_hit_rate``
    (:func:`taste_hit`), with 95% bootstrap intervals over users.
    """
    from pmgen.stages.keywords import _TOKEN, english_words, keyword_key

    users = list(users) if users is not None else multilingual_users()
    english = {keyword_key(w) for it in items.values() for w in _TOKEN.findall(f"{it.title} {it.text}".lower())}
    english |= {keyword_key(w) for w in english_words()}
    rows = []
    for u in users:
        kws, info = keywords_of(extract_fn(u.events, items))
        eng = [k for k in kws if is_english_keyword(k, english)]
        rows.append({"user_id": u.user_id, "language": u.attributes.get("language"), "taste": u.attributes["taste"],
                     "keywords": kws, "non_english": [k for k in kws if k not in eng],
                     "english_share": len(eng) / len(kws) if kws else 0.0,
                     "taste_hit": taste_hit(kws, u.attributes["taste"]), "fallback": info.get("fallback")})
    uids = [r["user_id"] for r in rows]
    return {"benchmark": "multilingual-keywords", "n_users": len(rows), "seed": seed,
            "summary": {"english_rate": mean_ci([r["english_share"] for r in rows], uids, seed),
                        "taste_hit_rate": mean_ci([float(r["taste_hit"]) for r in rows], uids, seed)},
            "users": rows}
