"""The fedal ClientApp (Flower message API).

On a train message: open the site's durable state, label the initial set the first
time, score the local unlabeled pool with the global model, ask the local oracle for at
most this round's budget, train on the labeled set and reply with the model and
aggregate scalars only (see :mod:`fedal.flower.protocol`). On an evaluate message:
report the global model's loss and accuracy on the local test set. On a
``query.client_id`` message: say which client this node is.
"""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from clients.node import NodeConfig
from clients.offline import ServerContact, note_contact, stale_problem
from clients.profiling import profiling_mod
from clients.secure import secure_aggregation_mod, summable_reply, under_protocol
from clients.site import ClientSite
from fedal.config import FederationConfig
from fedal.flower import protocol
from fedal.messages import TrainInstruction



def _settings(context: Context) -> tuple[FederationConfig, NodeConfig]:
    return FederationConfig.from_run_config(dict(context.run_config)), NodeConfig.from_mapping(dict(context.node_config))


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


def train(msg: Message, context: Context) -> Message:
    """Query within the budget, train locally, reply with weights and aggregate scalars (under secure aggregation:
    with their fixed-point limbs, which Flower's SecAgg+ mod masks: :mod:`clients.secure`)."""
    cfg, node = _settings(context)
    instruction = TrainInstruction.from_config(dict(msg.content[protocol.CONFIG]))
    site = ClientSite(cfg, node)
    try:
        global_state = protocol.state_from_record(msg.content[protocol.ARRAYS])
        # the global model is kept beside the ledger, for `fedal site` while the server is away
        contact = ServerContact(site, cfg, node, run_id=context.run_id, run_config=dict(context.run_config),
                                node_config=dict(context.node_config), global_state=global_state,
                                global_stats=protocol.global_stats_of(msg.content), instruction=instruction,
                                sent_at=msg.metadata.created_at)
        state, report = site.train(global_state, instruction, global_stats=protocol.global_stats_of(msg.content))
        report = contact.report(report)
    finally:
        site.close()
    if under_protocol(msg):
        return summable_reply(msg, context, state, report, site.secure_codec())
    return protocol.train_reply(msg, state, report)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local test set."""
    cfg, node = _settings(context)
    site = ClientSite(cfg, node)
    try:
        config = msg.content[protocol.CONFIG] if protocol.CONFIG in msg.content else {}
        stale_problem(cfg, int(config.get(protocol.SERVER_ROUND, 0)), msg.metadata.created_at, pool=site.pool)
        note_contact(site.pool, node, None)
        n, loss, acc = site.evaluate(protocol.state_from_record(msg.content[protocol.ARRAYS]))
        each = site.evaluate_each()
    finally:
        site.close()
    return protocol.eval_reply(msg, num_examples=n, client_id=site.client_id, loss=loss, accuracy=acc, each=each)


def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (its node config's client id; nothing else)."""
    return protocol.identify_reply(msg, NodeConfig.from_mapping(dict(context.node_config)).client_id)


def client_app(train_mods=(), mods=()) -> ClientApp:
    """A ClientApp with fedal's train, evaluate and identify functions; ``train_mods`` run in front of the train
    function, behind the secure aggregation mod (so under SecAgg+ they see fedal's own train message: tests and
    benchmarks put fault injection or captures there), ``mods`` around every message, inside the profiler
    (:mod:`clients.profiling`: nothing unless ``$FEDAL_PROFILE_DIR`` is set)."""
    built = ClientApp(mods=[profiling_mod, *mods])
    built.train(mods=[secure_aggregation_mod, *train_mods, dp_clipping_mod])(train)
    built.evaluate()(evaluate)
    built.query(protocol.IDENTIFY)(identify)
    return built


#: the ClientApp Flower loads (``clients.app:app``)
app = client_app()
