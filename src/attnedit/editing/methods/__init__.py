"""The editing methods, one module each; importing this package registers every one of them.

Each module declares its parameter model, its editor and one ``MethodSpec`` (``editing.spec.register``).
A new module here is found by itself: adding a method is that module plus its presets
(``resources/presets/<name>/``). Methods of other packages register through the ``attnedit.methods``
entry-point group (each entry point names a module to import).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

ENTRY_POINTS = "attnedit.methods"


def load_all() -> None:
    """Import every method module of this package, then those named by ``attnedit.methods`` entry points
    (a broken third-party one is logged and skipped: it must not take the built-in methods down)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")
    for entry in entry_points(group=ENTRY_POINTS):
        try:
            entry.load()
        except Exception as err:  # a plug-in's own bug
            logger.error("method plug-in %r could not be loaded: %s", entry.value, err)


load_all()
