"""The fedal ServerApp: rounds of query -> local training -> aggregation -> evaluation.

Each round the budget coordinator splits the label budget among the sampled clients
(from the aggregate statistics they reported), a Flower strategy aggregates their
updates, the global model is evaluated on the server's held-out test set, and the
results and a checkpoint are written. Everything the server learns of the clients is
in one :class:`~server.book.RoundBook`. ``resume = true`` continues from the last
checkpoint (model, round, the book's state).
"""
from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedal.budget import BudgetCoordinator
from fedal.config import FederationConfig
from fedal.dp import released_entries
from fedal.exceptions import ConfigError, FedalError
from fedal.features import featurizer_for, model_inputs
from fedal.federation import federation_dataset
from fedal.flower import protocol
from fedal.models import HandoverClassifier, model_for
from fedal.models.handover_adapter import serving_of
from fedal.seeds import reinit_seed
from server.book import RoundBook
from server.handover import HEAD_ACC, NET_ACC, handover_due, serve_network
from server.privacy import PrivacySettings, statistics_report
from server.results import RunRecorder
from server.strategy import make_strategy

app = ServerApp()
log = logging.getLogger("fedal.server")
#: callables run with each round's result row (``fedal simulate`` shows progress with it)
ROUND_HOOKS: list = []
#: callables given every secure-aggregation stage's messages and replies (:data:`server.secure.StageListener`;
#: the privacy audit test reads what the server received through it)
SECURE_LISTENERS: list = []
#: set (by ``fedal simulate``'s Ctrl-C) to stop after the last finished round: the round under way is
#: abandoned, not recorded, so a resumed run does it again (the clients' side of a round is idempotent)
STOP_REQUESTED = threading.Event()
#: seconds to wait for the run's SuperNodes to register before checking their number
NODE_WAIT_S = 15.0


class FederationFailed(FedalError, RuntimeError):
    """No client took part in any round: the run has no result (the reasons are in the message)."""


def connected_nodes(grid: Grid, want: int, wait_s: float | None = None) -> int:
    """How many SuperNodes are connected, once ``want`` have registered or ``wait_s`` passed.

    SuperNodes register one by one (in simulation too), so an immediate count taken when the
    ServerApp starts can be short of a federation that is still coming up."""
    deadline = time.monotonic() + (NODE_WAIT_S if wait_s is None else wait_s)
    while (count := len(list(grid.get_node_ids()))) < want and time.monotonic() < deadline:
        time.sleep(0.25)
    return count


def round_kpis(first: dict, row: dict) -> dict:
    """The KPIs of a round from what the clients reported (:mod:`fedal.kpi`; the clients' own scalars
    combined): labels per accuracy point gained since round 1, the oracles' answered / asked share and
    median wait, the queried batches' diversity (against random batches), the labels' class balance and the
    second readings asked so far."""
    import statistics

    from fedal.kpi import queries_per_point

    clients = list(row["clients"].values())

    def weighted(key: str, weight: str):
        pairs = [(c[key], c[weight]) for c in clients if c[key] is not None and c[weight] > 0]
        total = sum(w for _, w in pairs)
        return round(sum(v * w for v, w in pairs) / total, 4) if total else None

    made = sum(c["requests_made"] for c in clients)
    waits = [c["answer_seconds"] for c in clients if c["answer_seconds"] is not None]
    qpp = queries_per_point(first["labels"], first["accuracy"], row["labels"], row["accuracy"])
    return {"queries_per_point": None if qpp is None else round(qpp, 2),
            "oracle_answered": round(sum(c["requests_answered"] for c in clients) / made, 4) if made else None,
            "median_answer_seconds": round(statistics.median(waits), 3) if waits else None,
            "batch_diversity": weighted("batch_diversity", "queried"),
            "label_entropy": weighted("label_entropy", "labeled"),
            "labels_reviewed": sum(c.get("labels_reviewed", 0) for c in clients)}


