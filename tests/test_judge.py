"""`pmgen evaluate-judge`: what the evaluator credits as "the target, in this user's taste"."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pmgen.cli import app


def test_judge_images_are_the_target_the_truth_and_composites_of_a_safe_taste_sticker(data_root):
    from pmgen.data import datasets
    from pmgen.data.datasets.sticker_users import taste_by_name
    from pmgen.eval.evaluate import evaluation_samples
    from pmgen.eval.judge import ROWS, judge_images
    from pmgen.composites import heldout_from_sticker_users

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
                                   "--data-dir", str(data_root), "--lpips"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "j" / "judge.json").read_text())
    assert result["n_samples"] == 3 and result["evaluator_weights"] == "zoo:sticker-tiny/evaluator"
    target = result["summary"]["target"]
    assert target["both"]["n"] == 3 and 0 <= target["both"]["mean"] <= target["target_top5"]["mean"] + 1e-9
    assert set(result["summary"]) >= {"target", "taste sticker", "badge, w = 2", "palette, w = 0.5", "history sticker"}
    assert 0 < target["lpips_history"]["mean"] < 1 and result["summary"]["history sticker"]["lpips_history"]["n"] == 3
    if "ground truth" in result["summary"]:  # the recorded sticker is its own nearest catalog item
        assert result["summary"]["ground truth"]["gt_hit"]["mean"] == 1.0
        assert result["substitution_bound"]["gt_hit"] >= target["gt_hit"]["mean"]
    assert (tmp_path / "j" / "judge_examples.png").stat().st_size > 1000
    md = (tmp_path / "j" / "judge.md").read_text()
    assert "both at once" in md and "ST-LPIPS to the history" in md


def test_substitution_bound_swaps_the_cheapest_users_within_the_accuracy_floor():
    from pmgen.eval.judge import substitution_bound

    pairs = [(1.0, 0.0, [(0.5, 1.0)]),  # costs 0.5 of accuracy
             (1.0, 0.0, [(0.95, 0.0), (0.9, 1.0), (0.3, 1.0)]),  # costs 0.1 (the best hit; a miss never counts)
             (1.0, 1.0, [(0.2, 1.0)]),  # already a hit: never swapped
             (1.0, None, []),  # no ground truth: counts for the accuracy only
             (0.5, 0.0, [(0.7, 1.0)]),  # gains accuracy: free
             (1.0, 0.0, [(0.99, 0.0)])]  # no image hits: stays a miss
    b = substitution_bound(pairs, floor=0.95)  # budget 0.05 × 5.5 = 0.275: the free one and the 0.1 one
    assert (b["swaps"], b["n_with_ground_truth"]) == (2, 5) and abs(b["gt_hit"] - 3 / 5) < 1e-9
    assert abs(b["accuracy_kept"] - 5.6 / 5.5) < 1e-9
    assert substitution_bound(pairs, floor=0.8)["gt_hit"] == 4 / 5  # budget 1.1 pays for the 0.5 one too
    assert substitution_bound([(1.0, None, [])])["n_with_ground_truth"] == 0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="floor"):
            substitution_bound(pairs, floor=bad)


def test_the_history_sticker_is_graded_against_the_rest_of_the_history(data_root):
    """A sent sticker in its own reference set would give it an ST-LPIPS of 0 to itself."""
    from pmgen.data import datasets
    from pmgen.data.images import load_image
    from pmgen.eval.evaluate import evaluation_samples, history_item_ids
    from pmgen.eval.judge import judge_check

    class Recorder:
        def __init__(self):
            self.calls = []

        def grade(self, images, sample, taste, hist):
            self.calls.append((images, sample, list(hist)))
            return [{"acc_text": 0.5, "target_top5": 1.0, "pers_taste": 0.1, "taste_top1": 0.0, "both": 0.0}
                    for _ in range(images.shape[0])]

    ds = datasets.load("sticker-users", data_root)
    samples = evaluation_samples(ds, 3, split="val")
    rec = Recorder()
    result = judge_check(rec, ds, samples, set(), history=True)
    singles = [c for c in rec.calls if c[0].shape[0] == 1]
    assert len(singles) == 3 and result["summary"]["history sticker"]["both"]["n"] == 3
    for images, sample, hist in singles:
        full = history_item_ids(ds.users[sample.user_id])
        sent = [i for i in full if i not in hist]
        assert len(sent) == 1 and len(hist) == len(full) - 1
        assert torch.allclose(load_image(ds.image_path(sent[0]), 64), images)
    rec = Recorder()
    judge_check(rec, ds, samples, set())  # without history: no history row, nothing graded against a history
    assert all(c[0].shape[0] > 1 and c[2] == [] for c in rec.calls)


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
