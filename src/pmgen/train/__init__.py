"""Trainers for the models pmgen ships, one package per model. Each runs on a CPU, in the background,
and resumes exactly from its last checkpoint under ``<cache dir>/train/<model>/`` (``--resume``).

* :mod:`pmgen.train.generator` — the ``sticker-tiny`` latent diffusion generator (``pmgen train generator``);
  :mod:`pmgen.composites` — its composition fine-tune data.
* :mod:`pmgen.train.soft_prompt` — the bias-correction LLM's soft prompt (``pmgen train soft-prompt``).
* :mod:`pmgen.train.scorer` — the selector and evaluator scorers (``pmgen train scorer``).
* :mod:`pmgen.train.run` — what they share: run-control settings, the resume rule, checkpoints,
  RNG state, signals, logs; :mod:`pmgen.train.losses` — the diffusion loss.
"""
