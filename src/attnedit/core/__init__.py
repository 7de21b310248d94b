"""The core layer: model families (adapters), loading, tokens, data records, hooks and interventions,
the scoring engine and weight edits. Imports nothing else of attnedit."""
