"""Exact reference backends: the per-sample loop and torch.func vmap."""
