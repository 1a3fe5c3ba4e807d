"""The model being compared: spec, presets, canonical weights (seeded, stored, from checkpoints), prompts, the
canonical tap names and the tensor file format. Imports no framework and no later stage.
"""
