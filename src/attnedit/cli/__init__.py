"""The command line (``attnedit ...``): typer apps over the layers below."""
