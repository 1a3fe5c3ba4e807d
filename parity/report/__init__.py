"""Report: the terminal, report.json, report.md and report.html, and the `python -m parity.report` command
line.
"""
