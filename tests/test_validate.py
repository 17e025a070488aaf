"""One test per kind of bad input; every problem names file, line, field and expectation."""

import json

import pytest
from PIL import Image

from pmgen.data.schema import DataError
from pmgen.data.validate import load_dataset
from pmgen.data.validate import validate_file, validate_folder

ITEM_LINES = [
    json.dumps({"id": "a", "title": "grinning face", "text": "happy"}),
    json.dumps({"id": "b", "title": "cat face"}),
]


def user(events, uid="u1"):
    return json.dumps({"user_id": uid, "events": events})


@pytest.fixture()
def folder(tmp_path, write_jsonl_lines):
    write_jsonl_lines("items.jsonl", ITEM_LINES)
    return tmp_path


def only_problem(report):
    assert len(report.problems) == 1, [str(p) for p in report.problems]
    return report.problems[0]


def test_valid_users_file_passes(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "click", "item_id": "a"},
                                                {"type": "rating", "item_id": "b", "value": 5}])])
    r = validate_file(p)
    assert r.ok and r.counts == {"users": 1}


def test_malformed_json(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "click", "item_id": "a"}]), '{"user_id": "u2", "events": [}'])
    prob = only_problem(validate_file(p))
    assert prob.line == 2 and "malformed JSON" in prob.message and "column" in prob.message
    assert str(prob).startswith(f"{p}:2")


def test_not_an_object(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", ["[1, 2]"])
    assert "expected a JSON object" in only_problem(validate_file(p)).message


def test_unknown_event_type(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "click", "item_id": "a"}, {"type": "clik", "item_id": "a"}])])
    prob = only_problem(validate_file(p))
    assert (prob.line, prob.field) == (1, "events[1].type")
    assert "unknown event type 'clik'" in prob.message and "click" in prob.message


def test_unknown_item_id(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "purchase", "item_id": "zzz"}])])
    prob = only_problem(validate_file(p))
    assert prob.field == "events[0].item_id" and "unknown item id 'zzz'" in prob.message


def test_event_missing_item_id(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "click"}])])
    assert "needs an 'item_id'" in only_problem(validate_file(p)).message


def test_missing_target(folder, write_jsonl_lines):
    write_jsonl_lines("users.jsonl", [user([{"type": "click", "item_id": "a"}])])
    p = write_jsonl_lines("samples.jsonl", [json.dumps({"sample_id": "s1", "user_id": "u1"})])
    prob = only_problem(validate_file(p))
    assert prob.field == "target_id" and "missing target" in prob.message


def test_unknown_target_and_user(folder, write_jsonl_lines):
    write_jsonl_lines("users.jsonl", [user([{"type": "click", "item_id": "a"}])])
    p = write_jsonl_lines("samples.jsonl", [json.dumps({"sample_id": "s1", "user_id": "nobody", "target_id": "q"})])
    msgs = sorted(pr.message for pr in validate_file(p).problems)
    assert any("unknown target item id 'q'" in m for m in msgs)
    assert any("unknown user id 'nobody'" in m for m in msgs)


def test_empty_history(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([])])
    prob = only_problem(validate_file(p))
    assert prob.field == "events" and "empty history" in prob.message


def test_rating_out_of_range(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "rating", "item_id": "a", "value": 7}])])
    prob = only_problem(validate_file(p))
    assert prob.field == "events[0].value" and "out of range" in prob.message and "1 to 5" in prob.message
    # a different scale is accepted when declared
    assert validate_file(p, rating_scale=(0, 10)).ok


def test_rating_not_a_number(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "rating", "item_id": "a", "value": "five"}])])
    assert "numeric 'value'" in only_problem(validate_file(p)).message


def test_non_utf8_bytes(folder, write_jsonl_lines):
    bad = b'{"user_id": "u\xff", "events": [{"type": "search", "text": "x"}]}'
    p = write_jsonl_lines("users.jsonl", [user([{"type": "search", "text": "ok"}], "u0"), bad])
    prob = only_problem(validate_file(p))
    assert prob.line == 2 and "not valid UTF-8" in prob.message and "0xff" in prob.message


def test_image_does_not_exist(tmp_path, write_jsonl_lines):
    p = write_jsonl_lines("items.jsonl", [json.dumps({"id": "a", "title": "x", "image": "img/missing.png"})])
    prob = only_problem(validate_file(p))
    assert prob.field == "image" and "does not exist" in prob.message


def test_image_not_an_image(tmp_path, write_jsonl_lines):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "fake.png").write_text("this is text, not a PNG")
    p = write_jsonl_lines("items.jsonl", [json.dumps({"id": "a", "title": "x", "image": "img/fake.png"})])
    assert "not a readable image" in only_problem(validate_file(p)).message


def test_image_path_escapes_folder(tmp_path, write_jsonl_lines):
    outside = tmp_path.parent / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    sub = tmp_path / "ds"
    sub.mkdir()
    p = sub / "items.jsonl"
    p.write_text(json.dumps({"id": "a", "title": "x", "image": "../outside.png"}) + "\n"
                 + json.dumps({"id": "b", "title": "y", "image": str(outside)}) + "\n")
    probs = validate_file(p).problems
    assert len(probs) == 2 and all("escapes the dataset folder" in pr.message for pr in probs)


def test_valid_image_passes(tmp_path, write_jsonl_lines):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "white").save(tmp_path / "img" / "ok.png")
    p = write_jsonl_lines("items.jsonl", [json.dumps({"id": "a", "title": "x", "image": "img/ok.png"})])
    assert validate_file(p).ok


def test_duplicate_ids(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [user([{"type": "search", "text": "a"}]), user([{"type": "search", "text": "b"}])])
    prob = only_problem(validate_file(p))
    assert prob.line == 2 and "duplicate user id 'u1' (first seen on line 1)" in prob.message


def test_every_problem_is_reported_not_just_the_first(folder, write_jsonl_lines):
    p = write_jsonl_lines("users.jsonl", [
        user([{"type": "clik", "item_id": "a"}], "u1"),
        "not json",
        user([{"type": "rating", "item_id": "a", "value": 0}], "u3"),
        user([{"type": "click", "item_id": "a"}], "u4"),
    ])
    r = validate_file(p)
    assert [pr.line for pr in r.problems] == [1, 2, 3]
    assert r.counts == {"users": 1}


def test_load_dataset_raises_dataerror_listing_problems(folder, write_jsonl_lines):
    write_jsonl_lines("users.jsonl", [user([{"type": "click", "item_id": "nope"}])])
    with pytest.raises(DataError) as exc:
        load_dataset(folder)
    assert len(exc.value.problems) == 1
    assert "users.jsonl:1 [events[0].item_id]: unknown item id 'nope'" in str(exc.value)


def test_load_valid_folder_keeps_every_record(folder, write_jsonl_lines):
    write_jsonl_lines("users.jsonl", [user([{"type": "click", "item_id": "a"}], f"u{i}") for i in range(5)])
    write_jsonl_lines("samples.jsonl", [json.dumps({"sample_id": f"s{i}", "user_id": f"u{i}", "target_id": "b",
                                                    "split": "test"}) for i in range(5)])
    ds = load_dataset(folder)
    assert len(ds.items) == 2 and len(ds.users) == 5 and len(ds.samples) == 5
    r = validate_folder(folder)
    assert r.ok and r.counts == {"items": 2, "users": 5, "samples": 5}


def test_unknown_file_kind(tmp_path, write_jsonl_lines):
    p = write_jsonl_lines("stuff.jsonl", ['{"foo": 1}'])
    assert "cannot tell" in only_problem(validate_file(p)).message
