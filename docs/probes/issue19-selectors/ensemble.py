"""Probe (issue 19): does choosing with an ensemble of independently trained selectors find more of the
user's taste at the same accuracy?

The default's candidates carry far more taste than its choice keeps (evaluator-oracle ceiling +66% on
val, choice +30%), and even a selector told the hidden taste reaches only +47%: the selector's own
quirks cost the rest. Averaging the cosine similarities of selectors trained with other seeds and
held-out splits (never the evaluator's architecture) is the classic cure for a proxy reward's quirks.

    # 1) the default's candidates for val users, graded once by the evaluator (no selector needed)
    python docs/probes/issue19-selectors/ensemble.py candidates --n 60 --out runs/issue19/selectors/val
    # 2) choose among them with each selector set; rows like `pmgen evaluate`'s, for analyze.py
    python docs/probes/issue19-selectors/ensemble.py select --out runs/issue19/selectors/val \\
        --set default=zoo:sticker-tiny/selector --set seed3=DIR --set ens2=zoo:sticker-tiny/selector+DIR
    python docs/probes/issue19-badge/analyze.py runs/issue19/selectors/val/rows.jsonl
    (analyze.py takes "none" from the w = 0 rows of the set named "default")
    # 3) accuracy / taste change vs none for each set along the α sweep
    python docs/probes/issue19-selectors/ensemble.py frontier --out runs/issue19/selectors/val
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("phase", choices=["candidates", "select", "frontier"])
ap.add_argument("--n", type=int, default=60)
ap.add_argument("--split", default="val")
ap.add_argument("--skip", type=int, default=0, help="candidates: skip the first samples (100 = each user's second "
                "request, targets the first 100 never showed)")
ap.add_argument("--out", default="runs/issue19/selectors/val")
ap.add_argument("--users-seed", type=int, default=0, help="candidates / select: users drawn with this seed "
                "(pmgen evaluate --users-seed; 0 = the users every model and setting was made with)")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--set", action="append", default=[], help="name=ref[+ref…] (a selector or an ensemble)")
ap.add_argument("--history-text", action="store_true", help="select: also d_p to the names of the user's history "
                "items, alone and averaged with the keywords")
ap.add_argument("--history-weights", default="", help="select, with --history-text: also d_p with the user's "
                "history images' share β (comma-separated, e.g. 0.25,0.5), the pipeline's history_weight")
ap.add_argument("--told", action="store_true", help="select: also each set told the user's hidden taste (as the "
                "preference text, no background): is it the selector or the keywords that miss the taste?")
args = ap.parse_args()
torch.set_num_threads(args.threads)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

from pmgen import PMG  # noqa: E402
from pmgen.data import datasets  # noqa: E402
from pmgen.presets import load_preference_background, load_scorer  # noqa: E402
from pmgen.stages.condition import keywords_text  # noqa: E402

from common import change, load_selectors, none_of  # noqa: E402

if args.phase == "candidates":
    from pmgen.data.requests import from_dataset
    from pmgen.eval.evaluate import CONTRAST_SELECTION, evaluation_samples, history_item_ids
    from pmgen.eval.grading import sticker_grader

    pmg = PMG.from_preset("sticker-tiny")
    ds = datasets.load("sticker-users", seed=args.users_seed)
    grader = sticker_grader(load_scorer(pmg.preset, "evaluator", pmg.text_encoder), perceptual=False)
    samples = evaluation_samples(ds, args.n, split=args.split, skip=args.skip)
    overrides = {"use_soft": True, "mode": "compose", **CONTRAST_SELECTION}
    done = out / "candidates.pt"
    store = torch.load(done, weights_only=False) if done.is_file() else {}  # resume: finished users are kept
    for n, s in enumerate(samples):
        if s.sample_id in store:
            continue
        req = from_dataset(ds, sample_id=s.sample_id)
        hist = history_item_ids(ds.users[s.user_id])
        plan = pmg.plan(req.user, req.target, req.items, context=req.context, target_image=req.target_image,
                        history_images=[ds.image_path(i) for i in hist], **overrides)
        images = pmg.render(plan)
        res = pmg.finish(plan, images)
        metrics = grader.grade(images, s, ds.users[s.user_id].attributes.get("taste_description"), hist)
        store[s.sample_id] = {"user_id": s.user_id, "images": images.half(), "metrics": metrics,
                              "weights": [c.weight for c in res.record.candidates],
                              "target_text": plan.target.title, "pref_text": keywords_text(plan.preference_keywords),
                              "alpha": plan.settings.alpha, "contrast": plan.settings.contrast,
                              "min_accuracy": plan.settings.min_accuracy,
                              "recorded": [(c.d_t, c.d_p) for c in res.record.candidates]}
        print(f"{n + 1}/{len(samples)}", flush=True)
        if (n + 1) % 10 == 0 or n + 1 == len(samples):
            torch.save(store, out / "candidates.pt")
    print("done")
elif args.phase == "frontier":
    import statistics

    from pmgen.eval.summary import reselect

    rows = [json.loads(line) for line in (out / "rows.jsonl").open()]
    base = none_of(rows)
    alphas = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95)
    print("set            " + " ".join(f"{a:>12}" for a in alphas) + "   (accuracy % / taste % vs none)")
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [change(reselect([r for r in rows if r["method"] == m], a), base) for a in alphas]
        print(f"{m:14s} " + " ".join(f"{c:>12}" for c in cells))

    def ranks(x: list[float]) -> torch.Tensor:
        r = torch.tensor(x).argsort().argsort().float()
        return r - r.mean()

    def agreement(m: str, key: str, other: str, okey: str) -> float:
        """Mean over users of the rank correlation, within the user's candidates, of two scores."""
        vals = []
        for sid in dict.fromkeys(r["sample_id"] for r in rows):
            a = sorted((r for r in rows if r["method"] == m and r["sample_id"] == sid), key=lambda r: r["weight"])
            b = sorted((r for r in rows if r["method"] == other and r["sample_id"] == sid), key=lambda r: r["weight"])
            x, y = ranks([r[key] for r in a]), ranks([r[okey] for r in b])
            if len(a) > 2 and x.norm() > 0 and y.norm() > 0:
                vals.append(float((x * y).sum() / (x.norm() * y.norm())))
        return statistics.fmean(vals)

    print("\nrank correlation within a user's candidates, mean over users:")
    for m in dict.fromkeys(r["method"] for r in rows):
        print(f"{m:14s} d_p ~ evaluator taste {agreement(m, 'd_p', m, 'pers_taste'):.3f}   "
              f"d_t ~ evaluator accuracy {agreement(m, 'd_t', m, 'acc_text'):.3f}   "
              f"d_p ~ default's d_p {agreement(m, 'd_p', 'default', 'd_p'):.3f}")
    print(f"weight   ~ evaluator taste {agreement('default', 'weight', 'default', 'pers_taste'):.3f}")
