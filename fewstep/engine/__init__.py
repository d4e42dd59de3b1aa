"""Training machinery: the loop, EMA, checkpoints, distributed setup, logging."""
