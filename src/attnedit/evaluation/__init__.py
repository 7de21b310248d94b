"""The evaluation layer: the metric table (``metrics``), the per-case evaluator (``evaluator``) and the
answers to probe prompts shown before and after an edit (``answers``)."""