def check_stopping(cfg: FederationConfig, book: RoundBook, criteria, row: dict, server_round: int) -> dict | None:
    """After a query round: add it to the book's history and ask the criteria; when one fires, record in
    the book (and return) which, when, at how many labels, and the labels the rest of the schedule
    would have asked for."""
    from fedal.stopping import StepRecord

    clients = row["clients"].values()
    weights = [(c["mean_uncertainty"], c["unlabeled"]) for c in clients if c["mean_uncertainty"] is not None]
    total = sum(w for _, w in weights)
    book.history.append(StepRecord(
        step=len(book.history), queried=sum(c["queried"] for c in clients), labeled=row["labels"],
        unlabeled=sum(c["unlabeled"] for c in clients), accuracy=row["accuracy"], loss=row["loss"],
        mean_uncertainty=sum(u * w for u, w in weights) / total if total else math.nan))
    for criterion in criteria:
        reason = criterion.check(book.history)
        if reason:
            left = sum(cfg.is_query_round(r) for r in range(server_round + 1, cfg.rounds + 1))
            saved = left * cfg.round_budget
            if cfg.total_budget:
                saved = min(saved, max(cfg.total_budget - row["labels"], 0))
            book.stopped = {"criterion": reason, "round": server_round, "labels": row["labels"],
                            "query_rounds_skipped": left, "labels_saved": saved}
            log.warning("round %d: stopped asking for labels: %s (%d labels; %d not asked)", server_round, reason,
                        row["labels"], saved)
            return book.stopped
    return None


