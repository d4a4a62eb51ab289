"""Metrics for generated samples (FID and friends)."""
