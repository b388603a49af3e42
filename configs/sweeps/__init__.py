"""Sweep files for `python -m unclip_jax.sweep` (each defines get_sweep())."""
