"""``pmgen bench``: per-stage latency (medians of N), warm and cold generate, throughput, peak memory.

Budgets (DESIGN.md section 5, sticker-tiny, warm, 2-core CPU): keywords ≤ 3 s per user (then
cached), soft embeddings ≤ 0.3 s, one image-to-image candidate ≤ 0.5 s, a 3-weight generate ≤ 5 s,
a cold generate ≤ 30 s, peak memory ≤ 3 GB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

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
              log: Callable[[str], None] = print, mode: str | None = None) -> dict[str, Any]:
    """Measure every stage; returns the results dict (also what ``--json-out`` writes). ``mode``: the
    weighting mode instead of the preset's (``compose`` and ``guidance`` add a UNet call per step)."""
    from pmgen.data import datasets
    from pmgen.data.requests import from_dataset
    from pmgen.pipeline import PMG
    from pmgen.stages.keywords import KeywordCache

    ds = datasets.load("sticker-users", data_root)
    test = ds.split("test")
    results: dict[str, Any] = {"preset": preset, "n": n, "machine": machine_info(), "stages": {}}
    overrides = {"mode": mode} if mode else {}
    stages = results["stages"]

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pmg = PMG.from_preset(preset, keyword_cache=KeywordCache(Path(tmp) / "kw.sqlite"), **overrides)
        results["mode"] = pmg.settings.mode
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
        s = dataclasses.replace(pmg.settings, seed=0)
        # a w = 1 candidate of the preset's weighting mode (compose and guidance add a UNet call per step)
        med, _ = _median_time(lambda: pmg.render_one(cond, s, init), n)
        stages["candidate_img2img"] = {"median_s": med, "runs": n, "strength": s.strength,
                                       "steps": s.num_inference_steps, "mode": s.mode}
        med, _ = _median_time(lambda: pmg.render_one(cond, s, None), n)
        stages["candidate_text_to_image"] = {"median_s": med, "runs": n, "steps": s.num_inference_steps,
                                             "mode": s.mode}
        log(f"one w = 1 candidate ({s.mode}): img2img {stages['candidate_img2img']['median_s']:.2f} s, "
            f"text-to-image {stages['candidate_text_to_image']['median_s']:.2f} s")
        from pmgen.stages.text import TitleIndex

        titles = TitleIndex(r0.items)  # a personalized one-line text, 3 candidates, keywords cached (issue 44)
        med, _ = _median_time(lambda: pmg.generate_text(r0.user, r0.target, r0.items, weights=(0, 1, 2),
                                                        titles=titles), n)
        stages["text_3_candidates"] = {"median_s": med, "runs": n, "budget_s": 1.5}
        log(f"personalized text, 3 candidates (warm): {med:.2f} s (target <= 1.5 s)")

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
        stages.update(_five_weights(pmg, reqs[:n], log))
        results["peak_rss_gb_in_process"] = peak_rss_gb()

    if cold:
        with tempfile.TemporaryDirectory() as tmp:
            sample = test[0].sample_id
            cmd = [sys.executable, "-m", "pmgen", "generate", "--dataset", "sticker-users", "--sample", sample,
                   "--weights", "0,1,2", "--out", str(Path(tmp) / "out"), "--preset", preset]
            if mode:
                cmd += ["--mode", mode]
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


