"""The fedal ClientApp (Flower message API).

On a train message: open the site's durable state, label the initial set the first
time, score the local unlabeled pool with the global model, ask the local oracle for at
most this round's budget, train on the labeled set and reply with the model and
aggregate scalars only (see :mod:`fedal.flower.protocol`). On an evaluate message:
report the global model's loss and accuracy on the local test set.
"""
from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from clients.site import ClientSite
from fedal.config import FederationConfig
from fedal.flower import protocol

app = ClientApp()
torch.set_num_threads(1)  # one core per simulated client: Ray runs as many clients as cores


def _config(context: Context) -> FederationConfig:
    return FederationConfig.from_run_config(dict(context.run_config))


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Clip this client's update before it leaves (``dp-mode = client``) when the server asks.

    The server's DP wrapper puts the clipping norm in the train config; Flower's
    ``fixedclipping_mod`` then clips ``reply - received`` to it. Without that key the
    reply goes out unchanged (DP off, or clipped on the server).
    """
    content = msg.content
    if protocol.CONFIG in content and protocol.DP_CLIPPING_NORM in content[protocol.CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Query within the budget, train locally, reply with weights and aggregate scalars."""
    cfg = _config(context)
    config = msg.content[protocol.CONFIG]
    site = ClientSite(cfg, dict(context.node_config))
    try:
        state, report = site.train(
            protocol.state_from_record(msg.content[protocol.ARRAYS]),
            server_round=int(config[protocol.SERVER_ROUND]),
            budget=int(config.get(protocol.QUERY_BUDGET, 0)),
            proximal_mu=float(config.get(protocol.PROXIMAL_MU, 0.0)),
        )
    finally:
        site.close()
    return protocol.train_reply(msg, state, report)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local test set."""
    cfg = _config(context)
    site = ClientSite(cfg, dict(context.node_config))
    try:
        n, loss, acc = site.evaluate(protocol.state_from_record(msg.content[protocol.ARRAYS]))
    finally:
        site.close()
    return protocol.eval_reply(msg, num_examples=n, client_id=site.client_id, loss=loss, accuracy=acc)
