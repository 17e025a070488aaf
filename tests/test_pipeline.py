"""The whole PMG pipeline on tiny random models: record contract, w = 0 identity, reports, batch resume."""

from __future__ import annotations

import json

import pytest
import torch

from pmgen.data.schema import Event, Item, User


def test_generate_record_contract_and_w0_identity(tiny_pmg, toy_data):
    root, items, user = toy_data
    ctx = [Event("conversation", speaker="user", text="hahaha so funny")]
    res = tiny_pmg.generate(user, items["a"], items, context=ctx, target_image=root / "img" / "a.png",
                            history_images=[root / "img" / "b.png"])
    rec = res.record.to_json()  # the JSON contract of record.json
    for key in ("user_id", "target_id", "preference_keywords", "target_keywords", "alpha", "candidates", "chosen",
                "seed", "preset", "models", "timings_s"):
        assert key in rec, key
    assert [c["weight"] for c in rec["candidates"]] == [0.0, 1.0, 2.0]
    assert all({"weight", "d_t", "d_p", "z", "image"} <= set(c) for c in rec["candidates"])
    assert 0 <= rec["chosen"] < 3 and rec["alpha"] == pytest.approx(2 / 3)
    assert {"llm", "text_encoder", "generator", "selector"} <= set(rec["models"])
    assert rec["soft_embeddings"].startswith("off")
    assert res.images.shape == (3, 3, 64, 64)
    # w = 0 is the non-personalized baseline, bit for bit: same seed, same init, target-only condition
    b = tiny_pmg.builder("concat").build(rec["target_keywords"], [], 0.0)
    from pmgen.data.images import load_image

    base = tiny_pmg.generator.image_to_image(load_image(root / "img" / "a.png", 64), b.prompt_embeds,
                                             b.negative_prompt_embeds, strength=0.6, seed=0, num_inference_steps=3,
                                             guidance_scale=3.0)
    assert torch.equal(res.images[0], base[0])
    if rec["preference_keywords"]:
        assert not torch.equal(res.images[0], res.images[2])  # the preference changes the image


def test_title_and_contrast_selection_same_candidates_other_scores(tiny_pmg, toy_data):
    """target_text / contrast change only how the candidates are scored (the images are the same), the
    record says which; the preset's background is embedded once."""
    from pmgen.presets import load_preference_background
    from pmgen.stages.condition import keywords_text
    from pmgen.stages.select import background_embedding

    root, items, user = toy_data
    kw = dict(context=[], target_image=root / "img" / "a.png")
    paper = tiny_pmg.generate(user, items["a"], items, **kw)
    ours = tiny_pmg.generate(user, items["a"], items, target_text="title", contrast=1.0, **kw)
    assert torch.equal(paper.images, ours.images)
    assert (paper.record.target_text, paper.record.contrast) == ("keywords", 0.0)
    assert (ours.record.target_text, ours.record.contrast) == ("title", 1.0)
    assert ours.record.to_json()["target_text"] == "title"
    sel = tiny_pmg.selector
    sims = sel.text_similarity(ours.images, [items["a"].title, keywords_text(ours.record.preference_keywords)])
    bg = background_embedding(sel, load_preference_background(tiny_pmg.preset))
    assert [c.d_t for c in ours.record.candidates] == pytest.approx(((1 + sims[:, 0]) / 2).tolist(), abs=1e-6)
    if ours.record.preference_keywords:
        expect = (1 + sims[:, 1] - sel.image_embeddings(ours.images) @ bg) / 2
        assert [c.d_p for c in ours.record.candidates] == pytest.approx(expect.tolist(), abs=1e-6)
    assert tiny_pmg.background() is tiny_pmg.background()  # embedded once


