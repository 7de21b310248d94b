"""The editing layer: presets, context templates, covariance statistics, the target optimisation with
its loss terms (SADR), the closed-form solvers, one module per method and the method registry."""
