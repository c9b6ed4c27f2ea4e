"""A secure round's protocol parameters, from the run config and the round's sites.

Apart from ``mmfed.server.secure`` so that run preparation can refuse impossible
settings before anything starts without importing Flower: Flower reads its telemetry
switch from the environment when it is first imported, and ``mmfed simulate`` sets
that switch only just before it starts the simulation.
"""

from __future__ import annotations

from mmfed.config import RunConfig
from mmfed.errors import UsageError
from mmfed.secagg import SecAggError, SecAggParams, default_threshold


def secagg_params(cfg: RunConfig, round_num: int, n_sites: int, d: int,
                  segments: tuple[int, ...] = (), clip_range: float | None = None
                  ) -> SecAggParams:
    """The parameters of one round with ``n_sites`` sites and a ``d``-value update
    (``clip_range``: the run's ``secagg.clip_range`` unless the values have their own
    bound, as the schema's moments do)."""
    neighbours = int(cfg["secagg.neighbours"]) or None
    if neighbours is not None and neighbours >= n_sites - 1:
        neighbours = None
    group = n_sites if neighbours is None else min(n_sites, neighbours + 1 + neighbours % 2)
    threshold = int(cfg["secagg.threshold"]) or default_threshold(group)
    return SecAggParams(run_id=cfg["run_id"] or "unnamed-run", round=round_num,
                        site_ids=list(range(n_sites)), threshold=threshold,
                        neighbours=neighbours,
                        clip_range=float(cfg["secagg.clip_range"] if clip_range is None
                                         else clip_range),
                        max_sites=max(n_sites, 2), count_cap=int(cfg["secagg.count_cap"]),
                        vector_length=d, segments=segments)


def check_secagg_settings(cfg: RunConfig, n_sites: int) -> None:
    """Refuse impossible secure-aggregation settings before anything starts."""
    if n_sites < 2:
        raise UsageError("secure aggregation needs at least 2 sites (a single site's "
                         "'aggregate' is its update); use --no-secagg for one site")
    try:
        secagg_params(cfg, 1, n_sites, 1).validate()
    except SecAggError as exc:
        raise UsageError(f"secure aggregation settings: {exc}") from None
