"""A federation as a bare loop in one process: the reference the simulation's overhead is measured against.

:class:`LoopGrid` is a Flower ``Grid`` that hands every message straight to the ClientApp in this
process, one node after the other, and returns the replies: no Ray, no actors, no LinkState, no
polling. :func:`run_in_loop` runs fedal's own ServerApp code (``server.app.run_federation``: the
strategy, the budget coordinator, the results and checkpoints) on it with fedal's ClientApp, so the
loop does exactly the computation of a simulated run and nothing else. It is a benchmark's
yardstick, not a way to run federations: it has none of Flower's isolation, time-outs or
concurrency.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from fedal.config import FederationConfig


#: the first node's id (the server is node 1, as Flower's SuperLink)
FIRST_NODE = 1000


class LoopGrid(Grid):
    """Flower's Grid over ``nodes`` nodes whose ClientApp runs in this process, synchronously.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        What answers every message.
    run_config : dict
        The run config each node's context carries.
    nodes : int
        How many nodes (node ``FIRST_NODE + i`` is partition ``i``).
    """

    def __init__(self, client_app, run_config: dict, nodes: int) -> None:
        self.client_app = client_app
        self.run_id = random.getrandbits(63)  # a new run each time, as Flower's (a site tells runs apart by it)
        self.contexts = {FIRST_NODE + i: Context(run_id=self.run_id, node_id=FIRST_NODE + i, state=RecordDict(),
                                                 node_config={"partition-id": i, "num-partitions": nodes},
                                                 run_config=dict(run_config)) for i in range(nodes)}
        self._run = None
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[msg.metadata.message_id] = self.client_app(
                message=msg, context=self.contexts[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_loop(cfg: FederationConfig, client_app=None) -> LoopGrid:
    """Run the federation ``cfg`` with fedal's ServerApp code and ClientApp in this process; return the grid.
    Writes the same results as a simulated run."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.app import run_federation

    if client_app is None:
        from clients.app import app as client_app
    if cfg.pipeline != "head":  # one core, as each simulated client and the simulation's ServerApp
        import torch

        torch.set_num_threads(1)
    # what the Simulation Engine sets for the ServerApp's messages (run, node and task of the sender)
    grid = LoopGrid(client_app, cfg.to_run_config(), cfg.clients)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = grid.run_id, 1, 1
    run_federation(grid, cfg)
    return grid
