"""Model roles (one module each); import the module you need, nothing is loaded at import time.

* :mod:`pmgen.models.text_encoder` — token states and pooled sentence vectors (MiniLM by default);
* :mod:`pmgen.models.generator` — the ``sticker-tiny`` latent diffusion generator.
"""
