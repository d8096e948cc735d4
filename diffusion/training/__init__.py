"""Training: the loop, the run it drives, resuming, stopping, and the small pieces of a step."""
