import json

from typer.testing import CliRunner

from pmgen.cli import app

runner = CliRunner()


def test_data_build_and_list(data_root):
    r = runner.invoke(app, ["data", "build", "all", "--data-dir", str(data_root)])
    assert r.exit_code == 0, r.output
    assert "stickers" in r.output and "items=4495" in r.output
    r = runner.invoke(app, ["data", "list", "--data-dir", str(data_root)])
    assert r.exit_code == 0 and r.output.count("yes") == 4


def test_data_show_sticker_users(data_root):
    r = runner.invoke(app, ["data", "show", "sticker-users", "--data-dir", str(data_root), "--n", "2"])
    assert r.exit_code == 0, r.output
    assert "samples_with_ground_truth" in r.output and "→ target:" in r.output


def test_data_show_stickers_writes_sheet(data_root, tmp_path):
    out = tmp_path / "sheet.png"
    r = runner.invoke(app, ["data", "show", "stickers", "--data-dir", str(data_root), "--sheet", str(out)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    im = Image.open(out)
    assert im.width == 12 * 64 and im.height > 10 * 64


def test_unknown_dataset_is_a_clear_error(data_root):
    r = runner.invoke(app, ["data", "build", "imagenet", "--data-dir", str(data_root)])
    assert r.exit_code == 2 and "unknown dataset 'imagenet'" in r.output


def test_validate_good_and_bad(tmp_path):
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "title": "x"}) + "\n")
    good = tmp_path / "users.jsonl"
    good.write_text(json.dumps({"user_id": "u", "events": [{"type": "click", "item_id": "a"}]}) + "\n")
    r = runner.invoke(app, ["data", "validate", str(good)])
    assert r.exit_code == 0 and "OK" in r.output
    bad = tmp_path / "users2.jsonl"
    bad.write_text(json.dumps({"user_id": "u", "events": [{"type": "rating", "item_id": "a", "value": 9}]}) + "\n")
    r = runner.invoke(app, ["data", "validate", str(bad)])
    assert r.exit_code == 1
    assert f"{bad}:1 [events[0].value]: rating 9 out of range (expected 1 to 5)" in r.output.replace("\n", "")
    r = runner.invoke(app, ["data", "validate", str(tmp_path)])
    assert r.exit_code == 0


def test_generate_without_a_request_is_a_usage_error():
    r = runner.invoke(app, ["generate"])
    assert r.exit_code == 2 and "say what to generate" in r.output


def test_generate_unknown_ids_name_the_problem(data_root):
    r = runner.invoke(app, ["generate", "--dataset", "sticker-users", "--sample", "nope-0", "--data-dir", str(data_root)])
    assert r.exit_code == 2 and "unknown sample id 'nope-0'" in r.output
    r = runner.invoke(app, ["generate", "--dataset", "sticker-users", "--user", "su0001", "--target", "ZZZ",
                            "--data-dir", str(data_root)])
    assert r.exit_code == 2 and "unknown target item id 'ZZZ'" in r.output


def test_generate_own_files_are_validated(tmp_path):
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "title": "x"}) + "\n")
    beh = tmp_path / "alice.json"
    beh.write_text(json.dumps({"user_id": "alice", "events": [{"type": "rating", "item_id": "a", "value": 11}]}))
    r = runner.invoke(app, ["generate", "--behaviors", str(beh), "--items", str(tmp_path / "items.jsonl"),
                            "--target", "a"])
    assert r.exit_code == 2 and "rating 11 out of range" in r.output
    r = runner.invoke(app, ["generate", "--behaviors", str(beh)])
    assert r.exit_code == 2 and "--behaviors needs --items and --target" in r.output


def test_models_list_names_every_role():
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0
    for word in ("sticker-tiny", "sd15", "llm", "text_encoder", "generator", "selector", "evaluator"):
        assert word in r.output


