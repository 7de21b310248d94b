"""The analysis layer: the SADR paper's section 3 analyses and ROME's causal tracing as functions returning
JSON-ready dataclasses, one module per analysis (``tracing``, ``substitution``, ``drift``, ``patching``) on
one shared engine (``engine``); ``aggregate`` turns per-case records into the figures' grids and ``plots``
draws them."""
