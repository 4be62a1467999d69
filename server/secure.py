"""Secure aggregation of a round's training: Flower's SecAgg+ workflow, run for that step.

With ``secure-aggregation = true`` each round's training is one run of Flower's own
:class:`~flwr.server.workflow.SecAggPlusWorkflow` (its four stages: setup, key sharing,
collection of masked vectors, unmasking), unchanged. Flower offers it on its legacy
context, so :class:`SecureTraining` builds one for the step: a :class:`_RoundPlan` legacy
strategy that hands the workflow the nodes fedal's strategy chose, and takes back what the
workflow unmasked; a :class:`_StageGrid` in front of the grid that gives the masking stage's
message fedal's own train message for that node (its budget, the global model, the head's
global statistics) and keeps which node failed in which stage.

The server never holds a site's update: only the masked vectors, whose sum the workflow
unmasks, and each site's report scalars (in the clear, as without secure aggregation:
they drive the budgets). The sum is of the fixed-point limbs of :mod:`fedal.secure`, exact;
:meth:`server.strategy.BudgetedStrategy.aggregate_secure` decodes it (the statistics'
sums; FedAvg's mean of the weights) and hands it to the rest of the strategy chain as one
reply. Sites that drop out after sharing their keys are unmasked by the others' shares
(SecAgg+); a round where fewer than the threshold remain is not aggregated.

With network differential privacy (``dp-clipping-norm``, ``dp-noise-multiplier``) the sites
clip their changes, weigh them alike and add their shares of the noise before masking
(:class:`fedal.dp.UpdateNoise`): the sum the workflow unmasks is already noisy, the
decoded aggregate is the mean over the sites in it, and every unmasked sum is composed in
the round book's accountant, aggregated or not.

What the server can no longer do is screen one site's update (NaN, shape, norm): each site
bounds its own contribution on the device instead (:mod:`clients.secure`), and a round
whose sum holds a report the server refuses is dropped whole, since a contribution cannot
be taken out of the sum.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedal.flower import protocol
from fedal.secure import CHANGE, CLIPPING_RANGE, LIMBS, MODULUS_RANGE, QUANTIZATION_RANGE, FixedPoint, kind_of
from server.strategy import error_summary

log = logging.getLogger("fedal.server")
#: the record of a masking stage's reply with the site's report (Flower's legacy ``fitres.metrics``)
REPORT_RECORD = "fitres.metrics"

#: called with (stage, the messages sent, the replies received) of every stage: the privacy audit's view
StageListener = Callable[[str, list[Message], list[Message]], None]


class _StageGrid:
    """The grid as the workflow uses it (``send_and_receive`` only): the masking stage carries fedal's train
    message for each node; every reply's failure is kept per node and stage."""

    def __init__(self, grid: Grid, train_content: dict[int, RecordDict], listener: StageListener | None,
                 masked_shapes: list[tuple[int, ...]] | None = None) -> None:
        self.grid = grid
        self.train_content = train_content
        self.listener = listener
        #: the shapes of an honest masked vector (the weight factor, then the limbs); None = not checked
        self.masked_shapes = masked_shapes
        self.failed: dict[int, str] = {}
        #: node -> the scalars of its report (the masking stage's replies carry them in the clear)
        self.reports: dict[int, dict] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = str(messages[0].content[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        if stage == Stage.COLLECT_MASKED_VECTORS:
            for msg in messages:
                records = dict(self.train_content[msg.metadata.dst_node_id].items())
                records[RECORD_KEY_CONFIGS] = msg.content[RECORD_KEY_CONFIGS]
                msg.content = RecordDict(records)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failed.setdefault(node, f"failed in the {stage} stage of secure aggregation: "
                                             f"{error_summary(reply.error.reason)}")
            else:
                answered.add(node)
                if stage == Stage.COLLECT_MASKED_VECTORS and (problem := self.masked_problem(reply)):
                    # the workflow would add it to the others' and stop the ServerApp; left out, it is a site that
                    # dropped out after sharing its keys, whose masks the others' shares remove
                    self.failed[node] = f"its masked vector was refused: {problem}"
                    log.warning("node %d: masked vector refused: %s", node, problem)
                    answered.add(node)
                    continue
                if stage == Stage.COLLECT_MASKED_VECTORS and REPORT_RECORD in reply.content:
                    self.reports[node] = dict(reply.content[REPORT_RECORD])
        for msg in messages:  # no reply at all before the timeout
            node = msg.metadata.dst_node_id
            if node not in answered:
                self.failed.setdefault(node, f"did not answer the {stage} stage of secure aggregation in time")
        if self.listener is not None:
            self.listener(stage, messages, replies)
        return [r for r in replies if r.has_error() or stage != Stage.COLLECT_MASKED_VECTORS
                or not self.failed.get(r.metadata.src_node_id, "").startswith("its masked vector was refused")]

    def masked_problem(self, reply: Message) -> str | None:
        """Why a masking stage's reply cannot be summed with the others' (shapes, records), or None."""
        if self.masked_shapes is None:
            return None
        try:
            vectors = [bytes_to_ndarray(b) for b in reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        except Exception as ex:  # noqa: BLE001 - whatever a site sent, the run goes on without it
            return f"it holds no readable masked vector ({type(ex).__name__}: {ex})"
        shapes = [tuple(v.shape) for v in vectors]
        if shapes != self.masked_shapes:
            return f"arrays of shapes {shapes[:5]}, expected {self.masked_shapes[:5]}"
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, but a site that drops out before it has shared its keys leaves the round.

    In flwr 1.41 such a site stays among the round's sampled nodes: the unmask stage asks for shares of its
    secret that nobody holds (it never sent any), finds too few and stops the round, although the sites left
    did not mask with it (a site masks only with those whose shares it received). Taken out of the sampled
    nodes and of every neighbourhood after the key sharing, it is what a site that never joined would be."""

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        gone = set(state.sampled_node_ids) - set(state.active_node_ids)
        if not gone:
            return ok
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {nid: set(neighbours) - gone for nid, neighbours in state.nid_to_neighbours.items()
                                   if nid not in gone}
        log.warning("secure aggregation: node(s) %s left before sharing their keys; the round goes on with %d",
                    sorted(gone), len(state.active_node_ids))
        return self._check_threshold(state)


class _RoundPlan(LegacyStrategy):
    """The legacy strategy of one round's workflow: it samples nothing (fedal's strategy chose the nodes) and
    aggregates nothing (it keeps what the workflow unmasked)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.grid, self.nodes = grid, nodes
        #: the nodes in the unmasked sum, and the mean of their limb vectors the workflow unmasked
        self.summed: set[int] = set()
        self.mean: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), FitIns(Parameters(tensors=[], tensor_type=""), {}))
                for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.summed = {proxy.node_id for proxy, _ in results}
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)  # the same unmasked sum in every result
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecureTraining:
    """One round's training under SecAgg+ (see the module docstring).

    Parameters
    ----------
    strategy : BudgetedStrategy
        The run's strategy: it picks the nodes, gives their budgets and aggregates the decoded sum.
    codec : FixedPoint or callable
        The run's fixed-point encoding (the sites use the same), or what gives it for the round about to start (a
        private run's grid follows the labels' centre).
    threshold : float
        ``secure-threshold``: the share of a site's neighbours whose shares rebuild its masks.
    timeout : float, optional
        Seconds each stage waits for the sites' replies (None = no limit).
    listener : callable, optional
        Called with every stage's messages and replies (the privacy audit).
    """

    def __init__(self, strategy, codec: FixedPoint, threshold: float, timeout: float | None = None,
                 listener: StageListener | None = None) -> None:
        self.strategy = strategy
        self.codec = codec
        self.threshold = float(threshold)
        self.timeout = timeout
        self.listener = listener

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's workflow with the settings under which fedal's limbs sum exactly (:mod:`fedal.secure`): every
        sampled site is a neighbour of every other, all weigh alike."""
        return _Workflow(num_shares=1.0, reconstruction_threshold=self.threshold, max_weight=1.0,
                                  clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
                                  modulus_range=MODULUS_RANGE, timeout=self.timeout)

    def __call__(self, grid: Grid, server_round: int, arrays: ArrayRecord):
        """Run the round's training under the protocol; return what ``aggregate_train`` would (arrays, metrics)."""
        messages = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        codec = self.codec() if callable(self.codec) else self.codec  # a private run's grid follows its centre
        nodes = [m.metadata.dst_node_id for m in messages]
        size = codec.encoded_size(self.reference(arrays))
        stage_grid = _StageGrid(grid, {m.metadata.dst_node_id: m.content for m in messages}, self.listener,
                                masked_shapes=[(1,), *[(size,)] * LIMBS])
        plan = _RoundPlan(grid, nodes)
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                            MAIN_PARAMS_RECORD: ArrayRecord()})
        context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state,
                                        run_config={}), strategy=plan)
        if len(nodes) >= 2:
            self.workflow()(stage_grid, context)
        else:
            log.warning("round %d: secure aggregation needs at least 2 sites; %d sampled: nothing is aggregated",
                        server_round, len(nodes))
            for node in nodes:
                stage_grid.failed[node] = "secure aggregation needs at least 2 sites in the round"
        reports = {n: stage_grid.reports[n] for n in plan.summed if n in stage_grid.reports}
        aggregate = None
        book = self.strategy.book
        if plan.mean is not None and book.privacy is not None and book.privacy.accounted():
            # a sum unmasked is a release, whether or not the round goes on to aggregate it
            book.accountant.compose(book.privacy.release(len(plan.summed)))
        if plan.mean is not None and len(reports) == len(plan.summed):
            sums = [np.rint(m * len(plan.summed)) for m in plan.mean]  # the workflow divides by the sites summed
            reference = self.reference(arrays)
            sites = len(plan.summed)
            # equal weights (differential privacy): the mean of the sites' clipped changes
            aggregate = lambda total_weight: codec.decode(  # noqa: E731
                sums, reference, sites if codec.equal_weights else total_weight)
        else:  # the protocol stopped (fewer sites than the threshold remained): the reports count, no sum
            reports = dict(stage_grid.reports)
        failed = {n: r for n, r in stage_grid.failed.items() if n not in reports}
        out = self.strategy.aggregate_secure(server_round, reports, failed, aggregate)
        if aggregate is None and self.strategy.book.rounds[server_round].aggregated:
            self.strategy.book.not_aggregated(server_round, (
                f"secure aggregation did not complete ({len(stage_grid.failed)} of the {len(nodes)} sites failed a "
                f"stage, each named in its event; a site's masks need secure-threshold {self.threshold:g} of its "
                "neighbours to remain): the round is not aggregated"))
        return out

    def reference(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """Every key of a site's update: the global value sent for a weight, zeros of its shape for a statistic."""
        out = {}
        for key, shape in self.strategy.reference.items():
            if kind_of(key) == CHANGE:
                if key not in arrays:
                    raise ValueError(f"the update's weight {key!r} is not in the global model")
                out[key] = arrays[key].numpy()
            else:
                out[key] = np.zeros(shape)
        return out