def test_history_names_as_the_preference_side_same_candidates_other_d_p(tiny_pmg, toy_data):
    """preference_text history / both: d_p to the names of the user's recent history items (alone, and
    averaged with the keywords against the background); the images and d_t do not change; the record says
    which and how many names."""
    from pmgen.presets import load_preference_background
    from pmgen.stages.condition import keywords_text
    from pmgen.stages.select import background_embedding

    root, items, user = toy_data
    user2 = User("u2", user.events + [Event("social", item_id="c", value="send", time=4),
                                      Event("social", item_id="zz-not-in-items", value="send", time=5)])
    kw = dict(context=[], target_image=root / "img" / "a.png", target_text="title", contrast=1.0)
    base = tiny_pmg.generate(user2, items["a"], items, **kw)
    hist = tiny_pmg.generate(user2, items["a"], items, preference_text="history", **kw)
    both = tiny_pmg.generate(user2, items["a"], items, preference_text="both", **kw)
    assert torch.equal(base.images, hist.images) and torch.equal(base.images, both.images)
    assert [c.d_t for c in hist.record.candidates] == [c.d_t for c in base.record.candidates]
    assert (base.record.preference_text, base.record.history_names) == ("keywords", 0)
    # the newest distinct items the catalog knows: c then b (the unknown id is left out)
    assert (hist.record.preference_text, hist.record.history_names) == ("history", 2)
    assert hist.record.to_json()["preference_text"] == "history"
    sel = tiny_pmg.selector
    emb = sel.image_embeddings(hist.images)
    names = (emb @ sel.text_embeddings(["blue heart", "cat face"]).T).mean(1)
    assert [c.d_p for c in hist.record.candidates] == pytest.approx(((1 + names) / 2).tolist(), abs=1e-6)
    if both.record.preference_keywords:
        bg = background_embedding(sel, load_preference_background(tiny_pmg.preset))
        k = emb @ sel.text_embeddings([keywords_text(both.record.preference_keywords)])[0]
        expect = (1 + (k + names) / 2 - emb @ bg) / 2
        assert [c.d_p for c in both.record.candidates] == pytest.approx(expect.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="preference_text"):
        tiny_pmg.generate(user2, items["a"], items, preference_text="taste", **kw)


def test_contrast_without_a_background_fails_before_any_model_runs(tiny_pmg, toy_data, monkeypatch):
    from pmgen.pipeline import PMG
    from pmgen.presets import get_preset

    root, items, user = toy_data
    preset = get_preset("sticker-tiny", text_max_length=16, contrast=0.0, preference_background="")
    pmg = PMG(preset, tiny_pmg.llm, tiny_pmg.text_encoder, tiny_pmg.generator, tiny_pmg.selector,
              settings=tiny_pmg.settings)
    monkeypatch.setattr(pmg, "extractor", lambda *a, **k: pytest.fail("keywords ran before the check"))
    with pytest.raises(ValueError, match="needs a preference background"):
        pmg.generate(user, items["a"], items, contrast=1.0)
    with pytest.raises(ValueError, match="must name a preference_background"):
        get_preset("sticker-tiny", preference_background="")  # its default contrast is 1


@pytest.mark.parametrize("mode", ["guidance", "compose"])
def test_w0_identity_in_other_weighting_modes(tiny_pmg, toy_data, mode):
    root, items, user = toy_data
    a = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", mode=mode)
    c = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", mode="concat")
    assert torch.equal(a.images[0], c.images[0])
    assert a.record.mode == mode
    assert a.record.preference_keywords  # the toy user has a preference, so w > 0 differs:
    assert not torch.equal(a.images[2], a.images[0]) and not torch.equal(a.images[2], c.images[2])


@pytest.mark.parametrize("mode", ["concat", "compose"])
def test_render_one_is_the_candidate_generate_draws(tiny_pmg, toy_data, mode):
    """`pmgen bench` times render_one: it must be the pipeline's candidate, extra guidance call included."""
    import dataclasses

    root, items, user = toy_data
    plan = tiny_pmg.plan(user, items["a"], items, target_image=root / "img" / "a.png", mode=mode)
    res = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", mode=mode)
    assert torch.equal(tiny_pmg.render_one(plan.conditions[1], plan.settings, plan.init), res.images[1:2])
    assert (plan.conditions[1].extra_prompt_embeds is not None) == (mode == "compose")
    noise = tiny_pmg.render_one(plan.conditions[1], dataclasses.replace(plan.settings, seed=1), None)
    assert noise.shape == res.images[1:2].shape and not torch.equal(noise, res.images[1:2])


