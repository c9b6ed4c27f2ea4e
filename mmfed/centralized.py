"""``mmfed centralized``: the non-federated reference every federated result is judged by.

Same sites, same train/validation split, same feature schema, same model and the same
number of passes over the data (rounds × local epochs), only pooled in one place.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmfed.config import RunConfig
from mmfed.data.reader import load_site
from mmfed.ml.features import EncodedSite, encode, pooled_schema, split_indices
from mmfed.run.prepare import default_out, prepare_run
from mmfed.run.rundir import RunDir


def pooled_training_data(cfg: RunConfig) -> tuple[Any, EncodedSite, EncodedSite]:
    """(schema, pooled train split, holdout) exactly as the federation would see them."""
    from mmfed.data.reader import list_sites

    root = Path(cfg["data.dir"])
    sites = [load_site(folder) for folder in list_sites(root)]
    schema = pooled_schema(sites)
    parts = []
    for site in sites:
        train_idx, _ = split_indices(site.ids, site.labels, cfg["data.val_fraction"],
                                     cfg["seed"])
        parts.append(encode(site, schema).subset(train_idx))
    holdout = encode(load_site(root / "holdout"), schema)
    return schema, EncodedSite.concat(parts), holdout


def run_centralized(cfg: RunConfig, run: RunDir, log: Any = None) -> dict[str, Any]:

    from mmfed.ml.device import resolve_device
    from mmfed.ml.model import build_model
    from mmfed.ml.training import evaluate, site_spec, train_local
    from mmfed.site.runtime import site_seed

    started = time.perf_counter()
    schema, train, holdout = pooled_training_data(cfg)
    model = build_model(schema, cfg.model_spec(), seed=cfg["seed"])
    spec = site_spec(cfg.train_spec(), len(train))
    device = resolve_device(spec.device)
    epochs = cfg["rounds"] * spec.epochs
    one_epoch = type(spec)(**{**spec.__dict__, "epochs": 1})
    final: dict[str, Any] = {}
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        stats = train_local(model, train, one_epoch, schema.task,
                            seed=site_seed(cfg["seed"], epoch, "centralized"), device=device)
        final = {k: v for k, v in evaluate(model, holdout, spec.modalities,
                                           device=device).items() if k != "n"}
        line = {"round": epoch, "epoch": epoch, "global": final, "sites": {},
                "aggregation": {"participants": 0, "dropped": 0, "declined": 0,
                                "secure": False},
                "bytes": {"up": 0, "down": 0},
                "train": {"loss": stats["train_loss"], "num_examples": len(train)},
                "seconds": {"round": time.perf_counter() - t0}}
        run.append_metrics(line)
        if log is not None:
            log(line)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    run.save_checkpoint(epochs, state, schema, cfg)
    run.save_model(state, schema, cfg, epochs)
    summary = {"rounds": epochs, "final": final, "sites": {},
               "wall_seconds": round(time.perf_counter() - started, 2),
               "mode": "centralized", "num_examples": len(train), "device": str(device),
               "task": schema.task.kind}
    if schema.task.kind == "classification":
        summary["label_balance"] = np.bincount(train.labels).tolist()
    run.write_summary(summary)
    return summary


def centralized_from_args(args: argparse.Namespace) -> int:
    from mmfed.ml.process import limit_threads
    from mmfed.run.progress import Progress

    limit_threads()

    extra = {"seed": args.seed, "data.dir": str(args.data) if args.data else None}
    cfg = RunConfig.load(args.config, args.overrides, extra)
    from mmfed.ml.device import resolve_device

    resolve_device(cfg["train.device"])  # a missing GPU is one line, before any work
    out = args.out or (Path(cfg["out"]) if cfg["out"] else default_out("centralized"))
    cfg, run = prepare_run(cfg, out)
    epochs = cfg["rounds"] * cfg["train.local_epochs"]
    from mmfed.run.tracking import TensorBoardLog, chain

    tensorboard = TensorBoardLog(run.path)
    try:
        with Progress(epochs, "mmfed centralized") as progress:
            summary = run_centralized(cfg, run, chain(progress.round_done, tensorboard))
    finally:
        tensorboard.close()
    from mmfed.ml.task import headline_text

    print(f"done: {epochs} epochs on {summary['num_examples']} pooled patients in "
          f"{summary['wall_seconds']:.1f}s; {headline_text(summary['task'], summary['final'])}"
          f"; run directory {run.path}")
    return 0
