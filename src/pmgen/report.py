"""Human-readable outputs: per-request HTML reports and side-by-side pictures.

Every report and picture built from sticker images carries the OpenMoji credit (CC BY-SA 4.0).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from pmgen.types import GenerationRecord

CREDIT = "Sticker images: OpenMoji (https://openmoji.org), CC BY-SA 4.0. Generated with pmgen."

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px} h2{font-size:16px;margin-top:24px}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;text-align:center;font-size:12px;width:140px}
.card img{width:128px;height:128px;image-rendering:pixelated;background:#fff}
.chosen{border:3px solid #2a9d4b}
.kw{display:inline-block;background:#eef;border-radius:10px;padding:2px 8px;margin:2px;font-size:13px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
.small{color:#777;font-size:12px}
"""


def _kw(words: Sequence[str]) -> str:
    return "".join(f'<span class="kw">{html.escape(w)}</span>' for w in words) or "<i>none</i>"


def write_request_report(folder: Path, record: GenerationRecord, history_images: Sequence[Path] = (),
                         target_image: Path | None = None, max_history: int = 12) -> Path:
    """Write ``folder/report.html`` for one generation record, with small PNG copies (at most 256 px a side)
    of the history and target images it shows (inputs are never copied whole)."""
    from pmgen.data.images import save_thumbnail

    folder = Path(folder)
    hist_html = []
    if history_images:
        (folder / "history").mkdir(exist_ok=True)
        for i, p in enumerate(list(history_images)[:max_history]):
            name = f"history/{i:02d}.png"
            save_thumbnail(p, folder / name)
            hist_html.append(f'<div class="card"><img src="{name}"></div>')
    target_html = ""
    if target_image is not None and Path(target_image).is_file():
        save_thumbnail(target_image, folder / "target.png")
        target_html = '<div class="card"><img src="target.png"><br>target item</div>'
    cands = []
    rows = []
    for i, c in enumerate(record.candidates):
        chosen = i == record.chosen
        label = "baseline (w = 0)" if c.weight == 0 else f"w = {c.weight:g}"
        if c.start is not None:  # redrawn from a retrieved catalog exemplar: say which (user-visible text, escaped)
            label += f", from {html.escape(str(c.start_title or c.start))}"
        cands.append(f'<div class="{"card chosen" if chosen else "card"}"><img src="{html.escape(c.image or "")}">'
                     f'<br>{label}<br>d_t {c.d_t:.3f} · d_p {c.d_p:.3f}<br>z {c.z:.3f}'
                     f'{" ✔ chosen" if chosen else ""}</div>')
        rows.append(f"<tr><td>{c.weight:g}</td><td>{c.d_t:.4f}</td><td>{c.d_p:.4f}</td>"
                    f"<td>{c.z:.4f}</td><td>{'✔' if chosen else ''}</td></tr>")
    notes = [] if record.personalized else [f"Not personalized: {html.escape(record.reason)}"]
    notes += [html.escape(w) for w in record.warnings]
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in record.timings_s.items())
    models = ", ".join(f"{k}: {v['name']} ({v['hash'][:8] or '-'})" for k, v in record.models.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pmgen: {html.escape(record.user_id)}
→ {html.escape(record.target_title)}</title><style>{_CSS}</style></head><body>
<h1>pmgen · user <code>{html.escape(record.user_id)}</code> · target
<code>{html.escape(record.target_title)}</code></h1>
{''.join(f'<p class="small">⚠ {n}</p>' for n in notes)}
<h2>History images (newest first)</h2><div class="row">{''.join(hist_html) or '<i>none</i>'}</div>
<h2>Preference keywords</h2><p>{_kw(record.preference_keywords)}</p>
<h2>Target keywords</h2><p>{_kw(record.target_keywords)}</p>
<h2>Candidates (same seed; chosen = argmax z, α = {record.alpha:.3g}, mode {html.escape(record.mode)})</h2>
<div class="row">{target_html}{''.join(cands)}</div>
<table><tr><th>weight</th><th>d_t</th><th>d_p</th><th>z</th><th>chosen</th></tr>{''.join(rows)}</table>
<p class="small">soft embeddings: {html.escape(record.soft_embeddings)} · seed {record.seed} ·
strength {record.strength} · preset {html.escape(record.preset)}<br>models: {html.escape(models)}<br>
timings: {timings}</p>
<p class="small">{CREDIT}</p></body></html>
"""
    out = folder / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def side_by_side(columns: Sequence[dict[str, Any]], out: Path, title: str = "", cell: int = 128) -> Path:
    """One picture: a column per entry ``{"image": PIL/Path, "caption": str, "lines": [str], "history": [Path]}``.

    Each column shows an optional strip of history thumbnails, the main image and its caption lines,
    and optionally a second image below (``"below": {"image", "caption", "lines"}``, e.g. the same
    request without one of the conditions).
    """
    from PIL import Image, ImageDraw, ImageFont

    pad = 10
    thumb = cell // 4
    hist_rows = max((len(c.get("history", [])) + 3) // 4 for c in columns) if columns else 0
    max_lines = max((len(c.get("lines", [])) for c in columns), default=0)
    font = ImageFont.load_default(size=12)
    bold = ImageFont.load_default(size=14)
    col_w = cell + 2 * pad
    top = 34 if title else 8
    below_lines = max((len(c["below"].get("lines", [])) for c in columns if c.get("below")), default=-1)
    below_h = 0 if below_lines < 0 else 8 + cell + 22 + 15 * below_lines
    h = top + hist_rows * thumb + (6 if hist_rows else 0) + cell + 22 + 15 * max_lines + below_h + 24
    sheet = Image.new("RGB", (col_w * len(columns), h), "white")
    d = ImageDraw.Draw(sheet)
    if title:
        d.text((pad, 8), title, fill="black", font=ImageFont.load_default(size=16))
    for j, c in enumerate(columns):
        x0 = j * col_w + pad
        y = top
        for k, hp in enumerate(c.get("history", [])[: hist_rows * 4]):
            with Image.open(hp) as im:
                sheet.paste(im.convert("RGB").resize((thumb, thumb)), (x0 + (k % 4) * thumb, y + (k // 4) * thumb))
        y += hist_rows * thumb + (6 if hist_rows else 0)
        for k, entry in enumerate((c, c.get("below"))):
            if not entry:
                continue
            if k == 1:  # the second image starts below every column's caption lines
                y = top + hist_rows * thumb + (6 if hist_rows else 0) + cell + 22 + 15 * max_lines + 8
            im = Image.open(entry["image"]) if isinstance(entry["image"], (str, Path)) else entry["image"]
            sheet.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x0, y))
            if entry.get("highlight"):
                d.rectangle((x0 - 2, y - 2, x0 + cell + 1, y + cell + 1), outline=(42, 157, 75), width=2)
            y += cell + 4
            d.text((x0, y), entry.get("caption", "")[:22], fill="black", font=bold)
            y += 18
            for line in entry.get("lines", []):
                d.text((x0, y), line[:24], fill=(70, 70, 70), font=font)
                y += 15
    d.text((pad, h - 16), CREDIT, fill=(130, 130, 130), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
