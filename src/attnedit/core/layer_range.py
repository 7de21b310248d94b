"""Layer lists as users write them: ``3-7``, ``3,4,5``, ``[3, 4, 5]``, ``2-4,8``, ``all``.

The one parser behind ``--param layers=...``, the SADR layer range and ``--drift-layers``.
"""

from __future__ import annotations

EVERY_LAYER = ("", "all", "none")  # spellings of "no restriction"


def parse_layers(text: str) -> list[int] | None:
    """The layers ``text`` names, in the order written; None for every layer (``all``, ``none``, empty).

    Items are separated by commas; each is a layer number or an inclusive range ``FIRST-LAST``
    (``2-4,8`` is ``[2, 3, 4, 8]``). Surrounding brackets are allowed (``[3, 4, 5]``, JSON style).
    Raises ``ValueError`` naming ``text`` for anything else (negative numbers, ``7-3``, a repeated layer).
    """
    body = text.strip()
    if body.lower() in EVERY_LAYER:
        return None
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    layers: list[int] = []
    items = [item.strip() for item in body.split(",") if item.strip()]  # a trailing comma is harmless
    if not items:
        raise ValueError(f"layers {text!r}: no layer given (expected e.g. 3-7, 3,4,5 or all)")
    for item in items:
        first, dash, last = item.partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ValueError(
                f"layers {text!r}: {item!r} is not a layer or FIRST-LAST (expected e.g. 3-7, 3,4,5 or all)"
            ) from None
        if lo < 0 or hi < lo:
            raise ValueError(f"layers {text!r}: {item!r} is not a range 0 <= FIRST <= LAST")
        layers += range(lo, hi + 1)
    repeated = sorted({x for x in layers if layers.count(x) > 1})
    if repeated:
        raise ValueError(f"layers {text!r}: layer(s) {repeated} given more than once")
    return layers
