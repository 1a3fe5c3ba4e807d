"""Capture: resolve the implementations, run each in one dtype (in this process or another), and lay out what
it computed as traces (prefill and decode).
"""
