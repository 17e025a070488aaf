"""Evaluation commands: generation (:mod:`.evaluate`), preference keywords (:mod:`.preferences`),
feedback-learned α (:mod:`.feedback`), speed (:mod:`.bench`), the generator's own quality report
(:mod:`.quality`) and the image metrics (:mod:`.metrics`)."""
