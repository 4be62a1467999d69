"""Split a labeled data set among clients: IID, Dirichlet label skew, pathological.

Written here rather than taken from flwr-datasets: its partitioners work on Hugging
Face ``datasets`` objects, while fedal's data are local numpy arrays that must never be
fetched from a hub; these three seeded splitters are short and exactly testable.
"""
from __future__ import annotations

import numpy as np

from fedal.exceptions import ConfigError


def partition(labels: np.ndarray, n_clients: int, method: str = "iid", *, alpha: float = 0.5,
              classes_per_client: int = 2, seed: int = 0, min_size: int = 2) -> list[np.ndarray]:
    """Indices of each client's samples (disjoint, covering every sample).

    Parameters
    ----------
    labels : array of int, shape (n,)
        Class of each sample.
    n_clients : int
        Number of clients.
    method : {"iid", "dirichlet", "pathological"}
        ``iid``: a seeded shuffle cut into equal parts. ``dirichlet``: per class, shares
        drawn from Dir(alpha) (Hsu, Qi & Brown 2019). ``pathological``: each client holds
        ``classes_per_client`` classes (McMahan et al. 2017).
    alpha : float
        Dirichlet concentration; small = strong label skew.
    classes_per_client : int
        Classes per client for ``pathological``.
    seed : int
        Seed of every random choice.
    min_size : int
        Dirichlet draws are repeated (up to 100 times) until each client has this many.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if n_clients < 1:
        raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
    if len(labels) < n_clients * max(min_size, 1):
        raise ConfigError(
            f"{len(labels)} samples cannot be split among {n_clients} clients with at least {min_size} each; "
            "use fewer clients or more data"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), n_clients)]
    if method == "dirichlet":
        if alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {alpha}")
        return _dirichlet(labels, n_clients, alpha, rng, min_size)
    if method == "pathological":
        return _pathological(labels, n_clients, classes_per_client, rng)
    raise ConfigError(f"unknown partition {method!r}; choose iid, dirichlet or pathological")


def _dirichlet(labels, n_clients, alpha, rng, min_size) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ConfigError(
        f"could not draw a Dirichlet(alpha={alpha}) partition giving each of {n_clients} clients "
        f"{min_size}+ samples in 100 tries; raise alpha or use fewer clients"
    )


def _pathological(labels, n_clients, k, rng) -> list[np.ndarray]:
    classes = np.unique(labels)
    if k > len(classes):
        raise ConfigError(f"classes-per-client ({k}) exceeds the {len(classes)} classes in the data")
    # deal classes round-robin so every class is used: client i gets classes i*k .. i*k+k-1 (mod C)
    order = rng.permutation(classes)
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(n_clients):
        for j in range(k):
            owners[int(order[(client * k + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c, clients in owners.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        if not clients:  # more classes than client slots: give the class to a random client
            clients = [int(rng.integers(n_clients))]
        for client, chunk in zip(clients, np.array_split(members, len(clients))):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def class_counts(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """Matrix ``(n_clients, n_classes)``: how many samples of each class (from ``labels``) each
    client's index array in ``parts`` holds."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
