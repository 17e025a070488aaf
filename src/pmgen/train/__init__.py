"""Trainers for the models pmgen ships, one module per model. Each runs on a CPU, in the
background, and resumes exactly from its last checkpoint under ``<cache dir>/train/<model>/``.

* :mod:`pmgen.train.generator` — the ``sticker-tiny`` latent diffusion generator
  (``python -m pmgen.train.generator --out DIR [--minutes N] [--resume]``).
"""