def cannot_go_on(cfg: FederationConfig, book: RoundBook, rounds: list[int], recorded: int) -> str:
    """Why the run stops after ``rounds`` in a row were not aggregated, and how to resume it."""
    reasons = {}
    for r in rounds:
        for event in book.rounds[r].events:
            reasons.setdefault(event.reason if event.node is None else f"{event.kind}: {event.reason}", r)
    said = "; ".join(list(reasons)[-3:]) or "no site replied"
    kept = f"the checkpoint holds round {recorded}" if recorded >= 1 else "no round was recorded"
    return (f"no round could be aggregated in the last {len(rounds)} rounds ({rounds[0]}-{rounds[-1]}; "
            f"max-failed-rounds = {cfg.max_failed_rounds}): {said}. {kept.capitalize()}. Bring the sites back (their "
            "SuperNodes running and connected, or the simulation's memory freed), then continue the run with "
            "resume = true: `fedal simulate ... --resume`, or `flwr run . <federation> --run-config "
            "\"resume=true\"` with the run's other settings; max-failed-rounds = 0 never stops")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls (simulation or deployment)."""
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    run_federation(grid, cfg, on_round=lambda row: [hook(row) for hook in ROUND_HOOKS])


def run_federation(grid: Grid, cfg: FederationConfig, on_round=None) -> RunRecorder:
    """Run every round of a federation on ``grid``; return the recorder with the results.

    Each round has two phases, train (query within the budgets, local training,
    aggregation) and evaluate (the global model on the clients' local test sets and on the
    server's test set); then the round's row and the checkpoint are written. With
    ``eval-every`` > 1 the rounds between evaluations only train (:meth:`FederationConfig.is_eval_round`).

    Parameters
    ----------
    grid : Grid
        Flower's connection to the SuperNodes.
    cfg : FederationConfig
        Run settings.
    on_round : callable, optional
        Called with each round's result row (progress display).
    """
    dataset = federation_dataset(cfg)
    X_test = model_inputs(featurizer_for(cfg.features, dataset.input_shape, cfg.pipeline), dataset.X_test)
    model = model_for(cfg, X_test.shape[1:], dataset.n_classes, seed=cfg.seed, raw_shape=dataset.input_shape)
    # the values of a network update (network DP under secure aggregation accounts the rounding of each)
    entries = sum(int(np.size(v)) for v in model.get_state().values()) if cfg.dp_clipping_norm > 0 else 0
    book = RoundBook(BudgetCoordinator(cfg.budget_policy, cfg.round_budget, cfg.client_cap),
                     PrivacySettings.from_config(cfg, entries=entries), offline_budget=cfg.offline_budget,
                     rounds=cfg.rounds, initial_labels=cfg.initial_labels)
    strategy = make_strategy(cfg, book, model, is_query_round=lambda r: cfg.is_query_round(r) and book.stopped is None)
    private_noise = strategy.inner.noise if cfg.head_private else None  # the head aggregation's (fedal.dp)
    if private_noise is not None:
        planned = statistics_report(cfg, private_noise, released_entries(model.n_classes, model.dim), 0)
        log.warning("private run: every site adds noise of multiplier %.3f to what it sends (%s); each labeled sample "
                    "is in at most %d releases: epsilon %.3f at delta %g planned for the whole run", planned["noise_multiplier"],
                    "its share of it, under secure aggregation" if private_noise.secure else "all of it, in the clear",
                    planned["releases_planned"], planned["epsilon_planned"], cfg.dp_delta)
    if book.privacy is not None and book.privacy.mode == "distributed" and book.privacy.accounted():
        p = book.privacy
        log.warning("private network updates: every site clips its update to %g and adds its share of noise of "
                    "multiplier %g before masking (any %d sites of a sum carry all of it): client-level epsilon %.3f "
                    "at delta %g planned for %d rounds", p.clipping_norm, p.noise_multiplier, p.fewest_sites - 1,
                    p.planned_epsilon, p.delta, cfg.rounds)
    secure = None
    if cfg.secure_aggregation:
        from fedal.models import secure_codec
        from server.secure import SecureTraining

        codec = ((lambda: secure_codec(cfg, model, centre=strategy.inner.centre())) if cfg.head_private
                 else secure_codec(cfg, model))
        secure = SecureTraining(strategy, codec, cfg.secure_threshold, timeout=cfg.round_timeout,
                                listener=lambda *stage: [listener(*stage) for listener in SECURE_LISTENERS])
    criteria = cfg.stopping_criteria()
    recorder = RunRecorder(cfg.output_dir, cfg.to_run_config())
    state = model.get_state()
    start_round = 1
    if not cfg.resume and not cfg.overwrite and (recorder.out / "results.json").is_file():
        raise ConfigError(f"output-dir {recorder.out} holds another run's results; set resume = true to continue it, "
                          "overwrite = true to replace it, or another output-dir (e.g. --run-config "
                          "\"output-dir='runs/flwr-1'\")")
    if cfg.resume:
        ckpt = recorder.load_checkpoint()
        if ckpt is not None:
            last, state, saved = ckpt
            book.load_state_dict(saved)
            strategy.load_state_arrays(recorder.load_server_arrays(saved))
            start_round = last + 1
            if book.stopped is not None and cfg.after_stop == "end":  # it ended on its stopping rule
                log.warning("the run in %s stopped asking for labels after round %d (%s) and ended there; nothing "
                            "to resume (after-stop = \"continue\" trains the remaining rounds without queries)",
                            recorder.out, book.stopped["round"], book.stopped["criterion"])
                return recorder
            log.warning("resuming after round %d from %s", last, recorder.out)
            if book.stopped is not None:
                log.warning("it stopped asking for labels after round %d (%s): the rounds from %d train without "
                            "queries (after-stop = continue)", book.stopped["round"], book.stopped["criterion"],
                            start_round)
    arrays = protocol.model_record(state)
    nodes = connected_nodes(grid, cfg.clients)
    if nodes and nodes != cfg.clients:
        log.warning("the run config says clients=%d but %d SuperNodes are connected; with `flwr run`, pass "
                    "--federation-config \"num-supernodes=%d\" (the budget is split among the nodes present)",
                    cfg.clients, nodes, cfg.clients)
    heard = False  # did any client reply with a usable report?
    failed_rounds: list[int] = []  # the rounds in a row not aggregated for want of replies
    t0 = time.perf_counter()  # a row's seconds: since the last row (eval-every > 1 trains rounds between rows)
    try:
        for server_round in range(start_round, cfg.rounds + 1):
            if STOP_REQUESTED.is_set():
                log.warning("stopped before round %d; the checkpoint holds round %d", server_round, server_round - 1)
                break
            query = cfg.is_query_round(server_round) and book.stopped is None
            if (query or book.makeup_due()) and cfg.total_budget:  # the last query round gets what is left of the run's budget
                pending = sum(r.pending for r in book.rounds[max(book.rounds)].reports.values()) if book.rounds else 0
                book.label_limit = max(cfg.total_budget - sum(book.labeled.values()) - pending, 0)
            if cfg.reinit and query:
                model.reset(seed=reinit_seed(cfg.seed, server_round))
                arrays = protocol.model_record(model.get_state())
            # train: budgets -> queries -> local training -> aggregation
            if secure is not None:  # the server sees the sites' sum only (server.secure)
                new_arrays, train_metrics = secure(grid, server_round, arrays)
            else:
                replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
                                                timeout=cfg.round_timeout)
                new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            if STOP_REQUESTED.is_set():  # interrupted during the round: its replies may be cut short
                log.warning("stopped during round %d; it is not recorded (resume does it again)", server_round)
                break
            if new_arrays is not None:
                arrays = new_arrays
            rlog = book.rounds[server_round]
            if rlog.reports:
                heard = True
            failed_rounds = failed_rounds + [server_round] if not rlog.aggregated or not rlog.reports else []
            if cfg.max_failed_rounds and len(failed_rounds) >= cfg.max_failed_rounds:
                for event in rlog.events:
                    recorder.add_event(server_round, event.kind, event.describe())
                recorded = recorder.rounds[-1]["round"] if recorder.rounds else 0
                raise FederationFailed(cannot_go_on(cfg, book, failed_rounds, recorded))
            if not cfg.is_eval_round(server_round):  # a training round between evaluations (eval-every)
                for event in rlog.events:
                    recorder.add_event(server_round, event.kind, event.describe())
                continue
            # evaluate: the clients' local test sets, then the server's test set
            eval_replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=cfg.round_timeout)
            client_eval = strategy.aggregate_evaluate(server_round, eval_replies)
            for event in rlog.events:
                recorder.add_event(server_round, event.kind, event.describe())
            served = None
            if isinstance(model, HandoverClassifier):
                served = serving_of(protocol.state_from_record(arrays))
                if handover_due(served, client_eval):
                    arrays, served = serve_network(arrays), "network"
                    recorder.add_event(server_round, "handover", (
                        f"the network serves from now on: the sites' local test accuracy {client_eval[NET_ACC]:.4f} "
                        f"(network) against {client_eval[HEAD_ACC]:.4f} (head)"))
                    log.warning("round %d: the network takes over from the head (local test accuracy %.4f vs %.4f)",
                                server_round, client_eval[NET_ACC], client_eval[HEAD_ACC])
            model.set_state(protocol.state_from_record(arrays))
            # the hand-over: both models on the test set, the serving one's numbers are the row's (one pass each)
            each = model.evaluate_each(X_test, dataset.y_test) if served is not None else None
            loss, acc = each[served] if each is not None else model.evaluate(X_test, dataset.y_test)
            row = {"round": server_round, "labels": int(sum(book.labeled.values())), "accuracy": acc, "loss": loss,
                   "client_accuracy": float(client_eval["eval-acc"]) if client_eval else None,
                   "query_round": query, "clients": book.clients_row(server_round),
                   "aggregated": rlog.aggregated and bool(rlog.reports),
                   "budget_sent": int(sum(rlog.assigned.values())),
                   "pending": int(train_metrics["pending"]) if train_metrics else 0,
                   "seconds": round(time.perf_counter() - t0, 2)}
            if each is not None:  # what each model would give, and which one serves
                row.update(serving=served, head_accuracy=each["head"][1], network_accuracy=each["network"][1])
            row["kpi"] = round_kpis(recorder.rounds[0] if recorder.rounds else row, row)
            privacy = book.privacy_report()
            if private_noise is not None:
                privacy = statistics_report(cfg, private_noise, released_entries(model.n_classes, model.dim),
                                            book.dp_releases_made)
            if privacy is not None:
                row["privacy"] = privacy
            if query and criteria and (fired := check_stopping(cfg, book, criteria, row, server_round)):
                row["stopped"] = fired
            recorder.add_round(row, checkpoint=(model.get_state(), book.state_dict()))
            t0 = time.perf_counter()
            if on_round is not None:
                on_round(row)
            log.info("round %d: labels %d, accuracy %.4f", server_round, row["labels"], acc)
            if row.get("stopped") and cfg.after_stop == "end":
                break
    finally:  # the plot is drawn once more with every recorded round, whatever ended the run
        recorder.finish()
    if not heard and cfg.rounds >= start_round and not STOP_REQUESTED.is_set():
        reasons = sorted({e.reason for r in book.rounds.values() for e in r.events if e.node is not None})
        raise FederationFailed(f"every client failed every round ({len(book.rounds)} rounds); the clients said: "
                               + "; ".join(reasons[:3]))
    return recorder
