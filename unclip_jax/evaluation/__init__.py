"""Evaluating generated images the way the field does: FID/KID and precision/recall on the
standard Inception-v3 pool features (`inception`, `fid`), and the CLIP score."""
