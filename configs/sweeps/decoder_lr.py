"""The tiny decoder's learning rate against how often the CLIP embedding is dropped in training.

  python -m unclip_jax.sweep --config=configs/decoder.py:tiny \
      --sweep=configs/sweeps/decoder_lr.py --workdir=runs/sweep_decoder_lr
  python -m unclip_jax.sweep --summarize=runs/sweep_decoder_lr \
      --metric=samples_shape_accuracy --x=optim.lr

Six points of about 8 minutes each on 2 CPU cores (4000 steps at batch 16).
"""

from unclip_jax.sweep import product, sweep


def get_sweep():
  return product(sweep('optim.lr', [5e-4, 1e-3, 2e-3]),
                 sweep('decoder.clip_drop_prob', [0.1, 0.2]))
