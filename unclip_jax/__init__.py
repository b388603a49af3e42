"""unclip_jax: unCLIP (CLIP, diffusion prior, decoder, upsamplers) in JAX/Flax. See README.md."""
