"""The ``pmgen`` command line: the app, its shared options and helpers.

    pmgen data build all            # build every built-in dataset (cached; rebuilt only when missing)
    pmgen data show sticker-users   # counts and examples
    pmgen data validate my/users.jsonl
    pmgen demo                      # the main job (what `make demo` runs)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pmgen.data import datasets

# light imports: the trainers' settings classes and the service's commands load torch / FastAPI only when run

app = typer.Typer(help="pmgen: personalized multimodal generation (PMG) on a laptop CPU.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Build, inspect and validate datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Inspect and check the models of a preset.", no_args_is_help=True)
app.add_typer(models_app, name="models")
train_app = typer.Typer(help="Train the models pmgen ships (runs resumably; see each --help).", no_args_is_help=True)
app.add_typer(train_app, name="train")
eval_app = typer.Typer(help="Evaluate pmgen: personalization on held-out users, the judges, the keywords, "
                            "feedback, recommendation features.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def eval_command(name: str, alias: str) -> Any:
    """Register an evaluation as ``pmgen eval <name>`` and, hidden, under its former name ``pmgen <alias>``."""
    def register(fn: Any) -> Any:
        eval_app.command(name)(fn)
        app.command(alias, hidden=True)(fn)
        return fn
    return register


def quiet_third_party() -> None:
    """No third-party progress bars, info logs or warnings (transformers' "Loading weights", diffusers'
    and huggingface_hub's bars, Ray's and RecBole's notices): pmgen shows its own progress. Environment
    variables are read when those libraries are imported, so this runs before any of them is."""
    import logging
    import os
    import warnings

    for name, value in (("TQDM_DISABLE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("RAY_DEDUP_LOGS", "1")):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module=r"(?!pmgen)")  # pmgen's own warnings still show
    for name in ("transformers", "diffusers", "huggingface_hub", "recbole", "ray", "cornac", "accelerate", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show third-party progress bars, "
                                                                         "logs and warnings.")] = False) -> None:
    """pmgen: personalized multimodal generation (PMG) on a laptop CPU."""
    if not verbose:
        quiet_third_party()


# piped output (logs, CI) gets wide lines instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Dataset directory "
                                                    "(default: $PMGEN_DATA_DIR or ~/.cache/pmgen/data).")]


def progress_bar(label: str, total: Optional[int]) -> Any:
    """:func:`pmgen.progress.progress_bar` on the command line's console."""
    from pmgen.progress import progress_bar as bar

    return bar(label, total, console)


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _names(name: str) -> list[str]:
    if name == "all":
        return list(datasets.NAMES)
    if name not in datasets.NAMES:
        _fail(f"unknown dataset {name!r}; choose one of: all, {', '.join(datasets.NAMES)}", 2)
    return [name]



_OPTION_OF = {"weights": "--weights", "alpha": "--alpha", "mode": "--mode", "seed": "--seed",
              "strength": "--strength", "num_inference_steps": "--steps", "k": "--keywords",
              "history_weight": "--history-weight", "min_accuracy": "--min-accuracy",
              "target_text": "--target-text", "contrast": "--contrast", "surround_strength": "--surround-strength",
              "preference_text": "--preference-text", "inversion": "--inversion", "exemplars": "--exemplars",
              "keep": "--keep"}


def _settings_overrides(weights: Optional[str], alpha: Optional[float], mode: Optional[str], seed: Optional[int],
                        strength: Optional[float], steps: Optional[int], k: Optional[int],
                        history_weight: Optional[float], min_accuracy: Optional[float] = None,
                        target_text: Optional[str] = None, contrast: Optional[float] = None,
                        surround_strength: Optional[float] = None, preference_text: Optional[str] = None,
                        inversion: Optional[str] = None, exemplars: Optional[int] = None,
                        keep: Optional[float] = None) -> dict:
    """The generation settings given as options, checked before any model loads (exit 2 naming the option)."""
    from pmgen.pipeline import Settings
    from pmgen.stages.select import weight_grid

    out: dict = {}
    if weights is not None:
        try:
            out["weights"] = tuple(weight_grid(weights))
        except ValueError as e:
            _fail(f"--weights: {e}", 2)
    for key, val in (("alpha", alpha), ("mode", mode), ("seed", seed), ("strength", strength),
                     ("num_inference_steps", steps), ("k", k), ("history_weight", history_weight),
                     ("min_accuracy", min_accuracy), ("target_text", target_text), ("contrast", contrast),
                     ("surround_strength", surround_strength), ("preference_text", preference_text),
                     ("inversion", inversion), ("exemplars", exemplars), ("keep", keep)):
        if val is not None:
            out[key] = val
    for key, val in out.items():
        try:
            Settings(**{key: val, **({"inversion": "ddim"} if key == "exemplars" else {})})
        except (ValueError, TypeError) as e:
            _fail(f"{_OPTION_OF[key]}: {e}", 2)
    return out


def _load_pmg(preset: str, overrides: dict, no_cache: bool = False, **preset_overrides):
    import dataclasses

    from pmgen.models.llm import ModelNotAvailable
    from pmgen.pipeline import PMG

    try:
        pmg = PMG.from_preset(preset, keyword_cache=None if no_cache else "default", **preset_overrides)
    except KeyError as e:
        _fail(str(e.args[0]), 2)
    except (FileNotFoundError, ModelNotAvailable) as e:
        _fail(f"{e}\n(`pmgen models check --preset {preset}` lists every model and what is missing)")
    except ValueError as e:  # a malformed reference, e.g. --selector 'a+' (an ensemble needs 2 to 8 members)
        _fail(str(e), 2)
    try:
        pmg.settings = dataclasses.replace(pmg.settings, **overrides)
    except (ValueError, TypeError) as e:
        _fail(str(e), 2)
    return pmg


WeightsOpt = Annotated[Optional[str], typer.Option(help="Candidate preference weights, e.g. '0,1,2' (0 is always "
                                                   "included: the non-personalized baseline). Default 0,0.5,1,1.5,2.")]
AlphaOpt = Annotated[Optional[float], typer.Option(
    help="Balance α in z = α·log d_p + (1−α)·log d_t. Default: the user's α learned from feedback "
         "(`pmgen feedback`, the service) when there is some, else the preset's (2/3).")]
ModeOpt = Annotated[Optional[str], typer.Option(help="Weighting mode: concat (paper), guidance (continuous) or "
                                                "compose (the preference composed with the target, AND; the "
                                                "sticker-tiny default).")]
TargetTextOpt = Annotated[Optional[str], typer.Option(help="What d_t compares candidates with: keywords (the target "
                                                      "keywords, paper) or title (the target's title; sticker-tiny).")]
ContrastOpt = Annotated[Optional[float], typer.Option(
    help="c in d_p = s(sim(image, preference) - c·sim(image, other users' preferences)): the user's preference "
         "against the preset's background (0 = off, the paper; 1 = sticker-tiny's default).")]
PrefTextOpt = Annotated[Optional[str], typer.Option(
    help="What d_p compares candidates with: keywords (the preference keywords, paper), history (the names of the "
         "user's 12 most recent history items) or both (their mean, against the background).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Noise seed shared by all candidates (default 0).")]
StrengthOpt = Annotated[Optional[float], typer.Option(help="Image-to-image strength (default: the preset's).")]
SurroundOpt = Annotated[Optional[float], typer.Option(
    help="Strength outside the target's outline for the personalized candidates (w > 0); inside, --strength. "
         "Default: off (--strength everywhere). The w = 0 baseline never changes.")]
InversionOpt = Annotated[Optional[str], typer.Option(
    help="Start from the target inverted into the generator's noise: ddim or noised (w = 0 reproduces the "
         "target, w > 0 keeps its layout); off = SDEdit noise at --strength. Default: the preset's.")]
ExemplarsOpt = Annotated[Optional[int], typer.Option(
    help="Catalog items holding both the target and the user's taste to retrieve and redraw as extra "
         "candidates (0-8; needs --inversion). Default: the preset's.")]
KeepOpt = Annotated[Optional[float], typer.Option(
    help="With --inversion: the share of steps that hold the inverted layout (1 = all).")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Sampler steps (default: the preset's).")]
KOpt = Annotated[Optional[int], typer.Option("--keywords", help="Number of preference keywords (default 8).")]
HistOpt = Annotated[Optional[float], typer.Option(help="Share of history-image similarity in d_p (default 0).")]
MinAccOpt = Annotated[Optional[float], typer.Option(
    help="Choose only candidates whose d_t is at least this share of the w = 0 baseline's (0 = no guard).")]
SoftOpt = Annotated[Optional[str], typer.Option(
    help="Soft-prompt weights (folder or zoo:..., e.g. zoo:sticker-tiny/soft-prompt) for the soft preference "
         "embeddings, or 'off' (default: the preset's).")]
PresetOpt = Annotated[str, typer.Option(help="Model preset (see `pmgen models list`).")]
GeneratorOpt = Annotated[Optional[str], typer.Option(
    help="Generator weights to use instead of the preset's (a folder or zoo:..., e.g. "
         "zoo:sticker-tiny/generator-compose).")]


def _learned_alpha(pmg, data_root: Optional[Path]):
    """``user_id → (α, source)`` from the feedback in the shared store, or ``None`` for a user without any."""
    from pmgen.stages.feedback import open_store, resolve_alpha

    store = open_store(data_root)
    return lambda user_id: resolve_alpha(store, user_id, pmg.settings.alpha)


SelectorOpt = Annotated[Optional[str], typer.Option(
    help="Selector weights to use instead of the preset's (a folder or zoo:..., e.g. "
         "zoo:sticker-tiny/selector-catalog; a+b: the mean similarity of several selectors).")]


EvaluatorOpt = Annotated[Optional[str], typer.Option(
    help="Evaluator weights to grade with instead of the preset's (a folder or zoo:..., e.g. "
         "zoo:sticker-tiny/evaluator-robust). It never selects.")]


def _soft(soft_prompt: Optional[str], generator: Optional[str] = None, selector: Optional[str] = None,
          evaluator: Optional[str] = None) -> dict:
    """Preset overrides: soft-prompt weights (or ``off``), generator, selector and evaluator weights, when given."""
    out: dict = {}
    if soft_prompt is not None:
        out["soft_prompt"] = "" if soft_prompt.strip().lower() in ("off", "none", "") else soft_prompt
    if generator is not None:
        out["generator"] = generator
    if selector is not None:
        out["selector"] = selector
    if evaluator is not None:
        out["evaluator"] = evaluator
    return out



def _load_keyword_models(preset: str, text_encoder: bool = True):
    """The preset, its LLM and (optionally) its text encoder; a clear error when one cannot be loaded."""
    from pmgen.models.llm import ModelNotAvailable
    from pmgen.presets import get_preset, load_llm, load_text_encoder

    try:
        p = get_preset(preset)
    except KeyError as e:
        _fail(str(e.args[0]), 2)
    try:
        llm = load_llm(p)
        te = load_text_encoder(p) if text_encoder else None
    except (FileNotFoundError, ModelNotAvailable, ValueError) as e:
        _fail(f"{e}\n(`pmgen models check --preset {preset}` lists every model and what is missing)")
    return p, llm, te


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    t = Table(*header, title=title)
    for r in rows:
        t.add_row(*r)
    console.print(t)


