"""Getting a run ready before any site is contacted: inputs checked, run directory made.

Every entry point (``mmfed simulate``, ``mmfed centralized``, ``flwr run .``, the
ServerApp ``mmfed server`` submits, the Compose ServerApp) prepares its run here, so
a bad folder or an impossible setting is refused the same way, with one clear line,
before Ray, a SuperLink or any site starts. ``freeze_config`` is the one place a run
gets its id and its ``config.toml``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfed.config import RunConfig
from mmfed.data.reader import list_sites, read_site
from mmfed.data.sitespec import SiteSpec, parse_site_spec
from mmfed.data.synth import SynthSettings, parse_missing, synthesize
from mmfed.errors import DataError, MmfedError, UsageError
from mmfed.run.resume import ResumePoint, find_resume_point, truncate_metrics
from mmfed.run.rundir import RunDir
from mmfed.server.secure_settings import check_distributed_settings, check_secagg_settings


@dataclass(frozen=True)
class PreparedRun:
    """A run ready to start: its resolved config, its directory, and where it resumes
    (``None``: from round 1)."""

    cfg: RunConfig
    run: RunDir
    resume: ResumePoint | None = None
    admitted: dict[int, str] | None = None  # node id -> the site its key was admitted as


def default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def validate_site_folder(folder: Path) -> SiteSpec:
    """One site folder (or the holdout) must check clean: its first problem, one line."""
    result = read_site(folder)
    if result.site is None:
        extra = len(result.problems) - 1
        more = f" (and {extra} more; run `mmfed data check {folder}`)" if extra else ""
        raise DataError(f"{folder}: {result.problems[0]}{more}", result.problems)
    return result.site.spec


def validate_holdout(data_dir: Path) -> Path:
    """The server's evaluation set, ``data_dir/holdout``, must check clean; a deployed
    server holds nothing else."""
    holdout = data_dir / "holdout"
    if not holdout.is_dir():
        raise DataError(f"{data_dir}: no holdout/ folder (the server's evaluation set)")
    validate_site_folder(holdout)
    return holdout


def _task_of(spec: SiteSpec) -> str:
    if spec.kind == "classification":
        return f"classification of {list(spec.classes)}"
    return spec.kind + (f" in {spec.unit}" if spec.unit else "")


def validate_federation(root: Path) -> list[Path]:
    """Every site folder and the holdout must check clean, and declare one task,
    before anything trains: a model cannot be averaged across tasks."""
    sites = list_sites(root)
    folders = [*sites, root / "holdout"]
    specs = [validate_site_folder(folder) for folder in sites]
    if not (root / "holdout").is_dir():
        validate_holdout(root)  # the one-line refusal for a missing holdout
    specs.append(validate_site_folder(root / "holdout"))
    first = _task_of(specs[0])
    for folder, spec in zip(folders[1:], specs[1:], strict=True):
        if _task_of(spec) != first:
            raise DataError(f"sites disagree on the task: {folders[0].name} declares "
                            f"{first}, {folder.name} {_task_of(spec)} ([task] in site.toml; "
                            "every site of a federation has the same task)")
    return sites


def freeze_config(cfg: RunConfig, run: RunDir) -> None:
    """Record the config that runs: its run directory, a fresh run id unless it has
    one (the id names the run in every site's privacy ledger), and ``config.toml``."""
    cfg.set("out", str(run.path))
    if not cfg["run_id"]:
        cfg.set("run_id", uuid.uuid4().hex)
    run.write_config(cfg)


def _synthesize_default(cfg: RunConfig, data: Path) -> None:
    """The configured synthetic cohort in ``data``, unless an earlier start made it."""
    if (data / "cohort.json").exists():
        return
    p = cfg["data.patient_missing"]
    synthesize(data, SynthSettings(
        sites=cfg["data.sites"], patients_per_site=cfg["data.patients_per_site"],
        holdout=cfg["data.holdout"], seed=cfg["seed"], genes=cfg["data.genes"],
        patient_missing={"images": p, "genomics": p},
        site_missing=parse_missing(list(cfg["data.missing"]), cfg["data.sites"])))


def _site_name(folder: Path) -> str:
    """A site's name from its site.toml (the folder checked clean just before)."""
    spec, _ = parse_site_spec(folder / "site.toml")
    return spec.name if spec is not None else folder.name


def check_cohort(cfg: RunConfig, n_sites: int, names: list[str] | None = None) -> None:
    """A cohort term larger than the federation would make every site decline every
    round: one line now instead of a run of refusals. The server's own request
    (``privacy.min_cohort``) is checked against ``n_sites``, and so are the policies of
    the simulated sites in ``names`` (``privacy.site.<name>.min_cohort``)."""
    wanted = {"the server's request": int(cfg["privacy.min_cohort"])}
    for name in names or []:
        wanted[name] = int(cfg.values.get(f"privacy.site.{name}.min_cohort",
                                          cfg["privacy.min_cohort"]))
    for who, cohort in wanted.items():
        if cohort > n_sites:
            raise UsageError(
                f"{who} needs at least {cohort} sites in every secure sum "
                f"(privacy.min_cohort) and the federation has {n_sites}; with "
                f"{n_sites} sites set --set privacy.min_cohort={n_sites}"
                + (" (each site can then read the other's update from the sum)"
                   if n_sites == 2 else ""))


def relax_simulated_policies(cfg: RunConfig, n_sites: int) -> None:
    """Without secure aggregation, the simulated sites (whose policies are this run's
    ``privacy.*`` settings) accept plaintext rounds of the whole federation.

    Only for runs that hold every site's folder: here one operator owns every site,
    and ``--no-secagg`` is that operator's explicit choice. A per-site entry
    (``privacy.site.<name>.*``) is a site's own word and stays as written; a deployed
    site's policy file is never touched by anything the server does.
    """
    cfg.set("privacy.secure_aggregation", "optional")
    cfg.set("privacy.min_cohort", max(1, min(int(cfg["privacy.min_cohort"]), n_sites)))


def prepare_run(cfg: RunConfig, out: Path, *, fresh: bool = True) -> tuple[RunConfig, RunDir]:
    """Create the run directory, synthesize data if none was given, freeze the config.

    For runs that hold every site's folder (simulation, ``flwr run .``, centralized).
    """
    out = out.resolve()
    run = RunDir(out, fresh=fresh)  # refuses an existing run before any other work
    if not cfg["data.dir"]:
        _synthesize_default(cfg, out / "data")
        cfg.set("data.dir", str(out / "data"))
    else:
        cfg.set("data.dir", str(Path(cfg["data.dir"]).resolve()))
    sites = validate_federation(Path(cfg["data.dir"]))
    cfg.set("data.sites", len(sites))
    check_distributed_settings(cfg)
    if cfg["secagg.enabled"]:
        check_secagg_settings(cfg, len(sites))
        check_cohort(cfg, len(sites), [_site_name(s) for s in sites])
    else:
        relax_simulated_policies(cfg, len(sites))
    if cfg["federation.min_sites"] > len(sites):
        raise UsageError(f"federation.min_sites = {cfg['federation.min_sites']} but the "
                         f"federation has {len(sites)} site(s)")
    freeze_config(cfg, run)
    return cfg, run


def prepare_flwr_run(run_config: Mapping[str, Any], default: Path) -> PreparedRun:
    """``flwr run .``: the same preparation as ``mmfed simulate``, into ``out`` (or
    ``default``), from the app's config plus ``--run-config``."""
    cfg = RunConfig.from_flower(run_config)
    cfg, run = prepare_run(cfg, Path(cfg["out"]) if cfg["out"] else default)
    return PreparedRun(cfg, run)


def prepare_submitted(run_config: Mapping[str, Any]) -> PreparedRun:
    """The run ``mmfed server`` submitted: it already made the run directory and froze
    the config, so only the holdout is checked (the server holds no site data), and a
    run directory with complete rounds (``mmfed server --resume``) continues after them.
    """
    cfg = RunConfig.from_flower(run_config)
    if not cfg["out"]:
        raise MmfedError("run config has no 'out': submit runs with `mmfed server`")
    validate_holdout(Path(cfg["data.dir"]))
    run = RunDir(Path(cfg["out"]), fresh=False)
    point = find_resume_point(run.path, cfg)
    if point is not None:
        truncate_metrics(run.path, point)
    return PreparedRun(cfg, run, point, admitted_nodes(run.path))


def admitted_nodes(run_path: Path) -> dict[int, str] | None:
    """Which site each node's key was admitted as, from ``deployment.json`` (written by
    ``mmfed server`` when it registered the keys); None where sites are not
    authenticated (``--insecure``), since a node's name is then all there is."""
    import json

    try:
        record = json.loads((run_path / "deployment.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MmfedError(f"{run_path / 'deployment.json'}: unreadable ({exc})") from None
    if not record.get("supernode_auth"):
        return None
    try:
        return {int(entry["node_id"]): str(entry["site"]) for entry in record["admitted"]
                if entry.get("node_id") is not None}
    except (KeyError, TypeError, ValueError) as exc:
        raise MmfedError(f"{run_path / 'deployment.json'}: malformed admission record "
                         f"({exc})") from None
