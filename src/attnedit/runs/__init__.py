"""The runs layer: run directories (manifest, identity, resume), the evaluation runner, analysis runs,
reports."""
