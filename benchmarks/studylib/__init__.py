"""Shared pieces of the benchmark studies (runs, analysis, plots); the scripts put benchmarks/ on sys.path."""
