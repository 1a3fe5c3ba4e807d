"""Diagnose: name each divergence's cause (the catalogue), with probes first, then counterfactuals."""
