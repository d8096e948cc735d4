"""Sampling: per-sample noise and labels, generation, grids, resumable .npz jobs, and the one loader from a
checkpoint to a ready-to-sample source."""
