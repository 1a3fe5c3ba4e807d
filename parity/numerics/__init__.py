"""The arithmetic every stage shares: the dtypes' formats and every per-dtype table (tolerances), and the error
statistics (metrics). Imports nothing of parity but its errors.
"""