def test_surround_strength_frees_the_white_around_the_target_and_keeps_the_baseline(tiny_pmg, toy_data):
    from pmgen.models.generator import outline_strengths

    root, items, user = toy_data
    kw = dict(target_image=root / "img" / "a.png", mode="compose")
    plain = tiny_pmg.generate(user, items["a"], items, **kw)
    free = tiny_pmg.generate(user, items["a"], items, surround_strength=1.0, **kw)
    assert torch.equal(free.images[0], plain.images[0])  # w = 0: the baseline, bit for bit
    assert not torch.equal(free.images[2], plain.images[2])
    assert free.record.surround_strength == 1.0 and plain.record.surround_strength is None
    # the candidate is the generator's own per-pixel-strength call (the map from the target's outline)
    plan = tiny_pmg.plan(user, items["a"], items, surround_strength=1.0, **kw)
    c = plan.conditions[2]
    smap = outline_strengths(plan.init, 0.6, 1.0)
    direct = tiny_pmg.generator.image_to_image(plan.init, c.prompt_embeds, c.negative_prompt_embeds,
                                               strength_map=smap, seed=0, num_inference_steps=3, guidance_scale=3.0,
                                               extra_prompt_embeds=c.extra_prompt_embeds,
                                               extra_guidance_scale=c.extra_scale, extra_base=c.extra_base)
    assert torch.equal(direct, free.images[2:3])
    # the toy target: a 30 px square at (17, 17) on white, grown by 1 px
    assert float(smap[0, 0, 32, 32]) == pytest.approx(0.6) and float(smap[0, 0, 16, 16]) == pytest.approx(0.6)
    assert float(smap[0, 0, 15, 15]) == 1.0 and float(smap[0, 0, 2, 60]) == 1.0
    # a photo without white background: inside everywhere, i.e. plain SDEdit
    assert torch.equal(outline_strengths(torch.zeros(1, 3, 8, 8), 0.6, 1.0), torch.full((1, 1, 8, 8), 0.6))


@pytest.mark.parametrize("bad", [1.5, -0.1, "high", float("nan")])
def test_surround_strength_outside_zero_one_is_refused(bad):
    from pmgen.pipeline import Settings

    with pytest.raises(ValueError, match="surround_strength must be in"):
        Settings(surround_strength=bad)


def test_save_writes_everything_atomically(tiny_pmg, toy_data, tmp_path):
    root, items, user = toy_data
    res = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png",
                            history_images=[root / "img" / "b.png"])
    out = res.save(tmp_path / "req")
    assert (out / "chosen.png").is_file() and (out / "report.html").is_file()
    rec = json.loads((out / "record.json").read_text())
    assert all((out / c["image"]).is_file() for c in rec["candidates"])
    assert "OpenMoji" in (out / "report.html").read_text()
    assert not (tmp_path / "req.partial").exists()


def test_empty_history_is_an_explicit_non_personalized_result(tiny_pmg, toy_data):
    root, items, _ = toy_data
    res = tiny_pmg.generate(User("nobody", []), items["a"], items, target_image=root / "img" / "a.png")
    assert res.record.personalized is False and "empty history" in res.record.reason
    assert [c.weight for c in res.record.candidates] == [0.0]


def test_no_target_image_draws_from_noise(tiny_pmg, toy_data):
    _, items, user = toy_data
    res = tiny_pmg.generate(user, Item("x", "party popper"), items)
    assert res.record.init.startswith("noise") and res.images.shape[0] == 3


