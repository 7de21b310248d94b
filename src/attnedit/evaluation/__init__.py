"""The evaluation layer: the metric table (``metrics``) and the per-case evaluator (``evaluator``)."""
