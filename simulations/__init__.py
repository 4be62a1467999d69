"""Experiment entry points: fedal simulate / compare, presets and benchmarks."""
