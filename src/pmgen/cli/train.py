"""`pmgen train`: the trainers, their options from their config dataclasses."""

from __future__ import annotations

from typing import Annotated

import typer

from pmgen.cli.app import DataDirOpt, train_app

# light imports: the trainers' settings classes and the service's commands load torch / FastAPI only when run
from pmgen.config import config_options
from pmgen.train.generator.config import GeneratorTrainConfig
from pmgen.train.history_images.config import HistoryImageTrainConfig
from pmgen.train.scorer.config import ScorerTrainConfig
from pmgen.train.soft_prompt.config import SoftPromptTrainConfig

ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run whose checkpoint is in the train dir "
                                         "(its settings come from the checkpoint; only run control may change).")]


@train_app.command("scorer")
@config_options(ScorerTrainConfig, always=ScorerTrainConfig.INVOCATION_FIELDS)
def train_scorer(given: dict, resume: ResumeOpt = False) -> None:
    """Train the selector or evaluator scorer on the sticker catalog."""
    from pmgen.train.scorer.main import main as scorer_main

    raise typer.Exit(scorer_main(given, resume=resume))


@train_app.command("generator")
@config_options(GeneratorTrainConfig, always=GeneratorTrainConfig.INVOCATION_FIELDS)
def train_generator(given: dict, resume: ResumeOpt = False,
                    write_card: Annotated[bool, typer.Option("--write-card", help="Only (re)write the model card of --out from "
                                                             "the training logs, then exit.")] = False) -> None:
    """Train the sticker generator (from scratch, or a composition fine-tune with --init-from)."""
    from pmgen.train.generator.main import main as generator_main

    raise typer.Exit(generator_main(given, resume=resume, write_card=write_card))


@train_app.command("soft-prompt")
@config_options(SoftPromptTrainConfig, always=SoftPromptTrainConfig.INVOCATION_FIELDS)
def train_soft_prompt(given: dict, resume: ResumeOpt = False,
                      preset: Annotated[str, typer.Option(help="Preset whose LLM, text encoder and generator "
                                                          "to use.")] = "sticker-tiny") -> None:
    """Train the soft preference embeddings against the preset's frozen generator."""
    from pmgen.train.soft_prompt.main import main as soft_main

    raise typer.Exit(soft_main(given, resume=resume, preset=preset))


@train_app.command("history-images")
@config_options(HistoryImageTrainConfig, always=HistoryImageTrainConfig.INVOCATION_FIELDS)
def train_history_images(given: dict, resume: ResumeOpt = False,
                         preset: Annotated[str, typer.Option(help="Preset whose text encoder, generator and "
                                                             "selector to use.")] = "sticker-tiny") -> None:
    """Train the projection of the user's history images into condition tokens (a fourth condition group)."""
    from pmgen.train.history_images.main import main as history_main

    raise typer.Exit(history_main(given, resume=resume, preset=preset))


@train_app.command("background")
def train_background(
        out: Annotated[str, typer.Option(help="JSON file to write (a new file, or a pmgen background to replace).")]
        = "src/pmgen/zoo/sticker-tiny/preference-background.json",
        n_users: Annotated[int, typer.Option(help="Training users whose preference keywords make the background.")]
        = 240,
        seed: Annotated[int, typer.Option(help="Seed of the users' random choice.")] = 0,
        preset: Annotated[str, typer.Option(help="Preset whose LLM extracts the keywords.")] = "sticker-tiny",
        data_dir_: DataDirOpt = None) -> None:
    """The preference background of the selection's contrast: the preference keywords of sticker-users'
    training users (never val/test), extracted by the preset's LLM."""
    import time

    from pmgen.cli.app import _fail, _load_pmg, console, progress_bar
    from pmgen.data import datasets
    from pmgen.train.background import preference_texts, write_background

    if not 1 <= n_users <= 10_000:
        _fail(f"--n-users must be in [1, 10000], got {n_users}", 2)
    t = time.time()
    pmg = _load_pmg(preset, {})
    ds = datasets.load("sticker-users", data_dir_)
    with progress_bar("preference keywords of training users", n_users) as step:
        texts = preference_texts(pmg, ds, "train", n_users, seed, progress=step)
    try:
        path = write_background(out, texts, {"dataset": "sticker-users", "split": "train", "n_users": n_users,
                                             "seed": seed, "llm": str(pmg.llm.name), "k": pmg.settings.k})
    except FileExistsError as e:
        _fail(str(e), 2)
    console.print(f"✓ {path}: {len(texts)} preference texts ({time.time() - t:.0f} s)")