def _five_weights(pmg: PMG, reqs: list[Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Warm 5-weight generation with the preset's start (inversion, exemplars) against SDEdit alone (the
    start before issue 41), interleaved request by request; the retrieval's share; a 100,000-item index."""
    from pmgen.stages.retrieve import ExemplarIndex

    plain = {"inversion": "off", "exemplars": 0}
    times: dict[str, list[float]] = {"preset": [], "sdedit": []}
    retrieve: list[float] = []
    for r in reqs:
        for name, over in (("preset", {}), ("sdedit", plain)):
            t = time.perf_counter()
            res = pmg.generate(r.user, r.target, r.items, context=r.context, target_image=r.target_image,
                               item_images=r.item_image, **over)
            times[name].append(time.perf_counter() - t)
            if name == "preset" and "retrieve" in res.record.timings_s:
                retrieve.append(res.record.timings_s["retrieve"])
    out: dict[str, Any] = {f"generate_5_weights_warm_{k}": {"median_s": statistics.median(v), "runs": len(v)}
                           for k, v in times.items()}
    ratio = out["generate_5_weights_warm_preset"]["median_s"] / out["generate_5_weights_warm_sdedit"]["median_s"]
    out["generate_5_weights_ratio_vs_sdedit"] = {"value": ratio}
    if retrieve:
        out["retrieve_per_request"] = {"median_s": statistics.median(retrieve), "runs": len(retrieve)}
    g = torch.Generator().manual_seed(0)
    big = torch.nn.functional.normalize(torch.randn(100_000, 256, generator=g), dim=1)
    index = ExemplarIndex([str(i) for i in range(len(big))], [""] * len(big), big)
    t_vec, p_vec = big[0], big[1]
    med, _ = _median_time(lambda: index.search(t_vec, p_vec, 4, 2 / 3, target_item="0"), 9)
    out["retrieve_100k_items"] = {"median_s": med, "runs": 9}
    log(f"generate (5 weights, warm): preset {out['generate_5_weights_warm_preset']['median_s']:.2f} s, SDEdit "
        f"{out['generate_5_weights_warm_sdedit']['median_s']:.2f} s (×{ratio:.2f}); retrieval "
        f"{(out.get('retrieve_per_request') or {}).get('median_s', 0) * 1000:.1f} ms per request, "
        f"{med * 1000:.1f} ms on 100,000 items")
    return out


# ---------------------------------------------------------------------------------------------- batch engines

BATCH_ENGINES = {"local1": ("local", 1), "local": ("local", None), "ray": ("ray", None)}
"""``pmgen bench --batch N --engine ...``: ``local1`` = the local engine one request at a time (the images
of ``pmgen generate``, the engine before groups), ``local`` = grouped, ``ray`` = the Ray Data engine."""


def batch_requests(data_root: Path | None, n: int) -> list[dict[str, Any]]:
    """``n`` batch lines from the sticker users' test split: one sample per user first (distinct histories),
    then around again with other seeds."""
    from pmgen.data import datasets

    test = datasets.load("sticker-users", data_root).split("test")
    per_user = list({s.user_id: s for s in reversed(test)}.values())[::-1]
    return [{"dataset": "sticker-users", "sample_id": per_user[i % len(per_user)].sample_id,
             "request_id": f"b{i:04d}", "seed": i // len(per_user)} for i in range(n)]


def _tree_rss(proc: Any) -> int:
    """Resident bytes of a process and all its descendants (Ray's raylet, GCS and workers included)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _cache_copy(dst: Path, keywords: Path | None) -> Path:
    """A private cache dir for one run: the shared one's models, glossary and data linked, keyword cache
    fresh (cold) or a copy of ``keywords`` (warm)."""
    import shutil

    from pmgen.paths import cache_dir

    src = cache_dir()
    dst.mkdir(parents=True)
    for entry in ("models", "glossary", "data"):
        if (src / entry).exists():
            (dst / entry).symlink_to(src / entry)
    if keywords is not None and keywords.exists():
        shutil.copy(keywords, dst / "keywords.sqlite")
    return dst


def _run_engine(name: str, batch: Path, work: Path, preset: str, group_size: int, actors: int | None,
                data_root: Path | None, keywords: Path | None, extra: list[str]) -> dict[str, Any]:
    import psutil

    engine, fixed_group = BATCH_ENGINES[name]
    out, stats_path = work / f"out-{name}", work / f"stats-{name}.json"
    cmd = [sys.executable, "-m", "pmgen", "generate", "--batch", str(batch), "--engine", engine, "--out", str(out),
           "--group-size", str(fixed_group or group_size), "--stats", str(stats_path), "--preset", preset, *extra]
    if engine == "ray" and actors:
        cmd += ["--actors", str(actors)]
    if data_root is not None:
        cmd += ["--data-dir", str(data_root)]
    env = {**os.environ, "PMGEN_CACHE_DIR": str(_cache_copy(work / f"cache-{name}", keywords))}
    load_before = os.getloadavg()
    t = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc))
        time.sleep(0.25)
    wall = time.perf_counter() - t
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: `{' '.join(cmd[1:])}` failed:\n{stderr[-3000:]}")
    st = json.loads(stats_path.read_text())
    window = (st["last_end"] - st["first_start"]) if st.get("first_start") else st["wall_s"]
    lat = sorted(st["latency_s"])
    stage_s: dict[str, float] = {}
    for rec in out.glob("*/record.json"):  # busy time per stage, summed over requests (shares of group calls)
        for k, v in json.loads(rec.read_text()).get("timings_s", {}).items():
            if k != "total":
                stage_s[k] = stage_s.get(k, 0.0) + float(v)
    return {"stage_busy_s": stage_s, "engine": engine, "group_size": fixed_group or group_size, "requests": st["written"],
            "candidates": st["candidates"], "window_s": window, "process_wall_s": wall,
            "stickers_per_s": st["candidates"] / window, "requests_per_s": st["written"] / window,
            "stickers_per_s_end_to_end": st["candidates"] / wall,
            "p50_latency_s": statistics.median(lat) if lat else None,
            "p90_latency_s": lat[int(0.9 * (len(lat) - 1))] if lat else None,
            "peak_rss_gb_all_processes": peak / 2**30, "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(), "retried": st.get("retried", []), "out": str(out),
            "command": " ".join(cmd[1:])}


def _pixels(folder: Path, pattern: str) -> dict[str, bytes]:
    from PIL import Image

    return {str(p.relative_to(folder)): Image.open(p).tobytes() for p in sorted(folder.glob(pattern))}


def _chosen_index(folder: Path) -> dict[str, tuple[int, list[str]]]:
    """Per request: the chosen candidate's index and the preference keywords (from record.json)."""
    out = {}
    for rec in folder.glob("*/record.json"):
        r = json.loads(rec.read_text())
        out[rec.parent.name] = (r["chosen"], r["preference_keywords"])
    return out


def _max_diff(a: Path, b: Path) -> int:
    """Largest difference of one pixel channel (0-255) over every candidate PNG both folders hold."""
    import numpy as np
    from PIL import Image

    worst = 0
    for p in a.glob("*/candidates/*.png"):
        q = b / p.relative_to(a)
        if q.is_file():
            x = np.asarray(Image.open(p), dtype=np.int16)
            y = np.asarray(Image.open(q), dtype=np.int16)
            worst = max(worst, int(np.abs(x - y).max()))
    return worst


def run_batch_bench(n: int = 16, engines: tuple[str, ...] = ("local", "ray"), preset: str = "sticker-tiny",
                    data_root: Path | None = None, group_size: int = 8, actors: int | None = None,
                    keywords: str = "cold", work: Path | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The batch engines on the same ``n`` requests (5 weights), one after another in fresh processes.

    Each engine gets its own keyword cache: empty (``keywords="cold"``: every user's keywords come from
    the LLM, as in a first overnight run) or a copy of one filled beforehand (``"warm"``). Reports
    stickers/s (candidate images per second over the processing window: the first request started to
    the last folder written; models are loaded before it, Ray's start-up and actor loading partly in
    it), requests/s, the same end to end (process start to exit), p50 per-request latency, the peak
    resident memory of the engine's whole process tree, the load average around each run, and whether
    the engines chose identical images (chosen.png and every candidate compared pixel by pixel).
    """
    bad = [e for e in engines if e not in BATCH_ENGINES]
    if bad or not engines:
        raise ValueError(f"unknown engine(s) {bad}; choose from {', '.join(BATCH_ENGINES)}")
    if keywords not in ("cold", "warm"):
        raise ValueError(f"keywords must be 'cold' or 'warm', got {keywords!r}")
    tmp = tempfile.TemporaryDirectory() if work is None else None
    work = Path(tmp.name) if tmp is not None else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        batch = work / "requests.jsonl"
        lines = batch_requests(data_root, n)
        batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
        kw_path = None
        if keywords == "warm":
            kw_path = work / "warm-keywords.sqlite"
            _fill_keyword_cache(preset, batch, data_root, kw_path, log)
        results: dict[str, Any] = {"n": n, "weights": 5, "keywords": keywords, "machine": machine_info(),
                                   "cpu_count": os.cpu_count(), "engines": {}}
        for name in engines:
            log(f"{name}: {n} requests (load average {os.getloadavg()[0]:.2f}) ...")
            r = _run_engine(name, batch, work, preset, group_size, actors, data_root, kw_path, [])
            results["engines"][name] = r
            log(f"  {r['stickers_per_s']:.2f} stickers/s, p50 {r['p50_latency_s']:.1f} s, "
                f"peak {r['peak_rss_gb_all_processes']:.2f} GB")
        for i, ref in enumerate(engines):  # every pair: pixels of chosen.png and of every candidate
            out_ref = Path(results["engines"][ref]["out"])
            chosen_ref, cands_ref = _pixels(out_ref, "*/chosen.png"), _pixels(out_ref, "*/candidates/*.png")
            idx_ref = _chosen_index(out_ref)
            for name in engines[i + 1:]:
                out = Path(results["engines"][name]["out"])
                chosen, cands = _pixels(out, "*/chosen.png"), _pixels(out, "*/candidates/*.png")
                idx = _chosen_index(out)
                results["engines"][name]["vs_" + ref] = {
                    "identical_chosen": sum(chosen.get(k) == v for k, v in chosen_ref.items()),
                    "same_chosen_candidate": sum(idx.get(k) == v for k, v in idx_ref.items()),
                    "identical_candidates": sum(cands.get(k) == v for k, v in cands_ref.items()),
                    "of_chosen": len(chosen_ref), "of_candidates": len(cands_ref),
                    "max_pixel_diff": _max_diff(out_ref, out)}
        if "local" in results["engines"] and "ray" in results["engines"]:
            results["ray_vs_local_throughput"] = (results["engines"]["ray"]["stickers_per_s"]
                                                  / results["engines"]["local"]["stickers_per_s"])
        return results
    finally:
        if tmp is not None:
            tmp.cleanup()


def _fill_keyword_cache(preset: str, batch: Path, data_root: Path | None, path: Path,
                        log: Callable[[str], None]) -> None:
    """Warm keywords: every request's user through the keyword stage once, into ``path``."""
    from pmgen.data.requests import Request, read_batch
    from pmgen.pipeline import PMG, Settings
    from pmgen.presets import get_preset, load_llm
    from pmgen.stages.keywords import KeywordCache

    log("filling the keyword cache (warm run) ...")
    p = get_preset(preset)
    pmg = PMG(p, load_llm(p), None, None, None, settings=Settings(), keyword_cache=KeywordCache(path))
    for _, r in read_batch(batch, data_root):
        if isinstance(r, Request) and r.user.events:
            pmg.extract(r.user, r.items)
