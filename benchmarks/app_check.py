"""What checking the app costs a site: hashing the FAB a run ships and deciding on it.

The site node decides once per run, on the run's first message (fetching the FAB is
Flower's cost, paid by a stock SuperNode too); every later message of the run only
looks the decision up. Measured here, in process, on the app ``mmfed server`` ships
and on the repository's own Flower app (the whole mmfed source tree as a FAB):

* ``first``: hash + approval check + run config parsed from the FAB, for a new run;
* ``later``: the lookup every other message of the run pays.

Last line: one JSON object with the medians in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from flwr.cli.build import build_fab_from_disk

from mmfed.config import RunConfig
from mmfed.deploy.node import NodePlan, SiteNode
from mmfed.deploy.server import app_pyproject

REPO = Path(__file__).resolve().parents[1]


def fleet(fab: bytes) -> tuple[object, object]:
    digest = hashlib.sha256(fab).hexdigest()
    run = SimpleNamespace(fab_hash=digest, series_id=0, fab_id="x", fab_version="1",
                          override_config={})
    return (lambda run_id: run), (lambda h, run_id: SimpleNamespace(content=fab,
                                                                     hash_str=h))


def measure(fab: bytes, repeats: int, folder: Path) -> dict[str, float]:
    policy = folder / "policy.toml"
    policy.write_text("", encoding="utf-8")
    node = SiteNode(NodePlan("site-1", str(folder), "127.0.0.1:1", None, None, str(policy),
                             str(folder / "privacy")))
    get_run, get_fab = fleet(fab)
    first, later = [], []
    for run_id in range(repeats):
        start = time.perf_counter()
        node.run_for(run_id, get_run, get_fab)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        node.run_for(run_id, get_run, get_fab)
        later.append(time.perf_counter() - start)
    return {"first_ms": round(1000 * statistics.median(first), 3),
            "later_ms": round(1000 * statistics.median(later), 4),
            "fab_kib": round(len(fab) / 1024, 1)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        app = folder / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(app_pyproject(RunConfig.load()), encoding="utf-8")
        results = {"deployment_app": measure(build_fab_from_disk(app), 50, folder),
                   "repository_app": measure(build_fab_from_disk(REPO), 10, folder)}
    for name, figures in results.items():
        print(f"{name:15s} first message of a run {figures['first_ms']:8.2f} ms, every "
              f"later message {figures['later_ms']:.4f} ms (FAB {figures['fab_kib']} KiB)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