def test_batch_is_resumable(tiny_pmg, toy_data, tmp_path, monkeypatch):
    from pmgen.batch.local import run_batch

    root, items, user = toy_data
    lines = [{"request_id": f"r{i}", "user": user.to_json(), "items": str(root / "items.jsonl"), "target_id": t}
             for i, t in enumerate(["a", "c", "d"])]
    lines.insert(1, {"request_id": "bad", "dataset": "no-such-dataset", "sample_id": "x"})
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"

    real = tiny_pmg.generate
    calls = []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies during the second request
        return real(*a, **k)

    monkeypatch.setattr(tiny_pmg, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_batch(tiny_pmg, batch, out)
    assert (out / "r0" / "record.json").is_file()
    assert not (out / "r1").exists() and not list(out.glob("*.partial"))
    first_mtime = (out / "r0" / "record.json").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(tiny_pmg, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    done, failed = run_batch(tiny_pmg, batch, out)
    assert (done, failed) == (3, 1)  # the unknown dataset line fails with its line number, the rest go on
    assert len(calls) == 2  # r0 was skipped
    assert (out / "r0" / "record.json").stat().st_mtime_ns == first_mtime
    assert (out / "r2" / "record.json").is_file()
    assert len((out / "index.jsonl").read_text().splitlines()) == 3


def test_evaluate_rows_views_and_outputs(tiny_pmg, toy_data, tmp_path):
    from pmgen.data.schema import Dataset, Sample
    from pmgen.eval.evaluate import Method, run_methods
    from pmgen.eval.grading import Grader
    from pmgen.eval.report import write_outputs
    from pmgen.eval.summary import alpha_sweep, at_weight, paired_margin, reselect, selected, summarize
    from pmgen.eval.metrics import STLPIPS
    from pmgen.stages.soft import SoftPromptConfig, SoftPromptEncoder

    root, items, user = toy_data
    user.attributes["taste_description"] = "loves cats"
    ds = Dataset("toy", root, items, {"u1": user},
                 [Sample("s1", "u1", "a", "test", ground_truth_personalized="b")], items_root=root)
    grader = Grader(tiny_pmg.selector, ds, STLPIPS("alex"), tastes=["loves cats", "loves rockets"])
    loaded = []

    def soft_loader(folder):
        loaded.append(folder)
        return SoftPromptEncoder(SoftPromptConfig(llm_name="tiny", llm_hidden=tiny_pmg.llm.hidden_size, text_width=32,
                                                  prefix_length=0, n_img=2), tiny_pmg.llm).eval()

    methods = [Method("none", {"weights": (0.0,)}), Method("keywords", {}),
               Method("soft-x", {"use_soft": True, "use_keywords": False, "history_weight": 1.0}, soft_prompt="x")]
    rows, kept = run_methods(tiny_pmg, grader, ds, ds.samples, methods, keep_images=1, soft_loader=soft_loader,
                             reference=True)
    assert loaded == ["x"] and tiny_pmg.soft_prompt is None  # the ablation's weights were never installed
    ref = rows.pop(0)  # the real target image, graded as is
    assert ref["method"] == "target image" and ref["target_top1"] in (0.0, 1.0)
    assert [(r["method"], r["weight"]) for r in rows] == [("none", 0.0), ("keywords", 0.0), ("keywords", 1.0),
                                                          ("keywords", 2.0), ("soft-x", 0.0), ("soft-x", 1.0),
                                                          ("soft-x", 2.0)]
    for key in ("acc_text", "acc_image", "pers_image", "pers_taste", "gt_hit", "lpips_target", "lpips_history",
                "ssim_target", "ssim_history", "ms_ssim_history"):
        assert key in rows[0], key
    assert rows[0]["gt_hit"] in (0.0, 1.0) and rows[0]["lpips_target"] >= 0 and -1 <= rows[0]["ssim_target"] <= 1
    for r in rows:
        assert r["target_top1"] <= r["target_top5"] and r["both"] == r["target_top5"] * r["taste_top1"]
    # every method's w = 0 candidate is the same image, so it grades the same
    zero = [r for r in rows if r["weight"] == 0.0]
    assert all(r["acc_text"] == pytest.approx(zero[0]["acc_text"], abs=1e-6) for r in zero)
    assert len(selected(rows)) == 3 and len(at_weight(rows, 1.0)) == 2
    # α = 0 keeps the best d_t; α = 1 the best d_p
    kw = [r for r in rows if r["method"] == "keywords"]
    assert reselect(kw, 0.0)[0]["d_t"] == max(r["d_t"] for r in kw)
    assert reselect(kw, 1.0)[0]["d_p"] == max(r["d_p"] for r in kw)
    curve = alpha_sweep(rows, "keywords", [0.0, 0.5, 1.0])
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 1.0] and all("acc_text" in p for p in curve)
    summary = summarize(selected(rows), baseline="none")
    assert summary["none"]["acc_text"]["n"] == 1 and "gain_vs_none" in summary["keywords"]["acc_text"]
    report = write_outputs(tmp_path, rows, {"n_samples": 1, "n_users": 1, "alpha": 2 / 3}, kept,
                           main_method="keywords")
    text = report.read_text()
    assert "| none |" in text and "w = 1" in text and "α sweep" in text
    for name in ("metrics.json", "tradeoff.png", "alpha_sweep.png", "samples.png"):
        assert (tmp_path / name).is_file(), name
    mean, lo, hi = paired_margin(selected(rows), "keywords", "none", "acc_text")
    assert lo <= mean <= hi


def test_evaluation_samples_one_per_user_then_each_users_next_request(data_root):
    """The first 100 samples are one per user; skip=100 gives each user's second request (none of the first),
    in the same user order; n and skip beyond the split give what is left."""
    from pmgen.data import datasets
    from pmgen.eval.evaluate import evaluation_samples

    ds = datasets.load("sticker-users", data_root)
    first, second = evaluation_samples(ds, 100, "val"), evaluation_samples(ds, 100, "val", skip=100)
    assert len({s.user_id for s in first}) == 100 and len(second) == 100
    assert [s.user_id for s in first] == [s.user_id for s in second]
    assert not {s.sample_id for s in first} & {s.sample_id for s in second}
    assert evaluation_samples(ds, 60, "val") == first[:60]  # what earlier runs graded is unchanged
    assert evaluation_samples(ds, 10, "val", skip=110) == second[10:20]
    assert len(evaluation_samples(ds, 1000, "val")) == len(ds.split("val"))
    assert evaluation_samples(ds, 5, "val", skip=10_000) == []
    with pytest.raises(ValueError, match="skip"):
        evaluation_samples(ds, 5, "val", skip=-1)


def test_both_at_once_counts_only_personalized_results():
    from pmgen.eval.summary import both_at_once

    def row(user, method, w, both, chosen=True):
        return {"user_id": user, "sample_id": user, "method": method, "weight": w, "both": both, "chosen": chosen}

    rows = [row("a", "pmg", 1.0, 1.0), row("b", "pmg", 2.0, 0.0), row("c", "pmg", 0.0, 1.0),
            row("d", "pmg", 1.0, 1.0, chosen=False), row("a", "none", 0.0, 0.0)]
    out = both_at_once(rows)
    assert out["pmg"]["n"] == 2 and out["pmg"]["n_results"] == 3 and out["pmg"]["mean"] == 0.5
    assert out["pmg"]["personalized_share"] == pytest.approx(2 / 3)
    assert out["none"]["n"] == 0


def test_candidate_ceiling_is_the_most_taste_at_the_accuracy_floor():
    from pmgen.eval.summary import candidate_ceiling

    def row(s, method, w, acc, taste, chosen=False):
        return {"user_id": s, "sample_id": s, "method": method, "weight": w, "acc_text": acc, "pers_taste": taste,
                "chosen": chosen, "both": float(taste > 0.5)}

    rows = [row("a", "none", 0.0, 1.0, 0.0, True), row("b", "none", 0.0, 1.0, 0.0, True)]
    # a: a free taste gain (w = 1 keeps accuracy); b: taste only at a large accuracy cost (w = 2)
    rows += [row("a", "pmg", 0.0, 1.0, 0.0, True), row("a", "pmg", 1.0, 1.0, 0.8),
             row("b", "pmg", 0.0, 1.0, 0.0), row("b", "pmg", 2.0, 0.5, 1.0, True)]
    out = candidate_ceiling(rows, "none", keep=0.95)
    c = out["pmg"]
    assert c["acc_text"] == pytest.approx(1.0) and c["pers_taste"] == pytest.approx(0.4)  # a at w=1, b at w=0
    assert c["acc_text_gain"] == pytest.approx(0.0) and c["both_personalized"] == 1.0 and c["mean_weight"] == 0.5
    loose = candidate_ceiling(rows, "none", keep=0.7)["pmg"]  # the floor now admits b's w = 2 candidate
    assert loose["pers_taste"] == pytest.approx(0.9) and loose["acc_text"] == pytest.approx(0.75)
    # a method that cannot keep the floor with any candidate gets no ceiling
    bad = rows[:2] + [row("a", "x", 0.0, 0.1, 0.0, True), row("b", "x", 0.0, 0.1, 0.0, True)]
    assert candidate_ceiling(bad, "none") == {}
    # another judge chooses (by=), the evaluator's floor and grades measure: a judge that sees taste in a's
    # w = 0 candidate and none at w = 1 keeps w = 0 there — no taste gained, and the evaluator says so
    for r in rows:
        r["j_taste"], r["j_acc"] = (1.0 - r["pers_taste"], r["acc_text"]) if r["sample_id"] == "a" else (r["pers_taste"], r["acc_text"])
    told = candidate_ceiling(rows, "none", keep=0.95, by=("j_taste", "j_acc"))["pmg"]
    assert told["pers_taste"] == pytest.approx(0.0) and told["acc_text"] == pytest.approx(1.0)
    assert told["mean_weight"] == 0.0 and told["pers_taste"] < c["pers_taste"]
    # rows without the judge's scores are left out, not guessed
    assert candidate_ceiling([{k: v for k, v in r.items() if k != "j_taste"} for r in rows], "none",
                             by=("j_taste", "j_acc")) == {}


def test_bootstrap_ci_resamples_users():
    from pmgen.eval.stats import bootstrap_ci

    mean, lo, hi = bootstrap_ci([1.0, 1.0, 0.0, 0.0], ["a", "a", "b", "b"], n=500)
    assert mean == 0.5 and lo == 0.0 and hi == 1.0  # two users: resampling users gives 0, 0.5 or 1
    m2, lo2, hi2 = bootstrap_ci([0.5] * 10)
    assert m2 == lo2 == hi2 == 0.5


def test_soft_embeddings_enter_the_condition_and_keep_the_w0_baseline(tiny_pmg, toy_data):
    from pmgen.stages.soft import SoftPromptConfig, SoftPromptEncoder

    root, items, user = toy_data
    enc = SoftPromptEncoder(SoftPromptConfig(llm_name="tiny", llm_hidden=tiny_pmg.llm.hidden_size, text_width=32,
                                             prefix_length=2, n_img=3), tiny_pmg.llm).eval()
    plain = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png")
    soft = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", use_soft=True,
                             soft_prompt=enc)
    assert tiny_pmg.soft_prompt is None  # passed for this call only
    assert soft.record.soft_embeddings == "on" and len(soft.record.models["soft_prompt"]["hash"]) == 16
    assert torch.equal(soft.images[0], plain.images[0])  # w = 0 ignores the soft embeddings
    n_kw = plain.record.candidates[1].preference_tokens
    assert soft.record.candidates[1].preference_tokens == n_kw + 3  # [P ; S] at w = 1
    assert not torch.equal(soft.images[1], plain.images[1])


