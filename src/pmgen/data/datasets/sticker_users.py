"""``sticker-users``: synthetic chat users with hidden sticker tastes, histories and conversational targets.

Each user has one hidden taste (cats, hearts, space, …; ``attributes.taste`` and
``attributes.taste_description`` — never shown to a model). Their history is stickers they sent
(``social``/``send`` events, mostly from their taste, some generic faces and hands), a few searches
and a few chat turns taken from the chatterbot-corpus. Each sample is a short conversation whose last
user turn asks for an emotion or action sticker ("hahaha I can't stop laughing" → *face with tears
of joy*, the target item). Where the catalog holds a sticker that matches both the target and the
user's taste (laughing + cats → *cat with tears of joy*) the sample records it as
``ground_truth_personalized``; those items are kept out of that user's history.

Splits are user-disjoint (80/10/10) with a fixed seed; the items are the ``stickers`` dataset's
(``dataset.json`` points to ``../stickers``).

``seed`` 0 gives the users every shipped model was trained, tuned and tested on. Another seed draws a
new population from the same recipe in its own folder (``sticker-users-seed{N}``, :func:`folder_name`):
users no pmgen model or setting has seen, for a fresh held-out test (``pmgen evaluate --users-seed N``).
Their user ids repeat seed 0's (``su0000`` …): nothing is cached by user id (keyword records are keyed
by the verbalized history).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmgen.data.datasets.base import build_atomically, is_built, user_disjoint_splits
from pmgen.data.schema import Event, Item, Sample, User, write_jsonl
from pmgen.data.validate import load_dataset

VERSION = 2


@dataclass(frozen=True)
class Taste:
    """A hidden taste: which catalog items belong to it and how the user searches for them."""

    name: str
    description: str
    title_re: str = r"$^"  # matches nothing by default
    subgroups: tuple[str, ...] = ()
    exclude_re: str = r"$^"
    searches: tuple[str, ...] = ()

    def matches(self, item: Item) -> bool:
        title = item.title.lower()
        if re.search(self.exclude_re, title):
            return False
        return item.attributes.get("subgroup") in self.subgroups or re.search(self.title_re, title) is not None


TASTES: tuple[Taste, ...] = (
    Taste("cats", "loves cats and kittens, sends cat stickers all the time",
          r"\bcats?\b|kitten|lion|tiger|leopard", ("cat-face",), r"catalog|cattle|scat",
          ("cat stickers", "cute kitten", "funny cat")),
    Taste("dogs", "a dog person: puppies, dogs and paw prints",
          r"\bdogs?\b|poodle|wolf|paw prints|\bfox\b", (), r"hot dog",
          ("dog stickers", "puppy", "good boy")),
    Taste("hearts", "romantic, sends hearts, kisses and roses",
          r"heart|kiss mark|love letter|\brose\b|cupid", ("heart",), r"anatomical|suit|heart hands|couple",
          ("heart stickers", "love", "cute hearts")),
    Taste("food", "a foodie who loves fruit, snacks, sweets and dishes", r"$^",
          ("food-fruit", "food-vegetable", "food-prepared", "food-asian", "food-sweet"), r"$^",
          ("food stickers", "yummy", "dessert")),
    Taste("space", "fascinated by space: rockets, planets, moons, stars and aliens",
          r"rocket|planet|\bstars?\b|comet|moon|alien|flying saucer|satellite|astronaut|telescope|milky way",
          (), r"moon cake|moon viewing|star of david|star-struck",
          ("space stickers", "rocket", "planets")),
    Taste("sports", "sporty: ball games, athletes, medals and trophies", r"trophy|medal",
          ("sport", "person-sport"), r"$^", ("sports stickers", "football", "workout")),
    Taste("plants", "a gardener who loves flowers, trees and green plants", r"clover|shamrock|herb",
          ("plant-flower", "plant-other"), r"$^", ("flower stickers", "plants", "garden")),
    Taste("ocean", "loves the sea: fish, whales, dolphins, waves and boats", r"water wave|sailboat|\bshell\b",
          ("animal-marine",), r"$^", ("ocean stickers", "sea animals", "beach")),
    Taste("music", "a musician: instruments, notes, singers and dancers",
          r"singer|dancer|dancing|headphone|microphone|musical", ("music", "musical-instrument"), r"$^",
          ("music stickers", "guitar", "party music")),
    Taste("weather", "watches the sky: sun, clouds, rain, snow and rainbows", r"$^", ("sky-weather",),
          r"moon|star|comet|ringed planet|milky way", ("weather stickers", "sunny day", "rain")),
    Taste("spooky", "into spooky things: ghosts, skulls, bats and monsters",
          r"ghost|skull|jack-o-lantern|vampire|zombie|\bbat\b|spider|\bogre\b|goblin|alien monster|mage|witch",
          (), r"$^", ("spooky stickers", "halloween", "ghost")),
    Taste("vehicles", "a vehicle fan: cars, trains, planes and bikes", r"$^",
          ("transport-ground", "transport-air"), r"sign|station|stop|light|track|fuel|tire|\bwheel\b",
          ("car stickers", "trains", "airplane")),
)


@dataclass(frozen=True)
class Target:
    """A conversational target: the emotion/action sticker a chat turn calls for."""

    key: str
    item_title: str  # the non-personalized sticker
    openers: tuple[str, ...]  # what the friend says
    replies: tuple[str, ...]  # what the user answers (the target is derived from this turn)
    personalized: dict[str, str]  # taste -> title of the sticker matching target and taste


TARGETS: tuple[Target, ...] = (
    Target("laughing", "face with tears of joy",
           ("my cat just fell off the sofa trying to catch a fly", "did you see that video I sent?"),
           ("hahaha I can't stop laughing", "lol that's hilarious", "omg I'm crying laughing"),
           {"cats": "cat with tears of joy"}),
    Target("happy", "grinning face",
           ("I passed the exam!", "we're meeting tomorrow, right?"),
           ("yay that makes me so happy", "great news, big smile here", "awesome, so happy right now"),
           {"cats": "grinning cat", "weather": "sun with face"}),
    Target("love", "smiling face with heart-eyes",
           ("look at this photo of the puppy I adopted", "I made you a birthday card"),
           ("I love it so much", "aww this is adorable, I adore it", "this is lovely, love love love"),
           {"cats": "smiling cat with heart-eyes", "hearts": "heart with arrow"}),
    Target("kiss", "face blowing a kiss",
           ("good night, talk tomorrow", "thanks for the flowers"),
           ("sending you a kiss", "kisses!", "mwah, a big kiss"),
           {"cats": "kissing cat", "hearts": "kiss mark"}),
    Target("sad", "crying face",
           ("the concert got cancelled", "I have to move away next month"),
           ("that's so sad, I'm crying", "noo I'm really sad now", "this makes me want to cry"),
           {"cats": "crying cat", "hearts": "broken heart", "plants": "wilted flower", "weather": "cloud with rain"}),
    Target("angry", "enraged face",
           ("they cancelled your order again", "someone ate your lunch from the fridge"),
           ("I'm so angry right now", "this makes me furious", "ugh I'm mad"),
           {"cats": "pouting cat", "weather": "cloud with lightning"}),
    Target("shocked", "face screaming in fear",
           ("the price doubled overnight", "there's a huge spider in the bathroom"),
           ("what?! I'm shocked", "omg no way, I'm terrified", "aaah that's scary"),
           {"cats": "weary cat", "spooky": "ghost"}),
    Target("sleepy", "sleeping face",
           ("are you still awake?", "the movie ends at 2am"),
           ("I'm so sleepy, going to bed", "good night, time to sleep", "can't keep my eyes open, sleeping now"),
           {"space": "crescent moon", "weather": "crescent moon"}),
    Target("celebrate", "partying face",
           ("I got the job!", "it's my birthday today"),
           ("let's celebrate!", "congratulations, party time!", "woohoo we have to celebrate"),
           {"sports": "trophy", "food": "birthday cake", "hearts": "heart with ribbon", "music": "musical notes"}),
    Target("hungry", "face savoring food",
           ("dinner is almost ready", "want to grab lunch?"),
           ("yes I'm starving", "so hungry, yum", "mmm I could eat a horse"),
           {"food": "pot of food"}),
    Target("cold", "cold face",
           ("it's snowing outside", "the heating is broken"),
           ("brr I'm freezing", "it's so cold", "I'm frozen solid"),
           {"weather": "snowman"}),
    Target("hot", "hot face",
           ("it's 38 degrees today", "the sauna is ready"),
           ("I'm melting, so hot", "this heat is too much", "it's boiling hot"),
           {"weather": "sun", "food": "hot pepper"}),
    Target("lets_go", "person running",
           ("the trip starts tomorrow morning", "are you ready to leave?"),
           ("let's go!", "on my way, running", "ready, let's gooo"),
           {"space": "rocket", "vehicles": "racing car", "ocean": "sailboat", "sports": "person running"}),
    Target("dance", "woman dancing",
           ("they're playing our song", "the party is starting"),
           ("let's dance!", "time to dance all night", "dancing already"),
           {"music": "man dancing"}),
    Target("thinking", "thinking face",
           ("which one should I buy?", "any idea what we should do this weekend?"),
           ("hmm let me think", "good question, thinking about it", "not sure, need to think"),
           {}),
    Target("hello", "waving hand",
           ("hey, long time no see", "hi there!"),
           ("hello!", "hi hi, waving at you", "hey, hello there"),
           {}),
    Target("luck", "crossed fingers",
           ("my interview is in an hour", "the results come out today"),
           ("good luck!!", "fingers crossed for you", "wishing you luck"),
           {"plants": "four leaf clover"}),
    Target("cool", "smiling face with sunglasses",
           ("I fixed the bike myself", "I got front row tickets"),
           ("that's so cool", "cool, nice one", "wow, very cool"),
           {"space": "alien", "ocean": "dolphin"}),
)

GENERIC_SUBGROUPS = ("face-smiling", "face-affection", "face-tongue", "face-hand", "face-neutral-skeptical",
                     "hand-fingers-open", "hand-fingers-closed", "hands")


def taste_by_name(name: str) -> Taste:
    for t in TASTES:
        if t.name == name:
            return t
    raise KeyError(f"unknown taste {name!r} (known: {', '.join(t.name for t in TASTES)})")


def _chat_lines(seed: int) -> list[str]:
    """Short user-side lines from the chatterbot-corpus English dialogs (the conversations dataset)."""
    from pmgen.data.datasets.conversations import read_corpus

    lines = []
    for dialog in read_corpus():
        for t in dialog["turns"][:1]:
            if 3 <= len(t.split()) <= 14 and "?" in t:
                lines.append(t)
    random.Random(seed).shuffle(lines)
    return lines


MAX_SEED = 2**31 - 1


def folder_name(seed: int = 0) -> str:
    """The folder of the users drawn with ``seed``: ``sticker-users`` (0) or ``sticker-users-seed{N}``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"sticker-users seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return "sticker-users" if seed == 0 else f"sticker-users-seed{seed}"


