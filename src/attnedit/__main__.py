from attnedit.cli.main import app

app()
