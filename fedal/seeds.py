"""Every seed fedal derives from the run's seed, in one place.

A run is reproducible because each random choice draws from a seed computed here from
the run's ``seed`` and where the choice is made (which client, which query, which fit).
The centralized reference of ``fedal compare`` picks the same initial labels as the
federation by calling the same functions, so the two cannot drift apart.
"""
from __future__ import annotations


def client_seed(run_seed: int, client_id: int) -> int:
    """Seed of everything client ``client_id`` of a run seeded ``run_seed`` draws (local test split,
    model, oracle, queries)."""
    return int(run_seed) * 1000 + int(client_id)


def reviewer_seed(run_seed: int, client_id: int) -> int:
    """Seed of the noise of the second (simulated) reader of client ``client_id`` of a run seeded ``run_seed``
    (``verify-threshold``)."""
    return client_seed(run_seed, client_id) + 13


def local_model_seed(run_seed: int, client_id: int) -> int:
    """Seed of the local model client ``client_id`` of a run seeded ``run_seed`` trains next to the global
    one for a federated-aware strategy (LoGo, KAFAL)."""
    return client_seed(run_seed, client_id) + 7


def query_seed(learner_seed: int, step: int) -> int:
    """Seed of the ``step``-th query (0 = the initial set) of a learner seeded with ``learner_seed``."""
    return int(learner_seed) * 100_003 + int(step)


def fit_seed(model_seed: int, fit_index: int) -> int:
    """Seed of the shuffling and dropout of the ``fit_index``-th fit of a model seeded with ``model_seed``."""
    return int(model_seed) * 7919 + int(fit_index)


def reinit_seed(run_seed: int, server_round: int) -> int:
    """Seed of the global model of a run seeded ``run_seed`` re-initialised at query round ``server_round``
    (``reinit = true``)."""
    return int(run_seed) + int(server_round)
