"""The ``pmgen`` command line.

    pmgen data build all            # build every built-in dataset (cached; rebuilt only when missing)
    pmgen data show sticker-users   # counts and examples
    pmgen data validate my/users.jsonl
    pmgen demo                      # the main job (what `make demo` runs)

One module per command group: :mod:`.data`, :mod:`.generate`, :mod:`.evaluate`, :mod:`.recommend`, :mod:`.models`,
:mod:`.train`; the app, shared options and helpers in :mod:`.app`; `pmgen serve` in :mod:`pmgen.serve.cli`.
"""

from __future__ import annotations

# importing a module registers its commands; this order is the order of `pmgen --help`
from pmgen.cli import generate  # noqa: F401, I001
from pmgen.cli import evaluate  # noqa: F401
from pmgen.cli import recommend  # noqa: F401
from pmgen.cli import data, models, train  # noqa: F401
from pmgen.cli.app import _learned_alpha, _soft, app  # noqa: F401  (used by tests and `python -m pmgen`)
from pmgen.serve.cli import bench_serve, serve

app.command("serve")(serve)
app.command("bench-serve")(bench_serve)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
