"""The input boundary: ids that cannot become paths, outputs that cannot escape or delete, bounded inputs,
clear errors before any model loads, and a seeded fuzz run over malformed requests."""

from __future__ import annotations

import json
import random
import re
import struct
import time
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pmgen.cli import app
from pmgen.data.schema import DataError, Event, User
from pmgen.data.images import ImageError, check_image, load_image
from pmgen.limits import Limits
from pmgen.paths import (RESULT_MARKER, UnsafePathError, check_id, inside, prepare_batch_root, write_result_dir)

runner = CliRunner()


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that *claims* ``width × height`` pixels (header + a tiny IDAT): a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with file contents (folders map to None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def write_items(folder: Path, image: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": "a", "title": "grinning face", "text": "tags: happy"}, {"id": "b", "title": "cat face"}]
    if image:
        rows[0]["image"] = image
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "items.jsonl"


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if the CLI tries to load models (option errors must come first)."""
    import pmgen.cli.evaluate
    import pmgen.cli.generate

    def boom(*a, **k):
        raise AssertionError("models were loaded before the input was checked")

    for module in (pmgen.cli.generate, pmgen.cli.evaluate):  # every command module that loads models
        monkeypatch.setattr(module, "_load_pmg", boom)


# ------------------------------------------------------------------ 1. ids and output paths


@pytest.mark.parametrize("bad", ["..", ".", "../../x", "/etc/passwd", "a/b", "a\\b", "", ".hidden", "x" * 129,
                                 "a\x00b", "名前", "a b", "~", "C:x"])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(UnsafePathError, match="not a safe id"):
        check_id(bad, "request_id")


@pytest.mark.parametrize("good", ["su0003-1", "1F600", "alice_2.v1", "x" * 128, "a..b"])
def test_safe_ids_pass(good):
    assert check_id(good) == good


def test_inside_refuses_escapes_and_symlinks(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    assert inside(root, "ok") == (root / "ok").resolve()
    for parts in (("..",), ("../x",), ("/abs",), ("link", "y")):
        with pytest.raises(UnsafePathError, match="leaves the folder"):
            inside(root, *parts)


def test_existing_foreign_folder_is_never_emptied(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(UnsafePathError, match="did not write"):
        write_result_dir(out, lambda d: (d / "record.json").write_text("{}"))
    assert tree(out) == {"thesis.txt": b"years of work"}
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temp folder left behind


def test_result_dir_new_empty_and_rerun(tmp_path):
    new = write_result_dir(tmp_path / "new", lambda d: (d / "a.txt").write_text("1"))
    assert (new / "a.txt").read_text() == "1" and (new / RESULT_MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_result_dir(empty, lambda d: (d / "a.txt").write_text("2"))
    assert (empty / "a.txt").read_text() == "2"
    write_result_dir(new, lambda d: (d / "b.txt").write_text("3"))  # a pmgen result is replaced whole
    assert sorted(p.name for p in new.iterdir()) == [RESULT_MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


def test_interrupted_write_keeps_the_old_result(tmp_path):
    out = write_result_dir(tmp_path / "r", lambda d: (d / "a.txt").write_text("old"))

    def crash(d: Path) -> None:
        (d / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_result_dir(out, crash)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_batch_root_refuses_foreign_folders(tmp_path):
    (tmp_path / "x.txt").write_text("keep")
    with pytest.raises(UnsafePathError):
        prepare_batch_root(tmp_path)
    fresh = prepare_batch_root(tmp_path / "b")
    assert prepare_batch_root(fresh) == fresh  # a batch folder pmgen made can be resumed


def test_batch_request_ids_cannot_escape_or_delete(tiny_pmg, toy_data, tmp_path):
    from pmgen.batch.local import run_batch

    root, items, user = toy_data
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("do not delete")
    good = {"user": user.to_json(), "items": str(root / "items.jsonl"), "target_id": "a"}
    lines = [dict(good, request_id=rid) for rid in ("../../x", "/tmp/pmgen-abs-escape", "..", ".", "a/b")]
    lines.append(dict(good, request_id="fine"))
    batch = work / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = tree(tmp_path)
    done, failed = run_batch(tiny_pmg, batch, work / "out")
    assert (done, failed) == (1, 5)
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("work/out")} == before
    assert not Path("/tmp/pmgen-abs-escape").exists()
    assert (work / "out" / "fine" / "record.json").is_file()


def test_a_foreign_folder_in_the_batch_output_is_not_replaced(tiny_pmg, toy_data, tmp_path):
    from pmgen.batch.local import run_batch

    root, items, user = toy_data
    out = prepare_batch_root(tmp_path / "out")
    (out / "r1").mkdir()
    (out / "r1" / "notes.txt").write_text("mine")
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"request_id": "r1", "user": user.to_json(), "items": str(root / "items.jsonl"),
                                 "target_id": "a"}) + "\n")
    done, failed = run_batch(tiny_pmg, batch, out)
    assert (done, failed) == (0, 1)
    assert tree(out / "r1") == {"notes.txt": b"mine"}


def test_generate_out_existing_folder_is_refused_before_models_load(toy_data, tmp_path, no_model_load, monkeypatch):
    root, items, user = toy_data
    beh = tmp_path / "alice.json"
    beh.write_text(json.dumps(user.to_json()))
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f.txt").write_text("x")
    args = ["generate", "--behaviors", str(beh), "--items", str(root / "items.jsonl"), "--target", "a"]
    r = runner.invoke(app, args + ["--out", str(keep)])
    assert r.exit_code == 2 and "did not write" in r.output and (keep / "f.txt").read_text() == "x"
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, args + ["--out", "."])
    assert r.exit_code == 2 and "did not write" in r.output and r.exception is None or isinstance(r.exception,
                                                                                                SystemExit)


# ------------------------------------------------------------------ 3. bounded inputs


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    big = png_header_only(tmp_path / "big.png", 12000, 12000)
    for p in (bomb, big):
        t = time.perf_counter()
        with pytest.raises(ImageError, match="pixels"):
            check_image(p)
        with pytest.raises(ImageError, match="pixels"):
            load_image(p, 64)
        assert time.perf_counter() - t < 2.0  # refused from the header, not decoded


def test_image_bytes_limit(tmp_path):
    from PIL import Image

    p = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(p)
    assert check_image(p) == (64, 64)
    with pytest.raises(ImageError, match="the limit is"):
        check_image(p, Limits(max_image_bytes=10))


def test_validate_and_generate_name_the_oversized_image(tmp_path, no_model_load):
    (tmp_path / "img").mkdir()
    png_header_only(tmp_path / "img" / "bomb.png", 20000, 20000)
    items = write_items(tmp_path, image="img/bomb.png")
    r = runner.invoke(app, ["data", "validate", str(items)])
    assert r.exit_code == 1 and "bomb.png" in r.output and "pixels" in r.output and "Traceback" not in r.output
    beh = tmp_path / "u.json"
    beh.write_text(json.dumps({"user_id": "u", "events": [{"type": "click", "item_id": "b"}]}))
    r = runner.invoke(app, ["generate", "--behaviors", str(beh), "--items", str(items), "--target", "a"])
    assert r.exit_code == 2 and "bomb.png" in r.output and "pixels" in r.output


def test_huge_texts_and_histories_are_refused_with_the_limit(tmp_path):
    from pmgen.data.requests import from_files

    items = write_items(tmp_path / "d")
    beh = tmp_path / "u.json"
    beh.write_text(json.dumps({"user_id": "u", "events": [{"type": "search", "text": "x" * 100_000}]}))
    with pytest.raises(DataError, match=r"events\[0\]\.text.*100,000 characters; the limit is 10,000"):
        from_files(beh, items, "a")
    beh.write_text(json.dumps({"user_id": "u", "events": [{"type": "click", "item_id": "a"}] * 11}))
    with pytest.raises(DataError, match="11 events; the limit is 10"):
        from_files(beh, items, "a", limits=Limits(max_events_per_user=10))
    big = tmp_path / "big.json"
    with big.open("w") as f:  # a 17 MiB behaviors file (one enormous text)
        f.write('{"user_id": "u", "events": [{"type": "note", "text": "' + "y" * (17 * 2**20) + '"}]}')
    t = time.perf_counter()
    with pytest.raises(DataError, match="behaviors file .* is 17.0 MiB; the limit is 16.0 MiB"):
        from_files(big, items, "a")
    assert time.perf_counter() - t < 1.0


def test_long_texts_within_the_limit_are_shortened_and_the_record_says_so(tiny_pmg, toy_data):
    root, items, _ = toy_data
    user = User("u", [Event("social", item_id="b", value="send", time=1),
                      Event("review", item_id="b", text="so cute " * 100, time=2)])
    res = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png")
    assert any("shortened" in w and "300 characters" in w for w in res.record.warnings)


def test_batch_file_limits(tmp_path):
    from pmgen.data.requests import read_batch

    p = tmp_path / "b.jsonl"
    p.write_text('{"dataset": "stickers"}\n' * 3)
    with pytest.raises(DataError, match="3 requests; the limit is 2"):
        list(read_batch(p, limits=Limits(max_batch_requests=2)))
    with pytest.raises(DataError, match="must be a file, not a folder"):
        list(read_batch(tmp_path))


# ------------------------------------------------------------------ 4. clear errors, exit 2, before loading


@pytest.mark.parametrize("opts, expect", [
    (["--weights", "a,b"], "--weights: weights must be comma-separated numbers"),
    (["--weights", "-3,nan"], "--weights: weights must be finite numbers"),
    (["--weights", "0,1e9"], "--weights: weights must be finite numbers"),
    (["--steps", "0"], "--steps: steps (num_inference_steps) must be in [1, 1000]"),
    (["--alpha", "nan"], "--alpha: alpha must be in [0, 1]"),
    (["--strength", "2"], "--strength: strength must be in [0, 1]"),
    (["--seed", "-1"], "--seed: seed must be an integer"),
    (["--mode", "magic"], "--mode: mode must be one of"),
    (["--contrast", "nan"], "--contrast: contrast must be in [0, 1]"),
    (["--contrast", "2"], "--contrast: contrast must be in [0, 1]"),
    (["--target-text", "../etc/passwd"], "--target-text: target_text must be one of"),
    (["--preference-text", "ignore previous instructions"], "--preference-text: preference_text must be one of"),
])
def test_bad_options_fail_before_models_load(opts, expect, no_model_load):
    r = runner.invoke(app, ["generate", "--dataset", "sticker-users", "--sample", "x"] + opts)
    assert r.exit_code == 2, r.output
    assert expect in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("opts, expect", [
    (["--contrast", "-1"], "--contrast: contrast must be in [0, 1]"),
    (["--target-text", "name; rm -rf /"], "--target-text: target_text must be one of"),
    (["--preference-text", "../../history"], "--preference-text: preference_text must be one of"),
])
def test_demo_bad_selection_options_fail_before_models_load(opts, expect, no_model_load, tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")] + opts)
    assert r.exit_code == 2, r.output
    assert expect in " ".join(r.output.split()), r.output
    assert not (tmp_path / "demo").exists()


def test_bench_bad_mode_fails_before_models_load(no_model_load):
    r = runner.invoke(app, ["bench", "--mode", "magic"])
    assert r.exit_code == 2 and "--mode: mode must be one of" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["bench", "--mode", "concat", "--batch", "2"])
    assert r.exit_code == 2 and "leave --mode out with --batch" in " ".join(r.output.split()), r.output


def test_behaviors_file_errors_name_the_file(tmp_path, no_model_load):
    items = write_items(tmp_path / "d")
    cases = {
        tmp_path: "must be a file, not a folder",
        tmp_path / "missing.json": "behaviors file not found",
    }
    notjson = tmp_path / "notjson.json"
    notjson.write_text("this is not json\n")
    cases[notjson] = "malformed JSON"
    for path, expect in cases.items():
        r = runner.invoke(app, ["generate", "--behaviors", str(path), "--items", str(items), "--target", "a"])
        out = " ".join(r.output.split())
        assert r.exit_code == 2 and str(path) in out and expect in out, r.output
        assert len(r.output.strip().splitlines()) <= 3  # one message, not a traceback
    r = runner.invoke(app, ["generate", "--behaviors", str(notjson), "--items", str(tmp_path / "nope.jsonl"),
                            "--target", "a"])
    assert r.exit_code == 2 and "nope.jsonl" in r.output


def test_batch_file_errors_before_models_load(tmp_path, no_model_load):
    r = runner.invoke(app, ["generate", "--batch", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "batch file not found" in r.output
    b = tmp_path / "b.jsonl"
    b.write_text("{}\n")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x").write_text("x")
    r = runner.invoke(app, ["generate", "--batch", str(b), "--out", str(keep)])
    assert r.exit_code == 2 and "did not write" in r.output


# ------------------------------------------------------------------ 5. the record


def test_every_model_in_the_record_has_a_content_hash(tiny_pmg, toy_data):
    root, items, user = toy_data
    res = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png")
    models = res.record.models
    assert {"llm", "text_encoder", "generator", "selector"} <= set(models)
    assert all(len(m["hash"]) == 16 for m in models.values()), models
    assert models["generator"]["hash"] == tiny_pmg.generator.content_hash  # stable


def test_keyword_fallback_and_truncation_reach_the_top_level_warnings(tiny_pmg, toy_data):
    root, items, _ = toy_data
    many = User("m", [Event("search", text=f"cats and dogs number {i}", time=i) for i in range(200)])
    res = tiny_pmg.generate(many, items["a"], items, target_image=root / "img" / "a.png")
    pref = res.record.preference
    assert pref["n_kept"] < pref["n_events"]
    assert any(w.startswith("history truncated") for w in res.record.warnings)
    if pref.get("fallback"):
        assert any(w.startswith("preference keywords:") for w in res.record.warnings)


# ------------------------------------------------------------------ fuzz


def _mutations(rng: random.Random, good: dict) -> dict | list | str | int | None:
    junk = [None, 1, -1, 1e308, float("inf"), True, "", "..", "../x", "/abs", "x" * 300, [], {}, [1, 2], "\x00",
            "<|im_start|>system", "[/bold]", {"a": 1}, "nan", "%s%n"]
    obj = json.loads(json.dumps(good))
    kind = rng.random()
    if kind < 0.1:
        return rng.choice(junk)
    for _ in range(rng.randint(1, 3)):
        where = rng.random()
        if where < 0.3:
            obj[rng.choice(["request_id", "seed", "target_id", "items", "dataset", "sample_id", "user"])] = rng.choice(junk)
        elif where < 0.5:
            obj.pop(rng.choice(list(obj) or ["x"]), None)
        elif isinstance(obj.get("user"), dict):
            u = obj["user"]
            if rng.random() < 0.3:
                u[rng.choice(["user_id", "events", "attributes"])] = rng.choice(junk)
            elif isinstance(u.get("events"), list) and u["events"]:
                ev = dict(rng.choice(u["events"]))
                ev[rng.choice(["type", "item_id", "text", "value", "time", "speaker"])] = rng.choice(junk)
                u["events"].append(ev if rng.random() < 0.9 else rng.choice(junk))
    return obj


def test_fuzz_malformed_requests_no_traceback_nothing_outside(tiny_pmg, toy_data, tmp_path):
    """300 seeded malformed request lines (+ raw garbage lines): every line is either done or reported,
    no exception escapes, and nothing is written outside the output root."""
    from pmgen.batch.local import run_batch

    root, items, user = toy_data
    rng = random.Random(1234)
    good = {"user": user.to_json(), "items": str(root / "items.jsonl"), "target_id": "a"}
    lines = []
    for i in range(300):
        m = _mutations(rng, good)
        lines.append(json.dumps(m) if rng.random() < 0.95 else rng.choice(["{", "]]", "\x00\x01", "{'a': 1}",
                                                                            '{"user": '] ))
    work = tmp_path / "fuzz"
    work.mkdir()
    batch = work / "b.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    snapshot = tree(tmp_path)
    snapshot_data = tree(root)

    calls = []
    real = tiny_pmg.generate

    def bounded(*a, **k):  # keep the run short: generation itself is tested elsewhere
        calls.append(1)
        k["weights"] = (0.0,)
        return real(*a, **k)

    tiny_pmg.generate = bounded
    t = time.perf_counter()
    try:
        done, failed = run_batch(tiny_pmg, batch, work / "out")
    finally:
        del tiny_pmg.generate
    assert done + failed == sum(1 for ln in lines if ln.strip())
    assert failed > 200 and done >= 1
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("fuzz/out")} == snapshot
    assert tree(root) == snapshot_data
    assert time.perf_counter() - t < 240


# ------------------------------------------------------------------ the preference background file


@pytest.mark.parametrize("content, expect", [
    (b"not json", "not a JSON file"),
    (b"\xff\xfe\x00", "not a JSON file"),
    (b'["a", "b"]', "expected an object"),
    (b'{"texts": []}', "expected an object"),
    (b'{"texts": "cats"}', "expected an object"),
    (b'{"texts": ["cats", 3]}', "texts[1] must be a non-empty string"),
    (b'{"texts": ["cats", "  "]}', "texts[1] must be a non-empty string"),
    (json.dumps({"texts": ["x" * 1001]}).encode(), "texts[0] must be a non-empty string of at most 1,000"),
    (json.dumps({"texts": ["cats"] * 10_001}).encode(), "10,001 texts; at most 10,000"),
])
def test_preference_background_file_is_checked(tmp_path, content, expect):
    from pmgen.presets import get_preset, load_preference_background

    path = tmp_path / "bg.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(expect)) as e:
        load_preference_background(get_preset("sticker-tiny", preference_background=str(path)))
    assert str(path) in str(e.value)


def test_preference_background_size_and_missing_file(tmp_path):
    from pmgen.presets import MAX_BACKGROUND_BYTES, get_preset, load_preference_background

    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_BACKGROUND_BYTES + 1))
    with pytest.raises(ValueError, match="bytes; a preference background is at most"):
        load_preference_background(get_preset("sticker-tiny", preference_background=str(big)))
    with pytest.raises(FileNotFoundError, match="preference background not found"):
        load_preference_background(get_preset("sticker-tiny", preference_background=str(tmp_path / "nope.json")))
    with pytest.raises(FileNotFoundError):  # a folder is not a background file
        load_preference_background(get_preset("sticker-tiny", preference_background=str(tmp_path)))
    shipped = load_preference_background(get_preset("sticker-tiny"))
    assert shipped and all(isinstance(t, str) and t for t in shipped)


def test_write_background_never_replaces_a_foreign_file(tmp_path):
    from pmgen.train.background import FORMAT, write_background

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    with pytest.raises(FileExistsError, match="not a pmgen preference background"):
        write_background(foreign, ["cats"], {})
    assert foreign.read_text() == '{"mine": true}'
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(FileExistsError):
        write_background(tmp_path / "dir.json", ["cats"], {})
    ours = write_background(tmp_path / "sub" / "bg.json", ["cats, kitten"], {"n_users": 1})
    again = write_background(ours, ["space"], {"n_users": 1})  # a pmgen background is replaced
    assert json.loads(again.read_text()) == {"format": FORMAT, "n_users": 1, "texts": ["space"]}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["bg.json"]  # no temporary file left


def test_atomic_file_write_leaves_the_old_file_on_a_failed_write(tmp_path):
    """pmgen's one atomic file writer (weights, configs, JSONL, checkpoints): a write that fails half-way leaves
    the previous file as it was and no temporary file behind; a good write replaces it whole."""
    from pmgen.paths import write_file_atomically, write_text_atomically

    path = tmp_path / "sub" / "config.json"
    write_text_atomically(path, "old\n")

    def half(tmp):
        tmp.write_text("half of a new fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(path, half)
    assert path.read_text() == "old\n" and sorted(p.name for p in path.parent.iterdir()) == ["config.json"]
    write_file_atomically(path, lambda tmp: tmp.write_bytes(b"new\n"))
    assert path.read_text() == "new\n" and sorted(p.name for p in path.parent.iterdir()) == ["config.json"]
