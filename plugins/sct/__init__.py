"""sCT (placeholder)."""
