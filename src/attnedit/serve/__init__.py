"""The edit inspector, ``attnedit serve``: a web page and JSON API that edit a fact in one loaded model
and show what the edit did to its answers and attention (``app.create_app``). Needs the ``serve``
extra (fastapi, uvicorn); nothing here is imported by ``import attnedit``."""
