"""The `cvdd` command: one subcommand per stage, all driven by a YAML config."""

from __future__ import annotations

import argparse
import logging
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
    parser.add_argument("--data-root", help="folder or archive that holds the dataset (sets data.root)")
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


def _prepare(args):
    """Validate the config, load the data, then create the run folder and its log."""
    from .data import load_dataset
    from .runs import RunFolder, atomic_write_text, resolve_device, setup_logging

    cfg = _resolve_config(args)
    device = resolve_device(cfg.device)
    setup_logging()
    dataset = load_dataset(cfg.data)
    run = RunFolder(cfg.resolved_run_dir()).create()
    setup_logging(run.log_path)
    atomic_write_text(run.config_path, config_to_yaml(cfg))
    log.info("run folder %s, device %s, %s", run.root, device, dataset.describe())
    return cfg, dataset, run, device


def cmd_pretrain(args) -> int:
    from .runs import stage
    from .train import pretrain_committee

    cfg, dataset, run, device = _prepare(args)
    timings: dict = {}
    with stage("committee", timings):
        results = pretrain_committee(cfg, dataset, run, device)
    print(format_committee_table(results))
    return 0


def format_committee_table(results: dict) -> str:
    lines = ["| member | test top-1 | parameters | seconds |", "|---|---|---|---|"]
    for arch, r in results.items():
        note = " (reused)" if r.get("skipped") else ""
        lines.append(f"| {arch} | {100 * r['top1']:.2f}%{note} | {r['parameters']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def cmd_config(args) -> int:
    cfg = _resolve_config(args)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvdd", description="Dataset distillation by committee voting (CV-DD): train, distill, evaluate."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "pretrain": (cmd_pretrain, "train every committee member and save its checkpoint"),
        "config": (cmd_config, "print the resolved config after overrides and validation"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except CvddError as exc:
        print(f"cvdd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvdd: interrupted; rerun the same command to continue from the last finished item", file=sys.stderr)
        return 130
    log.debug("command %s took %.1f s", args.command, time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
