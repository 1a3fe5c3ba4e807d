"""Compare: every trace against its reference, tap by tap and decode step by step, with the fixed table and the
honest-noise model measured in the same run.
"""
