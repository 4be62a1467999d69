"""The server's round book: who each node is, what every client reported, budgets and privacy.

One object owns everything the server learns while a federation runs, so the round
loop, the results and the checkpoint read it in one place:

* the identity of each node: Flower's node id -> the client id it reported (the one name
  a client has everywhere else: ledger, results, checkpoint);
* per round: the budget each client was sent, its report, and what went wrong (a failed
  client, a rejected update) as :class:`RoundEvent` rows;
* the budget coordinator (:class:`fedal.budget.BudgetCoordinator`: ledger and the
  clients' last statistics) and each client's labeled count;
* with differential privacy, the privacy accountant and its settings.

:meth:`RoundBook.state_dict` is the server state a checkpoint holds.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

from fedal.budget import BudgetCoordinator
from fedal.messages import TrainReport
from fedal.stopping import StepRecord
from server.privacy import GaussianAccountant, PrivacySettings, privacy_config

log = logging.getLogger("fedal.server")


@dataclass(frozen=True)
class RoundEvent:
    """Something that went wrong with one node in one round.

    Attributes: ``kind`` (``failed``: no usable reply; ``rejected``: a reply or update the
    server refused; ``no-budget``: left out of a query round's budget; ``not-aggregated``: the round as a whole,
    with no client or node), ``client`` (None while the node has not said which client it is),
    ``node`` (Flower's node id) and ``reason``.
    """

    kind: str
    client: int | None
    node: int | None
    reason: str

    def describe(self) -> str:
        if self.node is None:
            return self.reason
        who = f"client {self.client}" if self.client is not None else "a client not yet identified"
        return f"{who} (node {self.node}): {self.reason}"


@dataclass
class RoundLog:
    """What the server saw of the clients in one round (aggregate scalars only)."""

    server_round: int
    query: bool
    nodes: list[int] = field(default_factory=list)  # the nodes it was sent to
    assigned: dict[int, int] = field(default_factory=dict)  # client -> query budget sent
    refused: set[int] = field(default_factory=set)  # nodes whose replies this round are not used
    replied: set[int] = field(default_factory=set)  # nodes that sent a reply (usable or not)
    reports: dict[int, TrainReport] = field(default_factory=dict)  # client -> its report
    offline_granted: dict[int, int] = field(default_factory=dict)  # client -> offline budget sent with the message
    events: list[RoundEvent] = field(default_factory=list)
    aggregated: bool = True  # False: the global model of the round before stays (see the not-aggregated event)

    def problem_of(self, client: int) -> RoundEvent | None:
        """The event recorded for ``client`` this round, if any."""
        return next((e for e in self.events if e.client == client), None)


class RoundBook:
    """Everything the server keeps about the clients of one run (see the module docstring).

    Parameters
    ----------
    coordinator : BudgetCoordinator
        Splits query rounds' budgets; keeps the ledger and the clients' statistics.
    privacy : PrivacySettings, optional
        Differential privacy settings; with them the book holds the accountant.
    offline_budget : int
        Labels each identified client may ask for on its own if the server becomes unreachable (the run's
        ``offline-budget``), granted with every train message while the run still asks for labels.
    rounds : int, optional
        The run's last round: its messages grant nothing (no later reply could report the spend).
    initial_labels : int, optional
        The run's ``initial-labels``: with it the book keeps what each client was granted (initial set, budgets,
        offline grants) and refuses a report of more labeled and pending samples than that; None = no such check.
    """

    def __init__(self, coordinator: BudgetCoordinator, privacy: PrivacySettings | None = None, *,
                 offline_budget: int = 0, rounds: int | None = None, initial_labels: int | None = None) -> None:
        self.coordinator = coordinator
        self.privacy = privacy
        self.accountant = (GaussianAccountant(privacy_config(privacy.delta, privacy.population))
                           if privacy is not None else None)
        self.rounds: dict[int, RoundLog] = {}
        self.labeled: dict[int, int] = {}  # client -> labeled samples last reported
        self.history: list[StepRecord] = []  # one record per query round (stopping criteria)
        self.stopped: dict | None = None  # which stopping criterion fired, when, and what it saved
        self.label_limit: int | None = None  # labels the query rounds may still add (total-budget)
        self._client_of: dict[int, int] = {}  # node id -> client id (Flower's ids end here)
        self.offline_budget = int(offline_budget)
        self.rounds_in_run = rounds
        self.offline_unreported: dict[int, int] = {}  # client -> offline budget granted since its last reply
        self.initial_labels = initial_labels
        #: client -> labels it was granted so far: the initial set, every round's budget, every offline grant
        self.granted: dict[int, int] = {}
        #: private run: the most replies any site said one of its samples was in (fedal.dp)
        self.dp_releases_made = 0

    # ------------------------------------------------------------- identities
    def client_of(self, node: int) -> int | None:
        """The client id node ``node`` reported, None if it has not said yet."""
        return self._client_of.get(int(node))

    def unidentified(self, nodes) -> list[int]:
        """Those of ``nodes`` that have not said which client they are."""
        return [int(n) for n in nodes if int(n) not in self._client_of]

    def identify(self, node: int, client: int) -> None:
        """Node ``node`` is client ``client`` (a SuperNode that reconnected under a new node id
        takes its client's name over)."""
        self._client_of = {n: c for n, c in self._client_of.items() if c != client}
        self._client_of[int(node)] = int(client)

    # ------------------------------------------------------------- a round
    def makeup_due(self) -> bool:
        """Whether a round between query rounds should ask for the labels failed sites left (the carry)."""
        return self.stopped is None and self.coordinator.carry_over and self.coordinator.carry > 0

    def open_round(self, server_round: int, nodes, *, query: bool, makeup: bool = False) -> dict[int, int]:
        """Start ``server_round`` for ``nodes``; return each node's query budget.

        In a query round the coordinator splits the budget among the identified clients (in a
        ``makeup`` round, between query rounds, only what failed sites left: :meth:`makeup_due`);
        a node that has not said which client it is, or that claims a client another node
        of this round already is, gets nothing (and an event says why).
        """
        rlog = self.rounds[server_round] = RoundLog(server_round, query, nodes=[int(n) for n in nodes])
        budgets = {int(n): 0 for n in nodes}
        last = self.rounds_in_run is not None and server_round >= self.rounds_in_run
        grant = self.offline_budget if self.stopped is None and not last else 0
        if grant and self.label_limit is not None:
            grant = min(grant, self.label_limit)
        for node in budgets:
            if (client := self.client_of(node)) is not None and grant:
                rlog.offline_granted[client] = grant
                self._grant(client, grant)
                # what it may have spent offline before its next reply: every grant it was sent since the last one
                self.offline_unreported[client] = self.offline_unreported.get(client, 0) + grant
        if not query and not makeup:
            return budgets
        holder: dict[int, int] = {}
        for node in sorted(budgets):
            client = self.client_of(node)
            if client is None:
                rlog.events.append(RoundEvent("no-budget", None, node, "it did not say which client it is"))
            elif client in holder:
                rlog.refused.add(node)
                rlog.events.append(RoundEvent("rejected", client, node, f"node {holder[client]} is client {client} "
                                              "too: two SuperNodes share one client-id; its replies are not used"))
            else:
                holder[client] = node
        rlog.assigned = self.coordinator.allocate_to(server_round, sorted(holder), limit=self.label_limit,
                                                     carried_only=makeup and not query)
        for client, node in holder.items():
            budgets[node] = rlog.assigned[client]
            self._grant(client, rlog.assigned[client])
        return budgets

    def _grant(self, client: int, labels: int) -> None:
        self.granted[client] = self.granted.get(client, self.initial_labels or 0) + int(labels)

    def implausible(self, server_round: int, client: int, report: TrainReport) -> str | None:
        """Why ``report`` of ``client`` cannot be true by the book (or on its own terms), or None: more labels
        asked this round than its budget, more labeled and pending samples than it was ever granted."""
        if (problem := report.problem()) is not None:
            return problem
        rlog = self.rounds[server_round]
        budget = rlog.assigned.get(client, 0)
        if report.queries_used > budget:
            return f"it reports {report.queries_used} labels asked in round {server_round}, but its budget was {budget}"
        if self.initial_labels is not None:
            granted = self.granted.get(client, self.initial_labels)
            held = report.num_examples + report.pending
            if held > granted:
                return (f"it reports {report.num_examples} labeled and {report.pending} pending samples, but the run "
                        f"granted it {granted} labels in all (initial set, budgets, offline grants); a state-dir "
                        "kept from another run holds labels this run did not grant: give the site a fresh one")
        return None

    def record_report(self, server_round: int, node: int, report: TrainReport) -> str | None:
        """Keep the report node ``node`` sent in ``server_round``; return why it is refused, or None.

        The report names the client; its budget spend goes to the ledger (at most what was
        assigned) and its statistics to the coordinator.
        """
        rlog = self.rounds[server_round]
        rlog.replied.add(int(node))
        known = self.client_of(node)
        if int(node) in rlog.refused:
            return f"node {node} shares client-id {known} with another node"
        if known is not None and known != report.client_id:
            reason = f"it reported client-id {report.client_id}, but it is client {known}"
            rlog.events.append(RoundEvent("rejected", known, int(node), reason))
            return reason
        self.identify(node, report.client_id)
        client = report.client_id
        if (reason := self.implausible(server_round, client, report)) is not None:
            self.reject(server_round, node, reason, answered=True)
            return reason
        rlog.reports[client] = report
        self.dp_releases_made = max(self.dp_releases_made, int(report.dp_releases))
        self.labeled[client] = report.num_examples
        self.coordinator.report(client, report.unlabeled_left, report.mean_uncertainty)
        if client in rlog.assigned:
            self.coordinator.record_spent(server_round, client, report.queries_used)
        self._record_offline(server_round, node, client, report.offline_spent)
        return None

    def offline_grant(self, server_round: int, node: int) -> int:
        """The offline budget the train message of ``server_round`` gives node ``node`` (0 if it is not identified)."""
        client = self.client_of(node)
        return 0 if client is None else self.rounds[server_round].offline_granted.get(client, 0)

    def _record_offline(self, server_round: int, node: int, client: int, spent: int) -> None:
        """Take a reply's offline spend to the coordinator: at most what the client was granted since its last
        reply (a site that says more gets an event, and only the granted labels count)."""
        granted = self.offline_unreported.get(client, 0)
        if server_round in self.rounds and client in self.rounds[server_round].offline_granted:
            granted -= self.rounds[server_round].offline_granted[client]  # this round's grant is for later
        if spent > granted:
            reason = f"it reports {spent} labels asked offline but was granted {granted} since its last reply"
            self.rounds[server_round].events.append(RoundEvent("rejected", client, int(node), reason))
            log.warning("round %d: client %d %s; %d counted", server_round, client, reason, granted)
            spent = granted
        self.coordinator.record_offline(server_round, client, spent)
        self.offline_unreported[client] = self.offline_unreported.get(client, 0) - granted

    def reject(self, server_round: int, node: int, reason: str, *, answered: bool) -> None:
        """Node ``node``'s reply (``answered``: it had replied, its spend counts) or update was refused."""
        rlog = self.rounds[server_round]
        rlog.replied.add(int(node))
        client = self.client_of(node)
        rlog.events.append(RoundEvent("rejected", client, int(node), reason))
        log.warning("round %d: reply of %s rejected: %s", server_round, _who(client, node), reason)
        if answered and client is not None and client in rlog.assigned and client not in rlog.reports:
            # it was asked and answered, but what it sent is unusable: count its budget as spent
            self.coordinator.record_spent(server_round, client, rlog.assigned[client])

    def not_aggregated(self, server_round: int, reason: str) -> None:
        """``server_round`` is not aggregated (too few usable replies, a secure sum without every site)."""
        rlog = self.rounds[server_round]
        rlog.aggregated = False
        rlog.events.append(RoundEvent("not-aggregated", None, None, reason))
        log.warning("round %d: %s", server_round, reason)

    def fail(self, server_round: int, node: int, reason: str) -> None:
        """Node ``node`` sent an error reply in ``server_round``."""
        rlog = self.rounds[server_round]
        rlog.replied.add(int(node))
        rlog.events.append(RoundEvent("failed", self.client_of(node), int(node), reason))

    def close_round(self, server_round: int) -> None:
        """After the replies: a node that sent none failed; its unspent budget is carried over."""
        rlog = self.rounds[server_round]
        for node in rlog.nodes:
            if node not in rlog.replied:
                rlog.events.append(RoundEvent("failed", self.client_of(node), node, "no reply before the round timeout"))
        for event in rlog.events:
            if event.kind == "failed":
                log.warning("round %d: %s left out: %s", server_round, _who(event.client, event.node), event.reason)
                if event.client in rlog.assigned and event.client not in rlog.reports:
                    self.coordinator.record_spent(server_round, event.client, None, failed=True)

    # ------------------------------------------------------------- results
    def clients_row(self, server_round: int) -> dict[str, dict]:
        """Per client of ``server_round``, what it was sent and what it reported (``results.json``)."""
        rlog = self.rounds[server_round]
        out = {}
        for client, r in sorted(rlog.reports.items()):
            out[str(client)] = {"budget": int(rlog.assigned.get(client, 0)), "queried": r.queries_used,
                                "labeled": r.num_examples, "labels_added": r.labels_added, "pending": r.pending,
                                "unlabeled": r.unlabeled_left, "mean_uncertainty": _none_if_nan(r.mean_uncertainty),
                                "train_loss": _none_if_nan(r.train_loss), "auto_labeled": r.auto_labeled,
                                "auto_correct": None if r.auto_correct < 0 else r.auto_correct,
                                "requests_made": r.requests_made, "requests_answered": r.requests_answered,
                                "answer_seconds": _none_if_nan(r.answer_seconds),
                                "batch_diversity": _none_if_nan(r.batch_diversity),
                                "label_entropy": _none_if_nan(r.label_entropy),
                                "labels_reviewed": r.labels_reviewed,
                                "offline_budget": int(rlog.offline_granted.get(client, 0)),
                                "offline_spent": r.offline_spent,
                                "offline_deducted": self._deducted(server_round, client),
                                "dp_releases": r.dp_releases}
        return out

    def _deducted(self, server_round: int, client: int) -> int:
        """Labels taken from ``client``'s share of ``server_round`` for what it asked offline before."""
        return next((r.offline_deducted for r in self.coordinator.ledger if r.round == server_round
                     and r.client == client), 0)

    def privacy_report(self) -> dict | None:
        """Privacy settings and what was spent so far; None without differential privacy."""
        if self.privacy is None:
            return None
        return self.privacy.report(self.accountant)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The server state a checkpoint keeps: budgets (ledger, statistics), labeled counts, privacy."""
        return {"budget": self.coordinator.state_dict(),
                "labeled": [{"client": c, "labeled": n} for c, n in sorted(self.labeled.items())],
                "privacy": None if self.accountant is None else self.accountant.state_dict(),
                "history": [asdict(h) for h in self.history], "stopped": self.stopped,
                "offline_unreported": [{"client": c, "labels": n} for c, n in sorted(self.offline_unreported.items())],
                "granted": [{"client": c, "labels": n} for c, n in sorted(self.granted.items())],
                "dp_releases_made": self.dp_releases_made}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (node identities are not kept: node ids change between runs)."""
        self.coordinator.load_state_dict(state["budget"])
        self.labeled = {int(r["client"]): int(r["labeled"]) for r in state.get("labeled", [])}
        self.history = [StepRecord(**{k: math.nan if v is None else v for k, v in h.items()})
                        for h in state.get("history", [])]
        self.stopped = state.get("stopped")
        self.offline_unreported = {int(r["client"]): int(r["labels"]) for r in state.get("offline_unreported", [])}
        if "granted" in state:
            self.granted = {int(r["client"]): int(r["labels"]) for r in state["granted"]}
        else:  # a checkpoint of an older fedal: what each client was granted is unknown, so it is not checked
            self.initial_labels = None
        self.dp_releases_made = int(state.get("dp_releases_made", 0))
        if self.accountant is not None:
            self.accountant.load_state_dict(state.get("privacy"))


def _who(client: int | None, node: int) -> str:
    return f"client {client} (node {node})" if client is not None else f"node {node}"


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
