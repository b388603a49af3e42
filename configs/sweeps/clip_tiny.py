"""The tiny CLIP's learning rate and batch size, paired (zipit) or every combination (product).

  python -m unclip_jax.sweep --config=configs/clip.py:tiny \
      --sweep=configs/sweeps/clip_tiny.py --workdir=runs/sweep_clip
  python -m unclip_jax.sweep --config=configs/clip.py:tiny \
      --sweep=configs/sweeps/clip_tiny.py:product --workdir=runs/sweep_clip_product

Each point takes 2 to 3 minutes on 2 CPU cores (1200 steps at batch 128).
"""

from unclip_jax.sweep import product, sweep, zipit


def get_sweep(arg: str = 'zip'):
  lrs = sweep('optim.lr', [3e-4, 1e-3, 3e-3])
  batches = sweep('batch_size', [64, 128, 256])
  if arg == 'zip':
    return zipit(lrs, batches)
  if arg == 'product':
    return product(lrs, batches)
  raise ValueError(f"configs/sweeps/clip_tiny.py: unknown variant {arg!r}; use 'zip' or "
                   "'product'")
