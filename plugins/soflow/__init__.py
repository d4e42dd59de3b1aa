"""SoFlow: Solution Flow Models (objective and samplers)."""
