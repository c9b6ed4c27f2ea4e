"""What a hospital does when the server asks: report statistics, train, evaluate.

Kept free of Flower types so it can be tested and reused directly; ``mmfed.site.app``
only translates messages to these calls. Data is read once per process and kept in
``mmfed.site.state``, because in deployment and simulation alike the same process
answers many messages. Each call takes a site folder, or the ``LoadedSite`` a message
handler already opened, so that the site is fingerprinted once per message.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfed.config import MODALITY_NAMES, RunConfig, TrainSpec
from mmfed.errors import DataError, Declined
from mmfed.ml.device import resolve_device
from mmfed.ml.features import EncodedSite, FeatureSchema, column_names
from mmfed.privacy.accounting import expected_snr
from mmfed.privacy.distributed import check_joins
from mmfed.privacy.policy import (
    TWO_SITE_WARNING,
    PrivacyPolicy,
    load_policy,
    policy_from_mapping,
)
from mmfed.site.state import LoadedSite, site_state

if TYPE_CHECKING:  # Opacus (budget): only training needs it
    from mmfed.privacy.budget import SiteBudget
    from mmfed.privacy.distributed import NoiseShare
    from mmfed.privacy.dp_sgd import NoiseSource
    from mmfed.secagg import SecAggParams

log = logging.getLogger("mmfed")
_WARNED: set[str] = set()  # sites already warned about a small min_cohort, per process


def resolve_site_dir(node_config: dict[str, Any], cfg: RunConfig) -> Path:
    """Deployment names the folder in node config; simulation maps partition-id to a site."""
    explicit = node_config.get("data-dir") or node_config.get("site-dir")
    if explicit:
        return Path(str(explicit))
    if "partition-id" not in node_config:
        raise DataError("this SuperNode has no 'data-dir' in its node config")
    root = cfg["data.dir"]
    if not root:
        raise DataError("run config has no data.dir for simulated sites")
    pid = int(node_config["partition-id"])
    sites = _simulated_sites(Path(root))
    if not 0 <= pid < len(sites) or not (sites[pid] / "site.toml").is_file():
        sites = _simulated_sites(Path(root), fresh=True)
    if not 0 <= pid < len(sites):
        raise DataError(f"partition-id {pid} but {root} has only {len(sites)} site folders")
    return sites[pid]


# federation folder -> (its modification time, its site folders), per process
_SITE_LISTS: dict[str, tuple[int, list[Path]]] = {}


def _simulated_sites(root: Path, fresh: bool = False) -> list[Path]:
    """The federation's site folders, listed again only when its entries change.

    Every simulated message maps its partition id to a folder; listing the folder
    each time stats every site, so a stage over N sites cost N x N stats (a fifth
    of a worker's time at 1,000 sites). Adding or removing a site folder changes the
    folder's modification time, and a listed folder that lost its site.toml is
    listed again (``fresh``).
    """
    from mmfed.data.reader import list_sites

    try:
        stamp = root.stat().st_mtime_ns
    except OSError:
        return list_sites(root)  # its one-line error
    known = _SITE_LISTS.get(str(root))
    if fresh or known is None or known[0] != stamp:
        known = (stamp, list_sites(root))
        _SITE_LISTS[str(root)] = known
    return known[1]


def open_site(folder: Path) -> LoadedSite:
    """The site folder for one message: fingerprinted once, read only if not yet held."""
    return site_state().open(folder)


def _opened(site: Path | LoadedSite) -> LoadedSite:
    return site if isinstance(site, LoadedSite) else open_site(site)


def site_seed(seed: int, round_num: int, site: str) -> int:
    digest = hashlib.sha256(f"{seed}:{round_num}:{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class TrainOutcome:
    state: dict[str, np.ndarray] | None  # None when the site declined the round
    metrics: dict[str, float]
    # training patients who had each modality: the weights of modality-aware
    # aggregation (sent in the clear only without secure aggregation)
    counts: dict[str, int] = field(default_factory=dict)
    # distributed DP: the noise share the site adds to its codes before masking
    noise: NoiseShare | None = None


def modality_counts(enc: EncodedSite, modalities: tuple[str, ...]) -> dict[str, int]:
    """How many patients each encoder actually learned from at this site."""
    present = (enc.mask > 0.5).sum(axis=0)
    return {m: int(present[i]) if m in modalities else 0
            for i, m in enumerate(MODALITY_NAMES)}


def site_policy(node_config: dict[str, Any], cfg: RunConfig, site: str) -> PrivacyPolicy:
    """The site's own policy (a file in deployment, run config in simulation), tightened
    by whatever the server asks for; never loosened."""
    path = node_config.get("policy")
    own = (load_policy(str(path)) if path else
           policy_from_mapping(cfg.site_privacy(site), f"run config for {site}"))
    policy = own.tightened(policy_from_mapping(cfg.privacy_request(), "server request"))
    if policy.min_cohort <= 2 and site not in _WARNED:
        _WARNED.add(site)
        log.warning("%s: %s", site, TWO_SITE_WARNING if policy.min_cohort == 2 else
                    "min_cohort = 1: the server may see this site's update alone")
    return policy


def check_encoders(policy: PrivacyPolicy, cfg: RunConfig) -> None:
    """Decline a run whose encoder code this site has not approved, before any of it is
    imported (an import runs the module: the approval is over its source, unread)."""
    from mmfed.ml.encoders import unapproved

    refused = unapproved(cfg.model_spec(), policy.approved_encoders)
    if refused:
        raise Declined(f"declined: {refused[0]}")


def noise_source(node_config: dict[str, Any], cfg: RunConfig, round_num: int, site: str,
                 device: Any) -> NoiseSource | None:
    """Where this round's DP noise comes from: fresh OS entropy (None), or, for a
    simulation being debugged with ``privacy.debug_seeded_noise``, the run seed.

    Seeded noise is noise the coordinator can replay, so a site that is not simulated
    (its node config names its folder, as ``mmfed client`` does) refuses it.
    """
    if not cfg["privacy.debug_seeded_noise"]:
        return None
    if "partition-id" not in node_config:
        raise Declined("declined: privacy.debug_seeded_noise asks for noise the server "
                       "could replay; a deployed site never trains with it")
    from mmfed.privacy.dp_sgd import NoiseSource

    log.warning("%s: round %d: DP noise seeded from the run seed "
                "(privacy.debug_seeded_noise): for debugging only, it protects nothing",
                site, round_num)
    return NoiseSource.seeded(device, site_seed(cfg["seed"], round_num, site))


def stats_for(site: Path | LoadedSite) -> tuple[str, dict[str, Any]]:
    """The site's name and column names: what it states in the clear for the schema."""
    loaded = _opened(site)
    return loaded.name, column_names(loaded.data).to_config()


def train_round(site: Path | LoadedSite, cfg: RunConfig, schema: FeatureSchema,
                global_state: dict[str, np.ndarray], round_num: int,
                node_config: dict[str, Any] | None = None,
                policy: PrivacyPolicy | None = None,
                secagg: SecAggParams | None = None) -> TrainOutcome:
    import torch

    from mmfed.ml.encoders import check_private
    from mmfed.ml.model import build_model
    from mmfed.ml.training import site_spec, train_local

    start = time.perf_counter()
    node_config = node_config or {}
    loaded = _opened(site)
    train, _ = site_state().splits(loaded, schema, cfg["data.val_fraction"], cfg["seed"])
    spec = site_spec(cfg.train_spec(), len(train))
    policy = policy or site_policy(node_config, cfg, loaded.name)
    check_joins(policy, secagg)  # before anything is trained or spent
    check_encoders(policy, cfg)
    model = build_model(schema, cfg.model_spec())
    if policy.enabled:
        check_private(model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
    seed = site_seed(cfg["seed"], round_num, loaded.name)
    device = resolve_device(spec.device)
    source = noise_source(node_config, cfg, round_num, loaded.name, device) \
        if policy.enabled else None
    if not policy.enabled:
        metrics = train_local(model, train, spec, schema.task, seed=seed,
                              device=device)
        metrics.update(private=0.0)
    else:
        from mmfed.files import state_hash
        from mmfed.privacy.budget import SiteBudget
        from mmfed.privacy.dp_sgd import train_private
        from mmfed.privacy.ledger import ledger_dir
        from mmfed.privacy.releases import ReleaseCache

        run_id = cfg["run_id"] or "unnamed-run"
        ledger_root = str(node_config.get("ledger-dir") or cfg["privacy.ledger_dir"])
        budget = SiteBudget(loaded.folder, policy, ledger_root, loaded.name, run_id)
        if policy.noise == "distributed":
            return _train_distributed(model, train, spec, schema, cfg, policy, budget,
                                      secagg, round_num, seed, device, source, start)
        releases = ReleaseCache(ledger_dir(ledger_root), budget.ledger.fingerprint)
        global_hash = state_hash(global_state)
        earlier = releases.load(run_id, round_num, global_hash)
        if earlier is not None:  # asked again (server resumed): re-send, spend nothing new
            return _re_release(budget, earlier, round_num, train, spec, cfg, start)
        plan = budget.plan_round(len(train), spec.batch_size, spec.epochs, round_num,
                                 cfg["rounds"])
        dim = sum(p.numel() for p in model.parameters())
        snr = expected_snr(plan.sample_rate * len(train), plan.sigma, dim,
                           plan.steps * cfg["rounds"])
        figures = {"private": 1.0, "delta": policy.delta, "epsilon_budget": policy.epsilon,
                   "sigma": plan.sigma, "sample_rate": plan.sample_rate, "snr": snr,
                   "parameters": float(dim)}
        if plan.declined:
            return TrainOutcome(None, {**figures, "declined": 1.0, "epsilon": plan.spent,
                                       "epsilon_projected": plan.projected,
                                       "seconds": time.perf_counter() - start})
        result = train_private(model, train, spec, schema.task, plan.sigma,
                               policy.max_grad_norm, seed, device=device,
                               mode=cfg["privacy.grad_sample_mode"], source=source)
        metrics = {**figures, "train_loss": result.train_loss, "steps": float(result.steps),
                   "num_examples": float(len(train))}
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        # durable copy first, then the ledger, and only then does the update leave
        releases.save(run_id, round_num, global_hash, state, metrics)
        metrics["epsilon"] = budget.record(plan, result.steps, round_num).epsilon
        metrics["seconds"] = time.perf_counter() - start
        return TrainOutcome(state, metrics, modality_counts(train, spec.modalities))
    metrics["seconds"] = time.perf_counter() - start
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return TrainOutcome(state, metrics, modality_counts(train, spec.modalities))


def _train_distributed(model: Any, train: EncodedSite, spec: TrainSpec, schema: FeatureSchema,
                       cfg: RunConfig, policy: PrivacyPolicy, budget: SiteBudget,
                       secagg: SecAggParams | None, round_num: int, seed: int, device: Any,
                       source: NoiseSource | None, start: float) -> TrainOutcome:
    """One full-batch step with clipping and no noise of its own: the noise share is
    added to the codes at masking (``mmfed.privacy.distributed``). The ledger entry is
    written here, before anything of the round leaves the site."""
    from mmfed.privacy import distributed
    from mmfed.privacy.dp_sgd import train_private

    distributed.check_request(policy, secagg, spec.full_batch, spec.epochs, spec.optimizer)
    assert secagg is not None  # check_request refused a plaintext round
    if any(e.run_id == budget.run_id and e.round == round_num
           for e in budget.ledger.entries()):
        raise Declined(f"declined: round {round_num} was already released under distributed "
                       "DP; releasing it again would need fresh noise and spend twice")
    plan, share = budget.plan_distributed(secagg, spec.lr, round_num, cfg["rounds"])
    figures = {"private": 1.0, "distributed": 1.0, "delta": policy.delta,
               "epsilon_budget": policy.epsilon, "sigma": plan.sigma, "sample_rate": 1.0}
    if share is None:
        return TrainOutcome(None, {**figures, "declined": 1.0, "epsilon": plan.spent,
                                   "epsilon_projected": plan.projected,
                                   "seconds": time.perf_counter() - start})
    result = train_private(model, train, spec, schema.task, 0.0, policy.max_grad_norm,
                           seed, device=device, mode=cfg["privacy.grad_sample_mode"],
                           source=source)
    dim = sum(p.numel() for p in model.parameters())
    # the sum's noise is σ·C over all survivors' patients; this site's figure assumes
    # the smallest sum it accepts, of sites its own size
    snr = expected_snr(len(train) * share.survivors, plan.sigma, dim, cfg["rounds"])
    metrics = {**figures, "train_loss": result.train_loss, "steps": float(result.steps),
               "num_examples": float(len(train)), "noise_share": share.mu_share,
               "survivors": float(share.survivors), "snr": snr,
               "wrap_probability": share.wrap_probability}
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    metrics["epsilon"] = budget.record_distributed(plan, share, round_num).epsilon
    metrics["seconds"] = time.perf_counter() - start
    return TrainOutcome(state, metrics, modality_counts(train, spec.modalities), share)


def _re_release(budget: SiteBudget, earlier: tuple[dict[str, np.ndarray], dict[str, float]],
                round_num: int, train: EncodedSite, spec: TrainSpec, cfg: RunConfig,
                start: float) -> TrainOutcome:
    """Answer a repeated request for a round with the update already released for it.

    If the ledger already has the round, nothing is spent; if the site crashed after
    saving the copy but before the ledger entry, the spend is recorded now (once).
    """
    state, metrics = earlier
    entries = [e for e in budget.ledger.entries()
               if e.run_id == budget.run_id and e.round == round_num]
    if entries:
        epsilon = entries[-1].epsilon
    else:
        plan = budget.plan_round(len(train), spec.batch_size, spec.epochs, round_num,
                                 cfg["rounds"])
        epsilon = budget.record(plan, int(metrics.get("steps", plan.steps)), round_num).epsilon
    out = {**metrics, "epsilon": epsilon, "re_released": 1.0,
           "seconds": time.perf_counter() - start}
    return TrainOutcome(state, out, modality_counts(train, spec.modalities))


def evaluate_round(site: Path | LoadedSite, cfg: RunConfig, schema: FeatureSchema,
                   global_state: dict[str, np.ndarray]) -> dict[str, float]:
    """Evaluate the global model on the site's own validation split."""
    import torch

    from mmfed.ml.model import build_model
    from mmfed.ml.training import evaluate

    loaded = _opened(site)
    _, val = site_state().splits(loaded, schema, cfg["data.val_fraction"], cfg["seed"])
    if len(val) == 0:
        return {"num_examples": 0.0}
    model = build_model(schema, cfg.model_spec())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
    figures = evaluate(model, val, tuple(cfg["train.modalities"]),
                       device=resolve_device(cfg["train.device"]))
    out = {k: float(v) for k, v in figures.items() if v is not None and k != "n"}
    out["num_examples"] = float(len(val))
    return out
