"""The Flower ClientApp a hospital runs: message in, site work, message out.

Failures the site can explain (bad data, wrong config) go back as an error reply
with a one-line reason instead of a crash, so the server can log which site failed
and why while the round carries on with the others. A refusal under the site's own
policy (``Declined``) is not a failure: it goes back as a normal ``declined`` reply.
Every request is checked against the site's policy (``mmfed.site.consent``) before
any data is touched for it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from mmfed import wire
from mmfed.config import RunConfig
from mmfed.errors import Declined, MmfedError
from mmfed.ml.features import FeatureSchema, column_moments
from mmfed.ml.process import limit_threads
from mmfed.ml.updates import flat_delta, group_weights
from mmfed.site import consent, faults
from mmfed.site import runtime as site_runtime
from mmfed.site import secagg as site_secagg
from mmfed.site.state import LoadedSite

ModelState = dict[str, np.ndarray]

app = ClientApp()


def _guard(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context],
                                                                       Message]:
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Declined as exc:
            return Message(wire.declined(str(exc)), reply_to=msg)
        except MmfedError as exc:
            return Message(Error(wire.ERR_SITE, str(exc)), reply_to=msg)
    return run


def _model_request(msg: Message, context: Context, what: str
                   ) -> tuple[RunConfig, int, FeatureSchema, ModelState, LoadedSite]:
    """A request that carries the global model, and the site folder it is about,
    fingerprinted once for the whole message."""
    cfg, round_num, schema, state = wire.read_request(msg.content)
    if schema is None or state is None:
        raise MmfedError(f"{what} request without schema or model")
    node_config = dict(context.node_config)
    site = site_runtime.open_site(site_runtime.resolve_site_dir(node_config, cfg))
    site_runtime.check_encoders(site_runtime.site_policy(node_config, cfg, site.name), cfg)
    return cfg, round_num, schema, state, site


@app.query(wire.ACTION_STATS)
@_guard
def stats(msg: Message, context: Context) -> Message:
    """The site's column names, in the clear: never a statistic."""
    cfg, _, _, _ = wire.read_request(msg.content)
    folder = site_runtime.resolve_site_dir(dict(context.node_config), cfg)
    name, names = site_runtime.stats_for(folder)
    # a site that would decline the run's encoder code says so at setup, not round one
    site_runtime.check_encoders(site_runtime.site_policy(dict(context.node_config), cfg,
                                                         name), cfg)
    return Message(wire.reply_content(name, config=names), reply_to=msg)


@app.query(wire.ACTION_MOMENTS)
@_guard
def moments(msg: Message, context: Context) -> Message:
    """Per-column moments for the schema: masked under secure aggregation (the server
    learns only the federation's totals), in the clear only where the policy allows."""
    cfg, _, _, _ = wire.read_request(msg.content)
    node_config = dict(context.node_config)
    site = site_runtime.open_site(site_runtime.resolve_site_dir(node_config, cfg))
    layout = wire.layout_of(msg.content)
    policy = site_runtime.site_policy(node_config, cfg, site.name)
    secagg = wire.secagg_request_of(msg.content)
    if secagg is None:
        consent.check_plaintext(policy, wire.cohort_of(msg.content))
        found, counts = column_moments(site.data, layout, int(cfg["secagg.count_cap"]))
        return Message(wire.moments_reply(site.name, found, counts), reply_to=msg)
    consent.check_secure(policy, secagg.params, secagg.my_id)
    if secagg.params.segments != (2,) * layout.columns:
        raise MmfedError("moments request: the secure sum is not laid out per column")
    found, counts = column_moments(site.data, layout, secagg.params.count_cap)
    pks = site_secagg.begin(context.state, secagg, found, int(counts.max(initial=0)),
                            counts=[int(c) for c in counts], min_cohort=policy.min_cohort)
    reply = wire.reply_content(site.name)
    reply[wire.SECAGG] = pks
    return Message(reply, reply_to=msg)


