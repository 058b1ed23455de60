"""The ``flora-ray`` command line.

Every subcommand turns input the user can fix (``errors.InputError``) into one line on stderr,
``flora-ray: error: ...``, and exit code 2, with no traceback; any other exception is reported with its type, the
stage it happened in and the hint to re-run with ``-v`` for the traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flora_ray.errors import InputError, StageUnfinished, stage_of

if TYPE_CHECKING:
    from flora_ray.records import ExportReport, FinetuneReport

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
# Local Ray binds every component to 127.0.0.1 only when this is set before Ray starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

logger = logging.getLogger("flora_ray")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}: give a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"ratio {value} is out of range: give a number in (0, 1]")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with flora-ray's one-line error format and exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"flora-ray: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from flora_ray import __version__

    parser = _Parser(prog="flora-ray", description="FLORA low-rank architecture search for Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"flora-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_inspect_parser(sub)
    _add_config_parsers(sub)
    run = sub.add_parser(
        "run",
        help="the whole pipeline: teacher, filter, supernet, search, export of the knee point, report",
        description="Run every stage in order; a finished stage is skipped when the command is run again, an "
        "interrupted one resumes. Writes report.md in the run directory.",
    )
    _add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    from flora_ray.stages import STAGES

    for name in (name for name, entry in STAGES.items() if entry.command):
        text = STAGES[name].help
        stage = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _add_run_arguments(stage)
        stage.set_defaults(func=cmd_stage, stage=name)
    _add_export_parser(sub)
    _add_finetune_parser(sub)
    _add_refine_parser(sub)
    _add_registry_parsers(sub)
    return parser


def _add_inspect_parser(sub: Any) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="per-layer shapes, ranks and exact MACs of a model configuration",
        description="Print every factorised layer's shape and rank, then total MACs and parameters versus dense.",
    )
    inspect.add_argument("model", help="timm model name, e.g. deit_base_patch16_224")
    which = inspect.add_mutually_exclusive_group()
    which.add_argument("--ranks", metavar="FILE", help="flora-ray rank JSON or reference subnet YAML")
    which.add_argument("--ratio", type=_ratio, help="uniform rank ratio for every layer, in (0, 1]")
    inspect.add_argument("--img-size", type=_positive_int, help="input resolution (default: the model's)")
    inspect.add_argument("--num-classes", type=_positive_int, help="classifier classes (default: the model's)")
    inspect.add_argument("--in-chans", type=_positive_int, help="input channels (default: the model's)")
    inspect.add_argument("--include-proj", action="store_true", help="also factorise attn.proj")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.set_defaults(func=cmd_inspect)


def _add_config_parsers(sub: Any) -> None:
    """``config`` (the resolved configuration) and ``plan`` (the dry run before submitting)."""
    config = sub.add_parser(
        "config",
        help="print the resolved configuration: base files merged, overrides applied, defaults filled in",
        description="Print the configuration a command would run with, as YAML (or JSON), after merging the "
        "base: files, applying the overrides and filling in every default; checks it as a run would.",
    )
    config.add_argument("config", help="experiment YAML (see experiments/)")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    config.add_argument("--json", action="store_true", help="print one JSON object instead of YAML")
    config.set_defaults(func=cmd_config, output=None)

    plan = sub.add_parser(
        "plan",
        help="dry run: per stage the resource demand, the nodes the autoscaler would start, time, GPU-hours, cost",
        description="Before submitting: per stage the bundles the code asks Ray for, the worker nodes Ray's "
        "autoscaler would start for them under a cluster launcher file (its own bin-packing), the work in MACs, a "
        "wall-time estimate with its source, GPU-hours and cost. No network is used and nothing is trained.",
    )
    plan.add_argument("config", help="experiment YAML (see experiments/)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    plan.add_argument("--cluster", help="Ray cluster launcher file (cluster/aws.yaml); default: this machine")
    plan.add_argument(
        "--price", action="append", default=[], metavar="NODE_TYPE=USD",
        help="price per node-hour of one node type (repeatable): --price gpu_1x=1.62 --price head=0.38",
    )  # fmt: skip
    plan.add_argument(
        "--prices", action="append", default=[], metavar="FILE",
        help="YAML/JSON mapping of node type to USD per node-hour (each node type the plan starts, and the head)",
    )  # fmt: skip
    plan.add_argument(
        "--throughput", action="append", default=[], metavar="FILE",
        help="a measured training rate (experiments/gpu_check.py result JSON); repeatable",
    )  # fmt: skip
    plan.add_argument(
        "--mfu", type=float, default=0.3,
        help="fallback only: assumed model-FLOPs utilisation of a GPU with no measured or published training rate",
    )  # fmt: skip
    plan.add_argument("--train-images", type=_positive_int, help="training images per epoch (a folder not here)")
    plan.add_argument("--classes", type=_positive_int, help="class count (an image folder not on this machine)")
    plan.add_argument("--output", help="parent directory of the run directory (its finished stages are measured)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    plan.set_defaults(func=cmd_plan)


def _add_export_parser(sub: Any) -> None:
    from flora_ray.api import BACKENDS, DEFAULT_BACKEND

    export = sub.add_parser(
        "export",
        help="export a searched subnet; report its test accuracy and CPU latency versus dense",
        description="Extract a subnet of a searched run into safetensors + subnet.json, then score and time it.",
    )
    export.add_argument(
        "run_dir", help="the run: its directory (runs/<name>) or storage URI (s3://bucket/prefix/<name>)"
    )
    pick = export.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=int, help="trial number (trials.parquet)")
    pick.add_argument("--max-macs", type=float, help="the most accurate front point within this many MACs per image")
    pick.add_argument(
        "--max-latency-ms", type=float, help="the most accurate front point within this predicted latency (ms)"
    )
    pick.add_argument("--knee", action="store_true", help="the knee point of the front (what the export stage exports)")
    export.add_argument("--output", help="directory to write (default RUN_DIR/export/trial_N)")
    export.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        default=["safetensors"],
        metavar="FORMAT",
        help="safetensors (always written), pt2 (torch.export), onnx (onnxruntime), int8 (Linear layers quantized "
        "to int8, CPU: accuracy and latency against fp32); several at once",
    )
    export.add_argument("--no-eval", action="store_true", help="skip the test-accuracy and latency passes")
    export.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for the latency measurement")
    export.add_argument("--address", help="Ray cluster whose nodes run the export's inference (default: local Ray)")
    export.add_argument(
        "--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help="ray (default: a Ray task) or local (this process)"
    )
    export.set_defaults(func=cmd_export)


def _add_finetune_parser(sub: Any) -> None:
    from flora_ray.api import BACKENDS, DEFAULT_BACKEND

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune a searched subnet by distillation from the run's teacher and export it again",
        description="Train a searched subnet further by distillation from the run's teacher (Ray Train, with "
        "checkpoints and resume), then export it into RUN_DIR/finetune/trial_N with its test accuracy before and "
        "after. key=value overrides may set finetune.* keys (finetune.epochs=3) and speed-only keys.",
    )
    finetune.add_argument(
        "run_dir", help="the run: its directory (runs/<name>) or storage URI (s3://bucket/prefix/<name>)"
    )
    finetune.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.epochs=3 finetune.lr=3e-4")
    pick = finetune.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=int, help="trial number (trials.parquet)")
    pick.add_argument("--max-macs", type=float, help="the most accurate front point within this many MACs per image")
    pick.add_argument("--knee", action="store_true", help="the knee point of the front (what the export stage exports)")
    finetune.add_argument("--output", help="directory to write (default RUN_DIR/finetune/trial_N)")
    finetune.add_argument("--address", help="Ray cluster to train on (default: local Ray on 127.0.0.1)")
    finetune.add_argument(
        "--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help="ray (default: Ray Train) or local (this process)"
    )
    finetune.set_defaults(func=cmd_finetune)


def _add_refine_parser(sub: Any) -> None:
    from flora_ray.api import BACKENDS, DEFAULT_BACKEND

    refine = sub.add_parser(
        "refine",
        help="choose the subnet of each budget after fine-tuning its best front points and best uniform configuration",
        description="For each budget, fine-tune the k most accurate front points within it (by inherited accuracy) "
        "and the best uniform configuration within it on one schedule (the run's finetune recipe), score them on the "
        "same test images and report the most accurate, with its paired difference to the uniform configuration. "
        "Writes RUN_DIR/refine.parquet and refine.json. key=value overrides may set refine.* and finetune.* keys "
        "(refine.epochs=1) and speed-only keys.",
    )
    refine.add_argument("run_dir", help="the run: its directory (runs/<name>) or storage URI (s3://bucket/p/<name>)")
    refine.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. refine.epochs=1 finetune.lr=3e-4")
    for flag, what in (("--max-macs", "MACs per image"), ("--max-params", "parameters"),
                       ("--max-latency-ms", "predicted latency (ms)")):  # fmt: skip
        refine.add_argument(flag, type=float, action="append", default=[], metavar="VALUE",
                            help=f"a budget of at most this many {what}; repeatable")  # fmt: skip
    refine.add_argument("--k", type=_positive_int, help="front points fine-tuned per budget (default: refine.k, 3)")
    refine.add_argument("--address", help="Ray cluster to fine-tune on (default: local Ray on 127.0.0.1)")
    refine.add_argument(
        "--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help="ray (default: Ray tasks) or local (this process)"
    )
    refine.set_defaults(func=cmd_refine)


def _add_registry_parsers(sub: Any) -> None:
    """``list``, ``status`` and ``compare``: the runs under a storage prefix, one run, several runs' fronts."""
    listing = sub.add_parser(
        "list",
        help="the runs under a storage prefix: state, stages, progress, trials, front, best accuracy, last update",
        description="One row per run under STORAGE (a local folder or an s3:// or gs:// prefix): finished, running "
        "(its lease is held), failed, interrupted or incomplete; the stage running and its progress; trials, front "
        "size, the best accuracy within 50/75/90% of the dense cost; the last update.",
    )
    listing.add_argument("storage", help="run.storage or the output folder: runs/, s3://bucket/prefix")
    listing.add_argument("--json", action="store_true", help="print one JSON array instead of a table")
    listing.set_defaults(func=cmd_list)
    status = sub.add_parser("status", help="one run's state, stages, progress, front and lease holder",
                            description="What `flora-ray list` shows for one run, with the stages done and the "
                            "job holding its lease.")  # fmt: skip
    status.add_argument("run_dir", help="the run: its directory (runs/<name>) or storage URI (s3://bucket/p/<name>)")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    status.set_defaults(func=cmd_status)
    compare = sub.add_parser(
        "compare",
        help="several runs' fronts and uniform baselines on one interactive page",
        description="Read the fronts, uniform baselines and dense models of finished searches; print the best "
        "accuracy of each within 50/75/90% of its dense cost, and with --html draw them all on one "
        "self-contained page (plotly, no network needed to view it).",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories or storage URIs")
    compare.add_argument("--html", metavar="FILE", help="write the interactive page to FILE")
    compare.add_argument("--cost", choices=("macs", "params", "latency_ms"), help="cost axis (default: the first "
                         "run's searched axis)")  # fmt: skip
    compare.add_argument("--json", action="store_true", help="print the points as a JSON array")
    compare.set_defaults(func=cmd_compare)


def cmd_list(args: argparse.Namespace) -> int:
    from flora_ray.registry import format_runs, list_runs

    frame = list_runs(args.storage)
    print(frame.to_json(orient="records") if args.json else format_runs(frame))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flora_ray.registry import format_status, run_status

    status = run_status(args.run_dir)
    print(json.dumps(status) if args.json else format_status(status))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flora_ray.registry import compare, format_runs, run_status

    frame = compare(args.runs, args.cost)
    if args.html:
        from flora_ray.search.interactive import compare_html
        from flora_ray.storage.files import write_text

        write_text(args.html, compare_html(frame, frame.attrs["cost_axis"]))
    if args.json:
        print(frame.drop(columns=["triples"]).to_json(orient="records"))
        return 0
    import pandas as pd

    print(format_runs(pd.DataFrame([run_status(run) for run in args.runs])))
    if args.html:
        print(f"wrote {args.html}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from flora_ray.stages.finetune import check_finetune, finetune_from_run

    choice = {"trial": args.trial, "max_macs": args.max_macs, "knee": args.knee, "overrides": args.overrides}
    check_finetune(args.run_dir, **choice)  # before Ray starts
    with _backend(args) as backend:
        report = finetune_from_run(args.run_dir, **choice, output=args.output, backend=backend)
    print(format_finetune(report))
    return 0


def format_finetune(report: FinetuneReport | Mapping[str, Any]) -> str:
    """What ``flora-ray finetune`` prints: the subnet, its test accuracy before and after, the folder."""
    from flora_ray.records import FinetuneReport

    r = report if isinstance(report, FinetuneReport) else FinetuneReport.from_dict(report)
    return (
        f"trial {r.trial}: {r.macs / 1e6:.2f} MMACs, test acc {r.test_accuracy_before:.2f}% -> "
        f"{r.test_accuracy:.2f}% ({r.change:+.2f} pts) after {r.epochs} epoch(s) of fine-tuning in "
        f"{r.seconds:.0f} s\n  {r.directory}"
    )


def cmd_refine(args: argparse.Namespace) -> int:
    from flora_ray.stages.refine import check_refine, refine_from_run
    from flora_ray.storage.run_store import ARTEFACTS

    budgets = [(axis, value) for axis, values in (("macs", args.max_macs), ("params", args.max_params),
                                                  ("latency_ms", args.max_latency_ms)) for value in values]  # fmt: skip
    choice = {"budgets": budgets, "k": args.k, "overrides": args.overrides}
    store, *_ = check_refine(args.run_dir, **choice)  # before Ray starts
    with _backend(args) as backend:
        _, summary = refine_from_run(store, **choice, backend=backend)
    print(f"{summary.describe()}\n  {store.location(ARTEFACTS.refine_table)}, {ARTEFACTS.refine_summary}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flora_ray.stages.export import check_export, export_from_run

    choice = {"trial": args.trial, "max_macs": args.max_macs, "max_latency_ms": args.max_latency_ms,
              "knee": args.knee, "formats": args.formats}  # fmt: skip
    check_export(args.run_dir, **choice)  # before Ray starts
    with _backend(args) as backend:
        report = export_from_run(args.run_dir, **choice, output=args.output, threads=args.threads, backend=backend,
                                 evaluate=not args.no_eval)  # fmt: skip
    print(format_export(report))
    return 0


def format_export(report: ExportReport | Mapping[str, Any]) -> str:
    """What ``flora-ray export`` prints: cost, accuracy, latency (when evaluated), formats, the folder."""
    from flora_ray.records import ExportReport

    r = report if isinstance(report, ExportReport) else ExportReport.from_dict(report)
    lines = [
        f"trial {r.trial}: {r.macs / 1e6:.2f} MMACs ({100 * r.macs_share:.0f}% of dense), search acc "
        f"{r.search_accuracy:.2f}%"
        + (f", test acc {r.test_accuracy:.2f}%" if r.evaluated else " (not evaluated: --no-eval)")
    ]
    if r.latency:
        lat = r.latency
        lines.append(
            f"  CPU latency batch 1: {lat.subnet_batch1_ms:.2f} ms (dense {lat.dense_batch1_ms:.2f}), "
            f"batch 32: {lat.subnet_batch32_ms:.2f} ms (dense {lat.dense_batch32_ms:.2f})"
        )
    for batch, b in (r.target_latency.batches if r.target_latency else {}).items():
        lines.append(
            f"  target device ({r.target_latency.device['name']}) batch {batch}: measured {b.measured_ms:.3f} ms, "
            f"predicted {b.predicted_ms:.3f} ms ({b.error_pct:+.1f}%)"
        )
    for name, f in r.formats.items():
        lines.append(f"  {name}: {f['file']}, max abs difference to PyTorch {f['max_abs_diff']:.2e}")
    if r.int8:
        q = r.int8
        lines.append(
            f"  int8: test acc {q.test_accuracy:.2f}% (fp32 {q.fp32_test_accuracy:.2f}%), CPU batch 1: "
            f"{q.latency.int8_batch1_ms:.2f} ms (fp32 {q.latency.fp32_batch1_ms:.2f}), batch 32: "
            f"{q.latency.int8_batch32_ms:.2f} ms (fp32 {q.latency.fp32_batch32_ms:.2f})"
        )
    return "\n".join([*lines, f"  {r.directory}"])


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from flora_ray.api import BACKENDS, DEFAULT_BACKEND

    parser.add_argument("config", help="experiment YAML (see experiments/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    parser.add_argument(
        "--address", help="Ray cluster to join (auto, ray://host:10001, host:6379); default: local Ray on 127.0.0.1"
    )
    parser.add_argument("--output", help="parent directory of the run directory (overrides run.output_dir)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="ray (default: Ray Train, tasks and Tune) or local (everything in this process, no Ray)",
    )


def format_inspect(report: dict[str, Any]) -> str:
    height, width = report["img_size"]
    lines = [f"{report['model']} at {height}x{width}: {len(report['layers'])} factorised layers"]
    lines.append(f"{'layer':<28} {'in':>6} {'out':>6} {'rank':>11} {'form':<9} {'MMACs':>10}")
    for layer in report["layers"]:
        rank = f"{layer['rank']}/{layer['max_rank']}"
        lines.append(
            f"{layer['fqn']:<28} {layer['in_features']:>6} {layer['out_features']:>6} {rank:>11} "
            f"{layer['form']:<9} {layer['macs'] / 1e6:>10.2f}"
        )
    macs, dense_macs = report["macs"], report["dense_macs"]
    params, dense_params = report["params"], report["dense_params"]
    lines.append(
        f"total: {macs / 1e9:.2f} GMACs (dense {dense_macs / 1e9:.2f}, saving {100 * (1 - macs / dense_macs):.1f}%), "
        f"{params / 1e6:.2f} M params (dense {dense_params / 1e6:.2f}, saving {100 * (1 - params / dense_params):.1f}%)"
    )
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    kwargs = {
        key: value
        for key, value in (("img_size", args.img_size), ("num_classes", args.num_classes), ("in_chans", args.in_chans))
        if value is not None
    }
    from flora_ray.core.inspection import inspect_model

    report = inspect_model(args.model, args.ranks, args.ratio, kwargs, args.include_proj)
    print(json.dumps(report) if args.json else format_inspect(report))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from flora_ray.plan import format_plan, make_plan, parse_prices, read_cluster

    cfg = _load_run_config(args)
    prices = parse_prices(args.price, args.prices)
    cluster = read_cluster(args.cluster) if args.cluster else None
    if prices and cluster is None:
        raise InputError("--price needs --cluster: prices are per node type of a cluster file")
    plans, totals = make_plan(cfg, cluster, prices, args.mfu, args.train_images, args.classes, args.throughput)
    if args.json:
        print(json.dumps({"stages": [dataclasses.asdict(p) for p in plans], "totals": totals}))
    else:
        where = f"under {args.cluster}" if cluster else "on this machine (local Ray)"
        print(f"plan for {cfg.run.name} ({cfg.model.name} on {cfg.data.name}) {where}:\n{format_plan(plans, totals)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from flora_ray.config import config_to_dict, dump_config

    cfg = _load_run_config(args)
    _check_model(cfg)
    print(json.dumps(config_to_dict(cfg)) if args.json else dump_config(cfg), end="" if not args.json else "\n")
    return 0


def _check_model(cfg: Any) -> None:
    """The model a configuration names exists (timm's registry, or a ``hf-hub:`` repo in the local hub cache), as
    ``plan`` and every run check; the data need not be on this machine."""
    from flora_ray.core.names import architecture, check_model_name

    check_model_name(architecture(cfg.model.name)[0])


def _load_run_config(args: argparse.Namespace):
    from flora_ray.config import load_config

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"run.output_dir={args.output}")
    return load_config(args.config, overrides)


@contextlib.contextmanager
def _backend(args: argparse.Namespace) -> Iterator[Any]:
    """The backend the command asked for: Ray (local on 127.0.0.1, or ``--address``) or in-process."""
    from flora_ray.api import open_backend

    with open_backend(args.backend, args.address) as backend:
        if args.backend == "ray" and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)  # ray.init installs its own handlers (sys.exit, Abseil's dump)
        yield backend


@contextlib.contextmanager
def _prepare(args: argparse.Namespace, stages: Sequence[str]) -> Iterator[tuple[Any, Any]]:
    """Load the configuration, take the run's lease (a run another job writes is refused), refuse another
    configuration's run and check the inputs of the first unfinished stage, then record the configuration: all
    before any backend starts. The lease is held until the block ends."""
    from flora_ray.api import writing_run

    cfg = _load_run_config(args)
    with writing_run(cfg, stages, args.address, args.backend) as store:
        yield cfg, store


def cmd_run(args: argparse.Namespace) -> int:
    from flora_ray.api import every_stage_done
    from flora_ray.pipeline import run_pipeline
    from flora_ray.stages import STAGES
    from flora_ray.storage.run_store import ARTEFACTS

    with _prepare(args, list(STAGES)) as (cfg, store):
        if every_stage_done(store):
            args.backend, args.address = "local", None  # every stage is skipped: nothing would run on Ray
        with _backend(args) as backend:
            run_pipeline(cfg, backend)
    print(store.read_text(ARTEFACTS.report))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from flora_ray.pipeline import run_stage

    with _prepare(args, [args.stage]) as (cfg, _), _backend(args) as backend:
        marker = run_stage(cfg, args.stage, backend)
    print(format_summary(args.stage, marker["summary"], marker["seconds"]))
    return 0


def format_summary(stage: str, summary: dict[str, Any], seconds: float) -> str:
    """What a stage command prints when it finishes (``stages.Stage.summarize``: each stage's own text)."""
    from flora_ray.stages import STAGES

    return STAGES[stage].summarize(summary, seconds=seconds)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may come after options (`train CONFIG --output D a.b=1`): argparse leaves them in `extra`.
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    logger.setLevel(logging.INFO)  # flora-ray's own progress lines (epochs, blocks, ETA) are always shown
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None  # SIGTERM stops like Ctrl-C
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command. Input the user can fix (``InputError``) is one line and exit code 2; a stage left with work
    (``StageUnfinished``) is its one line and exit code 1; anything else is a failure of flora-ray or of what it runs
    on: its type, the stage it happened in and the way to its traceback (``-v``), exit code 1."""
    try:
        return args.func(args)
    except InputError as exc:
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"flora-ray: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageUnfinished as exc:
        print(f"flora-ray: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("flora-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        where = stage_of(exc) or args.command
        hint = (
            "the traceback is above"
            if args.verbose
            else f"re-run with -v ('flora-ray -v {args.command} ...') for the traceback"
        )
        print(f"flora-ray: error: {type(exc).__name__} in {where}: {first_line(exc)} ({hint})", file=sys.stderr)
        return EXIT_FAILED


def first_line(exc: BaseException, limit: int = 1000) -> str:
    """An exception's message on one line (its first non-empty line, whitespace folded), or its type's name."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines[0].split())[:limit] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
