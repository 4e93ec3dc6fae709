"""The ``tfft`` command line.

    tfft run CONFIG [key=value ...] --out DIR [--address ADDR]   the whole pipeline
    tfft bank CONFIG [key=value ...] --out DIR [--address ADDR]  base bank only (resumable)
    tfft pretrain CONFIG [key=value ...]                         pretrain (or find cached) base model
    tfft config CONFIG [key=value ...]                           validate and print the resolved config
    tfft sweep CONFIG [key=value ...] --out DIR [--address ADDR] Ray Tune sweep (alpha, kl_weight, any key)
    tfft report DIR                                              table and plots of a sweep's trials

Configuration errors print one line naming the key and exit with code 2; so does a store (``s3://``,
``gs://``) that cannot be reached or written (``tfft: storage error: ...``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

_EPILOG = """\
Overrides are OmegaConf dot-lists, e.g. objective.side=left objective.alpha=0.05 finetune.steps=200.
Every key is documented in the README ("Configuration") and in pipelines/schema*.py.
MLflow: runs go to sqlite:///<cwd>/mlflow.db unless tracking.uri is set; view them with
  mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db
Cluster: every command takes --address (or RAY_ADDRESS) and runs under `ray job submit`; see
docs/cluster.md for the walk-through from `ray up cluster.yaml` to the MLflow UI.
Object stores: --out, pretrain.cache_dir and bank.cache_dir take s3://bucket/prefix or gs://bucket/prefix;
credentials and endpoints come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS); --out works in a local copy under
$TFFT_MIRROR_DIR (default ~/.cache/tfft/mirror), pushed every 30 s and at the end.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfft",
        description="Tail-aware Flow Fine-Tuning: fine-tune a flow model for the tail of a reward, on Ray.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config_args(p: argparse.ArgumentParser, example: str = "e.g. tune_configs/toy2d_right.yaml") -> None:
        p.add_argument("config", metavar="CONFIG", help=f"YAML file, {example}")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)")

    p_run = sub.add_parser(
        "run",
        help="bank -> threshold -> fine-tune -> evaluate -> record",
        description="Run the whole TFFT pipeline and print base / fine-tuned / target statistics. "
        "Rerunning with the same --out resumes from the stages already done.",
    )
    add_config_args(p_run)
    p_run.add_argument("--out", required=True, metavar="DIR", help="output directory (summary.json, banks, plots): a path, or s3://bucket/prefix, gs://...")

    p_bank = sub.add_parser(
        "bank",
        help="pretrain (cached) and compute the base bank only",
        description="Compute DIR/bank_base.parquet through the Ray Data sampler and reward pools, the "
        "same bank `tfft run` uses; an interrupted bank resumes from its committed shards and the reward cache. "
        "DIR/bank_summary.json records what the call built, reused or resumed and the bank's accounting.",
    )
    add_config_args(p_bank)
    p_bank.add_argument("--out", required=True, metavar="DIR", help="output directory: a path, or s3://..., gs://...")

    p_pre = sub.add_parser("pretrain", help="pretrain the base flow model (cached)", description="Flow-matching "
                           "pretraining on samples of data.source; reused by later runs with the same settings.")
    add_config_args(p_pre)

    p_cfg = sub.add_parser("config", help="validate a config and print it resolved")
    add_config_args(p_cfg)

    p_sweep = sub.add_parser(
        "sweep",
        help="Ray Tune sweep over alpha, kl_weight or any key, from one shared base bank",
        description="Run every trial of CONFIG's 'sweep:' section (grid / choice / uniform / loguniform over "
        "any key) as a Ray Tune trial into DIR/trials/<name>/, sharing one base bank, then write DIR/report/. "
        "Rerunning with the same --out runs only the trials without a summary.json. Exit code 1 if a trial failed.",
    )
    add_config_args(p_sweep, example="a run config plus a 'sweep:' section, e.g. tune_configs/sweep_toy2d.yaml")
    p_sweep.add_argument("--out", required=True, metavar="DIR", help="sweep directory (trials/, report/, trials.log); s3:// or gs:// on one machine")

    p_rep = sub.add_parser(
        "report",
        help="table and plots of a sweep's trials",
        description="Write DIR/report/: report.csv, report.md (CVaRs at each trial's alpha, both sides; base, "
        "fine-tuned, target; KL of the target), cvar_vs_alpha.png, tradeoff.png, histograms.png; logged to the "
        "sweep's parent MLflow run.",
    )
    p_rep.add_argument("dir", metavar="DIR", help="the --out directory of `tfft sweep`")
    return parser


def _load(args: argparse.Namespace):
    from pipelines.config import load_config

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    return load_config(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (``--out DIR key=value``): collect the stragglers.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from pipelines.config import ConfigError
    from pipelines.storage import StorageError

    try:
        return _dispatch(parser, args)
    except ConfigError as exc:
        print(f"tfft: config error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"tfft: storage error: {exc}", file=sys.stderr)
        return 2


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pipelines.mirror import working_dir
    from pipelines.storage import check_stores, is_remote

    if args.command == "sweep":
        from pipelines.config import ConfigError
        from pipelines.sweep.run import run_sweep
        from pipelines.sweep.spec import load_sweep

        overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
        sweep = load_sweep(args.config, overrides)
        if is_remote(args.out) and sweep.base.ray.address:
            raise ConfigError(f"'--out {args.out}': a sweep on a cluster writes its trial directories from every "
                              "node; give it a shared file system path (an object store works for local sweeps)")
        check_stores({"--out": args.out, "pretrain.cache_dir": sweep.base.pretrain.cache_dir,
                      "bank.cache_dir": sweep.base.bank.cache_dir if sweep.base.bank.cache else None})
        with working_dir(args.out) as out:
            statuses = run_sweep(sweep, out)
        return 0 if all(s in ("done", "stopped") for s in statuses.values()) else 1
    if args.command == "report":
        from pipelines.report import report_sweep

        with working_dir(args.dir, interval_s=0) as directory:
            report_sweep(directory)
        return 0
    cfg = _load(args)
    if args.command in ("run", "bank"):
        check_stores({"--out": args.out, "pretrain.cache_dir": cfg.pretrain.cache_dir,
                      "bank.cache_dir": cfg.bank.cache_dir if cfg.bank.cache else None})
    if args.command == "config":
        from pipelines.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    if args.command == "pretrain":
        from pipelines.pretrain import load_or_pretrain

        model = load_or_pretrain(cfg)
        print(model.path)
        return 0
    if args.command == "bank":
        from pipelines.run import run_bank_only

        with working_dir(args.out) as out:
            run_bank_only(cfg, out)
        return 0
    if args.command == "run":
        from pipelines.run import run_pipeline

        with working_dir(args.out) as out:
            run_pipeline(cfg, out)
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
