"""The ``mmfed`` command line: thin argument parsing over the library.

Heavy modules (torch, flwr, ray) are imported inside the command that needs them so
that ``mmfed --help`` and ``mmfed data check`` start in a fraction of a second.
Every user-caused failure is an ``MmfedError`` and becomes one line on stderr with
exit code 1 (input) or 2 (usage); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmfed.errors import MmfedError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="run configuration (TOML); defaults apply "
                   "for keys it leaves out")
    p.add_argument("--data", type=Path, help="federation folder: one subfolder per site "
                   "plus holdout/ (default: synthesize one into RUN/data)")
    p.add_argument("--seed", type=int, help="seed for the cohort, model init and sampling")
    p.add_argument("--out", type=Path, help="run directory to write (default: runs/<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config key, e.g. --set "
                   "train.lr=0.001 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmfed", description="Federated, privacy-preserving training of "
                     "multimodal medical models on Flower.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    data = sub.add_parser("data", help="create and validate site folders")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    synth = data_sub.add_parser("synth", help="write a synthetic multimodal federation "
                                "(site-1 … site-N + holdout), deterministic by seed")
    synth.add_argument("--out", type=Path, required=True, help="folder to create")
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--patients-per-site", type=int, default=400,
                       help="mean site size (sites are deliberately unequal)")
    synth.add_argument("--holdout", type=int, default=600, help="holdout patients")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--genes", type=int, default=2000)
    synth.add_argument("--missing", action="append", default=[], metavar="MODALITY@SITE",
                       help="remove a whole modality from a site, e.g. genomics@site-2")
    synth.add_argument("--patient-missing", type=float, default=0.1,
                       help="fraction of patients lacking each optional modality")
    synth.add_argument("--task", default="binary",
                       choices=("binary", "multiclass", "regression", "survival"),
                       help="outcome kind: binary (default), multiclass (4 ordered "
                       "subtypes), regression (continuous label) or survival (time, event)")
    imp = data_sub.add_parser(
        "import", help="turn a hospital export (EHR extract, PACS/DICOM export, expression "
        "matrix) into a site folder",
        description="Turn a hospital export into a site folder. Patients are the records' "
        "rows; a DICOM file belongs to the patient in its PatientID, any other image to the "
        "patient its file stem names. Only pixels are copied (as images/<patient_id>.npy); "
        "import.json names source files by the SHA-256 of their bytes, never by path. The "
        "folder appears only when everything has been read and checked.")
    imp.add_argument("--out", type=Path, required=True, metavar="SITE",
                     help="site folder to create (must not exist unless --force)")
    imp.add_argument("--name", required=True, help="site name written to site.toml")
    imp.add_argument("--records", type=Path, required=True, metavar="FILE",
                     help="EHR extract: CSV/TSV (delimiter detected) or Parquet")
    imp.add_argument("--id-column", required=True, metavar="COL",
                     help="the records' patient id column (becomes patient_id)")
    imp.add_argument("--task", choices=("classification", "regression", "survival"),
                     default="classification", help="what the outcome is: a class, a "
                     "number (regression) or a follow-up time with an event (survival); "
                     "default classification")
    imp.add_argument("--label", metavar="COL",
                     help="the records' outcome column (becomes label); required for "
                     "classification and regression")
    imp.add_argument("--classes", metavar="A,B,...", help="classification: allowed label "
                     "values in order (default: the sorted distinct values)")
    imp.add_argument("--time-column", metavar="COL", help="survival: the follow-up time "
                     "column (becomes time; each value a number > 0)")
    imp.add_argument("--event-column", metavar="COL", help="survival: the event column "
                     "(becomes event): 1/0, true/false or yes/no in any case; 1 = event, "
                     "0 = censored")
    imp.add_argument("--unit", metavar="TEXT", help="regression or survival: the unit of "
                     "the label or the times, e.g. days (written to site.toml task.unit)")
    imp.add_argument("--images", type=Path, metavar="DIR", help="image export, searched "
                     "recursively (DICOM, PNG, JPEG, TIFF, NPY)")
    imp.add_argument("--image-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                     help="height and width of the imported images (default 64 64)")
    imp.add_argument("--genomics", type=Path, metavar="FILE", help="expression matrix: "
                     "CSV/TSV/Parquet/GCT, samples x genes or genes x samples")
    imp.add_argument("--force", action="store_true", help="replace an existing site folder")
    imp.add_argument("--drop", metavar="COL,...", help="records columns not to import "
                     "(direct identifiers such as names or birth dates)")
    imp.add_argument("--workers", type=int, metavar="N", help="decoding processes "
                     "(default: the CPU count, at most 4)")
    imp.add_argument("--quiet", action="store_true", help="do not list skipped files and "
                     "warnings")
    check = data_sub.add_parser("check", help="validate one site folder")
    check.add_argument("dir", type=Path)
    check.add_argument("--quiet", action="store_true", help="do not print warnings")

    sim = sub.add_parser("simulate", help="run a multi-site federation on Flower's "
                         "simulation engine")
    _add_run_args(sim)
    sim.add_argument("--sites", type=int, help="number of synthetic sites (without --data)")
    sim.add_argument("--rounds", type=int, help="federated rounds")
    sim.add_argument("--no-progress", action="store_true", help="plain log lines instead "
                     "of the live display")
    sim.add_argument("--dp", action="store_true", help="train with site-owned differential "
                     "privacy (Opacus DP-SGD; budget privacy.epsilon per site)")
    sim.add_argument("--secagg", action="store_true", help="secure aggregation: the server "
                     "only learns the weighted sum of the sites' updates")
    sim.add_argument("--no-secagg", action="store_true", help="send plaintext updates "
                     "(warns every round)")
    sim.add_argument("--no-dp", action="store_true", help="train WITHOUT differential "
                     "privacy (warns every round)")
    sim.add_argument("--resume", type=Path, metavar="RUN", help="continue a crashed run "
                     "from its last complete round (with its own config.toml)")

    priv = sub.add_parser("privacy", help="inspect a site's privacy ledger")
    priv_sub = priv.add_subparsers(dest="privacy_command", metavar="ACTION",
                                   parser_class=_Parser)
    show = priv_sub.add_parser("show", help="print a site's privacy spending history")
    show.add_argument("site", type=Path, help="site folder (its data fingerprint names the "
                      "ledger)")
    show.add_argument("--ledger-dir", default="", help="ledger folder (default "
                      "$MMFED_LEDGER_DIR, else ~/.mmfed/privacy-ledger)")
    show.add_argument("--delta", type=float, help="δ to report ε at (default: the ledger's)")
    show.add_argument("--accountant", choices=("rdp", "prv"), help="default: the ledger's")

    aud = sub.add_parser("audit", help="check a site's tamper-evident audit trail")
    aud_sub = aud.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    aud_verify = aud_sub.add_parser("verify", help="verify the hash chain of "
                                    "DIR/audit.jsonl; exit 1 and name every problem")
    aud_verify.add_argument("dir", type=Path, help="the site's privacy (ledger) folder")

    app = sub.add_parser("app", help="the content hash a site approves a Flower app by")
    app_sub = app.add_subparsers(dest="app_command", metavar="ACTION", parser_class=_Parser)
    ahash = app_sub.add_parser("hash", help="print the approval hash of an app folder or "
                               ".fab file (its code and components, not its run config), "
                               "or of the app this installed mmfed's `mmfed server` ships")
    ahash.add_argument("path", type=Path, nargs="?", metavar="APP",
                       help="app folder (with pyproject.toml) or .fab file")
    ahash.add_argument("--installed", action="store_true", help="the hash of this "
                       "installation's own release (what a site trusts by default)")
    ahash.add_argument("--encoder", metavar="ENTRY", help='the digest of an encoder entry '
                       'point\'s code ("package.module:factory", model.*_encoder), which a '
                       "site lists in approved_encoders to run it; nothing is imported")

    rep = sub.add_parser("report", help="write RUN/report/index.html: a self-contained HTML "
                         "report of a finished run (performance, privacy, participation)")
    rep.add_argument("run", type=Path, help="run directory (from simulate or centralized)")
    rep.add_argument("--baseline", type=Path, help="reference run to compare with, e.g. a "
                     "`mmfed centralized` run on the same data")

    exp = sub.add_parser("explain", help="explain a finished run's final model on the "
                         "holdout (modality contributions, top features, image maps)")
    exp.add_argument("run", type=Path, help="run directory (holds model.pt)")
    exp.add_argument("--seed", type=int, default=0, help="seed for the permutations")
    exp.add_argument("--repeats", type=int, default=3, help="permutations per feature")
    exp.add_argument("--top", type=int, default=15, help="features listed per modality")
    exp.add_argument("--images", type=int, default=4, help="holdout images to map")
    exp.add_argument("--rank-by", choices=("loss", "auroc"), default="loss",
                     help="order features by log-loss increase (default: steadier) or by "
                     "AUROC drop when permuted")
    exp.add_argument("--data", type=Path, help="federation folder holding holdout/ "
                     "(default: the one recorded in the run)")

    cen = sub.add_parser("centralized", help="train the same model on all sites' data pooled "
                         "(the non-federated reference)")
    _add_run_args(cen)
    _add_deploy_parsers(sub)
    return parser


def _add_deploy_parsers(sub: Any) -> None:
    """certs init, keys new, server, client: deployment as real processes (mmfed.deploy)."""
    certs = sub.add_parser("certs", help="create the federation's TLS credentials")
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="ACTION",
                                     parser_class=_Parser)
    init = certs_sub.add_parser("init", help="create a CA (ca.pem, ca.key) and the server's "
                                "certificate (server.pem, server.key) for the given names")
    init.add_argument("--out", type=Path, required=True, help="folder to write")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="DNS name or IP address sites use to reach the server "
                      "(repeatable; localhost, 127.0.0.1 and ::1 are always added)")
    init.add_argument("--days", type=int, default=825, help="server certificate lifetime")
    init.add_argument("--force", action="store_true", help="replace existing files")

    keys = sub.add_parser("keys", help="create a site's SuperNode authentication keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    new = keys_sub.add_parser("new", help="write OUT/SITE.key (private, mode 0600) and "
                              "OUT/SITE.pub (give it to the server operator)")
    new.add_argument("--site", required=True, help="site name, e.g. site-1")
    new.add_argument("--out", type=Path, required=True, help="folder to write")
    new.add_argument("--force", action="store_true", help="replace existing files")

    srv = sub.add_parser("server", help="coordinate one federated run over the network: a TLS "
                         "SuperLink that admits only the given site keys, until the run ends")
    srv.add_argument("--config", type=Path, help="run configuration (TOML)")
    srv.add_argument("--data", type=Path, help="folder holding holdout/, the server's "
                     "evaluation set (or data.dir in the config)")
    srv.add_argument("--certs", type=Path, help="folder from `mmfed certs init` (ca.pem, "
                     "server.pem, server.key)")
    srv.add_argument("--admit", type=Path, action="append", default=[], metavar="PUB",
                     help="a site's public key (SITE.pub from `mmfed keys new`) or a folder "
                     "of them; the site name is the file name (repeatable)")
    srv.add_argument("--sites", type=int, help="sites to wait for before starting "
                     "(default: one per admitted key)")
    srv.add_argument("--host", default="0.0.0.0", help="address to listen on (default "
                     "0.0.0.0, all interfaces)")
    srv.add_argument("--port", type=int, default=9092, help="the public Fleet port sites "
                     "connect to (default 9092)")
    srv.add_argument("--out", type=Path, help="run directory to write (default: "
                     "runs/server-<time>)")
    srv.add_argument("--resume", type=Path, metavar="RUN", help="continue a crashed run from "
                     "its last complete round, with its own config.toml (give --certs and "
                     "--admit again)")
    srv.add_argument("--rounds", type=int, help="federated rounds")
    srv.add_argument("--seed", type=int, help="seed for model init and sampling")
    srv.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override one config key (repeatable)")
    srv.add_argument("--insecure", action="store_true", help="plain-text transport and no "
                     "site authentication (test networks only; warns)")
    srv.add_argument("--no-progress", action="store_true", help="plain log lines instead "
                     "of the live display")

    cli = sub.add_parser("client", help="run a hospital's site node: checks the site folder, "
                         "then trains when the server asks, under the site's privacy policy, "
                         "for apps the site approved")
    cli.add_argument("--data", type=Path, required=True, help="the site folder")
    cli.add_argument("--site", help="expected site name (must match the folder's site.toml)")
    cli.add_argument("--server", required=True, metavar="HOST:PORT",
                     help="the server's Fleet address, e.g. fl.example.org:9092")
    cli.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.pem)")
    cli.add_argument("--key", type=Path, help="this site's private key (SITE.key, mode 0600)")
    cli.add_argument("--policy", type=Path, help="this site's privacy policy (TOML); "
                     "default: DP on, epsilon 8, delta 1e-5")
    cli.add_argument("--ledger-dir", type=Path, help="privacy ledger folder (default "
                     "$MMFED_LEDGER_DIR, else ~/.mmfed/privacy-ledger)")
    cli.add_argument("--wait-admission", type=float, default=30.0, metavar="SECONDS",
                     help="keep retrying this long if the server does not know this site's "
                     "key yet (default 30)")
    cli.add_argument("--wait-server", type=float, default=0.0, metavar="SECONDS",
                     help="give up if the server is unreachable this long (default 0: "
                     "keep trying)")
    cli.add_argument("--insecure", action="store_true", help="plain-text transport, no "
                     "authentication (test networks only; warns)")
    cli.add_argument("--verbose", action="store_true", help="show the site node's log")
    cli.add_argument("--log", type=Path, metavar="FILE", help="append the site node's log "
                     "to FILE (default: kept only while the client runs)")


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from mmfed.data.synth import SynthSettings, parse_missing, synthesize

        if not 0.0 <= args.patient_missing < 1.0:
            raise UsageError("--patient-missing must be in [0, 1)")
        settings = SynthSettings(
            sites=args.sites, patients_per_site=args.patients_per_site, holdout=args.holdout,
            seed=args.seed, genes=args.genes,
            patient_missing={"images": args.patient_missing, "genomics": args.patient_missing},
            site_missing=parse_missing(args.missing, args.sites), task=args.task)
        if settings.genes < 10:
            raise UsageError("--genes must be at least 10")
        cohort = synthesize(args.out, settings)
        sites = cohort["sites"]
        assert isinstance(sites, list)
        print(f"wrote SYNTHETIC cohort (seed {args.seed}) to {args.out}: "
              + ", ".join(f"{s['name']} ({s['patients']} patients)" for s in sites)
              + f", holdout ({settings.holdout} patients)")
        return 0
    if args.data_command == "check":
        from mmfed.data import read_site, summarize

        result = read_site(args.dir)
        if not args.quiet:
            for warning in result.warnings:
                print(f"warning: {warning}", file=sys.stderr)
        if result.site is None:
            for problem in result.problems:
                print(f"problem: {problem}")
            print(f"{args.dir}: {len(result.problems)} problem(s); the site cannot train "
                  "until they are fixed", file=sys.stderr)
            return 1
        print(f"ok: {summarize(result.site)}")
        return 0
    if args.data_command == "import":
        from mmfed.data.importer import import_from_args

        code = import_from_args(args)
        # Everything is written and printed; end without running native libraries'
        # exit-time destructors (Arrow's thread pool aborted a loaded CI machine's
        # import once, after its work was done, turning exit 1 into SIGABRT).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise UsageError("mmfed data: choose an action: synth, import or check (see mmfed data "
                     "--help)")


def _cmd_privacy(args: argparse.Namespace) -> int:
    if args.privacy_command != "show":
        raise UsageError("mmfed privacy: choose an action: show (see mmfed privacy --help)")
    from mmfed.privacy.report import show_ledger

    print(show_ledger(args.site, args.ledger_dir, args.delta, args.accountant))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.audit_command != "verify":
        raise UsageError("mmfed audit: choose an action: verify (see mmfed audit --help)")
    from mmfed.privacy.audit import verify_command

    return verify_command(args.dir)


def _cmd_app(args: argparse.Namespace) -> int:
    if args.app_command != "hash":
        raise UsageError("mmfed app: choose an action: hash (see mmfed app --help)")
    from mmfed.deploy.release import app_command

    return app_command(args.path, args.installed, args.encoder)


def _cmd_explain(args: argparse.Namespace) -> int:
    from mmfed.report.explain import explain_from_args

    return explain_from_args(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from mmfed.report import render_report

    print(f"wrote {render_report(args.run, args.baseline)}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from mmfed.simulate import simulate_from_args

    return simulate_from_args(args)


def _cmd_centralized(args: argparse.Namespace) -> int:
    from mmfed.centralized import centralized_from_args

    return centralized_from_args(args)


def _cmd_certs(args: argparse.Namespace) -> int:
    if args.certs_command != "init":
        raise UsageError("mmfed certs: choose an action: init (see mmfed certs --help)")
    from mmfed.deploy.credentials import init_certs

    made = init_certs(args.out, args.host, days=args.days, force=args.force)
    print(f"wrote {made.ca_cert} (give to every site), {made.server_cert} and "
          f"{made.server_key} (server only), {made.ca_key} (keep offline; mode 0600); valid "
          f"for {', '.join(made.names)}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_command != "new":
        raise UsageError("mmfed keys: choose an action: new (see mmfed keys --help)")
    from mmfed.deploy.credentials import new_site_keys

    made = new_site_keys(args.site, args.out, force=args.force)
    print(f"wrote {made.private} (stays at the site; mode 0600) and {made.public} (give to "
          f"the server operator); fingerprint {made.fingerprint}")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from mmfed.deploy.server import server_from_args

    return server_from_args(args)


def _cmd_client(args: argparse.Namespace) -> int:
    from mmfed.deploy.client import client_from_args

    return client_from_args(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "data": _cmd_data,
    "simulate": _cmd_simulate,
    "centralized": _cmd_centralized,
    "privacy": _cmd_privacy,
    "audit": _cmd_audit,
    "app": _cmd_app,
    "report": _cmd_report,
    "explain": _cmd_explain,
    "certs": _cmd_certs,
    "keys": _cmd_keys,
    "server": _cmd_server,
    "client": _cmd_client,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except MmfedError as exc:
        if debug:
            raise
        print(f"mmfed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mmfed: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if debug or os.environ.get("MMFED_DEBUG"):
            raise
        print(f"mmfed: internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
