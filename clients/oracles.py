"""Oracles of a deployed site: the people who answer label queries.

A person answers through a channel: the labeling page (``fedal label``) or a file
exchange (``fedal exchange`` / an inbox folder). The channel writes every answer to the
site's pool itself, in one SQLite transaction, *before* it acknowledges it (the page
replies to the click only after the commit), because no label a person gave may be lost
to a crash. So by the time a ClientApp asks its oracle, the answers are already labels in
the pool: :meth:`HumanOracle.label` only (optionally) waits for people and returns
``{}``; handing the same answers back to :meth:`fedal.learner.ActiveLearner.teach`
would record them twice, which the pool refuses (the samples are no longer pending).
Requests nobody answered stay pending, are counted in the round report, and expire
after the run's ``query-timeout``, when their samples return to the pool.

``make_oracle`` picks the oracle from the SuperNode's node config key ``oracle``:
``simulated`` (ground truth in the site file), ``web`` or ``file``.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clients.exchange import ExchangeError, export_requests, import_answers
from clients.node import NodeConfig
from fedal.config import FederationConfig
from fedal.data import LocalData
from fedal.exceptions import ConfigError
from fedal.federation import simulated_oracle
from fedal.oracle import Oracle, VerifyingOracle
from fedal.pool import PENDING, Pool


class HumanOracle(Oracle):
    """People answering on the labeling page, at their own pace.

    Parameters
    ----------
    pool : Pool
        The site's pool (the page writes answers into the same database).
    wait_s : float
        How long :meth:`label` waits for the asked samples to be answered before the
        client trains on what it has (0 = do not wait; late answers are used next round).
    poll_s : float
        How often the database is checked while waiting.
    """

    name = "web"

    def __init__(self, pool: Pool, *, wait_s: float = 0.0, poll_s: float = 0.5) -> None:
        if wait_s < 0 or poll_s <= 0:
            raise ConfigError(f"label-wait must be >= 0 and the poll interval > 0 seconds, got {wait_s} and {poll_s}")
        self.pool = pool
        self.wait_s = float(wait_s)
        self.poll_s = float(poll_s)

    def label(self, ids: Sequence[int]) -> dict[int, int]:
        """Wait up to ``wait_s`` for people to answer ``ids``; return ``{}`` (answers are already recorded)."""
        deadline = time.monotonic() + self.wait_s
        ids = [int(i) for i in ids]
        while ids and time.monotonic() < deadline:
            ids = [i for i in ids if self.pool.state_of(i) == PENDING]
            if ids:
                time.sleep(min(self.poll_s, max(deadline - time.monotonic(), 0.0)))
        return {}


class FileOracle(Oracle):
    """People answering by file: requests go out to a folder, filled CSVs come back in.

    Each time it is asked, it imports every ``*.csv`` in ``<folder>/inbox`` (all or
    nothing per file; a rejected file moves to ``rejected/`` next to a ``.errors.txt``
    saying why, an imported one to ``imported/``), then writes the requests still
    pending to ``<folder>/requests.csv`` with their images (see :mod:`clients.exchange`).

    Parameters
    ----------
    pool : Pool
        The site's pool.
    data : LocalData
        The site's data (for the images / feature rows).
    folder : path
        The exchange folder.
    settle_s : float
        A CSV modified less than this many seconds ago is left for next time (it may
        still be being written).
    """

    name = "file"

    def __init__(self, pool: Pool, data: LocalData, folder: str | Path, *, settle_s: float = 2.0) -> None:
        self.pool, self.data, self.folder = pool, data, Path(folder)
        self.settle_s = float(settle_s)
        for sub in ("inbox", "imported", "rejected"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def sync(self) -> int:
        """Import the inbox, export what is still pending; return the labels recorded."""
        recorded = 0
        now = time.time()
        for csv_path in sorted((self.folder / "inbox").glob("*.csv"), key=lambda p: p.stat().st_mtime):
            if now - csv_path.stat().st_mtime < self.settle_s:
                continue
            stamp = time.strftime("%Y%m%d-%H%M%S")
            try:
                recorded += import_answers(self.pool, csv_path).recorded
            except ExchangeError as exc:
                target = self.folder / "rejected" / f"{stamp}-{csv_path.name}"
                csv_path.replace(target)
                target.with_name(target.name + ".errors.txt").write_text(str(exc) + "\n")
                warnings.warn(f"answer file rejected, moved to {target}: {exc}", stacklevel=2)
                continue
            csv_path.replace(self.folder / "imported" / f"{stamp}-{csv_path.name}")
        export_requests(self.pool, self.data, self.folder)
        return recorded

    def label(self, ids: Sequence[int]) -> dict[int, int]:
        """Import answers from the inbox and export the pending requests (``ids`` among them);
        return ``{}``: the imported answers are already recorded."""
        self.sync()
        return {}


def make_oracle(node: NodeConfig, *, pool: Pool, data: LocalData, state_dir: Path, cfg: FederationConfig,
                predict=None) -> Oracle:
    """The oracle a site's node config asks for (``node.oracle``).

    Parameters
    ----------
    node : NodeConfig
        ``oracle``: ``simulated`` answers from the pool labels of the site file; ``web`` is a
        person on the labeling page (``label-wait``: seconds to wait for answers before
        training); ``file`` a person using the file exchange (``exchange-dir``, default
        ``<state-dir>/exchange-<client-id>``).
    pool : Pool
        The site's pool.
    data : LocalData
        The site's data.
    state_dir : Path
        The site's state directory.
    cfg : FederationConfig
        The run: the simulated oracle's noise (``noise-rate``, ``client-noise``, ``noise-kind``,
        ``unsure-rate``) and its second reader (``verify-threshold``).
    predict : callable, optional
        ``predict(ids) -> (classes, confidences)`` of the site's current model, or ``None`` before it is
        trained; needed for ``verify-threshold``.
    """
    if node.oracle == "simulated":
        if np.any(data.y_pool < 0):
            raise ConfigError(
                f"oracle 'simulated' needs the ground truth of every pool sample, but the data of client "
                f"{node.client_id} has unknown labels (-1); set oracle=\"web\" or oracle=\"file\" in the node config"
            )
        oracle = simulated_oracle(cfg, node.client_id, data.y_pool, data.n_classes)
        if cfg.verify_threshold > 0:
            if predict is None:
                raise ConfigError("verify-threshold needs the site's model to compare answers with")
            second = simulated_oracle(cfg, node.client_id, data.y_pool, data.n_classes, reviewer=True)
            oracle = VerifyingOracle(oracle, second, predict, cfg.verify_threshold)
        return oracle
    if cfg.verify_threshold > 0:
        raise ConfigError(f"verify-threshold is a simulation of second readings and needs oracle=\"simulated\"; "
                          f"client {node.client_id} has oracle={node.oracle!r}: set verify-threshold = 0 (a site with "
                          "people at the page reviews answers there)")
    if node.oracle == "web":
        return HumanOracle(pool, wait_s=node.label_wait)
    return FileOracle(pool, data, node.exchange_dir or state_dir / f"exchange-{node.client_id}")