def test_demo_shows_each_user_with_and_without_soft_embeddings(tiny_pmg, data_root, tmp_path):
    from PIL import Image as PILImage

    from pmgen.data import datasets
    from pmgen.demo import run_demo
    from pmgen.stages.soft import SoftPromptConfig, SoftPromptEncoder

    ds = datasets.load("sticker-users", data_root)
    enc = SoftPromptEncoder(SoftPromptConfig(llm_name="tiny", llm_hidden=tiny_pmg.llm.hidden_size, text_width=32,
                                             prefix_length=2, n_img=3), tiny_pmg.llm).eval()
    tiny_pmg.soft_prompt, tiny_pmg.settings.use_soft = enc, True
    try:
        pic = run_demo(tiny_pmg, ds, tmp_path / "demo", n_users=2, target_key="love", log=lambda m: None)
        tiny_pmg.soft_prompt = None
        plain_pic = run_demo(tiny_pmg, ds, tmp_path / "plain", n_users=2, target_key="love", log=lambda m: None)
    finally:
        tiny_pmg.soft_prompt, tiny_pmg.settings.use_soft = None, False
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    records = demo["records"]
    assert len(records) == 2 and all(r["soft_embeddings"] == "on" for r in records)
    for sid, r in zip(demo["samples"], records):  # each request was also made without the soft embeddings
        plain = json.loads((tmp_path / "demo" / sid / "keywords-only" / "record.json").read_text())
        assert plain["soft_embeddings"].startswith("off") and plain["preference_keywords"] == r["preference_keywords"]
    with PILImage.open(pic) as a, PILImage.open(plain_pic) as b:
        assert a.width == b.width and a.height > b.height + 128  # a second row of images
    assert not any(p.name == "keywords-only" for p in (tmp_path / "plain").rglob("*"))


