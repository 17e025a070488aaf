"""The PMG pipeline end to end: behaviors → keywords (+ soft embeddings) → conditions → candidates → choice.

    from pmgen import PMG
    from pmgen.data import datasets
    pmg = PMG.from_preset("sticker-tiny")
    ds = datasets.load("sticker-users")
    sample = ds.split("test")[0]
    result = pmg.generate(ds.users[sample.user_id], ds.items[sample.target_id], ds.items,
                          context=sample.context, target_image=ds.image_path(sample.target_id))
    result.save("runs/one")            # chosen.png, candidates/*.png, record.json, report.html

Every candidate uses the same seed (same noise) and the target item's image as the init, so the
``w = 0`` candidate is the non-personalized baseline, bit for bit.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from pmgen.stages.condition import ConditionBuilder, keywords_text
from pmgen.data.schema import Event, Item, User, recent_item_ids
from pmgen.data.images import load_image
from pmgen.models.generator import outline_strengths
from pmgen.presets import Preset, get_preset
from pmgen.result import GenerationResult, Plan, candidate_file  # noqa: F401  (re-exported)
from pmgen.settings import DEFAULT_WEIGHTS, HISTORY_NAMES, TARGET_TEXTS, Settings  # noqa: F401  (re-exported)
from pmgen.stages.retrieve import ExemplarIndex
from pmgen.stages.select import (preference_vector, select)
from pmgen.types import (Candidate, ChatLLM, GenerationRecord, Generator, Scorer, SoftPrompt, TextEncoder)
from pmgen.stages.verbalize import TEXT_CHARS, shortened_texts

log = logging.getLogger(__name__)

class PMG:
    """Personalized multimodal generation with injected models (see :meth:`from_preset`).

    Args:
        preset: the :class:`~pmgen.presets.Preset` the models come from (recorded in outputs).
        llm: frozen LLM of the keyword stage.
        text_encoder: the generator's text encoder.
        generator: image-to-image / text-to-image on ``prompt_embeds``.
        selector: the scorer that chooses among candidates (never the evaluator).
        soft_prompt: the trained soft-prompt encoder, or ``None`` (soft embeddings off); a call can
            pass another one (:meth:`generate`'s ``soft_prompt``).
        settings: default :class:`Settings`.
        keyword_cache: a :class:`pmgen.stages.keywords.KeywordCache` or ``None`` (no caching).
        history_encoder: the trained :class:`pmgen.stages.history_images.HistoryImageEncoder`, or ``None``
            (history-image tokens unavailable).
        history_tower: the scorer whose image embeddings ``history_encoder`` reads (the one it was trained
            on); default: the selector.
    """

    def __init__(self, preset: Preset, llm: ChatLLM, text_encoder: TextEncoder, generator: Generator,
                 selector: Scorer, soft_prompt: SoftPrompt | None = None, settings: Settings | None = None,
                 keyword_cache: Any = None, history_encoder: Any = None, history_tower: Any = None):
        self.preset = preset
        self.llm = llm
        self.text_encoder = text_encoder
        self.generator = generator
        self.selector = selector
        self.soft_prompt = soft_prompt
        self.settings = settings or Settings.for_preset(preset, use_soft=soft_prompt is not None)
        self.keyword_cache = keyword_cache
        self.history_encoder = history_encoder
        self.history_tower = history_tower if history_tower is not None else selector
        if history_encoder is not None:
            history_encoder.check_image_encoder(self.history_tower)
        self.history_encoder_refused = ""
        """Why :meth:`from_preset` left the preset's history-image encoder out (it does not fit the selector)."""
        self._extractors: dict[tuple[int, int], Any] = {}
        self._builders: dict[str, ConditionBuilder] = {}
        self._background: torch.Tensor | None = None
        self._exemplar_indexes: dict[tuple[int, int], ExemplarIndex] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str = "sticker-tiny", settings: Settings | None = None, keyword_cache: Any = "default",
                    **preset_overrides: Any) -> "PMG":
        """Load every model a preset names (offline). ``keyword_cache="default"`` uses the cache dir's SQLite."""
        from pmgen.presets import (load_generator, load_history_encoder, load_history_tower, load_llm, load_scorer,
                                   load_soft_prompt, load_text_encoder)

        preset = get_preset(name, **preset_overrides)
        generator = load_generator(preset)
        text_encoder = load_text_encoder(preset, generator)
        llm = load_llm(preset)
        selector = load_scorer(preset, "selector", text_encoder)
        soft = load_soft_prompt(preset, llm)
        if keyword_cache == "default":
            from pmgen.stages.keywords import KeywordCache

            keyword_cache = KeywordCache()
        history_encoder = load_history_encoder(preset)
        tower = load_history_tower(preset, text_encoder, selector) if history_encoder is not None else None
        return cls.with_preset_history_encoder(preset, llm, text_encoder, generator, selector, soft, settings,
                                               keyword_cache, history_encoder, tower)

    @classmethod
    def with_preset_history_encoder(cls, preset: Preset, llm: Any, text_encoder: Any, generator: Any, selector: Any,
                                    soft_prompt: Any, settings: Settings | None, keyword_cache: Any,
                                    history_encoder: Any, history_tower: Any = None) -> "PMG":
        """A PMG with the preset's history-image encoder if it fits ``history_tower`` (default: ``selector``); else
        without it, the reason kept in :attr:`history_encoder_refused` (e.g. another ``--selector`` when the
        preset names no tower: the history tokens were trained on one selector's embeddings) and told when
        history-image tokens are asked for."""
        refused = ""
        tower = history_tower if history_tower is not None else selector
        if history_encoder is not None:
            try:
                history_encoder.check_image_encoder(tower)
            except ValueError as e:
                history_encoder, refused = None, str(e)
        pmg = cls(preset, llm, text_encoder, generator, selector, soft_prompt, settings, keyword_cache, history_encoder,
                  tower)
        pmg.history_encoder_refused = refused
        return pmg

    def models(self, soft_prompt: SoftPrompt | None = None, history_encoder: Any = None) -> dict[str, dict[str, str]]:
        """Name and content hash of each model used (the record's ``models`` field)."""
        out = {role: {"name": str(m.name), "hash": str(m.content_hash)}
               for role, m in (("llm", self.llm), ("text_encoder", self.text_encoder), ("generator", self.generator),
                               ("selector", self.selector))}
        if soft_prompt is not None:
            out["soft_prompt"] = {"name": str(soft_prompt.name), "hash": str(soft_prompt.content_hash)}
        if history_encoder is not None:
            out["history_images"] = {"name": str(history_encoder.name), "hash": str(history_encoder.content_hash)}
        return out

    def extractor(self, k: int | None = None, budget_tokens: int | None = None) -> Any:
        """The :class:`pmgen.stages.keywords.PreferenceExtractor` for ``k`` keywords and a history budget."""
        from pmgen.stages.keywords import PreferenceExtractor

        key = (k or self.settings.k, budget_tokens or self.settings.budget_tokens)
        if key not in self._extractors:
            self._extractors[key] = PreferenceExtractor(self.llm, k=key[0], cache=self.keyword_cache,
                                                        budget_tokens=key[1])
        return self._extractors[key]

    def background(self) -> torch.Tensor:
        """The selector's embedding of the preset's preference background (loaded and embedded once), for
        ``contrast`` (:func:`pmgen.stages.select.select`); a clear error when the preset names none."""
        if self._background is None:
            from pmgen.presets import load_preference_background
            from pmgen.stages.select import background_embedding

            texts = load_preference_background(self.preset)
            if texts is None:
                raise ValueError(f"contrast > 0 needs a preference background; preset {self.preset.name!r} names "
                                 "none (set contrast to 0, or give the preset a preference_background file)")
            self._background = background_embedding(self.selector, texts)
        return self._background

    def builder(self, mode: str) -> ConditionBuilder:
        if mode not in self._builders:
            self._builders[mode] = ConditionBuilder(self.text_encoder, self.preset.text_max_length, mode)
        return self._builders[mode]

    # ------------------------------------------------------------------ stages
    def extract(self, user: User | Sequence[Event], items: Mapping[str, Item]) -> Any:
        """Preference keywords of a user (cached); see :class:`pmgen.stages.keywords.Keywords`."""
        events = user.events if isinstance(user, User) else list(user)
        return self.extractor().extract(events, items)

    def target_keywords(self, target: Item, context: Sequence[Event] = (), n: int | None = None) -> list[str]:
        """Keywords of the target: the item's title and tags, then the emotion/action cues of the
        conversation's last user turn when there is one (deterministic; see :mod:`pmgen.stages.keywords`)."""
        from pmgen.stages.keywords import target_keywords

        n = n or self.settings.n_target_keywords
        return list(target_keywords(item=target, conversation=list(context) or None, k=n).keywords)

    def soft_embeddings(self, events: Sequence[Event], items: Mapping[str, Item],
                        soft_prompt: SoftPrompt | None = None) -> torch.Tensor:
        """``[n_img, D]`` soft preference embeddings of a history (``soft_prompt`` default: the PMG's own).

        The history is verbalized with the soft prompt's own budget and token counter
        (:meth:`pmgen.stages.soft.SoftPromptEncoder.history_text`), the way it was trained.
        """
        sp = soft_prompt if soft_prompt is not None else self.soft_prompt
        if sp is None:
            raise ValueError("no soft prompt: this PMG has none and none was given")
        with torch.no_grad():
            return sp([sp.history_text(events, items)])[0]

    # ------------------------------------------------------------------ generate
    def generate_text(self, user: User | Sequence[Event], target: Item, items: Mapping[str, Item], *,
                      weights: Sequence[float] | None = None, alpha: float | None = None, kind: str = "pitch",
                      titles: Any = None) -> Any:
        """A personalized one-line text about ``target`` (``kind``: ``"pitch"`` or ``"caption"``): candidates
        at ``weights`` from guided decoding with the preset's LLM and this user's preference keywords,
        chosen by the same ``z`` and α as images (:mod:`pmgen.stages.text`). An empty history gives the
        plain text only. ``titles``: a prebuilt :class:`pmgen.stages.text.TitleIndex` of ``items``."""
        from pmgen.stages.text import TitleIndex, write_text

        events = user.events if isinstance(user, User) else list(user)
        s = dataclasses.replace(self.settings, **{k: v for k, v in (("weights", weights), ("alpha", alpha))
                                                  if v is not None})
        keywords = list(self.extract(events, items).keywords) if events else []
        return write_text(self.llm, self.text_encoder, target, keywords, s.weights, s.alpha,
                          titles if titles is not None else TitleIndex(items), kind)

    def generate(self, user: User | Sequence[Event], target: Item, items: Mapping[str, Item], *,
                 context: Sequence[Event] = (), target_image: Any = None, history_images: Sequence[Path] = (),
                 user_id: str | None = None, settings: Settings | None = None,
                 soft_prompt: SoftPrompt | None = None, alpha_source: str | None = None,
                 item_images: Callable[[str], Any] | None = None, **overrides: Any) -> GenerationResult:
        """Generate the personalized version of ``target`` for ``user``.

        ``target_image`` (path, PIL image or tensor) is the init for image-to-image; without one the
        generator draws from noise. ``history_images`` are shown in the report and, with
        ``history_weight > 0``, count in d_p. ``soft_prompt`` replaces the PMG's own for this call
        (used when ``use_soft``). ``alpha_source`` is recorded as where α came from (default:
        ``"request"`` when ``alpha`` is given here, else ``"preset"``). ``item_images(item_id)`` gives an
        item's image (a path, or ``None``): the catalog ``exemplars`` are retrieved from. An empty history
        gives an explicit non-personalized result (only
        ``w = 0``; ``record.personalized`` is false with the reason).

        Three steps, also usable one by one (the batch engines run :meth:`render` for many requests
        at once): :meth:`plan` (keywords, soft embeddings, conditions), :meth:`render` (one candidate
        per condition, each alone: the numerics every pin was made with), :meth:`finish` (selection, record).
        """
        plan = self.plan(user, target, items, context=context, target_image=target_image,
                         history_images=history_images, user_id=user_id, settings=settings,
                         soft_prompt=soft_prompt, alpha_source=alpha_source, item_images=item_images, **overrides)
        t = time.perf_counter()
        images = self.render(plan)
        plan.timings["generate"] = time.perf_counter() - t
        return self.finish(plan, images)

    def plan(self, user: User | Sequence[Event], target: Item, items: Mapping[str, Item], *,
             context: Sequence[Event] = (), target_image: Any = None, history_images: Sequence[Path] = (),
             user_id: str | None = None, settings: Settings | None = None,
             soft_prompt: SoftPrompt | None = None, alpha_source: str | None = None,
             keywords: Any = None, soft: torch.Tensor | None = None,
             item_images: Callable[[str], Any] | None = None, **overrides: Any) -> "Plan":
        """Everything before the generator: target and preference keywords, soft embeddings, conditions.

        Arguments as in :meth:`generate`. ``keywords`` (a :class:`pmgen.stages.keywords.Keywords`)
        and ``soft`` (``[n_img, D]``) are used instead of computing them when given (a batch engine
        computes them for many users at once); they must be what :meth:`extract` /
        :meth:`soft_embeddings` give for this history and settings.
        """
        s = dataclasses.replace(settings or self.settings, **overrides) if overrides else (settings or self.settings)
        if s.contrast > 0:
            self.background()  # fail before any model runs when the preset has no background
        sp = soft_prompt if soft_prompt is not None else self.soft_prompt
        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        events = user.events if isinstance(user, User) else list(user)
        uid = user_id or (user.user_id if isinstance(user, User) else "user")

        t = time.perf_counter()
        tkw = self.target_keywords(target, context, s.n_target_keywords)
        timings["target_keywords"] = time.perf_counter() - t

        warnings: list[str] = []
        personalized, reason = True, ""
        pref_record: dict[str, Any] = {}
        pref_kw: list[str] = []
        use_soft = s.use_soft and sp is not None
        if not events:
            personalized, reason = False, "empty history: no behaviors to personalize from"
        elif not s.use_keywords and not use_soft and not s.use_history_images:
            personalized, reason = False, "neither preference keywords, soft embeddings nor history images are in use"
        elif s.use_keywords:
            t = time.perf_counter()
            kw = keywords if keywords is not None else self.extractor(s.k, s.budget_tokens).extract(events, items)
            timings["preference_keywords"] = time.perf_counter() - t
            pref_kw = list(kw.keywords)
            pref_record = kw.to_json()
            if kw.fallback:
                warnings.append(f"preference keywords: {kw.fallback}")
            if kw.truncated:
                warnings.append(f"history truncated: the LLM read the newest {kw.n_kept} of {kw.n_events} events "
                                f"(token budget {s.budget_tokens})")
            if not pref_kw and not use_soft and not (s.use_history_images and history_images):
                personalized, reason = False, "no usable preference keywords"
        n_short = shortened_texts(events) if personalized else 0
        if n_short:
            warnings.append(f"{n_short} event text(s) longer than {TEXT_CHARS} characters were shortened for the LLM")
        soft_t = None
        if personalized and use_soft:
            t = time.perf_counter()
            soft_t = soft if soft is not None else self.soft_embeddings(events, items, sp)
            timings["soft_embeddings"] = time.perf_counter() - t
        size = int(self.generator.image_size)
        init = load_image(target_image, size)
        hist = [load_image(p, size) for p in history_images]
        hist_tokens = None
        if personalized and s.use_history_images:
            if self.history_encoder is None:
                raise ValueError(f"use_history_images: {self.history_encoder_refused}" if self.history_encoder_refused
                                 else "use_history_images needs a trained history-image encoder: this preset names "
                                      "none (train one with `pmgen train history-images`)")
            if hist:
                t = time.perf_counter()
                hist_tokens = self.history_encoder.embed(self.history_tower, torch.cat(hist))
                timings["history_image_tokens"] = time.perf_counter() - t
            else:
                warnings.append("no history images given: the history-image tokens are left out")
                if not pref_kw and soft_t is None:
                    personalized, reason = False, "no history images and no other preference condition"
        weights = list(s.weights) if personalized else [0.0]
        history_titles = ([items[i].title for i in recent_item_ids(events, HISTORY_NAMES) if i in items]
                          if personalized and s.preference_text != "keywords" else [])
        extra = [v for v in (soft_t, hist_tokens) if v is not None]
        builder = self.builder(s.mode)
        t = time.perf_counter()
        conds = [builder.build(tkw, pref_kw, w, torch.cat(extra) if extra else None) for w in weights]
        timings["conditions"] = time.perf_counter() - t
        for c in conds:
            warnings += [w for w in c.warnings if w not in warnings]
        found, ex_init, ex_cond = [], None, None
        if personalized and s.exemplars and init is not None:
            t = time.perf_counter()
            found, ex_init = self.retrieve(target, items, item_images, s, tkw, pref_kw, history_titles, warnings)
            timings["retrieve"] = time.perf_counter() - t
            if found:
                ex_cond = builder.build(tkw, pref_kw, s.exemplar_weight, torch.cat(extra) if extra else None)
        return Plan(user_id=uid, target=target, settings=s, target_keywords=tkw, preference_keywords=pref_kw,
                    preference=pref_record, personalized=personalized, reason=reason, soft=soft_t,
                    soft_prompt=sp, conditions=conds, history_tokens=hist_tokens, init=init, history=hist,
                    warnings=warnings, timings=timings,
                    t_start=t_all, alpha_source=alpha_source or ("request" if "alpha" in overrides else "preset"),
                    history_images=[Path(p) for p in history_images],
                    target_image=Path(target_image) if isinstance(target_image, (str, Path)) else None,
                    history_titles=history_titles, exemplars=found, exemplar_init=ex_init,
                    exemplar_condition=ex_cond)

    def target_text(self, target: Item, target_keywords: Sequence[str], s: Settings) -> str:
        """What d_t compares with: the target's title (``target_text="title"``) or its keywords."""
        return target.title if s.target_text == "title" and target.title.strip() else keywords_text(target_keywords)

    def exemplar_index(self, items: Mapping[str, Item], item_images: Callable[[str], Any]) -> ExemplarIndex:
        """The selector's :class:`~pmgen.stages.retrieve.ExemplarIndex` of ``items`` (built once per
        catalog and selector; kept on disk in the cache dir)."""
        from pmgen.paths import cache_dir

        key = (id(items), len(items))
        if key not in self._exemplar_indexes:
            size = int(self.generator.image_size)

            def image_of(item_id: str) -> torch.Tensor | None:
                path = item_images(item_id)
                return load_image(path, size) if path is not None and Path(path).is_file() else None

            self._exemplar_indexes = {key: ExemplarIndex.build(self.selector, items, image_of,
                                                               cache_dir=cache_dir() / "exemplars")}
        return self._exemplar_indexes[key]

    def retrieve(self, target: Item, items: Mapping[str, Item], item_images: Callable[[str], Any] | None,
                 s: Settings, target_keywords: Sequence[str], preference_keywords: Sequence[str],
                 history_titles: Sequence[str], warnings: list[str]) -> tuple[list[Any], torch.Tensor | None]:
        """The request's exemplars (:mod:`pmgen.stages.retrieve`) and their images ``[X, 3, H, W]``."""
        if item_images is None:
            warnings.append("exemplars: no item images given (item_images): none retrieved")
            return [], None
        p_vec = preference_vector(self.selector, keywords_text(preference_keywords), history_titles,
                                  s.preference_text, self.background() if s.contrast > 0 else None, s.contrast)
        if p_vec is None:
            return [], None
        index = self.exemplar_index(items, item_images)
        t_vec = self.selector.text_embeddings([self.target_text(target, target_keywords, s)])[0]
        found = index.search(t_vec, p_vec, s.exemplars, s.alpha, min_target=s.exemplar_floor, target_item=target.id)
        if not found:
            return [], None
        size = int(self.generator.image_size)
        return found, torch.cat([load_image(item_images(e.item_id), size) for e in found])

    def render(self, plan: "Plan") -> torch.Tensor:
        """The plan's candidates ``[N, 3, H, W]``, one generator call per condition (same seed each), then
        one per exemplar. With ``inversion`` the target (and each exemplar) is inverted first."""
        if plan.settings.inversion != "off" and plan.init is not None:
            return self.render_inverted(plan)
        return torch.cat([self.render_one(c, plan.settings, plan.init) for c in plan.conditions])

    def render_one(self, c: Any, s: Settings, init: torch.Tensor | None) -> torch.Tensor:
        """One candidate ``[1, 3, H, W]`` for condition ``c`` (with its extra guidance direction in the
        ``guidance`` and ``compose`` modes): image-to-image from ``init``, or from noise when it is ``None``."""
        kwargs = dict(seed=s.seed, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale)
        if c.extra_prompt_embeds is not None:
            kwargs.update(extra_prompt_embeds=c.extra_prompt_embeds, extra_guidance_scale=c.extra_scale,
                          extra_base=c.extra_base)
        if init is not None:
            if s.surround_strength is not None and c.weight > 0:
                if "strength_map" not in inspect.signature(self.generator.image_to_image).parameters:
                    raise ValueError("surround_strength needs a generator with per-pixel strengths (pmgen's sticker "
                                     f"generator); {type(self.generator).__name__} has none")
                kwargs["strength_map"] = outline_strengths(init, s.strength, s.surround_strength)
            else:
                kwargs["strength"] = s.strength
            return self.generator.image_to_image(init, c.prompt_embeds, c.negative_prompt_embeds, **kwargs)
        return self.generator.text_to_image(c.prompt_embeds, c.negative_prompt_embeds, **kwargs)

    def render_inverted(self, plan: "Plan") -> torch.Tensor:
        """Candidates edited from the target's inversion under its ``w = 0`` condition (``w = 0`` is the
        target itself, through the VAE), then the exemplars, each inverted under its own name (in the same
        batch) and redrawn under :attr:`Plan.exemplar_condition`. Rows whose conditions have one shape
        (``compose`` and ``guidance``: the target's states, one extra direction) share one batched sampler
        call; ``concat`` conditions, whose lengths differ, run one by one."""
        s, gen = plan.settings, self.generator
        if not hasattr(gen, "invert"):
            raise ValueError(f"inversion needs pmgen's sticker generator; {type(gen).__name__} has none")
        c0 = plan.conditions[0]
        rows = [(0, c) for c in plan.conditions[1:]] + [(1 + j, plan.exemplar_condition)
                                                      for j in range(len(plan.exemplars))]
        if not rows:
            return gen.decode(gen.encode(plan.init))
        images, source = plan.init, c0.prompt_embeds
        if plan.exemplars:
            names = torch.stack([self.builder(s.mode).encode(e.title)[0] for e in plan.exemplars])
            images, source = torch.cat([plan.init, plan.exemplar_init]), torch.cat([source, names])
        inv = gen.invert(images, source, c0.negative_prompt_embeds, strength=s.inversion_strength,
                         num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                         method=s.inversion, seed=s.seed)
        out = [gen.decode(inv.init_latents[:1])]
        if len({(c.prompt_embeds.shape, c.negative_prompt_embeds.shape, c.extra_base,
                 None if c.extra_prompt_embeds is None else c.extra_prompt_embeds.shape) for _, c in rows}) == 1 \
                and rows[0][1].extra_prompt_embeds is not None:
            cs = [c for _, c in rows]
            out.append(gen.edit(inv.select([r for r, _ in rows]), torch.cat([c.prompt_embeds for c in cs]),
                                torch.cat([c.negative_prompt_embeds for c in cs]),
                                extra_prompt_embeds=torch.cat([c.extra_prompt_embeds for c in cs]),
                                extra_guidance_scale=[c.extra_scale for c in cs], extra_base=cs[0].extra_base,
                                keep=s.keep))
        else:
            out += [self.edit_one(inv.select([r]), c, s.keep) for r, c in rows]
        return torch.cat(out)

    def edit_one(self, inversion: Any, c: Any, keep: float) -> torch.Tensor:
        """One candidate ``[1, 3, H, W]`` sampled from ``inversion`` under condition ``c``."""
        kwargs = {}
        if c.extra_prompt_embeds is not None:
            kwargs = dict(extra_prompt_embeds=c.extra_prompt_embeds, extra_guidance_scale=c.extra_scale,
                          extra_base=c.extra_base)
        return self.generator.edit(inversion, c.prompt_embeds, c.negative_prompt_embeds, keep=keep, **kwargs)

    def finish(self, plan: "Plan", images: torch.Tensor) -> GenerationResult:
        """Score the candidates, choose one and write the record (``plan.timings["generate"]`` is the
        caller's: the time its generator call took for this request)."""
        s, conds, timings = plan.settings, plan.conditions, plan.timings
        tkw, pref_kw = plan.target_keywords, plan.preference_keywords
        t = time.perf_counter()
        hist_t = torch.cat(plan.history) if plan.history else None
        sel = select(images, self.selector, self.target_text(plan.target, tkw, s), keywords_text(pref_kw), s.alpha,
                     hist_t, s.history_weight, s.min_accuracy, self.background() if s.contrast > 0 else None, s.contrast,
                     history_texts=plan.history_titles, preference_source=s.preference_text)
        timings["select"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - plan.t_start

        candidates = [Candidate(weight=c.weight, d_t=sel.d_t[i], d_p=sel.d_p[i], z=sel.z[i],
                                preference_tokens=c.n_preference_tokens, eligible=sel.eligible[i],
                                d_h=sel.d_h[i] if sel.d_h is not None else None) for i, c in enumerate(conds)]
        for j, e in enumerate(plan.exemplars):
            i, c = len(conds) + j, plan.exemplar_condition
            candidates.append(Candidate(weight=c.weight, d_t=sel.d_t[i], d_p=sel.d_p[i], z=sel.z[i],
                                        preference_tokens=c.n_preference_tokens, eligible=sel.eligible[i],
                                        d_h=sel.d_h[i] if sel.d_h is not None else None, start=e.item_id,
                                        start_title=e.title))
        sp, soft, init = plan.soft_prompt, plan.soft, plan.init
        record = GenerationRecord(
            user_id=plan.user_id, target_id=plan.target.id, target_title=plan.target.title,
            personalized=plan.personalized, reason=plan.reason,
            preference_keywords=pref_kw, keywords_used=bool(s.use_keywords and pref_kw), target_keywords=tkw,
            preference=plan.preference,
            soft_embeddings=("on" if soft is not None else
                             "off (no trained soft prompt in this preset)" if sp is None else "off"),
            alpha=s.alpha, alpha_source=plan.alpha_source, mode=s.mode, candidates=candidates, chosen=sel.chosen,
            seed=s.seed, strength=s.strength if init is not None else None,
            init="target image" if init is not None else "noise (target has no image)",
            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
            history_weight=s.history_weight, min_accuracy=s.min_accuracy, preset=self.preset.name,
            target_text=s.target_text, contrast=s.contrast, preference_text=s.preference_text,
            history_names=len(plan.history_titles),
            surround_strength=s.surround_strength if init is not None else None,
            models=self.models(sp if soft is not None else None,
                               self.history_encoder if plan.history_tokens is not None else None),
            history_image_tokens=(f"on ({plan.history_tokens.shape[0]} tokens from {len(plan.history)} images)"
                                  if plan.history_tokens is not None else ""),
            timings_s={k: round(v, 4) for k, v in timings.items()}, warnings=plan.warnings)
        return GenerationResult(record=record, images=images, history_images=plan.history_images,
                                target_image=plan.target_image)
