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
    schema_from_moments,
)
from mmfed.secagg import SecAggError, SecAggParams
from mmfed.secagg.quantize import pack_segments, unpack_segments
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
    """The same sum in the clear (``--no-secagg``), for sites whose policy allows it.

    The server encodes each site's moments in the fixed point the secure sum uses and
    decodes their sum as the secure sum would, so a run's schema does not depend on
    whether secure aggregation was on, and runs with and without it stay comparable.
    """
    request = wire.moments_request(ctx.cfg, layout, cohort=len(nodes))
    ok, failed = exchange(ctx.grid, dict.fromkeys(nodes, request), wire.MOMENTS,
                          SETUP_ROUND, ctx.remaining())
    params = moments_params(ctx, len(nodes), layout)
    segments = list(params.segments)
    total: np.ndarray | None = None
    used = 0
    left_out = {ctx.name(node): reason for node, reason in failed.items()}
    for node, reply in sorted(ok.items(), key=lambda item: ctx.name(item[0])):
        try:
            refusal = wire.declined_of(reply.content)
            if refusal is not None:
                raise wire.WireError(refusal)
            moments, counts = wire.moments_of(reply.content, layout.columns)
            share = [min(int(c), params.count_cap) / params.count_cap for c in counts]
            codes = pack_segments(moments.astype(np.float32), share, segments,
                                  params.clip_range, params.max_sites).astype(np.uint64)
        except (wire.WireError, SecAggError) as exc:
            left_out[ctx.name(node)] = str(exc)
            continue
        total = codes if total is None else total + codes
        used += 1
    for name, reason in sorted(left_out.items()):
        log.warning("%s left out of the schema statistics: %s", name, reason)
    if total is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(left_out.items()))
        raise MmfedError("no site contributed statistics for the feature schema"
                         + (f" ({reasons})" if reasons else ""))
    means, weights = unpack_segments(total.astype(np.uint32), used, segments,
                                     params.clip_range, params.max_sites)
    return schema_from_moments(layout, means, np.rint(weights * params.count_cap)
                               .astype(np.int64))


def moments_params(ctx: RoundContext, n_sites: int, layout: StatsLayout) -> SecAggParams:
    """The moments' fixed-point layout: one segment of two values per column, clipped
    to [-1, 1] (the moments lie there by construction, whatever secagg.clip_range says)."""
    return secagg_params(ctx.cfg, SETUP_ROUND, n_sites, 2 * layout.columns,
                         (2,) * layout.columns, clip_range=1.0)


class SecureMoments(SecureSum):
    """The moments' secure sum: one segment of two values per column."""

    def __init__(self, ctx: RoundContext, nodes: list[int], layout: StatsLayout) -> None:
        self.layout = layout
        super().__init__(ctx, SETUP_ROUND, nodes, moments_params(ctx, len(nodes), layout))

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
