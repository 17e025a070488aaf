"""The preference and target keyword stages of PMG (being split into modules; see :mod:`.extract`)."""

from pmgen.stages.keywords.extract import *  # noqa: F401,F403
from pmgen.stages.keywords.extract import (  # noqa: F401
    _TOKEN,
    STOPWORDS,
    Glossary,
    english_words,
    few_shot_keywords,
    generate_batch,
    gloss_history,
    history_vocabulary,
    is_grounded,
    vote_keywords,
)
