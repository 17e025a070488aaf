"""How ``pmgen evaluate`` grades an image, with the **evaluator** scorer (never the selector).

Metrics of an image (the evaluator is trained independently of the selector; catalog images 64×64):

* accuracy — ``acc_text``: evaluator similarity to the target item's name; ``acc_image``: evaluator
  image similarity to the target item's image; ``lpips_target`` (ST-LPIPS AlexNet, ↓) and
  ``ssim_target`` to the target image;
* recognizability — ``target_top1`` / ``target_top5``: the target's name ranks first / in the top 5
  of 100 catalog names (its own and 99 others, fixed per sample) by evaluator similarity;
  ``taste_top1``: the user's hidden taste ranks first among the 12 taste descriptions; ``both``:
  ``target_top5`` and ``taste_top1`` at once — "the target, in this user's taste";
* personalization — ``pers_image``: mean evaluator image similarity to the user's history images;
  ``lpips_history`` (↓), ``ssim_history``, ``ms_ssim_history``: means over the history images;
  ``pers_taste``: evaluator similarity to the user's hidden taste description (never shown to any
  model); ``gt_hit``: the image's nearest catalog item (evaluator embedding) is the sample's
  recorded personalized ground truth (samples that have one).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from pmgen.data.images import load_image
from pmgen.data.schema import Dataset, Sample

HIGHER_IS_BETTER = {"acc_text": True, "acc_image": True, "lpips_target": False, "ssim_target": True,
                    "target_top1": True, "target_top5": True,
                    "pers_image": True, "lpips_history": False, "ssim_history": True, "ms_ssim_history": True,
                    "pers_taste": True, "taste_top1": True, "gt_hit": True, "both": True}
ACCURACY = ("acc_text", "acc_image", "lpips_target", "ssim_target", "target_top1", "target_top5")
PERSONALIZATION = ("pers_image", "lpips_history", "ssim_history", "ms_ssim_history", "pers_taste", "taste_top1",
                   "gt_hit")
N_NAMES = 100
"""Names the target is ranked among (``target_top1`` / ``target_top5``): its own and 99 other catalog names."""


class Grader:
    """Evaluator-based and perceptual metrics for generated images (catalog embeddings computed once)."""

    def __init__(self, evaluator: Any, catalog: Dataset, lpips: Any = None, perceptual: bool = True,
                 tastes: Sequence[str] = ()):
        self.evaluator = evaluator
        self.catalog = catalog
        self.lpips = lpips
        self.perceptual = perceptual
        self.tastes = list(tastes)  # every taste description, for ``taste_top1``
        self.ids = list(catalog.items)
        imgs = torch.cat([load_image(catalog.image_path(i), 64) for i in self.ids])
        self.images = imgs
        with torch.no_grad():
            self.catalog_emb = torch.cat([evaluator.image_embeddings(imgs[i:i + 512])
                                          for i in range(0, len(imgs), 512)])
        self.index = {iid: k for k, iid in enumerate(self.ids)}
        self._text: dict[str, torch.Tensor] = {}

    def image(self, item_id: str) -> torch.Tensor:
        return self.images[self.index[item_id]].unsqueeze(0)

    def text(self, text: str) -> torch.Tensor:
        if text not in self._text:
            self._text[text] = self.evaluator.text_embeddings([text])[0]
        return self._text[text]

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Evaluator embeddings ``[len(texts), E]`` (cached per text)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text]
        if missing:
            for t, e in zip(missing, self.evaluator.text_embeddings(missing)):
                self._text[t] = e
        return torch.stack([self._text[t] for t in texts])

    def names_for(self, target_id: str, n: int = N_NAMES) -> list[str]:
        """The target's name first, then ``n - 1`` other catalog names (not skin-tone variants, not
        containing or contained in the target's name), fixed per target."""
        title = self.catalog.items[target_id].title.lower()
        pool = sorted({it.title for it in self.catalog.items.values()
                       if not it.attributes.get("skintone") and it.title.lower() not in title
                       and title not in it.title.lower()})
        rng = random.Random(f"names:{target_id}")
        return [self.catalog.items[target_id].title] + rng.sample(pool, min(n - 1, len(pool)))

    @torch.no_grad()
    def grade(self, images: torch.Tensor, sample: Sample, user_taste: str | None, history_ids: list[str]
              ) -> list[dict[str, float]]:
        """Metrics of each generated image ``[N, 3, 64, 64]`` in [0, 1] (one dict per image)."""
        from pmgen.eval.metrics import ms_ssim, ssim

        n = images.shape[0]
        emb = self.evaluator.image_embeddings(images)
        target = self.catalog.items[sample.target_id]
        t_img = self.index[sample.target_id]
        cols: dict[str, torch.Tensor] = {
            "acc_text": emb @ self.text(target.title),
            "acc_image": emb @ self.catalog_emb[t_img],
        }
        names = emb @ self.texts(self.names_for(sample.target_id)).T  # [n, 100], column 0 = the target
        rank = (names[:, 1:] >= names[:, :1]).sum(1)  # other names scoring at least as high (ties count against)
        cols["target_top1"], cols["target_top5"] = (rank < 1).float(), (rank < 5).float()
        if user_taste and user_taste in self.tastes:
            tastes = emb @ self.texts(self.tastes).T
            mine = self.tastes.index(user_taste)
            cols["taste_top1"] = (tastes.argmax(1) == mine).float()
            cols["both"] = cols["target_top5"] * cols["taste_top1"]
        hist = [self.index[i] for i in history_ids if i in self.index]
        if hist:
            cols["pers_image"] = (emb @ self.catalog_emb[hist].T).mean(1)
        if user_taste:
            cols["pers_taste"] = emb @ self.text(user_taste)
        if sample.ground_truth_personalized:
            nearest = (emb @ self.catalog_emb.T).argmax(1)
            cols["gt_hit"] = (nearest == self.index[sample.ground_truth_personalized]).float()
        t_image = self.images[t_img].unsqueeze(0)
        if self.perceptual:
            cols["ssim_target"] = ssim(images, t_image)
        if self.lpips is not None:
            cols["lpips_target"] = self.lpips(images, t_image)
        if hist:
            h = self.images[hist]
            rep = images.repeat_interleave(len(hist), 0)
            hh = h.repeat(n, 1, 1, 1)
            if self.perceptual:
                cols["ssim_history"] = ssim(rep, hh).view(n, -1).mean(1)
                cols["ms_ssim_history"] = ms_ssim(rep, hh).view(n, -1).mean(1)
            if self.lpips is not None:
                cols["lpips_history"] = self.lpips(rep, hh).view(n, -1).mean(1)
        return [{k: float(v[i]) for k, v in cols.items()} for i in range(n)]


def sticker_grader(evaluator: Any, data_dir: Any = None, lpips: Any = None, perceptual: bool = True) -> Grader:
    """The :class:`Grader` of ``sticker-users`` evaluations: the ``stickers`` catalog and the 12 hidden
    taste descriptions (for ``taste_top1`` and ``both``)."""
    from pmgen.data import datasets
    from pmgen.data.datasets.sticker_users import TASTES

    return Grader(evaluator, datasets.load("stickers", data_dir), lpips, perceptual=perceptual,
                  tastes=[t.description for t in TASTES])