else:
    from pmgen.eval.evaluate import history_item_ids
    from pmgen.presets import get_preset
    from pmgen.stages.select import background_embedding, select

    preset = get_preset("sticker-tiny")
    store = torch.load(out / "candidates.pt", weights_only=False)
    bg_texts = load_preference_background(preset)
    ds = datasets.load("sticker-users", seed=args.users_seed)
    rows = []
    hist_images: dict[str, torch.Tensor] = {}

    def add(name: str, sid: str, st: dict, d_t: list[float], d_p: list[float], chosen: int) -> None:
        for i, (w, mt) in enumerate(zip(st["weights"], st["metrics"])):
            rows.append({"sample_id": sid, "user_id": st["user_id"], "method": name, "weight": w,
                         "d_t": d_t[i], "d_p": d_p[i], "chosen": i == chosen, **mt})

    for spec in args.set:
        name, refs = spec.split("=", 1)
        sel = load_selectors(refs)
        bg = background_embedding(sel, bg_texts)
        for sid, st in store.items():
            images = st["images"].float()
            # the pipeline's own rule: d_p to the preference keywords, against the background
            s = select(images, sel, st["target_text"], st["pref_text"], st["alpha"], None, 0.0, st["min_accuracy"],
                       bg if st["contrast"] > 0 else None, st["contrast"])
            add(name, sid, st, s.d_t, s.d_p, s.chosen)
            if args.history_text:
                # d_p to the names of the user's history items (what the user did, not the keywords): pmgen's
                # preference_text history (-hist) and both (-kw+hist)
                titles = [ds.items[i].title for i in history_item_ids(ds.users[st["user_id"]])]
                for suffix, source in (("-hist", "history"), ("-kw+hist", "both")):
                    h = select(images, sel, st["target_text"], st["pref_text"], st["alpha"], None, 0.0,
                               st["min_accuracy"], bg if st["contrast"] > 0 else None, st["contrast"],
                               history_texts=titles, preference_source=source)
                    add(name + suffix, sid, st, h.d_t, h.d_p, h.chosen)
                for beta in [float(b) for b in args.history_weights.split(",") if b]:
                    # the history stickers themselves in d_p (the pipeline's history_weight), beside the names
                    if sid not in hist_images:
                        from pmgen.data.images import load_image
                        hist_images[sid] = torch.cat([load_image(ds.image_path(i), images.shape[-1])
                                                      for i in history_item_ids(ds.users[st["user_id"]])])
                    h = select(images, sel, st["target_text"], st["pref_text"], st["alpha"], hist_images[sid], beta,
                               st["min_accuracy"], bg if st["contrast"] > 0 else None, st["contrast"],
                               history_texts=titles, preference_source="history")
                    add(f"{name}-hist+img{beta:g}", sid, st, h.d_t, h.d_p, h.chosen)
            if args.told:  # a diagnostic, not a method: the hidden taste as the preference text
                taste = ds.users[st["user_id"]].attributes.get("taste_description") or ""
                s = select(images, sel, st["target_text"], taste, st["alpha"], None, 0.0, st["min_accuracy"])
                add(name + "-told", sid, st, s.d_t, s.d_p, s.chosen)
        print(name, "done", flush=True)
    with (out / "rows.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