@app.train()
@_guard
def train(msg: Message, context: Context) -> Message:
    """Check the request, evaluate the model it carries (``federation.local_eval``),
    then train on it; under secure aggregation the reply carries public keys, or, when
    the request carries the share group's keys advertised ahead, this site's
    encrypted shares.

    The local evaluation is the one the ``evaluate`` handler gives, of the global model
    the previous round made: riding on the train trip spares the round a trip of its
    own. It comes after the request's checks (a request this site refuses touches no
    data) and before training, so a site that its budget makes decline the round
    still sends it, as it would answer ``evaluate``.
    """
    cfg, round_num, schema, state, site = _model_request(msg, context, "train")
    name = site.name
    # keys made ahead serve this one request, whatever happens to it
    round_keys = site_secagg.take_round_keys(context.state)
    site_secagg.check_fault(list(cfg["faults.drop"]), name, round_num, "train")
    secagg = wire.secagg_request_of(msg.content)  # malformed: refused before training
    peers = wire.peers_of(msg.content)
    node_config = dict(context.node_config)
    policy = site_runtime.site_policy(node_config, cfg, name)
    if secagg is None:
        if peers is not None:
            raise wire.WireError("a plaintext train request with secure aggregation keys")
        consent.check_plaintext(policy, wire.cohort_of(msg.content))
    else:
        consent.check_secure(policy, secagg.params, secagg.my_id)
        if peers is not None:
            round_keys = site_secagg.check_round_keys(round_keys, secagg, peers, round_num)
    limit_threads()  # once per process, on the first message that evaluates or trains
    local = (site_runtime.evaluate_round(site, cfg, schema, state)
             if cfg["federation.local_eval"] else None)
    try:
        outcome = site_runtime.train_round(site, cfg, schema, state, round_num,
                                           node_config, policy=policy,
                                           secagg=None if secagg is None else secagg.params)
    except Declined as exc:  # e.g. noise the server could replay
        return Message(wire.declined(str(exc), local=local), reply_to=msg)
    kind = faults.corruption(list(cfg["faults.corrupt"]), name, round_num)
    if kind and outcome.state is not None and secagg is None:  # drill: send a bad update
        outcome.state = faults.corrupt_state(outcome.state, state, kind)
    if secagg is None or outcome.state is None:
        counts = {f"count_{m}": float(c) for m, c in outcome.counts.items()}
        reply = wire.reply_content(name, state=outcome.state,
                                   metrics={**outcome.metrics, **counts})
        return Message(_with_local(reply, local), reply_to=msg)
    # Secure aggregation: the update stays here; only public keys (or encrypted shares)
    # leave with the metrics.
    update = flat_delta(outcome.state, state)
    if kind:  # drill: corrupted before the guard, so that the guard is what stops it
        update = faults.corrupt_vector(update, kind)
    update = site_secagg.guard(secagg, update, float(cfg["aggregation.max_update_norm"]))
    num_examples = int(outcome.metrics["num_examples"])
    payload = site_secagg.begin(context.state, secagg, update, num_examples,
                                group_weights(num_examples, outcome.counts, True),
                                min_cohort=policy.min_cohort if outcome.noise is None
                                else max(policy.min_cohort, outcome.noise.survivors),
                                round_keys=round_keys if peers is not None else None,
                                peers=peers,
                                noise_share=None if outcome.noise is None
                                else outcome.noise.mu_share)
    reply = wire.reply_content(name, metrics=outcome.metrics)
    reply[wire.SECAGG] = payload
    return Message(_with_local(reply, local), reply_to=msg)


def _with_local(reply: RecordDict, local: dict[str, float] | None) -> RecordDict:
    if local is not None:
        reply[wire.LOCAL] = wire.local_figures(local)
    return reply


def _secagg_stage(msg: Message, context: Context, stage: str) -> Message:
    header, request = wire.read_stage(msg.content)
    site_secagg.check_fault(list(header.faults), header.site, header.round, stage)
    reply = RecordDict()
    if stage == "share":
        reply[wire.SECAGG] = site_secagg.share(context.state, request, header.round)
    elif stage == "mask":
        reply[wire.MASKED] = site_secagg.mask(context.state, request, header.round)
    else:
        reply[wire.SECAGG], ahead = site_secagg.unmask(context.state, request, header.round)
        if ahead is not None:
            reply[wire.NEXT_KEYS] = ahead
    return Message(reply, reply_to=msg)


@app.query(wire.ACTION_SHARE)
@_guard
def secagg_share(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, "share")


@app.query(wire.ACTION_MASK)
@_guard
def secagg_mask(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, "mask")


@app.query(wire.ACTION_UNMASK)
@_guard
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, "unmask")


@app.evaluate()
@_guard
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, schema, state, site = _model_request(msg, context, "evaluate")
    limit_threads()  # once per process, on the first message that evaluates
    figures = site_runtime.evaluate_round(site, cfg, schema, state)
    return Message(wire.reply_content(site.name, metrics=figures), reply_to=msg)
