"""Extract preferences and target keywords: the two frozen-LLM keyword stages of PMG.

* :class:`PreferenceExtractor` (:mod:`.extract`) — a user's behaviors → ``k`` preference keywords. The
  history is verbalized **order-invariantly** (:func:`pmgen.stages.verbalize.aggregate_history`: tag
  counts, distinct items with counts; the newest-first listing stays available), non-English free text
  gets English glosses (:class:`Glossary`, :mod:`.glossary`), and the text is put in a few-shot chat
  prompt (:mod:`.prompt`) that says the history is *data* (chat-control strings neutralized, the
  tokenized prompt checked). The frozen LLM answers with one comma-separated line per rendering
  (:mod:`.decode`; permutation self-consistency: several orders of the same lines in one batched call,
  keywords voted, :func:`vote_keywords`); keywords the history does not support are dropped
  (:func:`is_grounded`, :mod:`.ground`) and the rest ranked by votes and history support.
  Greedy decoding; generation stops as soon as enough keywords are complete.
* :func:`target_keywords` (:mod:`.target`) — a target item (title, tags, text) or the last user turn of
  a conversation (emotion / action) → keywords; deterministic by default, optionally with the LLM.
* :func:`parse_keywords` (:mod:`.parse`) — whatever a model returns → clean, deduplicated keywords.
* :func:`history_keywords` (:mod:`.ground`) — the non-LLM fallback: the most distinctive content words of
  the history (tf-idf against the catalog). It is used, and **stated in the record**, when the model
  returns nothing usable or fewer than ``k`` keywords.
* :class:`KeywordCache` (:mod:`.cache`) — an embedded SQLite store (``<cache dir>/keywords.sqlite``) keyed
  by the verbalized history, ``k``, the model (name + content hash), the prompt version and the settings.

Every result is a :class:`Keywords` record: keywords, the raw model output, whether (and why) a
fallback was used, how much of the history the model saw, timings and the model's name.

Modules depend one way: :mod:`.parse` ← :mod:`.ground`, :mod:`.glossary`, :mod:`.prompt`,
:mod:`.decode`, :mod:`.cache` ← :mod:`.extract`, :mod:`.target`. Private helpers are imported from
their module (``from pmgen.stages.keywords.parse import _TOKEN``).
"""

from pmgen.stages.keywords.cache import KeywordCache, Keywords, model_id
from pmgen.stages.keywords.decode import (
    DEFAULT_DECODING,
    PromptCache,
    generate,
    generate_batch,
)
from pmgen.stages.keywords.extract import PreferenceExtractor
from pmgen.stages.keywords.glossary import Glossary, english_words, gloss_history
from pmgen.stages.keywords.ground import (
    history_keywords,
    history_vocabulary,
    is_grounded,
    vote_keywords,
)
from pmgen.stages.keywords.parse import (
    _TOKEN as _TOKEN,  # still imported from here by pmgen.eval.leaks; prefer .parse
)
from pmgen.stages.keywords.parse import (
    INSTRUCTION_WORDS,
    STOPWORDS,
    keyword_key,
    neutralize_control_text,
    parse_keywords,
)
from pmgen.stages.keywords.prompt import (
    PROMPT_VERSION,
    PROMPT_VERSIONS,
    few_shot_keywords,
    history_kind,
    preference_messages,
)
from pmgen.stages.keywords.target import (
    EMOTION_CUES,
    TARGET_PROMPT_VERSION,
    deterministic_target_keywords,
    target_keywords,
    target_messages,
)

__all__ = [
    "DEFAULT_DECODING",
    "EMOTION_CUES",
    "PROMPT_VERSION",
    "TARGET_PROMPT_VERSION",
    "INSTRUCTION_WORDS",
    "KeywordCache",
    "Keywords",
    "PreferenceExtractor",
    "PromptCache",
    "deterministic_target_keywords",
    "generate",
    "history_keywords",
    "history_kind",
    "keyword_key",
    "model_id",
    "neutralize_control_text",
    "parse_keywords",
    "preference_messages",
    "target_keywords",
    "target_messages",
    # public names the evaluation code and tests import from the package as well
    "PROMPT_VERSIONS",
    "STOPWORDS",
    "Glossary",
    "english_words",
    "few_shot_keywords",
    "generate_batch",
    "gloss_history",
    "history_vocabulary",
    "is_grounded",
    "vote_keywords",
]
