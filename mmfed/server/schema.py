"""The federation's feature schema, learned without any one site's statistics.

Before round 1 the server needs each column's mean and spread to build the model and
to encode its holdout. It asks in two steps:

1. ``stats``: each site's column names (in the clear: names, never numbers). Merged,
   they give the layout; the server sets each column's clipping scale from its own
   holdout (twice the largest magnitude there), which bounds what any patient adds.
2. ``moments``: per column, each site's count and the means of its clipped, scaled
   values and of their squares. Under secure aggregation these are summed masked,
   exactly like model updates (one weighted segment per column, the weight being the
   site's count for that column), so the server learns only the federation's
   per-column totals: counts, means and spreads over every surviving site together.
   Every site checks the request against its policy (threshold, neighbourhood,
   ``min_cohort``, again before unmasking), as for training. Without secure
   aggregation (``--no-secagg``) each site sends its moments in the clear, and only
   where its policy allows plaintext.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import RecordDict

from mmfed import wire
from mmfed.data.reader import SiteData
from mmfed.errors import MmfedError
from mmfed.ml.features import (
    ColumnNames,
    FeatureSchema,
    StatsLayout,
    pool_moments,
    schema_from_moments,
)
from mmfed.secagg import SecAggError
from mmfed.server.records import SiteEntry
from mmfed.server.rounds import RoundContext
from mmfed.server.secure import SecureSum
from mmfed.server.secure_settings import secagg_params
from mmfed.server.transport import exchange

log = logging.getLogger("mmfed")
SETUP_ROUND = 0  # the schema's messages belong to no training round


def read_names(content: RecordDict) -> tuple[str, ColumnNames]:
    """A ``stats`` reply: the site's name and its column names."""
    name, record = wire.site_of(content)
    try:
        return name, ColumnNames.from_config(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise wire.WireError(f"malformed column names ({type(exc).__name__}: {exc})") \
            from None


def learn_schema(ctx: RoundContext, layout: StatsLayout, holdout: SiteData | None
                 ) -> FeatureSchema:
    """The schema from every site's moments under ``layout``, scaled on ``holdout``."""
    layout = layout.with_scales([holdout] if holdout is not None else [])
    nodes = sorted(ctx.sites)
    if ctx.cfg["secagg.enabled"]:
        return SecureMoments(ctx, nodes, layout).run()
    return _plain_moments(ctx, nodes, layout)


def _plain_moments(ctx: RoundContext, nodes: list[int], layout: StatsLayout
                   ) -> FeatureSchema:
    request = wire.moments_request(ctx.cfg, layout, cohort=len(nodes))
    ok, failed = exchange(ctx.grid, dict.fromkeys(nodes, request), wire.MOMENTS,
                          SETUP_ROUND, ctx.remaining())
    parts = []
    for node, reason in failed.items():
        log.warning("%s left out of the schema statistics: %s", ctx.name(node), reason)
    for node, reply in sorted(ok.items(), key=lambda item: ctx.name(item[0])):
        refusal = wire.declined_of(reply.content)
        try:
            if refusal is not None:
                raise wire.WireError(refusal)
            parts.append(wire.moments_of(reply.content, layout.columns))
        except wire.WireError as exc:
            log.warning("%s left out of the schema statistics: %s", ctx.name(node), exc)
    if not parts:
        raise MmfedError("no site contributed statistics for the feature schema")
    return schema_from_moments(layout, *pool_moments(parts))


class SecureMoments(SecureSum):
    """The moments' secure sum: one segment of two values per column."""

    def __init__(self, ctx: RoundContext, nodes: list[int], layout: StatsLayout) -> None:
        self.layout = layout
        segments = (2,) * layout.columns
        # the moments lie in [-1, 1] by construction, whatever secagg.clip_range says
        super().__init__(ctx, SETUP_ROUND, nodes, secagg_params(
            ctx.cfg, SETUP_ROUND, len(nodes), 2 * layout.columns, segments, clip_range=1.0))

    def run(self) -> FeatureSchema:
        base = wire.moments_request(self.ctx.cfg, self.layout)
        contents = {sid: wire.with_secagg(base, wire.SecAggRequest(self.params, sid))
                    for sid in self.node_of}
        advertised = self.open(contents, wire.MOMENTS, "moments", self.ctx.remaining(),
                               self.accept)
        try:
            means, used, _ = self.masked_sum(advertised)
        except SecAggError as exc:
            reasons = "; ".join(f"{name}: {entry.get('reason', entry['status'])}"
                                for name, entry in sorted(self.sites.items())
                                if entry["status"] != "trained")
            raise MmfedError(f"the feature schema's statistics could not be summed under "
                             f"secure aggregation ({exc})"
                             + (f"; {reasons}" if reasons else "")) from None
        counts = np.asarray(self.server.segment_weights) * self.params.count_cap
        log.info("feature schema from the masked moments of %d site(s)", len(used))
        return schema_from_moments(self.layout, means.astype(np.float64),
                                   np.rint(counts).astype(np.int64))

    def accept(self, sid: int, content: RecordDict) -> SiteEntry | None:
        refusal = wire.declined_of(content)
        if refusal is not None:
            self.refused(sid, "moments", refusal)
            return None
        return {"status": "trained"}
