"""Reference models and helpers for testing and benchmarking e3fast against e3nn."""
