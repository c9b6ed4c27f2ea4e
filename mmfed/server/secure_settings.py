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


def distributed_noise(cfg: RunConfig) -> bool:
    """Whether training rounds carry the sites' distributed DP noise shares."""
    return bool(cfg["privacy.enabled"]) and cfg["privacy.noise"] == "distributed"


def secagg_params(cfg: RunConfig, round_num: int, n_sites: int, d: int,
                  segments: tuple[int, ...] = (), clip_range: float | None = None,
                  noisy: bool = False) -> SecAggParams:
    """The parameters of one round with ``n_sites`` sites and a ``d``-value update
    (``clip_range``: the run's ``secagg.clip_range`` unless the values have their own
    bound, as the schema's moments do).

    ``noisy`` (distributed DP): max_sites is one above the number of sites, so that a
    site's levels leave a whole site's range of codes as room for the noise."""
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
                        max_sites=max(n_sites + int(noisy), 2),
                        count_cap=int(cfg["secagg.count_cap"]),
                        vector_length=d, segments=segments, noisy=noisy)


def check_secagg_settings(cfg: RunConfig, n_sites: int) -> None:
    """Refuse impossible secure-aggregation settings before anything starts."""
    if n_sites < 2:
        raise UsageError("secure aggregation needs at least 2 sites (a single site's "
                         "'aggregate' is its update); use --no-secagg for one site")
    try:
        secagg_params(cfg, 1, n_sites, 1).validate()
    except SecAggError as exc:
        raise UsageError(f"secure aggregation settings: {exc}") from None


def check_distributed_settings(cfg: RunConfig) -> None:
    """Distributed noise protects only a secure sum of one full-batch step: refuse any
    other plan before anything starts (each site would decline it anyway)."""
    if not distributed_noise(cfg):
        return
    problems = []
    if not cfg["secagg.enabled"]:
        problems.append("secure aggregation (drop --no-secagg)")
    if not cfg["train.full_batch"]:
        problems.append("train.full_batch = true")
    if cfg["train.local_epochs"] != 1:
        problems.append("train.local_epochs = 1")
    if cfg["train.optimizer"] != "sgd":
        problems.append('train.optimizer = "sgd"')
    if cfg["privacy.accountant"] != "rdp":
        problems.append('privacy.accountant = "rdp"')
    if problems:
        raise UsageError("privacy.noise = distributed needs " + ", ".join(problems)
                         + " (configs/fedsgd.toml sets the training plan)")
