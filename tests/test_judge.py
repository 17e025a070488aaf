"""`pmgen evaluate-judge`: what the evaluator credits as "the target, in this user's taste"."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from pmgen.cli import app


def test_judge_images_are_the_target_the_truth_and_composites_of_a_safe_taste_sticker(data_root):
    from pmgen.data import datasets
    from pmgen.data.datasets.sticker_users import taste_by_name
    from pmgen.eval.evaluate import evaluation_samples
    from pmgen.eval.judge import ROWS, judge_images
    from pmgen.train.composites import heldout_from_sticker_users

    ds = datasets.load("sticker-users", data_root)
    samples = evaluation_samples(ds, 6, split="val")
    _, truths = heldout_from_sticker_users(ds.samples)
    out = judge_images(ds, samples, truths, seed=0)
    assert out == [] or len(out) == len(samples)
    for s, imgs in zip(samples, out):
        expected = [r for r in ROWS if r != "ground truth" or s.ground_truth_personalized]
        assert list(imgs) == expected
        assert all(x.shape == (1, 3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1 for x in imgs.values())
        target = imgs["target"]
        for row in expected:
            if row.startswith(("badge", "side", "palette", "pattern", "taste")):
                assert not torch.equal(imgs[row], target), row  # the taste element is really there
        assert not torch.equal(imgs["badge, w = 0.5"], imgs["badge, w = 2"])  # the element grows with w
    # the taste element is one of the user's taste stickers, never a val/test ground truth
    again = judge_images(ds, samples, truths, seed=0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(out, again) for k in a)  # deterministic
    taste = taste_by_name(ds.users[samples[0].user_id].attributes["taste"])
    el = out[0]["taste sticker"]
    from pmgen.data.images import load_image

    matches = [i for i in ds.items if taste.matches(ds.items[i]) and not ds.items[i].attributes.get("skintone")]
    found = [i for i in matches if torch.allclose(load_image(ds.image_path(i), 64), el, atol=1 / 255)]
    assert found and not set(found) & truths


def test_evaluate_judge_command_writes_the_table_and_the_picture(data_root, tmp_path):
    res = CliRunner().invoke(app, ["evaluate-judge", "--n-samples", "3", "--out", str(tmp_path / "j"),
                                   "--data-dir", str(data_root)])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "j" / "judge.json").read_text())
    assert result["n_samples"] == 3 and result["evaluator_weights"] == "zoo:sticker-tiny/evaluator"
    target = result["summary"]["target"]
    assert target["both"]["n"] == 3 and 0 <= target["both"]["mean"] <= target["target_top5"]["mean"] + 1e-9
    assert set(result["summary"]) >= {"target", "taste sticker", "badge, w = 2", "palette, w = 0.5"}
    assert (tmp_path / "j" / "judge_examples.png").stat().st_size > 1000
    assert "both at once" in (tmp_path / "j" / "judge.md").read_text()


def test_evaluate_judge_refuses_bad_input_before_grading(data_root, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate-judge", "--split", "train", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "--split" in res.output and not (tmp_path / "a").exists()
    res = runner.invoke(app, ["evaluate-judge", "--evaluator", str(tmp_path / "gone"), "--out", str(tmp_path / "b"),
                              "--data-dir", str(data_root)])
    assert res.exit_code == 1 and "--evaluator" in res.output and "gone" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "b").exists()
    res = runner.invoke(app, ["evaluate-judge", "--n-samples", "0", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and not (tmp_path / "c").exists()


def test_a_target_that_is_itself_a_taste_sticker_is_never_its_own_badge(data_root):
    """A sports fan's "person running" is a sports sticker: the taste element must be another one."""
    from pmgen.data import datasets
    from pmgen.data.datasets.sticker_users import taste_by_name
    from pmgen.eval.judge import judge_images

    ds = datasets.load("sticker-users", data_root)
    own = [s for s in ds.samples
           if taste_by_name(ds.users[s.user_id].attributes["taste"]).matches(ds.items[s.target_id])]
    assert own  # the dataset has such samples (the check below would pass vacuously otherwise)
    for imgs in judge_images(ds, own[:20], set(), seed=0):
        assert not torch.equal(imgs["taste sticker"], imgs["target"])
