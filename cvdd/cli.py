"""The `cvdd` command: one subcommand per stage, all driven by a YAML config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .config import RunConfig, config_to_yaml, load_config
from .errors import CvddError

log = logging.getLogger("cvdd")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file, for example configs/digits.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, for example --set train.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", help="run folder (default: runs/<name>)")
    parser.add_argument("--data-root", help="folder or archive that contains the dataset (sets data.root)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download cifar10, cifar100, mnist or fashion-mnist into data.root")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (sets device)")


def _resolve_config(args) -> RunConfig:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.download:
        overrides.append("data.download=true")
    if args.device:
        overrides.append(f"device={args.device}")
    return load_config(args.config, overrides)


def _prepare(args, checks=None):
    """Validate the config, load the data, then create the run folder and its log (see cvdd.session)."""
    from .session import prepare

    session = prepare(_resolve_config(args), checks)
    return session.cfg, session.dataset, session.run, session.device


def _check_priors_available(cfg, dataset, run) -> None:
    from .prior import read_saved_priors

    if cfg.prior.values or read_saved_priors(cfg, dataset, run) is not None:
        return
    raise CvddError(
        f"committee members {cfg.committee.members} have no prior: prior.values is empty and there is no "
        f"matching priors.json in {str(run.root)!r}; run `cvdd prior` first or set prior.values"
    )


def cmd_pretrain(args) -> int:
    from .runs import stage
    from .train import pretrain_committee

    from .train import format_committee_table

    cfg, dataset, run, device = _prepare(args)
    timings: dict = {}
    with stage("committee", timings):
        results = pretrain_committee(cfg, dataset, run, device)
    table = format_committee_table(results)
    print(table)
    if args.report:
        from .runs import atomic_write_text

        total = sum(r["seconds"] for r in results.values())
        best = max(results.values(), key=lambda r: r["top1"])["top1"]
        text = (
            f"# Committee of `{cfg.name}`\n\n"
            f"Dataset: {dataset.describe()}.\n\n"
            f"Command: `cvdd {' '.join(sys.argv[1:]) if argv_is_cli() else 'pretrain --config ' + str(args.config)}`\n\n"
            f"{table}\n\n"
            f"Training seconds are the sum of the epoch times of each member, measured on this machine "
            f"({os.cpu_count()} CPU cores, torch threads {torch_threads()}, device {device}). "
            f"Total: {total / 60:.1f} minutes; best member: {100 * best:.2f}% test top-1.\n"
        )
        atomic_write_text(args.report, text)
    return 0


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name in ("cvdd", "__main__.py")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _methods(args, cfg) -> list[str]:
    from .errors import ConfigError

    methods = args.method or list(cfg.methods)
    for m in methods:
        if m not in ("random", "sre2l", "sre2l++", "cvdd"):
            raise ConfigError(f"method {m!r} is unknown; choose random, sre2l, sre2l++ or cvdd")
    return methods


def cmd_prior(args) -> int:
    from .prior import load_or_compute_priors
    from .runs import stage

    cfg, dataset, run, device = _prepare(args)
    with stage("prior"):
        priors = load_or_compute_priors(cfg, dataset, run, device)
    print("priors (%): " + ", ".join(f"{k} {v:.2f}" for k, v in priors.items()))
    return 0


def cmd_distill(args) -> int:
    from .pipeline import run_synthesis
    from .prior import load_or_compute_priors
    from .runs import stage

    def checks(cfg, dataset, run):
        if "cvdd" in _methods(args, cfg):
            _check_priors_available(cfg, dataset, run)

    cfg, dataset, run, device = _prepare(args, checks)
    methods = _methods(args, cfg)
    priors = load_or_compute_priors(cfg, dataset, run, device, compute=False) if "cvdd" in methods else {}
    with stage("synthesis"):
        outputs = run_synthesis(cfg, dataset, run, device, priors, methods)
    for method, out in outputs.items():
        print(f"{method}: {len(out['images'])} images in {run.distilled_dir(method)}")
    return 0


def cmd_evaluate(args) -> int:
    from .pipeline import format_results, run_evaluation, summarize
    from .prior import load_or_compute_priors
    from .runs import stage

    def checks(cfg, dataset, run):
        from .evaluate import check_class_names
        from .pipeline import load_distilled

        methods = _methods(args, cfg)
        if any(m in ("cvdd", "random") for m in methods):
            _check_priors_available(cfg, dataset, run)
        for method in methods:
            check_class_names(load_distilled(run, method), dataset)

    cfg, dataset, run, device = _prepare(args, checks)
    methods = _methods(args, cfg)
    needs_priors = any(m in ("cvdd", "random") for m in methods)
    priors = load_or_compute_priors(cfg, dataset, run, device, compute=False) if needs_priors else {}
    timings: dict = {}
    with stage("evaluate", timings):
        results = run_evaluation(cfg, dataset, run, device, priors, methods)
    print(format_results(summarize(results, cfg, dataset, priors, timings)))
    return 0


def cmd_run(args) -> int:
    from .pipeline import format_results, run_pipeline

    cfg, dataset, run, device = _prepare(args)
    start = time.perf_counter()
    metrics = run_pipeline(cfg, dataset, run, device)
    print(format_results(metrics))
    metrics_path = run.root / "validation" / "metrics.json" if cfg.validation else run.metrics_path
    print(f"total {time.perf_counter() - start:.0f} s; metrics in {metrics_path}")
    return 0


def cmd_report(args) -> int:
    from .report import rewrite_results, run_report, study_parts, write_study_index
    from .runs import setup_logging
    from .session import project_path

    setup_logging()
    parts = study_parts(args.experiment)
    if parts:
        # A study: every part in turn, then the index of all parts.
        for spec in parts:
            done = (project_path(args.reports_dir) / spec.folder / "metrics.json").is_file()
            if args.tables_only and done:
                print(f"rewrote {rewrite_results(spec.name, reports_dir=args.reports_dir)}")
            elif not args.tables_only:
                start = time.perf_counter()
                out = run_report(spec.name, reports_dir=args.reports_dir)
                print(f"report written to {out} in {time.perf_counter() - start:.0f} s")
        print(f"wrote {write_study_index(args.experiment, reports_dir=args.reports_dir)}")
        return 0
    if args.tables_only:
        print(f"rewrote {rewrite_results(args.experiment, reports_dir=args.reports_dir)}")
        return 0
    start = time.perf_counter()
    out = run_report(args.experiment, reports_dir=args.reports_dir)
    print(f"report written to {out} in {time.perf_counter() - start:.0f} s (results in {out / 'results.md'})")
    return 0


def cmd_config(args) -> int:
    cfg = _resolve_config(args)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def cmd_own_files(args) -> int:
    from .sweep import variant_own_files

    root = Path(args.run_dir)
    if not (root / "config.yaml").is_file():
        raise CvddError(f"{str(root)!r} is not a run folder: config.yaml not found; pass a run folder such as "
                        "runs/cifar10-cpu")
    entries = sorted(root.glob("ablations/*/*"))
    # The combined metrics.json of each ablation sits beside its variant folders.
    for path in entries:
        if path.is_file() and ".tmp-" not in path.name:
            print(path.as_posix())
    for variant in (p for p in entries if p.is_dir()):
        for path in variant_own_files(root, variant):
            print(path.as_posix())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvdd", description="Dataset distillation by committee voting (CV-DD): train, distill, evaluate."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "pretrain": (cmd_pretrain, "train every committee member and save its checkpoint"),
        "prior": (cmd_prior, "compute each member's prior performance (Algorithm 1) into priors.json"),
        "distill": (cmd_distill, "synthesise the distilled sets of the configured methods"),
        "evaluate": (cmd_evaluate, "train fresh students on the distilled sets and report test top-1"),
        "run": (cmd_run, "run every stage: committee, priors, synthesis, post-evaluation, metrics"),
        "config": (cmd_config, "print the resolved config after overrides and validation"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        if name == "pretrain":
            p.add_argument("--report", help="also write the committee table as Markdown to this file")
        if name in ("distill", "evaluate"):
            p.add_argument("--method", action="append", help="method to run (repeatable; default: config methods)")
        p.set_defaults(func=func)
    report = sub.add_parser("report", help="execute an experiment's notebooks with papermill into reports/",
                            description="execute the notebooks that configs/experiments/EXPERIMENT.yaml lists, "
                                        "with its parameters, into REPORTS_DIR/EXPERIMENT/")
    report.add_argument("experiment", help="experiment name (configs/experiments/NAME.yaml), a YAML path, "
                        "or a study whose parts name report folders under it (fidelity-cifar10)")
    report.add_argument("--reports-dir", default="reports", help="parent folder of the report (default: reports)")
    report.add_argument("--tables-only", action="store_true",
                        help="rebuild results.md from the report's metrics.json and discussion.md, executing nothing")
    report.set_defaults(func=cmd_report)
    own = sub.add_parser("own-files", help="list the ablation files of a run folder that differ from the base run's",
                         description="print, one per line, each ablation's combined metrics.json and every file under "
                                     "RUN_DIR/ablations/*/*/ that the base run does not hold with the same bytes: "
                                     "what a committed study needs "
                                     "(git add -f $(cvdd own-files RUN_DIR))")
    own.add_argument("run_dir", help="the base run folder, for example runs/cifar10-cpu")
    own.set_defaults(func=cmd_own_files)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        distributed.init_from_env()
        if not distributed.is_main():
            # Every rank runs the command; only rank 0 prints tables and summaries.
            sys.stdout = open(os.devnull, "w")
        code = args.func(args)
    except CvddError as exc:
        print(f"cvdd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvdd: interrupted; rerun the same command to continue from the last finished item", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    log.debug("command %s took %.1f s", args.command, time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