def test_evaluate_quick_on_the_shipped_models(data_root, tmp_path):
    """`pmgen evaluate --quick`: the real sticker-tiny models on 8 held-out users, every output written."""
    import json

    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", "--quick", "--out", str(out), "--data-dir", str(data_root),
                            "--keep-images", "2", "--methods", "none,keywords,soft,pmg,pmg+images"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["meta"]["n_samples"] == 8 and {"none", "keywords", "soft", "pmg", "pmg+images"} <= set(m["selected"])
    assert m["meta"]["models"]["soft_prompt"]  # the preset's trained soft prompt is on
    assert m["meta"]["models"]["history_images"]["name"] == "history-images"  # and its history-image encoder
    none = m["selected"]["none"]
    assert -1 <= none["acc_text"]["mean"] <= 1 and none["acc_text"]["n"] == 8
    assert none["acc_text"]["ci95"][0] <= none["acc_text"]["mean"] <= none["acc_text"]["ci95"][1]
    assert {p["alpha"] for p in m["alpha_sweep"]["curve"]} >= {0.0, 1.0}
    # the oracle ceiling: each method's w = 0 candidate is the baseline, so the floor is met and taste never drops.
    # Up to float32 noise: the baseline is graded alone, the w = 0 candidate in a batch with the others, and
    # the evaluator's convolutions round differently by batch size (seen: 3.6e-8 apart)
    eps = 1e-6
    ceil = m["candidate_ceiling"]["pmg"]
    assert ceil["acc_text"] >= 0.95 * none["acc_text"]["mean"] - eps
    assert ceil["pers_taste"] >= none["pers_taste"]["mean"] - eps
    assert "Candidate-pool ceiling" in (out / "report.md").read_text()
    # the second oracle: the selector told the target's name and the hidden taste, graded by the evaluator
    told = m["candidate_ceiling_told_selector"]["pmg"]
    assert told["acc_text"] >= 0.95 * none["acc_text"]["mean"] - eps and told["n"] == 8
    assert all(-1 <= x["oracle_title"] <= 1 and -1 <= x["oracle_taste"] <= 1 for x in m["rows"] if x["method"] == "pmg")
    assert "| pmg | selector, told |" in (out / "report.md").read_text()
    rows = [x for x in m["rows"] if x["method"] == "none"]
    assert all(x["weight"] == 0.0 for x in rows) and len(rows) == 8
    for name in ("report.md", "tradeoff.png", "alpha_sweep.png", "samples.png"):
        assert (out / name).is_file(), name
    assert "evaluating 5 methods: 8/8" in r.output  # progress shows in logs too, not only on a terminal


def test_progress_bar_prints_plain_lines_when_not_on_a_terminal():
    import io

    from rich.console import Console

    from pmgen.progress import progress_bar

    buf = io.StringIO()
    with progress_bar("work", 20, Console(file=buf)) as update:
        for i in range(1, 21):
            update(i)
    lines = [x for x in buf.getvalue().splitlines() if x.startswith("work: ")]
    assert [x.split()[1] for x in lines] == [f"{2 * k}/20" for k in range(1, 11)]  # every tenth, once
    assert "min left" in lines[0]


def test_soft_prompt_option_names_weights_or_turns_them_off() -> None:
    from pmgen.cli import _soft

    assert _soft(None) == {}  # the preset's own setting
    assert _soft("off") == _soft("None") == {"soft_prompt": ""}
    assert _soft("zoo:sticker-tiny/soft-prompt") == {"soft_prompt": "zoo:sticker-tiny/soft-prompt"}
    assert _soft(None, "g", "/some/selector") == {"generator": "g", "selector": "/some/selector"}
    assert _soft(None, evaluator="zoo:sticker-tiny/evaluator-robust") == {"evaluator": "zoo:sticker-tiny/evaluator-robust"}


