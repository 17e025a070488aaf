from pmgen.cli import app

app()
