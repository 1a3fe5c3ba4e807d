"""The gate: the one verdict, the checks the suite asserts, baselines and waivers."""
