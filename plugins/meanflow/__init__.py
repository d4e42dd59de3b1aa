"""MeanFlow: average-velocity objective with a JVP target, and its sampler."""
