"""The grouped local batch engine: a request's images are the same alone and in any group; resume; index."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from pmgen.data.schema import Event, User


def _plans(pmg, toy_data, mode="concat"):
    """Three requests of different users, targets, seeds and preference lengths (so other length buckets)."""
    from pmgen.stages.keywords import Keywords

    root, items, user = toy_data
    other = User("u2", [Event("search", text="hearts", time=1)])
    kws = [["cat", "kitten"], ["heart", "blue", "love", "valentine", "red heart"], ["cat"]]
    out = []
    for (u, t, seed), kw in zip([(user, "a", 0), (other, "c", 7), (user, "d", 3)], kws):
        out.append(pmg.plan(u, items[t], items, target_image=root / items[t].image, seed=seed, mode=mode,
                            keywords=Keywords(keywords=kw, n_events=len(u.events), n_kept=len(u.events))))
    return out


@pytest.mark.parametrize("mode", ["concat", "guidance", "compose"])
def test_a_request_renders_bit_identically_alone_and_in_any_group(tiny_pmg, toy_data, mode):
    from pmgen.batch.grouped import render_many

    plans = _plans(tiny_pmg, toy_data, mode)
    lengths = {(c.extra_prompt_embeds if c.extra_prompt_embeds is not None else c.prompt_embeds).shape[1]
               for p in plans for c in p.conditions}
    # several length buckets (compose: the extra condition is the keywords' whole prompt, one length)
    assert len(lengths) > (0 if mode == "compose" else 2)
    assert all(c.extra_base == ("uncond" if mode == "compose" else "cond") for p in plans for c in p.conditions
               if c.extra_prompt_embeds is not None)
    alone = [render_many(tiny_pmg, [p], batch_size=4, length_step=8)[0] for p in plans]
    group = render_many(tiny_pmg, plans, batch_size=4, length_step=8)
    reverse = render_many(tiny_pmg, plans[::-1], batch_size=4, length_step=8)[::-1]
    for a, g, r in zip(alone, group, reverse):
        assert a.shape == g.shape and torch.equal(a, g) and torch.equal(a, r)
    # against the one-candidate-at-a-time path (pmgen generate): float rounding only
    for p, g in zip(plans, group):
        ref = tiny_pmg.render(p)
        assert (ref - g).abs().max().item() < 1e-4


def test_a_plan_with_surround_strength_is_rendered_as_pmgen_generate_renders_it(tiny_pmg, toy_data):
    import dataclasses

    from pmgen.batch.grouped import render_many

    plans = _plans(tiny_pmg, toy_data, "compose")
    mixed = [dataclasses.replace(plans[0], settings=dataclasses.replace(plans[0].settings, surround_strength=1.0)),
             *plans[1:]]
    group = render_many(tiny_pmg, mixed, batch_size=4, length_step=8)
    assert torch.equal(group[0], tiny_pmg.render(mixed[0]))  # per-pixel strengths: rendered on its own
    assert not torch.equal(group[0], render_many(tiny_pmg, plans[:1], batch_size=4, length_step=8)[0])
    assert torch.equal(group[1], render_many(tiny_pmg, plans, batch_size=4, length_step=8)[1])


@pytest.fixture(scope="module")
def shipped_generator_pmg():
    from pmgen.pipeline import PMG, Settings
    from pmgen.presets import get_preset, load_generator, load_scorer, load_text_encoder

    class StubLLM:
        name = "fixed-keywords"
        content_hash = "0" * 16

    p = get_preset("sticker-tiny")
    gen = load_generator(p)
    te = load_text_encoder(p, gen)
    settings = Settings(weights=(0, 1, 2), seed=0, strength=p.settings.strength, num_inference_steps=10,
                        guidance_scale=p.settings.guidance_scale)
    return PMG(p, StubLLM(), te, gen, load_scorer(p, "selector", te), settings=settings)


def test_shipped_generator_alone_vs_group_vs_generate(shipped_generator_pmg, data_root):
    """The shipped models: bit-identical alone and in a group; against one candidate at a time
    (``pmgen generate``) at most 1/255 on a few pixels, and the same chosen candidate."""
    from pmgen.batch.grouped import render_many
    from pmgen.data import datasets
    from pmgen.data.requests import from_dataset
    from pmgen.stages.keywords import Keywords

    pmg = shipped_generator_pmg
    ds = datasets.load("sticker-users", data_root)
    kws = {"su0001-0": ["cat", "kitten", "cat face"], "su0014-1": ["rocket", "space", "planet", "star"]}
    plans = []
    for sid, kw in kws.items():
        r = from_dataset(ds, sample_id=sid)
        plans.append(pmg.plan(r.user, r.target, r.items, context=r.context, target_image=r.target_image,
                              keywords=Keywords(keywords=kw, n_events=1, n_kept=1)))
    group = render_many(pmg, plans)
    assert torch.equal(render_many(pmg, plans[1:])[0], group[1])
    u8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.int16)  # noqa: E731
    for p, g in zip(plans, group):
        ref = pmg.render(p)
        assert (u8(ref) - u8(g)).abs().max().item() <= 1
        assert (u8(ref) != u8(g)).float().mean().item() < 0.001
        assert pmg.finish(p, ref).chosen == pmg.finish(p, g).chosen


def _batch_file(toy_data, tmp_path, n=4, bad_line=True):
    root, items, user = toy_data
    lines = [{"request_id": f"r{i}", "user": user.to_json(), "items": str(root / "items.jsonl"),
              "target_id": "abcd"[i % 4], "seed": i} for i in range(n)]
    if bad_line:
        lines.insert(2, {"request_id": "bad", "dataset": "no-such-dataset", "sample_id": "x"})
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return batch


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.glob("*/candidates/*.png"))}


def test_local_engine_groups_give_the_same_images_for_any_group_size(tiny_pmg, toy_data, tmp_path):
    from pmgen.batch.local import run_batch

    batch = _batch_file(toy_data, tmp_path)
    stats: dict = {}
    assert run_batch(tiny_pmg, batch, tmp_path / "g2", group_size=2, stats=stats) == (4, 1)
    assert run_batch(tiny_pmg, batch, tmp_path / "g3", group_size=3) == (4, 1)
    assert run_batch(tiny_pmg, batch, tmp_path / "g1", group_size=1) == (4, 1)
    g2, g3, g1 = _pngs(tmp_path / "g2"), _pngs(tmp_path / "g3"), _pngs(tmp_path / "g1")
    assert len(g2) == 4 * 3 and g2.keys() == g3.keys() == g1.keys()
    assert all(np.array_equal(g2[k], g3[k]) for k in g2)
    assert all(np.abs(g2[k].astype(int) - g1[k].astype(int)).max() <= 1 for k in g2)  # rounding vs generate
    index = [json.loads(x) for x in (tmp_path / "g2" / "index.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in index] == ["r0", "r1", "r2", "r3"]
    assert all(r["attempts"] == 1 and not r["retried"] for r in index)
    assert [r["line"] for r in index] == [1, 2, 4, 5]
    rec = json.loads((tmp_path / "g2" / "r1" / "record.json").read_text())
    assert rec["seed"] == 1 and rec["timings_s"]["generate"] > 0
    assert len(stats["latency_s"]) == 4 and stats["candidates"] == 12


def test_local_engine_resumes_and_the_index_says_what_was_retried(tiny_pmg, toy_data, tmp_path, monkeypatch):
    import pmgen.batch.local as local

    batch = _batch_file(toy_data, tmp_path, n=4, bad_line=False)
    out = tmp_path / "out"
    real = local.run_group
    calls = []

    def dies_in_second_group(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(local, "run_group", dies_in_second_group)
    with pytest.raises(KeyboardInterrupt):
        local.run_batch(tiny_pmg, batch, out, group_size=2)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["r0", "r1"]
    monkeypatch.setattr(local, "run_group", real)
    buf = io.StringIO()
    assert local.run_batch(tiny_pmg, batch, out, group_size=2, console=Console(file=buf)) == (4, 0)
    # a log (no terminal) shows the progress too; the 2 requests finished before count as done
    assert [x.split()[1] for x in buf.getvalue().splitlines() if x.startswith("generating: ")] == ["3/4", "4/4"]
    index = {r["request_id"]: r for r in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    assert {k: v["retried"] for k, v in index.items()} == {"r0": False, "r1": False, "r2": True, "r3": True}
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_extract_many_is_extract_for_each_history_in_one_llm_call(tiny_pmg, toy_data, tmp_path, monkeypatch):
    import pmgen.stages.keywords.extract as ex
    from pmgen.stages.keywords import KeywordCache, PreferenceExtractor

    root, items, user = toy_data
    others = [User("u2", [Event("search", text="hearts", time=1), Event("social", item_id="c", value="send", time=2)]),
              User("u3", [Event("social", item_id="a", value="send", time=1)])]
    histories = [(user.events, items), (others[0].events, items), ([], items), (user.events, items),
                 (others[1].events, items)]
    alone = PreferenceExtractor(tiny_pmg.llm, k=4, cache=None)
    expected = [alone.extract(e, i) if e else None for e, i in histories]
    ext = PreferenceExtractor(tiny_pmg.llm, k=4, cache=KeywordCache(tmp_path / "kw.sqlite"))
    ext.extract(*histories[4])  # one of them cached already
    calls = []
    real = ex.generate_batch
    monkeypatch.setattr(ex, "generate_batch", lambda llm, prompts, *a, **k: (calls.append(len(prompts)),
                                                                          real(llm, prompts, *a, **k))[1])
    got = ext.extract_many(histories)
    assert calls == [2 * ext.n_permutations]  # one call: the two distinct misses' renderings
    assert isinstance(got[2], ValueError)  # an empty history: extract's error, for that entry only
    for g, e in zip(got, expected):
        if e is not None:
            assert g.keywords == e.keywords and g.raw == e.raw
    assert got[0] is got[3]  # the same history twice is run once
    assert ext.extract_many(histories[:2])[0].keywords == expected[0].keywords  # now from the cache


def test_engine_options_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import pmgen.cli.generate as gen_cli
    from pmgen.cli import app

    def boom(*a, **k):
        raise AssertionError("models were loaded before the options were checked")

    monkeypatch.setattr(gen_cli, "_load_pmg", boom)
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"dataset": "sticker-users", "sample_id": "su0001-0"}\n')
    runner = CliRunner()
    for args, msg in ((["--engine", "spark"], "--engine must be"), (["--ray-address", "x:1"], "need --engine ray"),
                      (["--group-size", "0"], "must be >= 1"), (["--engine", "ray", "--actors", "0"], "must be >= 1")):
        r = runner.invoke(app, ["generate", "--batch", str(batch), "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
    r = runner.invoke(app, ["generate", "--dataset", "sticker-users", "--sample", "x", "--engine", "ray"])
    assert r.exit_code == 2 and "apply to --batch runs" in r.output
