"""ECT: easy consistency training (EDM parameterisation) baseline."""
