"""A SuperNode's own settings (its node config) and the durable pool they point at.

The node config is what a site's operator types (``flower-supernode --node-config
'client-id=0 data-path="site-0.npz" state-dir="state" oracle="web"'``); in a
simulation Flower gives ``partition-id`` and ``num-partitions`` instead. Every key is
checked here once: a typo is an error that lists the known keys, not a setting
silently ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedal.data import LocalData
from fedal.exceptions import ConfigError
from fedal.offline import DEFAULT_OFFLINE_AFTER_S, DEFAULT_OFFLINE_MAX_HOURS
from fedal.pool import Pool

ORACLE_KINDS = ("simulated", "web", "file")
#: node config key -> what it sets (``partition-id`` / ``num-partitions``: Flower's simulation)
NODE_KEYS = {
    "client-id": "the site's client id (0, 1, ...), the one identity it has in the federation",
    "partition-id": "the client id in a simulation (set by Flower)",
    "num-partitions": "the number of simulated clients (set by Flower; not used)",
    "data-path": "the site's own data: a file (fedal split) or a folder of images (PNG, JPEG, TIFF, BMP, DICOM; "
                 "class subfolders or a labels.csv give labels that exist); default: its share of the simulated data set",
    "labels-csv": "a folder site: the CSV (path,label) of labels already given (default <data-path>/labels.csv)",
    "test-path": "a folder site: a folder of labeled images (class subfolders or its labels.csv) as the local test set",
    "state-dir": "folder of the site's SQLite database (default: the run's state-dir)",
    "oracle": f"who answers label requests: {', '.join(ORACLE_KINDS)}",
    "query-timeout": "seconds a label request waits for an answer before it expires (overrides the run's)",
    "label-wait": "web oracle: seconds to wait for answers before training",
    "exchange-dir": "file oracle: the exchange folder (default <state-dir>/exchange-<client-id>)",
    "offline-after": "seconds without a message from the server after which `fedal site` asks for labels on its own "
                     "(default 900)",
    "offline-max-hours": "hours `fedal site` may go on asking with the last global model (default 72)",
    "offline-budget": "most labels this site asks for while offline; lowers the server's grant, never raises it "
                      "(default: the grant)",
    "suggest": "show people the model's class and confidence on the labeling page (default false); `fedal site` "
               "computes them, so it must run beside the SuperNode (without it the page shows none)",
    "secure-only": "answer a train message only under secure aggregation, whatever the run says: the server never "
                   "sees this site's update in the clear (default false)",
}


@dataclass(frozen=True)
class NodeConfig:
    """A site's node config, parsed and checked.

    Attributes
    ----------
    client_id : int
        ``client-id`` (or the simulation's ``partition-id``).
    data_path : str
        ``data-path`` ("" = the simulated federation's share of this client).
    state_dir : str
        ``state-dir`` ("" = the run's client state folder).
    oracle : str
        ``oracle``: ``simulated``, ``web`` or ``file``.
    query_timeout : float or None
        ``query-timeout`` (None = the run's setting).
    label_wait : float
        ``label-wait`` (web oracle).
    exchange_dir : str
        ``exchange-dir`` (file oracle; "" = the default folder).
    offline_after : float
        ``offline-after``: seconds without a message after which the site acts on its own (``fedal site``).
    offline_max_hours : float
        ``offline-max-hours``: how long it may go on asking for labels with its last global model.
    offline_budget : int or None
        ``offline-budget``: the site's own cap on labels asked offline (None = the server's grant).
    suggest : bool
        ``suggest``: the labeling page shows the model's class and confidence.
    secure_only : bool
        ``secure-only``: the site refuses a train message that does not come with Flower's SecAgg+ protocol
        (:mod:`clients.secure`), so a server that turns secure aggregation off gets nothing from it.
    labels_csv : str
        ``labels-csv``: a folder site's CSV of labels already given ("" = ``labels.csv`` in the folder, if any).
    test_path : str
        ``test-path``: a folder site's labeled local test set ("" = none).
    """

    client_id: int
    data_path: str = ""
    state_dir: str = ""
    oracle: str = "simulated"
    query_timeout: float | None = None
    label_wait: float = 0.0
    exchange_dir: str = ""
    offline_after: float = DEFAULT_OFFLINE_AFTER_S
    offline_max_hours: float = DEFAULT_OFFLINE_MAX_HOURS
    offline_budget: int | None = None
    suggest: bool = False
    secure_only: bool = False
    labels_csv: str = ""
    test_path: str = ""

    @property
    def folder(self) -> bool:
        """Whether ``data-path`` is a folder of image files (:mod:`fedal.imagefolder`)."""
        return bool(self.data_path) and Path(self.data_path).expanduser().is_dir()

    def site_folders(self) -> tuple[str, str]:
        """A folder site's pool and test folders: ``data-path`` and ``test-path``, or, for a site folder as ``fedal
        split --format png|dicom`` writes it (``pool/`` and ``test/`` in it), its two subfolders."""
        root = Path(self.data_path).expanduser()
        if (root / "pool").is_dir():
            test = self.test_path or (str(root / "test") if (root / "test").is_dir() else "")
            return str(root / "pool"), test
        return self.data_path, self.test_path

    @classmethod
    def from_mapping(cls, node_config: dict[str, Any]) -> "NodeConfig":
        """Parse Flower's ``context.node_config``; :class:`ConfigError` names a bad or unknown key."""
        unknown = sorted(set(node_config) - set(NODE_KEYS))
        if unknown:
            known = "; ".join(f"{k} ({v})" for k, v in NODE_KEYS.items())
            raise ConfigError(f"unknown node config key(s) {unknown}; known keys: {known}")
        key = "client-id" if "client-id" in node_config else "partition-id" if "partition-id" in node_config else None
        if key is None:
            raise ConfigError('the node config has neither client-id nor partition-id; start the SuperNode with '
                              '--node-config "client-id=0 ..."')
        client_id = _number(node_config, key, int, low=0)
        oracle = str(node_config.get("oracle", "simulated"))
        if oracle not in ORACLE_KINDS:
            raise ConfigError(f"unknown oracle {oracle!r} in the node config; choose one of {', '.join(ORACLE_KINDS)}")
        timeout = _number(node_config, "query-timeout", float, low=0) if "query-timeout" in node_config else None
        hours = _number(node_config, "offline-max-hours", float, low=0) if "offline-max-hours" in node_config \
            else DEFAULT_OFFLINE_MAX_HOURS
        if hours <= 0:
            raise ConfigError("node config offline-max-hours must be > 0 (hours a site may ask for labels alone); "
                              "set offline-budget=0 to ask for none while offline")
        return cls(client_id=client_id, data_path=str(node_config.get("data-path", "")),
                   state_dir=str(node_config.get("state-dir", "")), oracle=oracle, query_timeout=timeout,
                   label_wait=_number(node_config, "label-wait", float, low=0) if "label-wait" in node_config else 0.0,
                   exchange_dir=str(node_config.get("exchange-dir", "")),
                   offline_after=_number(node_config, "offline-after", float, low=0) if "offline-after" in node_config
                   else DEFAULT_OFFLINE_AFTER_S, offline_max_hours=hours,
                   offline_budget=_number(node_config, "offline-budget", int, low=0) if "offline-budget" in node_config
                   else None, suggest=_flag(node_config, "suggest"), secure_only=_flag(node_config, "secure-only"),
                   labels_csv=str(node_config.get("labels-csv", "")), test_path=str(node_config.get("test-path", "")))


def _flag(node_config: dict, key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"node config {key} must be true or false, got {value!r}")
    return value


def _number(node_config: dict, key: str, kind: type, *, low: float):
    value = node_config[key]
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {node_config[key]!r}") from None
    if math.isnan(value):  # NaN compares false with everything: every check below would let it through
        raise ConfigError(f"node config {key} must be a number, got nan (not a number); give a number of "
                          f"{'hours' if 'hours' in key else 'seconds'}")
    if value < low:
        raise ConfigError(f"node config {key} must be >= {low}, got {value!r}")
    return value


def open_site_pool(state_dir: str | Path, client_id: int, data: LocalData, *, create: bool = True,
                   grow: bool = False) -> Pool:
    """The durable pool of client ``client_id``: ``<state_dir>/client-<id>.db``, sized for its ``data``.

    ``create=False`` (the labeling page, the file exchange) refuses to make a new, empty
    database, which would mean a wrong ``state_dir`` or ``client_id``. ``grow`` (a folder
    site): samples new since the last open join the pool.
    """
    path = Path(state_dir) / f"client-{client_id}.db"
    if not create and not path.is_file():
        raise ConfigError(
            f"there is no client database {path}; give the state-dir and client-id of the SuperNode's node config "
            "(the file appears when the client handles its first round)"
        )
    return Pool(data.n_classes, size=len(data.y_pool), path=path, grow=grow)
