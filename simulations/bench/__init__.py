"""Benchmarks: scripts that measure fedal and write tables and JSON under simulations/results/."""
