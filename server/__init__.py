"""Flower ServerApp, strategies with per-client budgets, results and checkpoints."""
