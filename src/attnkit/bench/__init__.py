"""Speed and memory measurement (``attnkit bench``). See :mod:`attnkit.bench.harness` for the JSON schema."""

from .harness import OPS, SCHEMA, BenchConfig, default_config, parse_pattern, run_bench

__all__ = ["BenchConfig", "run_bench", "default_config", "parse_pattern", "OPS", "SCHEMA"]
