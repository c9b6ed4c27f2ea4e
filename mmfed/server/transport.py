"""Moving messages over Flower's Grid: waiting for sites, one exchange per stage.

Every stage of every round is one ``exchange``: one message per node out, replies
back until all are in or the stage's time is up. A missing or error reply becomes that
node's failure reason; nothing here raises because of one site.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from mmfed.errors import MmfedError

POLL_FIRST = 0.02  # seconds before the first pull
POLL_MAX = 0.2  # the longest wait between pulls (a loopback call to the SuperLink)
PULL_PER_PENDING = 1e-3  # seconds of poll interval per outstanding reply (large federations)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """The connected node ids once at least ``minimum`` are there; an error after
    ``timeout`` seconds, so a federation that cannot start says so."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise MmfedError(f"only {len(nodes)} of {minimum} required sites connected "
                             f"within {timeout:.0f}s")
        time.sleep(POLL_MAX)


def send_and_receive(grid: Grid, out: list[Message], timeout: float) -> list[Message]:
    """Push, then pull replies until all are in or the timeout passes.

    Flower's deployed grid sleeps 3 s between pulls, which a secure round (four
    exchanges) pays up to four times; here the first pulls come after 20 ms and the
    interval backs off to 0.2 s, so a quick stage costs what its sites take.
    """
    pending = set(grid.push_messages(out))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = POLL_FIRST
    final = False
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        left = deadline - time.monotonic()
        if not pending or final:
            break
        if left <= 0:
            # One more pull: a pull can itself take long (Flower retries the objects of
            # a reply whose sender died mid-upload until its push session expires),
            # and replies that arrived meanwhile must not count as missing.
            final = True
            continue
        time.sleep(min(wait, left))
        # a pull costs time per pending message: with a thousand sites outstanding,
        # polling every 0.2 s would spend a core on asking; 1 ms per pending reply
        # keeps asking to a small share of the wait, and adds at most ~1 s per stage
        wait = min(wait * 1.5, max(POLL_MAX, PULL_PER_PENDING * len(pending)))
    return replies


def exchange(grid: Grid, contents: Mapping[int, RecordDict], message_type: str,
             round_num: int, timeout: float) -> tuple[dict[int, Message], dict[int, str]]:
    """Send one message per node; returns (replies with content, node -> failure reason)."""
    out = [Message(content, node, message_type, group_id=str(round_num))
           for node, content in contents.items()]
    replies = {m.metadata.src_node_id: m for m in send_and_receive(grid, out, timeout)}
    ok: dict[int, Message] = {}
    failed: dict[int, str] = {}
    for node in contents:
        reply = replies.get(node)
        if reply is None:
            failed[node] = f"no reply within {timeout:.0f}s"
        elif reply.has_error():
            failed[node] = reply.error.reason or f"error code {reply.error.code}"
        else:
            ok[node] = reply
    return ok, failed
