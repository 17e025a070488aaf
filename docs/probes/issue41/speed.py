"""Warm 5-weight generation time of each start against SDEdit (today's), interleaved request by request.

    OMP_NUM_THREADS=1 python docs/probes/issue41/speed.py --n 3
"""
import argparse
import statistics
import time

from pmgen import PMG
from pmgen.data import datasets
from pmgen.data.requests import from_dataset

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=3)
a = ap.parse_args()
VARIANTS = {"sdedit (today)": {"inversion": "off"}, "inversion ddim": {"inversion": "ddim"},
            "inversion ddim, strength 0.6": {"inversion": "ddim", "inversion_strength": 0.6},
            "inversion noised": {"inversion": "noised"},
            "ddim + 4 exemplars": {"inversion": "ddim", "exemplars": 4, "exemplar_floor": 0.85},
            "ddim 0.6 + 4 exemplars": {"inversion": "ddim", "inversion_strength": 0.6, "exemplars": 4,
                                       "exemplar_floor": 0.85}}
pmg = PMG.from_preset("sticker-tiny")
ds = datasets.load("sticker-users")
reqs = [from_dataset(ds, sample_id=s.sample_id) for s in ds.split("test")[: a.n]]
times = {k: [] for k in VARIANTS}
retr = []
for r in reqs:
    pmg.generate(r.user, r.target, r.items, context=r.context, target_image=r.target_image, item_images=r.item_image,
                 inversion="ddim", exemplars=1)  # warm: keywords, soft, index
    for name, over in VARIANTS.items():
        t = time.perf_counter()
        res = pmg.generate(r.user, r.target, r.items, context=r.context, target_image=r.target_image,
                           item_images=r.item_image, **over)
        times[name].append(time.perf_counter() - t)
        if "retrieve" in res.record.timings_s:
            retr.append(res.record.timings_s["retrieve"])
base = statistics.median(times["sdedit (today)"])
for name, v in times.items():
    print(f"{name:32s} median {statistics.median(v):6.2f} s  ×{statistics.median(v) / base:.2f}  ({len(v)} runs)")
print(f"retrieval per request: median {statistics.median(retr) * 1000:.1f} ms ({len(retr)} runs)")