def test_evaluate_methods_pin_their_selection_whatever_the_preset_default():
    from pmgen.eval.evaluate import default_methods

    without = default_methods(True, history_available=True)
    assert "pmg-compose-contrast" not in without and "pmg-contrast" not in without
    known = default_methods(True, history_available=True, background_available=True)
    for m in known.values():
        if m.name not in ("none", "none-kept"):  # one candidate: nothing to select
            assert {"target_text", "contrast", "preference_text"} <= set(m.overrides), m.name
        assert {"inversion", "exemplars"} <= set(m.overrides), m.name  # the start is pinned too
    assert known["pmg"].overrides["contrast"] == 0 and known["pmg"].overrides["mode"] == "concat"
    assert known["pmg-compose-contrast"].overrides == {"use_soft": True, "mode": "compose", "target_text": "title",
                                                       "contrast": 1.0, "preference_text": "keywords",
                                                       "inversion": "off", "exemplars": 0}
    kept = known["pmg-kept"].overrides
    assert kept["inversion"] == "ddim" and kept["exemplars"] > 0 and kept["preference_text"] == "history"
    assert known["none-kept"].overrides["weights"] == (0.0,) and known["none-kept"].overrides["inversion"] == "ddim"
    assert known["pmg-compose-history"].overrides["preference_text"] == "history"
    assert known["pmg-compose-both"].overrides["preference_text"] == "both"
    assert known["pmg-guidance-contrast"].overrides["mode"] == "guidance"
    assert "pmg-guidance-contrast" not in without


