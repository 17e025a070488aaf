"""``pmgen demo``: several test users with different tastes, one conversational target, one picture.

Picks held-out sticker users whose hidden tastes differ and who share a conversational target
(preferring targets where the catalog holds a personalized ground truth for many tastes), gives
them all the same conversation, generates each one's sticker, and writes

* ``<out>/demo.png`` — target item | non-personalized baseline | each user's sticker + keywords
  (when soft embeddings are on, each user's sticker with the keywords alone is shown below it);
* ``<out>/index.html`` — the picture and a link to each user's full report;
* ``<out>/<sample>/`` — each request's record, candidates and report.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, TYPE_CHECKING

from pmgen.data.schema import Dataset, Sample
from pmgen.report import CREDIT, side_by_side
from pmgen.data.requests import from_dataset

if TYPE_CHECKING:
    from pmgen.pipeline import PMG


def pick_samples(ds: Dataset, n_users: int = 4, split: str = "test", target_key: str | None = None) -> list[Sample]:
    """Up to ``n_users`` samples of one target key, each from a user with a different hidden taste."""
    by_key: dict[str, list[Sample]] = defaultdict(list)
    for s in ds.split(split):
        by_key[s.attributes.get("target_key", s.target_id)].append(s)
    if target_key is not None and target_key not in by_key:
        raise KeyError(f"no {split} sample with target {target_key!r} (known: {', '.join(sorted(by_key))})")

    def taste(s: Sample) -> str:
        return str(ds.users[s.user_id].attributes.get("taste", s.user_id))

    def score(key: str) -> tuple[int, int]:
        ss = by_key[key]
        return (len({taste(s) for s in ss if s.ground_truth_personalized}), len({taste(s) for s in ss}))

    key = target_key or max(sorted(by_key), key=score)
    chosen: list[Sample] = []
    seen: set[str] = set()
    for s in sorted(by_key[key], key=lambda s: (s.ground_truth_personalized is None, s.sample_id)):
        if taste(s) not in seen:
            chosen.append(s)
            seen.add(taste(s))
        if len(chosen) == n_users:
            break
    return chosen


def run_demo(pmg: PMG, ds: Dataset, out: Path, n_users: int = 4, target_key: str | None = None,
             log: Any = print) -> Path:
    """Generate the demo picture and pages into ``out``; returns the picture's path."""
    from pmgen.paths import prepare_batch_root

    out = prepare_batch_root(out)  # new, empty, or a folder pmgen made: never someone else's files
    samples = pick_samples(ds, n_users, target_key=target_key)
    if not samples:
        raise ValueError(f"no test samples in dataset {ds.name!r}")
    context = samples[0].context  # everyone answers the same conversation
    results = []
    without: dict[str, Any] = {}
    for s in samples:
        req = from_dataset(ds, sample_id=s.sample_id)
        res = pmg.generate(req.user, req.target, req.items, context=context, target_image=req.target_image,
                           history_images=req.history_images, user_id=req.user.user_id, item_images=req.item_image)
        res.save(out / req.request_id)
        results.append((s, req, res))
        if res.record.soft_embeddings == "on":  # the same request without them, to show what they change
            plain = pmg.generate(req.user, req.target, req.items, context=context, target_image=req.target_image,
                                 history_images=req.history_images, user_id=req.user.user_id, use_soft=False,
                                 item_images=req.item_image)
            plain.save(out / req.request_id / "keywords-only")
            without[s.sample_id] = plain
        c = res.record.chosen_candidate
        log(f"{s.user_id} ({ds.users[s.user_id].attributes.get('taste')}): "
            f"{', '.join(res.record.preference_keywords[:6])} → chosen w = {c.weight:g}"
            + (f", redrawn from {c.start_title!r}" if c.start else ""))
    first = results[0][2]
    target = samples[0]
    convo = " / ".join(f"{e.speaker}: {e.text}" for e in context)
    columns: list[dict[str, Any]] = [
        {"image": results[0][1].target_image, "caption": "target item", "lines": [ds.items[target.target_id].title]},
        {"image": out / results[0][1].request_id / "candidates" / f"w_{0.0:.2f}.png", "caption": "no personalization",
         "lines": ["(w = 0, same seed)"] + first.record.target_keywords[:3]},
    ]
    for s, req, res in results:
        taste = ds.users[s.user_id].attributes.get("taste", "?")
        w = res.record.chosen_candidate.weight
        start = res.record.chosen_candidate.start_title
        gt = ds.items[s.ground_truth_personalized].title if s.ground_truth_personalized else "-"
        columns.append({"image": out / req.request_id / "chosen.png", "caption": f"{s.user_id}",
                        "history": req.history_images[:8], "highlight": True,
                        "lines": [f"hidden taste: {taste}",
                                  f"chosen w = {w:g}" + (" + soft" if res.record.soft_embeddings == "on" else ""),
                                  *([f"from: {start[:22]}"] if start else []),
                                  *res.record.preference_keywords[:4], f"gt: {gt}"]})
        if s.sample_id in without:
            plain = without[s.sample_id]
            columns[-1]["below"] = {"image": out / req.request_id / "keywords-only" / "chosen.png",
                                    "caption": "keywords only",
                                    "lines": [f"chosen w = {plain.record.chosen_candidate.weight:g}"]}
    picture = side_by_side(columns, out / "demo.png",
                           title=f"Same conversation, different users: \"{context[-1].text if context else ''}\"")
    rows = "".join(
        f'<li><a href="{html.escape(req.request_id)}/report.html">{html.escape(s.user_id)}</a> — hidden taste '
        f'{html.escape(str(ds.users[s.user_id].attributes.get("taste")))}; keywords: '
        f'{html.escape(", ".join(res.record.preference_keywords))}</li>' for s, req, res in results)
    (out / "index.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>pmgen demo</title><body style='font-family:sans-serif'>"
        f"<h1>pmgen demo</h1><p>Conversation: {html.escape(convo)}</p><img src='demo.png' "
        f"style='max-width:100%'><ul>{rows}</ul><p style='color:#777'>{CREDIT}</p></body>", encoding="utf-8")
    (out / "demo.json").write_text(json.dumps({"conversation": convo, "samples": [s.sample_id for s, _, _ in results],
                                               "records": [res.record.to_json() for _, _, res in results]}, indent=2))
    return picture
