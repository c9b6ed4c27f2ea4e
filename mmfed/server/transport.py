"""Moving messages over Flower's Grid: waiting for sites, one exchange per stage.

Every stage of every round is one ``exchange``: one message per node out, replies
back until all are in or the stage's time is up. A missing or error reply becomes that
node's failure reason; nothing here raises because of one site.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from mmfed.errors import MmfedError

POLL_FIRST = 0.02  # seconds before the first pull
POLL_MAX = 0.2  # the longest wait between pulls (a loopback call to the SuperLink)
PULL_PER_PENDING = 1e-3  # seconds of poll interval per outstanding reply (large federations)
POLL_PACED = 0.03  # a paced stage's pull interval: few replies outstanding, cheap to ask
QUICK_REPLY = 0.5  # seconds: a paced stage whose replies come back faster is held up by
# the polling round trip rather than by the sites, and gets its wide window
STALLED_AFTER = 10.0  # seconds (at least; 4x the stage's mean reply time) before a paced
# message counts as stalled and stops holding its place in the window


class PacedGrid(Grid):
    """A Grid that keeps only a few messages of a stage outstanding (simulation).

    Why: Flower's simulation runtime finds each virtual node's next message by
    scanning every stored message once per node, ten times a second, under the lock
    that pulls and replies also take. With all of a stage's N messages outstanding a
    sweep costs N x N checks: 2.4 s of CPU at 1,000 sites, measured, so the sweeping
    alone took a core and round time grew with the square of the sites. Only a few
    sites run at once (one per Ray worker), so a stage here keeps ``slow`` messages
    outstanding while its replies take long (training: enough to keep every worker
    fed) and ``wide`` once they come back within ``QUICK_REPLY`` (secure
    aggregation's quick stages, where the 0.1 s sweep interval, not the workers,
    bounds the pace). A sweep then costs N x window. A site that hangs would hold its
    place until the stage's deadline; after ``STALLED_AFTER`` (or four times the
    stage's mean reply time, if longer) its message no longer counts, so one stuck
    site cannot stall the others. Deployed servers never use it: there every site is
    its own machine and all must get their message at once.
    """

    def __init__(self, grid: Grid, slow: int, wide: int) -> None:
        if not 1 <= slow <= wide:
            raise ValueError(f"need 1 <= slow <= wide, not {slow}, {wide}")
        self.inner, self.slow, self.wide = grid, slow, wide

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return send_and_receive(self, list(messages),
                                float("inf") if timeout is None else timeout)


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
    interval backs off to 0.2 s, so a quick stage costs what its sites take. On a
    ``PacedGrid`` the messages go out a window at a time (see there).
    """
    pacer = grid if isinstance(grid, PacedGrid) else None
    waiting = list(reversed(out))  # popped from the end: first in, first out
    deadline = time.monotonic() + timeout
    pending: dict[str, float] = {}  # message id -> when it was pushed
    replies: list[Message] = []
    quick, answered = 0, 0  # replies that came back within QUICK_REPLY, and all replies
    spent = 0.0  # their total seconds from push to pull
    wait = POLL_FIRST
    final = False

    def push(limit: int) -> None:
        stalled_before = time.monotonic() - max(
            STALLED_AFTER, 4 * spent / answered if answered else 0.0)
        live = sum(pushed_at > stalled_before for pushed_at in pending.values())
        batch = [waiting.pop() for _ in range(min(len(waiting), limit - live))]
        if batch:
            pushed_at = time.monotonic()
            pending.update(dict.fromkeys(grid.push_messages(batch), pushed_at))

    push(pacer.slow if pacer else len(out))
    while pending:
        got = list(grid.pull_messages(list(pending)))
        replies.extend(got)
        now = time.monotonic()
        for m in got:
            took = now - pending.pop(m.metadata.reply_to_message_id, now)
            quick, answered, spent = quick + (took < QUICK_REPLY), answered + 1, spent + took
        if pacer and not final:
            push(pacer.wide if 2 * quick > answered else pacer.slow)
        left = deadline - now
        if not pending or final:
            break
        if left <= 0:
            # One more pull: a pull can itself take long (Flower retries the objects of
            # a reply whose sender died mid-upload until its push session expires),
            # and replies that arrived meanwhile must not count as missing.
            final = True
            continue
        time.sleep(min(POLL_PACED if pacer else wait, left))
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
