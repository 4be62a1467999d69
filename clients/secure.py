"""The site's side of secure aggregation: Flower's ``secaggplus_mod`` in front of fedal's train function.

With ``secure-aggregation = true`` the server runs Flower's SecAgg+ protocol for a round's
training (:mod:`server.secure`): four train messages per site. :func:`secure_aggregation_mod`
hands those to Flower's own ``secaggplus_mod``, which makes the site's keys, shares them,
masks its vector and gives the shares that unmask the sum. fedal's train function runs once,
inside the masking stage, and answers with :func:`summable_reply`: its arrays as the
fixed-point limbs of :mod:`fedal.secure` (the weights' change L2-clipped on the device, NaN
refused) in the legacy ``fitres`` records the mod reads and masks. What leaves the site is the
masked vector, the report's scalars (in the clear, as without secure aggregation) and the
protocol's public keys and encrypted shares.

A train message without the protocol passes through unchanged, unless the node config says
``secure-only = true``: then the site refuses it, so a server that turns secure aggregation
off gets an error instead of the site's update.
"""
from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from clients.node import NodeConfig
from fedal.flower import protocol
from fedal.messages import TrainReport
from fedal.secure import CLIPPING_RANGE, QUANTIZATION_RANGE, FixedPoint

#: the legacy records Flower's mod reads a reply from (``flwr.compat``'s ``fitres`` layout)
FITRES_PARAMETERS, FITRES_WEIGHT, FITRES_METRICS, FITRES_STATUS = (
    "fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status")
#: the SecAgg+ settings under which fedal's fixed-point values sum exactly (:mod:`fedal.secure`)
EXACT_SETTINGS = {"clipping_range": CLIPPING_RANGE, "target_range": QUANTIZATION_RANGE, "max_weight": 1.0}
log = logging.getLogger("fedal.client")


class SecureAggregationRefused(RuntimeError):
    """The site does not answer: the message is not under the protocol it requires, or the protocol's settings
    would not sum its values exactly."""


def under_protocol(msg: Message) -> bool:
    """Whether the train message ``msg`` is a stage of Flower's SecAgg+ protocol."""
    return RECORD_KEY_CONFIGS in msg.content


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod for ``@app.train``: a SecAgg+ stage goes to Flower's ``secaggplus_mod`` (whose masking stage calls
    fedal's train function, which answers with :func:`summable_reply`); any other train message to ``call_next``."""
    if not under_protocol(msg):
        if NodeConfig.from_mapping(dict(context.node_config)).secure_only:
            raise SecureAggregationRefused(
                "this site answers train messages only under secure aggregation (node config secure-only = true); "
                "run the federation with secure-aggregation = true")
        return call_next(msg, context)
    return secaggplus_mod(msg, context, call_next)


def check_settings(context: Context) -> None:
    """Refuse SecAgg+ settings under which the sum would not be exact: Flower's quantiser must carry fedal's
    integers (a clipping range of 2^21 on 2^22 levels) and weigh every site alike (fedal weighs the changes)."""
    state = context.state[RECORD_KEY_STATE] if RECORD_KEY_STATE in context.state else {}
    wrong = {k: state.get(k) for k, v in EXACT_SETTINGS.items() if state.get(k) != v}
    if wrong:
        raise SecureAggregationRefused(f"the server's SecAgg+ settings {wrong} are not {EXACT_SETTINGS}: this site's "
                                       "fixed-point values would not sum exactly, so it does not send them")


def summable_reply(msg: Message, context: Context, arrays: dict, report: TrainReport, codec: FixedPoint) -> Message:
    """The reply to the masking stage ``msg``: the site's ``arrays`` as the fixed-point limb vectors
    (:meth:`fedal.secure.FixedPoint.encode`, the change from the model ``msg`` carried, weighted by the labeled
    samples), with weight 1 and the ``report``'s scalars, in the ``fitres`` records Flower's mod masks."""
    check_settings(context)
    sent = protocol.state_from_record(msg.content[protocol.ARRAYS])
    if codec.equal_weights:  # differential privacy: clipping is the mechanism, not an accident
        on_clip = lambda norm: log.info("this site's change of the weights has L2 norm %.3g, clipped to "  # noqa: E731
                                        "dp-clipping-norm %.3g", norm, codec.clip_norm)
    else:
        on_clip = lambda norm: log.warning(  # noqa: E731
            "this site's change of the weights has L2 norm %.3g, clipped to secure-clip-norm %.3g before it is "
            "summed; raise secure-clip-norm if that is not meant", norm, codec.clip_norm)
    limbs = codec.encode(arrays, sent, report.num_examples, on_clip=on_clip)
    return Message(RecordDict({
        FITRES_PARAMETERS: ArrayRecord({str(i): Array(a) for i, a in enumerate(limbs)}),
        FITRES_WEIGHT: MetricRecord({"num_examples": 1}),
        FITRES_METRICS: ConfigRecord(report.to_metrics()),
        FITRES_STATUS: ConfigRecord({"code": 0, "message": "Success"}),
    }), reply_to=msg)
