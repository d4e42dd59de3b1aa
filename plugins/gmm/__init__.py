"""Gaussian-mixture data with an exact solution function, and its evaluator."""
