from attnedit.cli import app

app()
