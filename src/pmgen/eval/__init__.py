"""Evaluation commands: generation (:mod:`.evaluate`, graded by :mod:`.grading`, summarized by :mod:`.summary`,
reported by :mod:`.report`), the preference keywords (:mod:`.movielens`, :mod:`.stability`, :mod:`.leaks`;
shared parts in :mod:`.keyword_bench`), feedback-learned α (:mod:`.feedback`), speed (:mod:`.bench`), the
generator's own quality report (:mod:`.quality`), the image metrics (:mod:`.metrics`) and the statistics
every report uses (:mod:`.stats`)."""
