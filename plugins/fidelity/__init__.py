"""torch-fidelity evaluators (FID, KID, IS, precision/recall), offline Inception."""
