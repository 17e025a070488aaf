"""Fill the keyword cache for the evaluation samples in batched LLM calls (8 users a call), so the
probe and `pmgen evaluate` runs that follow read the keywords from the cache.

    python docs/probes/issue41/prewarm.py val:60 test:100 seed2-test:100
"""
import sys
import time

from pmgen import PMG
from pmgen.data import datasets
from pmgen.eval.evaluate import evaluation_samples

pmg = PMG.from_preset("sticker-tiny")
ex = pmg.extractor()
for spec in sys.argv[1:]:
    split, n = spec.split(":")
    seed = 0
    if split.startswith("seed"):
        seed, split = int(split[4:].split("-")[0]), split.split("-")[1]
    ds = datasets.load("sticker-users", seed=seed) if seed else datasets.load("sticker-users")
    samples = evaluation_samples(ds, int(n), split)
    users = [ds.users[s.user_id] for s in samples]
    t0 = time.time()
    for i in range(0, len(users), 8):
        ex.extract_many([(u.events, ds.items) for u in users[i:i + 8]])
        print(spec, min(i + 8, len(users)), f"{time.time() - t0:.0f}s", flush=True)
