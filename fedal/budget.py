"""Per-client query budgets, decided by the server from aggregate statistics only.

Policies (the share of a round's budget each client gets, before capacity limits):

* ``uniform``: equal shares;
* ``pool``: proportional to the client's reported unlabeled pool size;
* ``uncertainty``: proportional to the client's reported mean pool uncertainty.

A client can spend at most ``min(client_cap, unlabeled left)`` and nothing when
absent; what it cannot spend is handed to the others (water-filling), and budget
assigned to a client that then failed to answer is carried to the next round.
Labels a client asked for on its own while the server was away (its offline budget,
granted in advance) are reported when it is back: :meth:`BudgetCoordinator.record_offline`
keeps them, and they are taken from that client's next shares (not handed to the others:
they were spent already).
Every assignment and spend is kept in a ledger, and the coordinator keeps what each
client last reported (its :class:`ClientStats`): it is the one owner of both, keyed by
the client id.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedal.exceptions import ConfigError

POLICIES = ("uniform", "pool", "uncertainty")


@dataclass
class ClientStats:
    """What the server knows of a client: aggregate scalars it reported.

    Attributes
    ----------
    unlabeled : int or None
        Unlabeled samples left (None before the first report).
    uncertainty : float
        Mean uncertainty of its pool (NaN before the first report).
    available : bool
        Whether the client takes part in this round.
    """

    unlabeled: int | None = None
    uncertainty: float = math.nan
    available: bool = True


@dataclass
class LedgerRow:
    """One client's budget in one round: ``assigned`` labels, ``spent`` (None until reported),
    ``status`` assigned / spent / failed, and ``offline_deducted``: what its share lost to labels it
    asked for while offline (``assigned`` is what is left)."""

    round: int
    client: int | str
    assigned: int
    spent: int | None = None
    status: str = "assigned"  # assigned | spent | failed
    offline_deducted: int = 0


@dataclass
class OfflineRow:
    """``spent`` labels ``client`` asked for while the server was away, reported in ``round``."""

    round: int
    client: int | str
    spent: int


class BudgetCoordinator:
    """Split each query round's label budget among clients.

    Parameters
    ----------
    policy : {"uniform", "pool", "uncertainty"}
        How shares are weighted.
    round_budget : int
        Labels per query round for the whole federation.
    client_cap : int
        Most labels per client per round (0 = no cap).
    carry_over : bool
        Add budget that failed clients did not spend to the next round.
    """

    def __init__(self, policy: str = "uniform", round_budget: int = 50, client_cap: int = 0,
                 carry_over: bool = True) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"budget policy must be one of {POLICIES}, got {policy!r}")
        if round_budget < 0:
            raise ConfigError(f"round budget must be >= 0, got {round_budget}")
        if client_cap < 0:
            raise ConfigError(f"client cap must be >= 0 (0 = no cap), got {client_cap}")
        self.policy = policy
        self.round_budget = int(round_budget)
        self.client_cap = int(client_cap)
        self.carry_over = carry_over
        self.carry = 0
        self.ledger: list[LedgerRow] = []
        self.stats: dict[int | str, ClientStats] = {}  # client -> what it last reported
        self.offline: list[OfflineRow] = []  # offline spend as reported
        self.debt: dict[int | str, int] = {}  # client -> offline labels not yet taken from its shares

    # ------------------------------------------------------------- reports
    def report(self, client: int | str, unlabeled: int, uncertainty: float) -> None:
        """Keep what ``client`` reported: ``unlabeled`` samples left, mean pool ``uncertainty`` (NaN = unknown)."""
        self.stats[client] = ClientStats(int(unlabeled), float(uncertainty))

    def allocate_to(self, round: int, clients, limit: int | None = None, *, carried_only: bool = False) -> dict:
        """Budgets for ``round`` among ``clients`` (the ones taking part), from what each last
        reported (a client never heard of weighs the average, with no capacity limit); at most
        ``limit`` labels in all (what is left of a whole run's budget); ``carried_only``: only what
        failed clients left (a round between query rounds that makes their labels up)."""
        return self.allocate(round, {c: self.stats.get(c, ClientStats()) for c in clients}, limit=limit,
                             carried_only=carried_only)

    # ------------------------------------------------------------- allocation
    def weights(self, stats: dict[str, ClientStats]) -> dict[str, float]:
        """Policy weight of each client (before capacities), from ``stats`` (client -> ClientStats)."""
        if self.policy == "uniform":
            return {c: 1.0 for c in stats}
        if self.policy == "pool":
            values = {c: None if s.unlabeled is None else float(s.unlabeled) for c, s in stats.items()}
        else:
            values = {c: None if math.isnan(s.uncertainty) else max(float(s.uncertainty), 0.0)
                      for c, s in stats.items()}
        known = [v for v in values.values() if v is not None]
        if not known or sum(known) <= 0:
            return {c: 1.0 for c in stats}
        fill = sum(known) / len(known)  # a client that has not reported yet gets the average
        return {c: fill if v is None else v for c, v in values.items()}

    def capacity(self, s: ClientStats) -> int:
        """Most a client with stats ``s`` can spend this round."""
        if not s.available:
            return 0
        cap = self.client_cap if self.client_cap > 0 else math.inf
        left = math.inf if s.unlabeled is None else max(int(s.unlabeled), 0)
        out = min(cap, left)
        return int(out) if out != math.inf else 1 << 40

    def allocate(self, round: int, stats: dict[str, ClientStats], limit: int | None = None, *,
                 carried_only: bool = False) -> dict[str, int]:
        """Budgets for ``round`` from ``stats`` (client -> ClientStats): shares by policy,
        limited by capacity, the excess redistributed.

        The budgets sum to ``min(round_budget + carried, limit, total capacity)``, less what clients
        owe for labels they asked for offline (:meth:`record_offline`), which is taken from their own shares;
        ``carried_only``: the carried labels alone (a make-up round between query rounds).
        """
        total = (0 if carried_only else self.round_budget) + (self.carry if self.carry_over else 0)
        if limit is not None:
            total = max(min(total, int(limit)), 0)
        self.carry = 0
        weights = self.weights(stats)
        caps = {c: self.capacity(s) for c, s in stats.items()}
        assigned = {c: 0 for c in stats}
        remaining = total
        active = [c for c in sorted(stats) if caps[c] > 0]
        while remaining > 0 and active:
            wsum = sum(weights[c] for c in active)
            w = {c: (weights[c] / wsum if wsum > 0 else 1 / len(active)) for c in active}
            shares = _largest_remainder(remaining, w)
            for c in active:
                give = min(shares[c], caps[c] - assigned[c])
                assigned[c] += give
                remaining -= give
            active = [c for c in active if assigned[c] < caps[c]]
            if all(shares[c] == 0 for c in active):  # rounding left nothing to hand out
                for c in active[:remaining]:
                    assigned[c] += 1
                    remaining -= 1
        for c in sorted(stats):
            owed = min(self.debt.get(c, 0), assigned[c])
            if owed:
                assigned[c] -= owed
                self.debt[c] -= owed
            self.ledger.append(LedgerRow(round, c, assigned[c], offline_deducted=owed))
        return assigned

    def record_offline(self, round: int, client: int | str, spent: int) -> None:
        """``client`` reported in ``round`` that it asked for ``spent`` labels while the server was away; they are
        taken from its next shares."""
        if isinstance(spent, bool) or not isinstance(spent, int) or spent < 0:
            raise ConfigError(f"client {client} reports {spent!r} offline labels in round {round}; expected an integer >= 0")
        if spent == 0:
            return
        self.offline.append(OfflineRow(round, client, spent))
        self.debt[client] = self.debt.get(client, 0) + spent

    def record_spent(self, round: int, client: int | str, spent: int | None, *, failed: bool = False) -> None:
        """Record what a client spent in a round (``failed`` if it never answered)."""
        for row in self.ledger:
            if row.round == round and row.client == client:
                if failed:
                    row.spent, row.status = 0, "failed"
                    self.carry += row.assigned
                else:
                    if spent is not None and spent > row.assigned:
                        raise ConfigError(
                            f"client {client} reports {spent} queries in round {round} but was assigned {row.assigned}"
                        )
                    row.spent, row.status = spent, "spent"
                return
        raise ConfigError(f"no budget was assigned to client {client} in round {round}")

    def assigned(self, round: int) -> dict[str, int]:
        """Budgets assigned in a round."""
        return {r.client: r.assigned for r in self.ledger if r.round == round}

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """JSON-able state (for checkpoints): carry, ledger and the clients' last reports."""
        stats = [{"client": c, "unlabeled": s.unlabeled, "uncertainty": None if math.isnan(s.uncertainty) else
                  s.uncertainty} for c, s in self.stats.items()]
        return {"carry": self.carry, "ledger": [asdict(r) for r in self.ledger], "stats": stats,
                "offline": [asdict(r) for r in self.offline],
                "debt": [{"client": c, "labels": n} for c, n in self.debt.items() if n]}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state``, as made by :meth:`state_dict`."""
        self.carry = int(state.get("carry", 0))
        self.ledger = [LedgerRow(**r) for r in state.get("ledger", [])]
        self.stats = {r["client"]: ClientStats(r["unlabeled"], math.nan if r["uncertainty"] is None else r["uncertainty"])
                      for r in state.get("stats", [])}
        self.offline = [OfflineRow(**r) for r in state.get("offline", [])]
        self.debt = {r["client"]: int(r["labels"]) for r in state.get("debt", [])}


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer shares of ``total`` proportional to ``weights`` (Hamilton's method; ties by name)."""
    raw = {c: total * w for c, w in weights.items()}
    out = {c: int(math.floor(v)) for c, v in raw.items()}
    left = total - sum(out.values())
    for c in sorted(raw, key=lambda c: (-(raw[c] - out[c]), c))[:left]:
        out[c] += 1
    return out
