"""The Flower ClientApp a hospital runs: message in, site work, message out.

Failures the site can explain (bad data, wrong config) go back as an error reply
with a one-line reason instead of a crash, so the server can log which site failed
and why while the round carries on with the others.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from mmfed import messages, site_runtime
from mmfed.errors import MmfedError

app = ClientApp()


def _guard(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context],
                                                                       Message]:
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except MmfedError as exc:
            return Message(Error(messages.ERR_SITE, str(exc)), reply_to=msg)
    return run


@app.query("stats")
@_guard
def stats(msg: Message, context: Context) -> Message:
    cfg, _, _, _ = messages.read_request(msg.content)
    folder = site_runtime.resolve_site_dir(dict(context.node_config), cfg)
    name, stats_cfg = site_runtime.stats_for(folder)
    return Message(messages.reply_content(name, config=stats_cfg), reply_to=msg)


@app.train()
@_guard
def train(msg: Message, context: Context) -> Message:
    cfg, round_num, schema, state = messages.read_request(msg.content)
    if schema is None or state is None:
        raise MmfedError("train request without schema or model")
    folder = site_runtime.resolve_site_dir(dict(context.node_config), cfg)
    outcome = site_runtime.train_round(folder, cfg, schema, state, round_num,
                                       dict(context.node_config))
    name = site_runtime.get_site(folder).name
    return Message(messages.reply_content(name, state=outcome.state, metrics=outcome.metrics),
                   reply_to=msg)


@app.evaluate()
@_guard
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, schema, state = messages.read_request(msg.content)
    if schema is None or state is None:
        raise MmfedError("evaluate request without schema or model")
    folder = site_runtime.resolve_site_dir(dict(context.node_config), cfg)
    figures = site_runtime.evaluate_round(folder, cfg, schema, state)
    name = site_runtime.get_site(folder).name
    return Message(messages.reply_content(name, metrics=figures), reply_to=msg)