def test_soft_prompt_trained_in_the_preference_branch_is_evaluated_in_compose_mode(tmp_path):
    """An ablation folder whose weights were trained in compose's preference branch becomes a compose method
    (keywords + those soft embeddings); target-branch ablations stay soft-only; unreadable configs count as
    target-branch."""
    import json

    from pmgen.eval.evaluate import default_methods
    from pmgen.presets import soft_prompt_branch

    folders = {}
    for name, branch in (("pref", "preference"), ("old", None), ("bad", "sideways")):
        d = tmp_path / name
        d.mkdir()
        cfg = {"info": {"config": {} if branch is None else {"branch": branch}}}
        (d / "config.json").write_text(json.dumps(cfg))
        folders[f"soft-{name}"] = d
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    folders["soft-broken"] = tmp_path / "broken"
    assert [soft_prompt_branch(f) for f in folders.values()] == ["preference", "target", "target", "target"]
    known = default_methods(True, folders, background_available=True)
    assert known["soft-pref"].overrides == {"use_soft": True, "mode": "compose", "target_text": "title", "contrast": 1.0,
                                            "preference_text": "keywords", "inversion": "off", "exemplars": 0}
    assert known["soft-pref"].soft_prompt == str(folders["soft-pref"])
    assert known["soft-old"].overrides["use_keywords"] is False and "mode" not in known["soft-old"].overrides
    assert default_methods(True, folders)["soft-pref"].overrides["contrast"] == 0.0
