"""Non-English free text → English words: the :class:`Glossary` and the glosses of a history's lines."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path
from typing import AbstractSet, Iterable, Mapping, Sequence

from pmgen.paths import cache_dir, write_text_atomically
from pmgen.stages.keywords.parse import STOPWORDS, keyword_key
from pmgen.stages.verbalize import History

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_LATIN_WORD = re.compile(r"[^\W\d_]{3,}")


class Glossary:
    """Foreign words → English words, learned from the multilingual emoji names of the ``emoji`` package.

    The ``emoji`` package (a pmgen dependency) names every emoji in English and in other languages
    (``:perro:`` / ``:dog:``, ``:狗脸:`` / ``:dog_face:``). A foreign token's translation is the English
    name word it co-occurs with most, by the Dice coefficient ``2·c(f, e) / (c(f) + c(e))`` over all
    emojis (kept when ≥ ``min_score``). Tokens are words of 3+ letters, and 1–3 character substrings for
    Chinese/Japanese. The vocabulary is the catalog's own (stickers), so the translations are the words
    the keyword stage and the generator understand. No network, built in ~1 s.

    Args:
        table: foreign token → English word.
        english: English words (never translated; e.g. the English emoji-name words).
    """

    def __init__(self, table: Mapping[str, str], english: Iterable[str] = ()):
        self.table = dict(table)
        self.english = set(english) | STOPWORDS

    @classmethod
    def from_emoji(cls, languages: Sequence[str] = ("es", "fr", "de", "it", "pt", "zh", "ja"),
                   min_score: float = 0.5) -> "Glossary":
        """Learn the table from the ``emoji`` package's names (~10 s; :meth:`cached` keeps the result)."""
        import emoji

        emoji.config.load_language(list(languages))

        def toks(name: str, cjk: bool) -> set[str]:
            name = name.strip(":").replace("_", " ").lower()
            if cjk:
                t = re.sub(r"[\s\W]", "", name)
                return {t[i:i + n] for n in (1, 2) for i in range(len(t) - n + 1)}
            return set(_LATIN_WORD.findall(name))

        english: set[str] = set()
        table: dict[str, str] = {}
        for lang in languages:
            cjk = lang in ("zh", "ja")
            cf: Counter[str] = Counter()
            ce: Counter[str] = Counter()
            whole: set[str] = set()
            cfe: dict[str, Counter[str]] = {}
            for v in emoji.EMOJI_DATA.values():
                if lang not in v:
                    continue
                en = {w for w in toks(v["en"], False) if w not in STOPWORDS}
                fo = toks(v[lang], cjk)
                whole.add(re.sub(r"[\s\W]", "", v[lang].strip(":").lower()))
                english |= en
                ce.update(en)
                cf.update(fo)
                for f in fo:
                    cfe.setdefault(f, Counter()).update(en)
            n_names = max(sum(1 for v in emoji.EMOJI_DATA.values() if lang in v), 1)
            for f, co in cfe.items():
                if not co or f in table or cf[f] > 0.015 * n_names:  # function words ("de", "les", "und")
                    continue
                score, c, e = max((2 * c / (cf[f] + ce[e]), c, e) for e, c in co.items())
                # one shared emoji is enough only for a rare word ("perrito" → dog)
                if cjk and len(f) == 1 and f not in whole:  # a lone character counts only as a whole name (狗, 猫)
                    continue
                if (score >= min_score and c >= 2) or (cf[f] == c == 1 and not cjk and len(f) >= 4 and score >= 0.3):
                    table[f] = e
        return cls(table, english)

    @classmethod
    def cached(cls, cache: Path | None = None) -> "Glossary":
        """:meth:`from_emoji`, stored once as JSON under ``<cache dir>/glossary/`` (keyed by the ``emoji``
        version) and read once per process: every call with the same file returns the same object (~2 s
        to build, ~15 ms to read; treat it as read-only)."""
        import emoji

        path = (cache or cache_dir()) / "glossary" / f"emoji-{getattr(emoji, '__version__', 'x')}-v1.json"
        return _glossary_at(cls, path)

    @classmethod
    def _load_or_build(cls, path: Path) -> "Glossary":
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(data["table"], data["english"])
        g = cls.from_emoji()
        write_text_atomically(path, json.dumps({"table": g.table, "english": sorted(g.english - STOPWORDS)},
                                               ensure_ascii=False))
        return g

    def _lookup(self, w: str) -> str | None:
        for cut, add in (("", ""), ("s", ""), ("es", ""), ("en", ""), ("n", ""), ("e", ""), ("i", "o"), ("i", "e")):
            if cut and not w.endswith(cut):  # plural endings: "chats", "hunde", "katzen", "gatti"
                continue
            stem = (w[: len(w) - len(cut)] if cut else w) + add
            if len(stem) >= 3 and stem in self.table:
                return self.table[stem]
        return None

    def _english(self, w: str) -> bool:
        return w in self.english or keyword_key(w) in self.english

    def translate(self, text: str) -> list[str]:
        """English words for the foreign words of ``text`` (in order, distinct; English words are skipped)."""
        out: list[str] = []
        low = text.lower()
        for w in _LATIN_WORD.findall(low):
            if _CJK.search(w) or self._english(w):
                continue
            hit = self._lookup(w)
            if hit:
                out.append(hit)
        for run in re.findall(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+", low):
            i = 0
            while i < len(run):
                for n in (2, 1):
                    if run[i:i + n] in self.table:
                        out.append(self.table[run[i:i + n]])
                        i += n
                        break
                else:
                    i += 1
        return list(dict.fromkeys(out))

    def english_keyword(self, keyword: str) -> str:
        """A keyword with its foreign words translated ("perrito" → "dog"); English words stay."""
        words = keyword.split()
        out = [w if self._english(w) else (self._lookup(w) or w) for w in words]
        return " ".join(dict.fromkeys(out))

    def is_foreign(self, text: str) -> bool:
        """Whether ``text`` is mostly not English: any CJK character, or most of its words unknown in English
        and at least one of them known to the glossary."""
        if _CJK.search(text):
            return True
        words = [w for w in _LATIN_WORD.findall(text.lower())]
        if not words:
            return False
        unknown = [w for w in words if not self._english(w)]
        return len(unknown) * 2 > len(words) and any(self._lookup(w) for w in unknown)


_QUOTED = re.compile(r'"([^"]*)"')
_ITEM_LINE = ("Sent ", "Clicked ", "Viewed ", "Bought ", "Rated ", "Most frequent tags", "Liked ", "Shared ")


@functools.lru_cache(maxsize=4)
def _glossary_at(cls: type[Glossary], path: Path) -> Glossary:
    """:meth:`Glossary.cached` of one file, once per process."""
    return cls._load_or_build(path)


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Words of the English emoji names of the ``emoji`` package (no extra language loaded; ~0.1–0.4 s,
    computed once per process)."""
    import emoji

    return frozenset(w for v in emoji.EMOJI_DATA.values()
                     for w in _LATIN_WORD.findall(v["en"].replace("_", " ").lower()))


def _may_be_foreign(text: str, english: AbstractSet[str]) -> bool:
    """A cheap pre-check before loading a :class:`Glossary`: CJK or non-ASCII letters, or most words
    unknown in English (``english`` + stopwords) with no English stopword among them."""
    if _CJK.search(text) or any(ch.isalpha() and not ch.isascii() for ch in text):
        return True
    words = re.findall(r"[a-z']+", text.lower())
    if not words or any(w in STOPWORDS for w in words):
        return False
    unknown = [w for w in words if w not in english and keyword_key(w) not in english]
    return len(unknown) * 2 > len(words)


def free_text_lines(history: History) -> list[str]:
    """The quoted free text (searches, chat turns, reviews, notes) of a verbalized history's lines."""
    return [" ".join(_QUOTED.findall(line)) for line in history.lines if not line.startswith(_ITEM_LINE)]


def gloss_history(history: History, glossary: Glossary) -> tuple[History, list[str]]:
    """Add English glosses to the lines whose quoted free text is not English.

    ``'User said: "perrito feliz"'`` → ``'User said: "perrito feliz" (in English: dog)'``. Returns the
    new history (same counts; ``n_tokens`` is not recomputed) and every English word added.
    """
    lines: list[str] = []
    added: list[str] = []
    for line in history.lines:
        quoted = " ".join(_QUOTED.findall(line))
        if quoted and not line.startswith(_ITEM_LINE) and glossary.is_foreign(quoted):
            words = glossary.translate(quoted)
            if words:
                line = f"{line} (in English: {', '.join(words)})"
                added += words
        lines.append(line)
    return History(lines=tuple(lines), n_events=history.n_events, n_kept=history.n_kept,
                   n_tokens=history.n_tokens), list(dict.fromkeys(added))