def build(data_root: Path, force: bool = False, n_users: int = 1000, samples_per_user: int = 3,
          seed: int = 0) -> Path:
    """Build ``sticker-users`` under ``data_root`` (needs the ``stickers`` dataset, built if missing);
    ``seed`` ≠ 0 draws a new population into ``sticker-users-seed{N}`` (:func:`folder_name`)."""
    from pmgen.data.datasets import stickers

    folder = data_root / folder_name(seed)
    params = {"n_users": n_users, "samples_per_user": samples_per_user, "seed": seed}
    if not force and is_built(folder, VERSION, params):
        return folder
    catalog = load_dataset(stickers.build(data_root), name="stickers")

    def write(tmp: Path) -> dict[str, Any]:
        rng = random.Random(seed)
        base = [it for it in catalog.items.values() if not it.attributes.get("skintone")]
        by_title: dict[str, str] = {}
        for it in base:
            by_title.setdefault(it.title, it.id)
        missing = sorted({t for tg in TARGETS for t in [tg.item_title, *tg.personalized.values()]} - set(by_title))
        if missing:
            raise RuntimeError(f"sticker catalog lacks target stickers: {missing}")
        pools = {t.name: [it.id for it in base if t.matches(it)] for t in TASTES}
        generic = [it.id for it in base if it.attributes.get("subgroup") in GENERIC_SUBGROUPS]
        chat = _chat_lines(seed)
        user_ids = [f"su{i:04d}" for i in range(n_users)]
        splits = user_disjoint_splits(user_ids, seed)
        taste_names = [TASTES[i % len(TASTES)].name for i in range(n_users)]
        rng.shuffle(taste_names)
        users: list[User] = []
        samples: list[Sample] = []
        n_gt = 0
        for uid, taste_name in zip(user_ids, taste_names):
            taste = taste_by_name(taste_name)
            with_gt = [tg for tg in TARGETS if taste.name in tg.personalized]
            chosen: list[Target] = []
            while len(chosen) < samples_per_user:
                pool = with_gt if (with_gt and rng.random() < 0.6) else list(TARGETS)
                tg = rng.choice(pool)
                if tg not in chosen:
                    chosen.append(tg)
            gt_ids = {by_title[tg.personalized[taste.name]] for tg in chosen if taste.name in tg.personalized}
            # history: stickers sent (taste-heavy), a couple of searches, a few chat lines; oldest first
            n_events = rng.randint(8, 20)
            taste_pool = [i for i in pools[taste.name] if i not in gt_ids]
            events: list[Event] = []
            t = float(rng.randint(1_700_000_000, 1_710_000_000))
            for _ in range(n_events):
                t += rng.randint(60, 86_400)
                r = rng.random()
                if r < 0.62:
                    events.append(Event("social", item_id=rng.choice(taste_pool), value="send", time=t))
                elif r < 0.80:
                    events.append(Event("social", item_id=rng.choice(generic), value="send", time=t))
                elif r < 0.88:
                    events.append(Event("search", text=rng.choice(taste.searches), time=t))
                elif r < 0.94:
                    events.append(Event("click", item_id=rng.choice(taste_pool), time=t))
                else:
                    events.append(Event("conversation", speaker="user", text=rng.choice(chat), time=t))
            n_taste_sent = sum(e.type == "social" and e.item_id in taste_pool for e in events)
            if n_taste_sent < 5:  # every user sends at least 5 stickers of their taste
                for _ in range(5 - n_taste_sent):
                    t += rng.randint(60, 3600)
                    events.append(Event("social", item_id=rng.choice(taste_pool), value="send", time=t))
            users.append(User(uid, events, {"taste": taste.name, "taste_description": taste.description,
                                            "split": splits[uid]}))
            for k, tg in enumerate(chosen):
                gt_title = tg.personalized.get(taste.name)
                gt = by_title[gt_title] if gt_title else None
                n_gt += gt is not None
                ctx = [Event("conversation", speaker="friend", text=rng.choice(tg.openers), time=t + 10 * k + 1),
                       Event("conversation", speaker="user", text=rng.choice(tg.replies), time=t + 10 * k + 2)]
                samples.append(Sample(sample_id=f"{uid}-{k}", user_id=uid, target_id=by_title[tg.item_title],
                                      split=splits[uid], context=ctx, ground_truth_personalized=gt,
                                      attributes={"target_key": tg.key}))
        write_jsonl(tmp / "users.jsonl", users)
        write_jsonl(tmp / "samples.jsonl", samples)
        split_counts = {s: sum(1 for u in users if u.attributes["split"] == s) for s in ("train", "val", "test")}
        return {
            "description": "synthetic chat users with hidden sticker tastes and conversational targets",
            "items": "../stickers",
            "license": stickers.CREDIT + " Chat lines from chatterbot-corpus (BSD-3-Clause).",
            "seed": seed,
            "tastes": [t.name for t in TASTES],
            "targets": [t.key for t in TARGETS],
            "taste_pool_sizes": {k: len(v) for k, v in pools.items()},
            "counts": {"users": len(users), "samples": len(samples),
                       "samples_with_ground_truth": n_gt, "users_per_split": split_counts},
        }

    return build_atomically(folder, write, VERSION, params)
