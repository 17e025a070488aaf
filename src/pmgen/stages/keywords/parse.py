"""Whatever a model returns → clean, deduplicated keywords (and the word lists and keys behind that).

* :func:`parse_keywords` — numbered lists, bullets, chatter, markdown, quotes, emoji → at most ``k`` keywords.
* :func:`keyword_key` — the comparison key (case, plural and hyphen variants are one keyword).
* :func:`neutralize_control_text` — chat-control markup in user text broken by look-alike characters.
* :data:`STOPWORDS`, :data:`INSTRUCTION_WORDS` — words that are never (the whole of) a keyword.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

# ------------------------------------------------------------------------------------ word lists

STOPWORDS = frozenset(
    """a an the and or but of in on at to for from by with without into onto about over under as is are
    was were be been being it its this that these those there their they them he she his her him i me my
    we our you your not no yes so very too also just than then some any all each every more most other
    such only own same can will would should could may might must do does did done have has had having
    what which who whom whose when where why how out up down off again once here now s t don ll re ve d m
    i'm i've i'll i'd it's that's there's you're we're they're don't can't won't isn't let's""".split()
)

# pieces of model chatter that are never keywords
_CHATTER = frozenset(
    """keyword keywords user user's users here sure answer answers list listed following taste tastes
    interest interests preference preferences hope helps example examples output log history note
    sentence sentences word words""".split()
)

# verbalizer echoes ("Sent "cat face".", "Rated "X" 5 out of 5.") that a model may copy back
_ECHO_PREFIX = re.compile(
    r"^(?:sent|clicked|viewed|bought|rated|reviewed|liked|shared|commented on|interacted with|"
    r"searched for|user said|friend said|note)\b\s*:?\s*", re.IGNORECASE)
_OUT_OF = re.compile(r"\b\d+(?:\.\d+)?\s*(?:out of|/)\s*\d+\b", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•·▪►>–—]+\s*|\(?\d{1,3}\s*[.):\]]\s*|\(?[a-hA-H][.)]\s+|#+\s*)")
_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "‘": "'", "’": "'", "`": "'"})
_WORD = re.compile(r"^(?:[^\W_]+(?:['&+-][^\W_]+)*\+*|&)$")
_CODE = re.compile(r"[{}=<>]|\w\(|^\s*(?:def|class|return|import|function|var|const|print)\b")
_ROLE = re.compile(r"^\s*(?:system|user|assistant|friend)\b(?:\s*:|\s+said\b|\s*$)", re.IGNORECASE)
_FIELD_LABEL = re.compile(r"\b[a-z][a-z ]{0,20}:\s", re.IGNORECASE)

# words of the prompt and of injection attempts: a keyword made only of these echoes instructions,
# it says nothing about the person ("system", "previous instructions", "ignore", "start prompt")
INSTRUCTION_WORDS = frozenset(
    """system systems user users assistant assistants previous prior above below instruction instructions
    ignore ignored ignoring disregard forget override start started begin end stop prompt prompts reply
    replies respond response command commands rule rules role roles pretend act mode jailbreak hacked hack
    token tokens message messages chat turn turns im_start im_end endoftext inst sys developer admin
    administrator password secret secrets reveal print output say repeat""".split()
)

_CONTROL_MARKUP = re.compile(r"<\|?/?[A-Za-z_][\w.:\-]{0,40}\|?>|<\||\|>|\[/?INST\]|<</?SYS>>")
_MARKUP_LOOKALIKE = str.maketrans({"<": "\u2039", ">": "\u203a", "[": "\u2045", "]": "\u2046"})


def neutralize_control_text(text: str) -> str:
    """User text with chat-control markup broken by look-alike characters, for any tokenizer.

    ``<|im_start|>``, ``<|eot_id|>``, ``<s>``, ``</s>``, ``<filename>``, ``[INST]``, ``<<SYS>>``
    and any other ``<|…|>``/``<tag>`` become ``‹|im_start|›``, ``‹s›``, ``⁅INST⁆``, …: a reader sees
    the same text, a tokenizer sees no control token. A local :class:`~pmgen.models.llm.LLM` also
    breaks its own tokenizer's special strings (:meth:`~pmgen.models.llm.LLM.encode_chat`).
    """
    return _CONTROL_MARKUP.sub(lambda m: m.group(0).translate(_MARKUP_LOOKALIKE), text)


