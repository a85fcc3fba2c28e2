"""Training: batch arithmetic, optimizer/schedule, checkpoints, metrics and the explicit accelerate loop."""