def test_selector_option_swaps_the_preset_selector_and_a_missing_one_is_a_clear_error(tmp_path) -> None:
    from typer.testing import CliRunner

    from pmgen.cli import app
    from pmgen.pipeline import PMG

    pmg = PMG.from_preset("sticker-tiny", keyword_cache=None, selector="zoo:sticker-tiny/evaluator")
    assert pmg.preset.selector == "zoo:sticker-tiny/evaluator"
    assert pmg.selector.model.cfg.info["role"] == "evaluator"
    # sticker-tiny names the history-image encoder's own tower (the seed-1 selector it was trained on): kept with any
    # selector, and it embeds with that tower, not with the selector
    seed1 = PMG.from_preset("sticker-tiny", keyword_cache=None, selector="zoo:sticker-tiny/selector")
    assert pmg.history_encoder is not None and pmg.history_tower is not pmg.selector
    assert pmg.history_tower.content_hash == seed1.selector.content_hash != pmg.selector.content_hash
    # a preset naming no tower: the encoder reads the selector, so another selector leaves it out, with the reason
    no_tower = PMG.from_preset("sticker-tiny", keyword_cache=None, selector="zoo:sticker-tiny/evaluator",
                               history_images_tower="")
    assert no_tower.history_encoder is None and "history-image encoder was trained" in no_tower.history_encoder_refused
    assert PMG.from_preset("sticker-tiny", keyword_cache=None, selector="zoo:sticker-tiny/selector",
                           history_images_tower="").history_encoder is not None  # its own selector: kept
    # ... and an ensemble led by that selector keeps it (its first member is the image tower); led by another, not
    ens = PMG.from_preset("sticker-tiny", keyword_cache=None, history_images_tower="",
                          selector="zoo:sticker-tiny/selector+zoo:sticker-tiny/evaluator")
    assert ens.history_encoder is not None and ens.selector.name == "selector+selector"
    assert PMG.from_preset("sticker-tiny", keyword_cache=None, history_images_tower="",
                           selector="zoo:sticker-tiny/evaluator+zoo:sticker-tiny/selector").history_encoder is None
    res = CliRunner().invoke(app, ["evaluate", "--quick", "--selector", str(tmp_path / "missing"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code != 0 and "missing" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--quick", "--evaluator", str(tmp_path / "gone"), "--out",
                                   str(tmp_path / "out3")])
    assert res.exit_code == 1 and "--evaluator" in res.output and "gone" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out3").exists()  # refused before anything was generated
    for bad in ("zoo:sticker-tiny/selector+", "+".join(["zoo:sticker-tiny/selector"] * 9)):
        res = CliRunner().invoke(app, ["generate", "--dataset", "sticker-users", "--sample", "su0007-0",
                                       "--selector", bad, "--out", str(tmp_path / "out4")])
        assert res.exit_code == 2 and "an ensemble is 2 to 8 references" in " ".join(res.output.split()), res.output
        assert "Traceback" not in res.output and not (tmp_path / "out4").exists()


def test_generate_with_history_images_records_the_tokens(data_root, tmp_path):
    """`pmgen generate --history-images`: the shipped encoder reads the user's history stickers."""
    import json

    from pmgen.data import datasets

    sample = datasets.load("sticker-users", data_root).split("test")[0]
    out = tmp_path / "one"
    r = runner.invoke(app, ["generate", "--dataset", "sticker-users", "--sample", sample.sample_id, "--weights", "0,1",
                            "--history-images", "--out", str(out), "--data-dir", str(data_root), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "record.json").read_text())
    assert rec["history_image_tokens"].startswith("on (4 tokens from ")
    assert rec["models"]["history_images"]["name"] == "history-images"
    r = runner.invoke(app, ["generate", "--dataset", "sticker-users", "--sample", sample.sample_id, "--weights", "0,1",
                            "--out", str(tmp_path / "plain"), "--data-dir", str(data_root)])
    assert r.exit_code == 0, r.output
    plain = json.loads((tmp_path / "plain" / "record.json").read_text())
    assert "history_image_tokens" not in plain  # off by default
    assert rec["candidates"][1]["preference_tokens"] == plain["candidates"][1]["preference_tokens"] + 4
    assert rec["candidates"][0]["d_t"] == plain["candidates"][0]["d_t"]  # w = 0: the same baseline


def test_scorer_check_repeats_the_training_split_and_shows_the_corner_drop(data_root, tmp_path):
    """`pmgen models scorer-check`: the shipped evaluator's held-out top-5 is the one its training recorded
    (same split, same candidates); drawn at 48 px in a corner it falls. Unusable scorers are refused first."""
    from pmgen.models.scorer import DualEncoder, ScorerConfig
    from pmgen.presets import ZOO

    info = json.loads((ZOO / "sticker-tiny" / "evaluator" / "config.json").read_text())["info"]
    r = runner.invoke(app, ["models", "scorer-check", "--scorer", "zoo:sticker-tiny/evaluator",
                            "--data-dir", str(data_root)])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "zoo:sticker-tiny/evaluator" in line)
    cells = [c.strip() for c in row.strip("│┃ ").split("│")]
    (top1, top5), (small1, small5) = ([float(x) for x in c.split(" / ")] for c in cells[1:3])
    assert (top1, top5) == (round(info["heldout"]["heldout_top1"], 3), round(info["heldout"]["heldout_top5"], 3))
    assert small5 < top5 - 0.2 and small1 < top1
    untrained = tmp_path / "untrained"
    DualEncoder(ScorerConfig(widths=(8, 16), embed_dim=16, text_dim=384)).save(untrained)
    for bad, says in ((tmp_path / "missing", "no scorer at"), (untrained, "records no held-out split")):
        r = runner.invoke(app, ["models", "scorer-check", "--scorer", "zoo:sticker-tiny/evaluator", "--scorer", str(bad),
                                "--data-dir", str(data_root)])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
        assert "held-out top-1" not in r.output  # refused before anything was measured


def test_evaluate_users_seed_is_bounded(tmp_path):
    """--users-seed names a dataset folder (sticker-users-seed{N}): a bad value exits 2 before anything is built."""
    for bad in ("-1", "2147483648", "x"):
        res = CliRunner().invoke(app, ["evaluate", "--quick", "--users-seed", bad, "--out", str(tmp_path / "out"),
                                       "--data-dir", str(tmp_path / "data")])
        assert res.exit_code == 2 and "Invalid value for '--users-seed'" in " ".join(res.output.split()), res.output
        assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_third_party_noise_is_off_unless_verbose(monkeypatch):
    import os
    import warnings

    from pmgen.cli.app import quiet_third_party

    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        quiet_third_party()
        warnings.warn_explicit("a library's notice", UserWarning, "x.py", 1, module="transformers.x")
        warnings.warn_explicit("pmgen's own warning", UserWarning, "y.py", 1, module="pmgen.stages.x")
    assert [str(w.message) for w in caught] == ["pmgen's own warning"]
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    r = runner.invoke(app, ["--verbose", "data", "list"])
    assert r.exit_code == 0 and "--verbose" in runner.invoke(app, ["--help"]).output
    assert "personalization" in runner.invoke(app, ["eval", "--help"]).output
