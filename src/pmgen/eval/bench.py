"""``pmgen bench``: per-stage latency (medians of N), warm and cold generate, throughput, peak memory.

Budgets (DESIGN.md section 5, sticker-tiny, warm, 2-core CPU): keywords ≤ 3 s per user (then
cached), soft embeddings ≤ 0.3 s, one image-to-image candidate ≤ 0.5 s, a 3-weight generate ≤ 5 s,
a cold generate ≤ 30 s, peak memory ≤ 3 GB.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

BUDGETS_S = {"preference_keywords_cold": 3.0, "soft_embeddings": 0.3, "candidate_img2img": 0.5,
             "generate_3_weights_warm": 5.0, "generate_cold_process": 30.0}
BUDGET_RSS_GB = 3.0


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _median_time(fn: Callable[[], Any], n: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_bench(preset: str = "sticker-tiny", n: int = 5, data_root: Path | None = None, cold: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every stage; returns the results dict (also what ``--json-out`` writes)."""
    from pmgen.data import datasets
    from pmgen.data.requests import from_dataset
    from pmgen.pipeline import PMG
    from pmgen.stages.keywords import KeywordCache

    ds = datasets.load("sticker-users", data_root)
    test = ds.split("test")
    results: dict[str, Any] = {"preset": preset, "n": n, "machine": machine_info(), "stages": {}}
    stages = results["stages"]

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pmg = PMG.from_preset(preset, keyword_cache=KeywordCache(Path(tmp) / "kw.sqlite"))
        stages["load_models"] = {"median_s": time.perf_counter() - t, "runs": 1}
        log(f"models loaded in {stages['load_models']['median_s']:.1f} s")
        one_per_user = list({s.user_id: s for s in reversed(test)}.values())[::-1]  # distinct users: cold = cold
        reqs = [from_dataset(ds, sample_id=s.sample_id) for s in one_per_user[: 3 * n]]

        # keywords: each user once with an empty cache (cold), then again (cached)
        cold_t, warm_t = [], []
        for r in reqs[:n]:
            t = time.perf_counter()
            pmg.extract(r.user, r.items)
            cold_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            pmg.extract(r.user, r.items)
            warm_t.append(time.perf_counter() - t)
        stages["preference_keywords_cold"] = {"median_s": statistics.median(cold_t), "runs": len(cold_t)}
        stages["preference_keywords_cached"] = {"median_s": statistics.median(warm_t), "runs": len(warm_t)}
        log(f"keywords: cold {stages['preference_keywords_cold']['median_s']:.2f} s, cached "
            f"{stages['preference_keywords_cached']['median_s'] * 1000:.1f} ms")

        if pmg.soft_prompt is not None and pmg.settings.use_soft:
            med, _ = _median_time(lambda: pmg.soft_embeddings(reqs[0].user.events, reqs[0].items), n)
            stages["soft_embeddings"] = {"median_s": med, "runs": n}

        r0 = reqs[0]
        tkw = pmg.target_keywords(r0.target, r0.context)
        pkw = list(pmg.extract(r0.user, r0.items).keywords)
        cond = pmg.builder(pmg.settings.mode).build(tkw, pkw, 1.0)
        from pmgen.data.images import load_image

        init = load_image(r0.target_image, int(pmg.generator.image_size))
        s = pmg.settings
        med, _ = _median_time(lambda: pmg.generator.image_to_image(
            init, cond.prompt_embeds, cond.negative_prompt_embeds, strength=s.strength, seed=0,
            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale), n)
        stages["candidate_img2img"] = {"median_s": med, "runs": n, "strength": s.strength,
                                       "steps": s.num_inference_steps}
        med, _ = _median_time(lambda: pmg.generator.text_to_image(
            cond.prompt_embeds, cond.negative_prompt_embeds, seed=0, num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale), n)
        stages["candidate_text_to_image"] = {"median_s": med, "runs": n, "steps": s.num_inference_steps}
        log(f"one candidate: img2img {stages['candidate_img2img']['median_s']:.2f} s, "
            f"text-to-image {stages['candidate_text_to_image']['median_s']:.2f} s")

        for r in reqs[:n]:  # warm the keyword cache for these users
            pmg.extract(r.user, r.items)
        gen_t = []
        per_stage: dict[str, list[float]] = {}
        for r in reqs[:n]:
            t = time.perf_counter()
            res = pmg.generate(r.user, r.target, r.items, context=r.context, target_image=r.target_image,
                               weights=(0.0, 1.0, 2.0))
            gen_t.append(time.perf_counter() - t)
            for k, v in res.record.timings_s.items():
                per_stage.setdefault(k, []).append(v)
        stages["generate_3_weights_warm"] = {"median_s": statistics.median(gen_t), "runs": n,
                                             "per_stage_median_s": {k: statistics.median(v) for k, v in per_stage.items()}}
        stages["throughput_stickers_per_s"] = {"value": 3 * n / sum(gen_t)}
        log(f"generate (3 weights, warm): {stages['generate_3_weights_warm']['median_s']:.2f} s")
        results["peak_rss_gb_in_process"] = peak_rss_gb()

    if cold:
        with tempfile.TemporaryDirectory() as tmp:
            sample = test[0].sample_id
            cmd = [sys.executable, "-m", "pmgen", "generate", "--dataset", "sticker-users", "--sample", sample,
                   "--weights", "0,1,2", "--out", str(Path(tmp) / "out"), "--preset", preset]
            if data_root is not None:
                cmd += ["--data-dir", str(data_root)]
            env = {**os.environ, "PMGEN_CACHE_DIR": str(Path(tmp) / "cache")}  # cold: no keyword cache
            for link in ("models",):  # but keep the one-time dequantized LLM (a warm install, not a new one)
                src = Path(os.environ.get("PMGEN_CACHE_DIR") or (Path.home() / ".cache" / "pmgen")) / link
                if src.exists():
                    (Path(tmp) / "cache").mkdir(exist_ok=True)
                    (Path(tmp) / "cache" / link).symlink_to(src)
            times = []
            for _ in range(max(1, min(3, n))):
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                times.append(time.perf_counter() - t)
                if proc.returncode != 0:
                    raise RuntimeError(f"cold generate failed: {proc.stderr[-2000:]}")
            child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            stages["generate_cold_process"] = {"median_s": statistics.median(times), "runs": len(times),
                                               "command": " ".join(cmd[1:])}
            results["peak_rss_gb_cold_process"] = child
            log(f"cold generate (new process): {stages['generate_cold_process']['median_s']:.1f} s")
    results["budgets_s"] = BUDGETS_S
    results["budget_rss_gb"] = BUDGET_RSS_GB
    return results
