"""Each library's format, framework-free: weight names, layouts and options, both directions in one module.

The adapter that builds a library's model and the checkpoint reader that loads its files both use the
module here, so a name or a layout is written once and the round trip is tested (tests/test_formats.py).
"""
