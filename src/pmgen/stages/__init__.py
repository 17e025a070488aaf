"""The PMG stages, in pipeline order: behaviors → text (:mod:`.verbalize`) → preference keywords
(:mod:`.keywords`) and soft preference embeddings (:mod:`.soft`) → one condition per preference
weight (:mod:`.condition`) → the chosen candidate (:mod:`.select`, with each user's α learned from
feedback in :mod:`.feedback`). :mod:`pmgen.pipeline` wires them with the models."""
