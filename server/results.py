"""Results of a run (``results.json``, ``results.csv``, ``curve.png``) and checkpoints.

Every file is written to a temporary name and moved into place, so a run killed at
any moment leaves the previous complete version, never half a file. Checkpoints are
``model.npz`` (plain arrays, no pickle) plus ``state.json``. The results and the
checkpoint are rewritten every round; the plot, which costs more to draw than a round of
the head pipeline takes, at most every ``plot_every_s`` seconds while the run goes on,
and once more when it ends (:meth:`RunRecorder.finish`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from fedal.fileio import atomic_write

CHECKPOINT_DIR = "checkpoint"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class RunRecorder:
    """Collects one row per round and keeps the output files up to date.

    Parameters
    ----------
    output_dir : path
        Where results and the checkpoint go.
    config : dict
        The run's settings, stored under ``"config"`` in ``results.json``.
    plot_every_s : float
        Least seconds between two drawings of ``curve.png`` while the run goes on (0: every round).
    """

    def __init__(self, output_dir: str | os.PathLike, config: dict, plot_every_s: float = 30.0) -> None:
        self.out = Path(output_dir)
        self.config = config
        self.rounds: list[dict] = []
        self.events: list[dict] = []
        self.plot_every_s = plot_every_s
        self._plotted_rows = 0  # how many rows curve.png shows
        self._plotted_at = time.monotonic()

    def add_round(self, row: dict, checkpoint: tuple[dict, dict] | None = None) -> None:
        """Append a round (``round``, ``labels``, ``accuracy``, ``clients`` ...) and rewrite the files.

        ``checkpoint = (model weights, server state)`` is saved first: a run killed between the two
        writes has results that never claim a round its checkpoint lacks (resume takes the results
        from the checkpoint).
        """
        self.rounds.append(row)
        if checkpoint is not None:
            self.save_checkpoint(row["round"], *checkpoint)
        self.write()

    def add_event(self, server_round: int, kind: str, detail: str) -> None:
        """Record something the run should tell (a failed client, a rejected update, the network taking over)."""
        self.events.append({"round": server_round, "kind": kind, "detail": detail})

    def to_dict(self) -> dict:
        """The content of ``results.json``."""
        return _clean({"config": self.config, "rounds": self.rounds, "events": self.events})

    def finish(self) -> None:
        """Draw ``curve.png`` with every round (the end of a run, finished or not)."""
        if len(self.rounds) > self._plotted_rows:
            self.plot()

    def plot(self) -> None:
        """Draw ``curve.png`` now."""
        plot_curves({self.config.get("strategy", "fedal"): self.rounds}, self.out / "curve.png",
                    title=run_title(self.config))
        self._plotted_rows, self._plotted_at = len(self.rounds), time.monotonic()

    def write(self) -> None:
        """Rewrite ``results.json`` and ``results.csv``, and ``curve.png`` if it is due (``plot_every_s`` seconds
        after the recorder began or last drew it)."""
        atomic_write(self.out / "results.json", json.dumps(self.to_dict(), indent=2))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["round", "labels", "accuracy", "loss", "queried", "clients_reporting"])
        for r in self.rounds:
            writer.writerow([r["round"], r["labels"], f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
                             sum(c["queried"] for c in r["clients"].values()), len(r["clients"])])
        atomic_write(self.out / "results.csv", buf.getvalue())
        if self.rounds and time.monotonic() - self._plotted_at >= self.plot_every_s:
            self.plot()

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, server_round: int, state: dict[str, np.ndarray], extra: dict,
                        server_arrays: dict[str, np.ndarray] | None = None) -> None:
        """Model weights and server state after ``server_round`` (``server_arrays``: what the strategy keeps
        between rounds, such as the sites' last head statistics, in ``server.npz``); ``state.json`` is
        written last, so a checkpoint it names is whole."""
        folder = self.out / CHECKPOINT_DIR
        for name, arrays in (("model.npz", state), ("server.npz", server_arrays or {})):
            buf = io.BytesIO()
            np.savez(buf, **{k.replace(".", "__"): v for k, v in arrays.items()})
            atomic_write(folder / name, buf.getvalue())
        atomic_write(folder / "state.json", json.dumps(_clean({
            "round": server_round, "keys": list(state), "server_keys": list(server_arrays or {}),
            "results": self.to_dict(), **extra}), indent=2))

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict] | None:
        """``(round, weights, state)`` of the last checkpoint, or None if there is none."""
        folder = self.out / CHECKPOINT_DIR
        if not (folder / "state.json").is_file():
            return None
        state = json.loads((folder / "state.json").read_text())
        with np.load(folder / "model.npz", allow_pickle=False) as f:
            weights = {k: f[k.replace(".", "__")] for k in state["keys"]}
        self.rounds = state["results"]["rounds"]
        self.events = state["results"].get("events", [])
        return int(state["round"]), weights, state

    def load_server_arrays(self, state: dict) -> dict[str, np.ndarray]:
        """The strategy's arrays of the checkpoint whose ``state.json`` is ``state`` (empty if it kept none)."""
        keys = state.get("server_keys", [])
        if not keys:
            return {}
        with np.load(self.out / CHECKPOINT_DIR / "server.npz", allow_pickle=False) as f:
            return {k: f[k.replace(".", "__")] for k in keys}


def run_title(config: dict) -> str:
    """A plot title naming the data set, the clients, the partition (with its alpha) and the pipeline."""
    partition = config.get("partition")
    if partition == "dirichlet":
        partition = f"dirichlet(alpha={config.get('alpha')})"
    return (f"{config.get('dataset')} - {config.get('clients')} clients, {partition}, "
            f"{config.get('pipeline', 'network')} pipeline")


def plot_curves(curves: dict[str, list[dict]], path: Path, *, title: str = "", bands: dict | None = None) -> None:
    """Accuracy vs labels, one line per curve (``bands``: name -> (lo, hi) arrays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, rows in curves.items():
        x = [r["labels"] for r in rows]
        y = [r["accuracy"] for r in rows]
        ax.plot(x, y, marker="o", ms=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xlabel("labels (all clients)")
    ax.set_ylabel("test accuracy (global model)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
