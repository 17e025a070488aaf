"""Retrieval: catalog exemplars that already hold the target and the user's taste (PMG's future work).

Every catalog image is embedded once by the selector (:class:`ExemplarIndex`, cached on disk per
selector and catalog). For a request, each item is scored like a candidate would be
(:mod:`pmgen.stages.select`)::

    r_t(i) = s(e_i · t)        r_p(i) = s(e_i · p)        score(i) = α·log r_p(i) + (1 − α)·log r_t(i)

with ``t`` the selector's embedding of the target text and ``p`` the user's preference vector
(:func:`pmgen.stages.select.preference_vector`: history names, keywords, background), ``s(c) = (1 + c)/2``.
Items that do not keep enough of the target (``r_t`` below ``min_target`` times the target image's
own) and the target itself are left out; the best ``k`` are the exemplars. Each exemplar is then an
extra **start** for generation — inverted into the generator's noise and redrawn under the target +
preference condition (:meth:`pmgen.pipeline.PMG.render`) — never pasted: what is judged is what the
generator drew, and the record names the item each candidate started from.

One matrix product per request: 100,000 items × 256 dimensions answer in a few milliseconds on a
2-core CPU (``pmgen bench --retrieval``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from pmgen.settings import MAX_EXEMPLARS  # noqa: F401  (re-exported)
from pmgen.stages.select import to_unit, z_score

log = logging.getLogger(__name__)
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Exemplar:
    """One retrieved item: its id and title, and its scores (``r_t``, ``r_p`` in (0, 1], ``score``)."""

    item_id: str
    title: str
    r_t: float
    r_p: float
    score: float


class ExemplarIndex:
    """Unit image embeddings ``[N, E]`` of a catalog's items under one selector.

    Args:
        ids: item ids, one per row.
        titles: their titles (recorded with the exemplars).
        embeddings: float ``[N, E]``, the selector's image embeddings of the items' images.
        selector_hash: the selector's content hash (an index is only valid with that selector).
    """

    def __init__(self, ids: Sequence[str], titles: Sequence[str], embeddings: torch.Tensor, selector_hash: str = ""):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids) or len(ids) != len(titles):
            raise ValueError(f"embeddings must be [len(ids), E], got {list(embeddings.shape)} for {len(ids)} ids")
        self.ids, self.titles = list(ids), list(titles)
        self.embeddings = embeddings.float().contiguous()
        self.selector_hash = selector_hash
        self.row = {iid: k for k, iid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, selector: Any, items: Mapping[str, Any], image_of: Callable[[str], Any],
              batch_size: int = 256, cache_dir: Path | None = None) -> "ExemplarIndex":
        """Embed every item that has an image (``image_of(item_id)`` → ``[1, 3, H, W]`` in [0, 1] or ``None``).

        With ``cache_dir`` the index is kept in ``cache_dir/exemplars-<key>.pt``, the key hashing the
        selector's content hash and the catalog's ids, titles and image paths (rebuilt when either changes).
        """
        ids = [i for i in items if getattr(items[i], "image", None)]
        key = hashlib.sha256("\n".join([str(getattr(selector, "content_hash", "")), str(INDEX_FORMAT)]
                                       + [f"{i}\t{items[i].title}\t{items[i].image}" for i in ids]).encode()
                             ).hexdigest()[:20]
        path = Path(cache_dir) / f"exemplars-{key}.pt" if cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved["catalog"] == ids:
                    kept = saved["ids"]
                    return cls(kept, [items[i].title for i in kept], saved["embeddings"], saved["selector_hash"])
            except Exception as e:  # noqa: BLE001 — a damaged or foreign cache file is rebuilt, never trusted
                log.warning("exemplar index cache %s unreadable (%s): rebuilding", path, e)
        kept, rows = [], []
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                chunk = [(i, image_of(i)) for i in ids[start:start + batch_size]]
                chunk = [(i, im) for i, im in chunk if im is not None]
                if chunk:
                    rows.append(selector.image_embeddings(torch.cat([im for _, im in chunk])).float())
                    kept += [i for i, _ in chunk]
        emb = torch.cat(rows) if rows else torch.zeros(0, 1)
        index = cls(kept, [items[i].title for i in kept], emb, str(getattr(selector, "content_hash", "")))
        if path is not None:
            from pmgen.paths import write_file_atomically

            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(path, lambda tmp: torch.save(
                {"catalog": ids, "ids": kept, "embeddings": emb, "selector_hash": index.selector_hash}, tmp))
        return index

    def search(self, target: torch.Tensor, preference: torch.Tensor, k: int, alpha: float,
               exclude: Sequence[str] = (), min_target: float = 0.0, target_item: str | None = None
               ) -> list[Exemplar]:
        """The ``k`` best exemplars for target embedding ``target`` ``[E]`` and preference vector
        ``preference`` ``[E]`` (see the module docstring).

        ``min_target`` in [0, 1]: an item is kept only if ``r_t ≥ min_target · r_t(target_item)`` (the
        target's own image, when it is in the index; 0 = no floor). ``exclude``: ids never returned
        (the target is always excluded).
        """
        if not 1 <= k <= MAX_EXEMPLARS:
            raise ValueError(f"k (exemplars) must be in 1..{MAX_EXEMPLARS}, got {k}")
        if not 0.0 <= min_target <= 1.0:
            raise ValueError(f"min_target must be in [0, 1], got {min_target}")
        if len(self) == 0:
            return []
        emb = self.embeddings
        sims = emb @ torch.stack([target.float(), preference.float()]).T.to(emb.dtype)  # [N, 2]
        r_t, r_p = to_unit(sims[:, 0]), to_unit(sims[:, 1])
        score = z_score(r_t, r_p, alpha)
        banned = {target_item, *exclude} - {None}
        for iid in banned:
            if iid in self.row:
                score[self.row[iid]] = float("-inf")
        if min_target > 0 and target_item in self.row:
            score[r_t < min_target * r_t[self.row[target_item]]] = float("-inf")
        top = torch.topk(score, min(k, len(self))).indices.tolist()
        return [Exemplar(self.ids[j], self.titles[j], float(r_t[j]), float(r_p[j]), float(score[j]))
                for j in top if score[j] > float("-inf")]
