"""``conversations``: the chatterbot-corpus English dialogs as ``conversation`` events.

Each dialog becomes one pseudo-user whose events alternate ``speaker: "user"`` / ``"bot"``;
``attributes.category`` names the corpus file (emotion, food, sports, …). Source: the PyPI package
``chatterbot-corpus`` (BSD-3-Clause), read from its YAML files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pmgen.data.datasets.base import build_atomically, is_built
from pmgen.data.schema import Event, User, write_jsonl
from pmgen.paths import package_dir

VERSION = 1
CREDIT = "Dialogs: chatterbot-corpus (https://github.com/gunthercox/chatterbot-corpus), BSD-3-Clause."


def corpus_dir() -> Path:
    path = package_dir("chatterbot_corpus") / "data" / "english"
    if not path.is_dir():
        raise FileNotFoundError(f"chatterbot-corpus English data not found at {path}; reinstall `chatterbot-corpus`")
    return path


def read_corpus() -> list[dict[str, Any]]:
    """Every English dialog: ``{"category", "turns": [str, ...]}`` in file order."""
    import yaml

    dialogs = []
    for f in sorted(corpus_dir().glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                dialogs.append({"category": f.stem, "turns": turns})
    return dialogs


def build(data_root: Path, force: bool = False) -> Path:
    folder = data_root / "conversations"
    if not force and is_built(folder, VERSION):
        return folder

    def write(tmp: Path) -> dict[str, Any]:
        dialogs = read_corpus()
        users = []
        for i, d in enumerate(dialogs):
            events = [Event("conversation", speaker="user" if j % 2 == 0 else "bot", text=t, time=float(j))
                      for j, t in enumerate(d["turns"])]
            users.append(User(f"{d['category']}-{i:04d}", events, {"category": d["category"]}))
        write_jsonl(tmp / "users.jsonl", users)
        cats: dict[str, int] = {}
        for d in dialogs:
            cats[d["category"]] = cats.get(d["category"], 0) + 1
        return {"description": "chatterbot-corpus English dialogs as conversation events",
                "license": CREDIT,
                "counts": {"dialogs": len(users), "turns": sum(len(d["turns"]) for d in dialogs)},
                "categories": cats}

    return build_atomically(folder, write, VERSION)
