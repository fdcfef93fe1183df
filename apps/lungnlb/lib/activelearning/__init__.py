"""Active learning: scores cached per model version, and the strategies that rank by them."""
