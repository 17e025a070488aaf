"""Batch engines: run a file of generation requests into request folders and an index.

* :mod:`pmgen.batch.local` — in this process, requests in groups (``run_batch``);
* :mod:`pmgen.batch.ray_engine` — Ray Data, LLM actors and generator actors pipelined (``run_batch_ray``);
* :mod:`pmgen.batch.grouped` — candidates of many requests in fixed-shape UNet batches (both engines);
* :mod:`pmgen.batch.common` — pending requests, groups, the attempt log, the index, fault injection.
"""
