"""Which samples each simulated client holds: the data set split by the configured
partition, then each client's share split into its pool and a local test set.

Pure functions of the :class:`~fedal.config.FederationConfig`, so the server, every
client process and ``fedal simulate`` compute the same split without exchanging it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedal.config import FederationConfig
from fedal.data import Dataset, LocalData, load_dataset
from fedal.exceptions import ConfigError
from fedal.oracle import SimulatedOracle
from fedal.partition import class_counts, partition
from fedal.seeds import client_seed, reviewer_seed


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str, seed: int, max_train: int, n_classes: int = 0) -> Dataset:
    return load_dataset(name, data_dir or None, seed=seed, max_train=max_train or None, n_classes=n_classes or None)


#: channels of the image data sets fedal knows by name (their sides are 28 unless the run's input-size says)
KNOWN_CHANNELS = {"bloodmnist": 3, "pneumoniamnist": 1, "mnist": 1}


def run_side(cfg: FederationConfig) -> int:
    """The side of the run ``cfg``'s images: ``input-size``, else 28 for the data sets fedal knows by name (0: the
    data set's own)."""
    return cfg.input_size or (28 if cfg.dataset in KNOWN_CHANNELS else 0)


def federation_dataset(cfg: FederationConfig) -> Dataset:
    """The data set of the run ``cfg`` (cached per process), its images at the run's side (:func:`run_side`)."""
    return _sized_dataset(cfg.dataset, cfg.data_dir, cfg.seed, cfg.max_train, cfg.n_classes, run_side(cfg),
                          cfg.resize_policy)


@lru_cache(maxsize=2)
def _sized_dataset(name: str, data_dir: str, seed: int, max_train: int, n_classes: int, size: int,
                   policy: str) -> Dataset:
    ds = _dataset(name, data_dir, seed, max_train, n_classes)
    if not size or ds.kind != "image" or ds.input_shape[-2:] == (size, size):
        return ds
    from dataclasses import replace

    from fedal.data import resize_images

    return replace(ds, X_train=resize_images(ds.X_train, size, policy), X_test=resize_images(ds.X_test, size, policy))


@lru_cache(maxsize=4)
def _parts(name, data_dir, seed, max_train, clients, method, alpha, k, n_classes=0) -> tuple[np.ndarray, ...]:
    ds = _dataset(name, data_dir, seed, max_train, n_classes)
    return tuple(partition(ds.y_train, clients, method, alpha=alpha, classes_per_client=k, seed=seed, min_size=4))


def client_parts(cfg: FederationConfig) -> list[np.ndarray]:
    """Training-set indices of every client of the run ``cfg``."""
    return list(_parts(cfg.dataset, cfg.data_dir, cfg.seed, cfg.max_train, cfg.clients, cfg.partition,
                       cfg.alpha, cfg.classes_per_client, cfg.n_classes))


def client_data(cfg: FederationConfig, client_id: int) -> LocalData:
    """The data client ``client_id`` holds in a simulation of the run ``cfg``."""
    if not 0 <= client_id < cfg.clients:
        raise ConfigError(f"client id {client_id} is outside 0..{cfg.clients - 1}")
    ds = federation_dataset(cfg)
    idx = client_parts(cfg)[client_id]
    rng = np.random.default_rng(client_seed(cfg.seed, client_id))
    idx = rng.permutation(idx)
    n_test = int(round(len(idx) * cfg.local_test_fraction))
    test, pool = np.sort(idx[:n_test]), np.sort(idx[n_test:])
    return LocalData(client_id, ds.X_train[pool], ds.y_train[pool], ds.X_train[test], ds.y_train[test],
                     ds.n_classes, ds.class_names, ds.kind)


def simulated_oracle(cfg: FederationConfig, client_id: int, labels: np.ndarray, n_classes: int, *,
                     reviewer: bool = False) -> SimulatedOracle:
    """The simulated reader of client ``client_id`` of the run ``cfg`` (its noise rate from ``client-noise`` /
    ``noise-rate``, the run's noise kind and unsure rate), answering with ground truth ``labels`` (one per pool
    sample) among ``n_classes`` classes; with ``reviewer`` its second reader (same reliability, its own
    noise). The site and the centralized reference of ``fedal compare`` both build it here, so they agree."""
    rates = cfg.client_noise_rates()
    if cfg.client_noise.strip() and not 0 <= client_id < len(rates):
        raise ConfigError(f"client-noise gives rates for clients 0..{len(rates) - 1}, not client {client_id}")
    rate = rates[client_id] if 0 <= client_id < len(rates) else cfg.noise_rate
    seed = reviewer_seed(cfg.seed, client_id) if reviewer else client_seed(cfg.seed, client_id)
    return SimulatedOracle(labels, n_classes, noise_rate=rate, seed=seed, noise_kind=cfg.noise_kind,
                           unsure_rate=cfg.unsure_rate)


def check_label_budgets(cfg: FederationConfig) -> None:
    """Raise :class:`ConfigError` when the label budgets of ``cfg`` cannot fit the simulated pools.

    Every client needs a non-empty pool holding at least ``initial_labels`` samples, and a
    query round's ``round_budget`` must not exceed what all pools hold after the initial
    labels (it could never be spent).

    Parameters
    ----------
    cfg : FederationConfig
        The run's settings (data set, clients, partition, local test share, budgets).
    """
    pools = [len(client_data(cfg, c).y_pool) for c in range(cfg.clients)]
    small = int(np.argmin(pools))
    if pools[small] == 0:
        raise ConfigError(f"client {small} has an empty pool (all its samples went to its local test set); "
                          "lower --local-test-fraction or use fewer --clients")
    if cfg.initial_labels > pools[small]:
        raise ConfigError(f"initial-labels {cfg.initial_labels} is more than client {small}'s pool of {pools[small]} "
                          f"samples; lower --initial-labels to at most {pools[small]}, or give each client more data "
                          "(fewer --clients, a larger --max-train)")
    left = sum(pools) - cfg.clients * cfg.initial_labels
    if cfg.round_budget > left:
        raise ConfigError(f"round-budget {cfg.round_budget} is larger than the {left} unlabeled samples all clients "
                          f"hold after their initial labels; lower --round-budget to at most {left}")


def check_federation(cfg: FederationConfig) -> Dataset:
    """Every check of a run that needs its data, before anything starts (``fedal simulate``, the deployment helper):
    the data set loads, the label budgets fit the pools (:func:`check_label_budgets`), and secure aggregation has a
    bound on the head's features. Returns the data set.

    Parameters
    ----------
    cfg : FederationConfig
        The run's settings.

    Raises
    ------
    ConfigError, DataFileError
        Naming the problem and the fix.
    """
    ds = federation_dataset(cfg)
    check_label_budgets(cfg)
    if cfg.pipeline != "network":  # secure aggregation needs a bound on the features (raises if there is none)
        from fedal.models import statistics_clip_norm

        statistics_clip_norm(cfg, ds.input_shape)
    return ds


def partition_table(cfg: FederationConfig) -> str:
    """Per-client class counts of the run ``cfg`` as a text table (printed at the start of a run)."""
    ds = federation_dataset(cfg)
    counts = class_counts(ds.y_train, client_parts(cfg), ds.n_classes)
    head = "client | " + " ".join(f"{c:>5d}" for c in range(ds.n_classes)) + " | total"
    lines = [head, "-" * len(head)]
    for cid, row in enumerate(counts):
        lines.append(f"{cid:>6d} | " + " ".join(f"{v:>5d}" for v in row) + f" | {row.sum():>5d}")
    return "\n".join(lines)
