"""``python -m pmgen.serve serve|bench-serve`` (the same commands as ``pmgen serve`` / ``pmgen bench-serve``)."""

import typer

from pmgen.serve.cli import bench_serve, serve

app = typer.Typer(help="pmgen's personalization service.", no_args_is_help=True, add_completion=False)
app.command("serve")(serve)
app.command("bench-serve")(bench_serve)

if __name__ == "__main__":
    app()