def _echoes_instructions(keyword: str) -> bool:
    """Whether every word of ``keyword`` is a prompt/instruction word (:data:`INSTRUCTION_WORDS`)."""
    words = [w for w in re.split(r"[\s\-]+", keyword.lower()) if w and w not in STOPWORDS]
    return bool(words) and all(w in INSTRUCTION_WORDS for w in words)


def keyword_key(keyword: str) -> str:
    """A comparison key: lower-cased, hyphens/spaces dropped, each word singularized.

    ``"Cats"``, ``"cat"`` → ``"cat"``; ``"Sci-Fi"``, ``"sci fi"`` → ``"scifi"``; ``"puppies"`` and
    ``"puppy"`` → ``"puppy"``; ``"movies"`` and ``"movie"`` → ``"movy"`` (a key, not a word).
    """
    words = re.split(r"[\s\-]+", keyword.lower().strip())
    return "".join(_singular(w) for w in words if w)


def _singular(w: str) -> str:
    if len(w) > 4 and w.endswith(("sses", "shes", "ches", "xes", "zes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    if len(w) > 3 and w.endswith("ie"):
        w = w[:-2] + "y"
    return w


def _strip_symbols(text: str) -> str:
    """Drop emoji and other pictographic symbols (``So``/``Sk``), keep everything else."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("So", "Sk", "Cf", "Co", "Cn"))


def _clean_piece(piece: str, max_words: int) -> str | None:
    """One candidate keyword → its clean form, or ``None`` when it is not a usable keyword."""
    p = piece.strip().translate(_QUOTES)
    p = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", p)  # parentheticals: "(1995)", "(genres)"
    p = _OUT_OF.sub(" ", p)
    p = p.strip(" \t\"'*_.,;:!?-–—…[](){}")
    for _ in range(2):  # 'Sent "cat face".' echoes, possibly nested in quotes
        p = _ECHO_PREFIX.sub("", p).strip(" \t\"'*_.,;:!?-–—…[](){}")
    p = _strip_symbols(p).lower()
    p = re.sub(r"\s+", " ", p).strip()
    if not p or len(p) > 60:
        return None
    words = p.split(" ")
    if len(words) > max_words + 2:  # a sentence, not a keyword
        return None
    if not all(_WORD.match(w) for w in words):  # code, urls, markup, random characters
        return None
    if any(w in _CHATTER or w in ("i", "you", "your", "me", "my") for w in words):
        return None
    while words and words[0] in STOPWORDS:
        words = words[1:]
    if len(words) > max_words:  # "trees under light pollution" → "trees"; "cute small fluffy kittens" →
        cut = next((i for i, w in enumerate(words) if i > 0 and w in STOPWORDS), len(words))
        words = words[:cut][-max_words:]  # "small fluffy kittens" (English heads come last)
    while words and words[-1] in STOPWORDS:
        words = words[:-1]
    if not words:
        return None
    if not any(ch.isalpha() for ch in "".join(words)):  # "1995", "42"
        return None
    for w in words:  # hex ids and codes: digits inside long words ("60ecebdaadfab"); "80s", "3d" pass
        if len(w) > 5 and any(c.isdigit() for c in w) and any(c.isalpha() for c in w):
            return None
    for w in words:  # random letter soup has no vowels ("xkcdq"); short words and acronyms pass
        letters = [c for c in w if c.isalpha()]
        if len(letters) > 4 and all(c.isascii() for c in letters) and not re.search(r"[aeiouy]", w):
            return None
    if len(words) == 1 and len(words[0]) < 2:
        return None
    return " ".join(words)


def _split_line(line: str) -> tuple[list[str], bool]:
    """One output line → candidate pieces (and whether the line was a list item)."""
    m = _LIST_MARKER.match(line)
    is_item = bool(m and m.group(0).strip())
    body = line[m.end():] if m else line
    body = body.strip()
    if not body:
        return [], is_item
    if body.endswith(":"):  # "Here are 8 keywords:" — a heading, not content
        return [], is_item
    if ":" in body:
        head, tail = body.split(":", 1)
        head_words = set(re.findall(r"[\w']+", head.lower()))
        if head_words & (_CHATTER | {"keyword", "keywords", "answer", "here", "tags", "topics", "assistant"}):
            body = tail  # "Keywords: cat, kitten" / "Here are the keywords: ..."
        elif is_item:
            body = head  # "1. Cats: the user loves cats"
        else:
            body = tail if len(head.split()) > 3 else f"{head},{tail}"
    if is_item:
        body = re.split(r"\s[-–—]\s", body, maxsplit=1)[0]  # "1. Cats - loves cats"
    pieces = re.split(r"[,;|/·•]|\s[-–—]\s|\.\s", body)
    return pieces, is_item


def _candidates(text: str) -> list[str]:
    text = text.translate(_QUOTES)
    text = re.sub(r"\*\*|__|~~", "", text)  # markdown bold / strike
    text = re.sub(r"(?<!\w)[*_](\S[^*_]*?)[*_](?!\w)", r"\1", text)  # markdown italics
    text = re.sub(r"<\|?[\w/]+\|?>", "\n", text)  # leftover special tokens / html tags
    text = re.sub(r"\b(?:[a-z][a-z0-9+.-]*://|www\.)\S*", " ", text, flags=re.IGNORECASE)  # urls
    out: list[str] = []
    for line in re.split(r"[\r\n]+", text):
        if _CODE.search(line) or _ROLE.match(line):  # code; leaked chat-template turns, "User said: …" echoes
            continue
        pieces, _ = _split_line(line)
        out.extend(pieces)
    return out


def parse_keywords(text: str, k: int = 8, exclude: Iterable[str] = (), max_words: int = 3) -> list[str]:
    """Parse a model's reply into at most ``k`` clean, distinct keywords (possibly fewer, possibly none).

    Accepts numbered lists, bullets, comma/semicolon/line-separated text, ``"Keywords: ..."`` chatter
    before or after, quotes, markdown bold/italics, trailing punctuation and emoji. Each keyword is
    lower-cased, stripped of leading/trailing stopwords and cut to ``max_words`` words; longer
    phrases (more than ``max_words + 2`` words) are treated as sentences and dropped, as are pieces
    with code/markup/random characters. Duplicates are removed case-insensitively, including
    plural/singular and hyphen variants (:func:`keyword_key`); the first surface form wins.
    Keywords whose key equals the key of any string in ``exclude`` are dropped.

    Args:
        text: the raw model output.
        k: maximum number of keywords returned (``>= 1``).
        exclude: strings that must not be returned (e.g. history item titles).
        max_words: maximum words per keyword (``>= 1``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    banned = {keyword_key(e) for e in exclude}
    banned.discard("")
    seen: set[str] = set()
    out: list[str] = []
    for piece in _candidates(text or ""):
        kw = _clean_piece(piece, max_words)
        if kw is None:
            continue
        key = keyword_key(kw)
        if not key or key in seen or key in banned or _echoes_instructions(kw):
            continue
        seen.add(key)
        out.append(kw)
        if len(out) >= k:
            break
    return out


def _complete_keywords(text: str, k: int, max_words: int) -> int:
    """How many keywords of a partial generation are already complete (the last piece may be cut)."""
    cut = max(text.rfind(","), text.rfind(";"), text.rfind("\n"))
    return len(parse_keywords(text[:cut], k, max_words=max_words)) if cut >= 0 else 0


def _enough(text: str, k: int, max_words: int) -> bool:
    """Early-stop rule: ``k`` complete keywords, or a blank line after some keywords (chatter follows)."""
    if _complete_keywords(text, k, max_words) >= k:
        return True
    head, sep, _ = text.partition("\n\n")
    return bool(sep) and len(parse_keywords(head, k, max_words=max_words)) > 0

# ------------------------------------------------------------------------------- content words

_TOKEN = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*")


def _content_words(text: str) -> list[str]:
    text = _FIELD_LABEL.sub(" ", text.lower())
    return [w for w in _TOKEN.findall(text) if len(w) >= 3 and w not in STOPWORDS and w not in _CHATTER]
