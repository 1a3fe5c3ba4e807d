"""mlx-lm's own Gemma classes on MLX's CPU backend as a parity implementation (`--impls mlx`).

checkpoint.py writes the HF directory mlx-lm users load and loads it with mlx-lm's `load_model`;
recording.py swaps recording wrappers into the loaded module tree; readback.py reads back what was built
(mlx-lm's ModelArgs and the built modules) and its caches; adapter.py is the Adapter. Nothing here is
imported until `--impls mlx` is asked for (parity.adapters.registry).
"""

from parity.adapters.mlx.adapter import MlxAdapter

__all__ = ["MlxAdapter"]
