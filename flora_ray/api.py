"""The Python API: run the pipeline from Python and open any run (local or on object storage) as one object.

``flora_ray.run(config, overrides=..., address=...)`` does what ``flora-ray run`` does (the same checks before any
compute, the same stages, skip and resume) and returns a ``Run``; ``flora_ray.Run.open(path_or_uri)`` reopens a
finished or running run. A ``Run`` gives the configuration, the trials, front and uniform baseline as pandas frames,
the Optuna study, the knee point, the best subnet under a budget, any trial's subnet as a torch module (inherited
weights, no evaluation) and its export.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora_ray.config import Config, apply_override, build_dataclass, config_to_dict, load_config
from flora_ray.errors import InputError, MissingInput
from flora_ray.storage.run_store import ARTEFACTS, RunStore

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from torch import nn

    from flora_ray.backends.base import Backend
    from flora_ray.core.supernet import Supernet
    from flora_ray.records import FinetuneReport, RefineSummary, SearchSummary, StageMarker

BACKENDS = ("ray", "local")
# The one default of every entry point (``flora-ray`` commands, ``run``, ``Run.export``, ``Run.finetune``): Ray, so
# that work goes where the CLI sends it (a local Ray on 127.0.0.1, or the cluster of ``address``), never silently
# into the calling process; ``backend="local"`` asks for this process.
DEFAULT_BACKEND = "ray"


def resolve_config(
    config: Config | Mapping[str, Any] | str | os.PathLike, overrides: Sequence[str] = (), output: str | None = None
) -> Config:
    """A ``Config`` from a config object, a mapping of sections or a YAML file, with ``section.key=value``
    overrides (and ``output``: the parent directory of the run, ``run.output_dir``) applied."""
    overrides = [*overrides, *([f"run.output_dir={output}"] if output is not None else [])]
    if isinstance(config, str | os.PathLike):
        return load_config(config, overrides)
    if isinstance(config, Config):
        config = config_to_dict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a Config, a mapping of sections or a YAML path, not {type(config).__name__}")
    data = json.loads(json.dumps(config))  # a deep, plain copy: the caller's mapping is not changed
    for item in overrides:
        apply_override(data, item)
    return build_dataclass(Config, data, "")


def prepare_run(
    cfg: Config, stages: Sequence[str], address: str | None, backend: str, storage_checked: bool = False
) -> RunStore:
    """What every command checks before any backend starts: the run storage (unless ``storage_checked``), a run
    made with another configuration, the inputs of the first unfinished stage; then the configuration is recorded."""
    from flora_ray.records import StageMarker
    from flora_ray.stages import STAGES
    from flora_ray.stages.inputs import claim_run
    from flora_ray.stages.parent import TAKEN_OVER, adopt_parent, check_parent
    from flora_ray.stages.preflight import check_devices, check_run_storage, preflight
    from flora_ray.tracking import ensure_experiment

    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if not storage_checked:
        check_run_storage(cfg, cluster=address is not None, local_backend=backend == "local")
    store = claim_run(cfg, record=False)
    parent = check_parent(cfg)  # a child run: its parent's supernet and configuration, before anything is written
    if not every_stage_done(store):  # a finished run re-run needs no device
        check_devices(cfg, on_this_machine=address is None)
    checked = [s for s in stages if STAGES[s].preflight and not (parent and s in TAKEN_OVER)]
    unfinished = [s for s in checked if StageMarker.read(store, stage=s) is None]
    if checked:  # a child's first own stage reads what it takes over: checked on the parent's copy
        adopted = parent is None or store.is_file(ARTEFACTS.supernet)
        preflight(cfg, (unfinished or checked)[0], store if adopted else parent)
    ensure_experiment(cfg)  # tracking: the MLflow experiment exists before any worker logs to it
    store = claim_run(cfg)
    adopt_parent(cfg, store, parent)
    return store


@contextlib.contextmanager
def writing_run(cfg: Config, stages: Sequence[str], address: str | None, backend: str) -> Iterator[RunStore]:
    """``prepare_run`` with the run's lease held until the block ends (``flora_ray.storage.lease``): a second job
    on the same run is refused in one line naming the holder, before it checks or records anything else."""
    from flora_ray.stages.preflight import check_run_storage
    from flora_ray.storage.lease import hold_lease, holds_lease

    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    check_run_storage(cfg, cluster=address is not None, local_backend=backend == "local")
    if address is not None and backend != "local":  # nothing recorded for a cluster nobody can reach
        from flora_ray.backends.ray import check_reachable

        check_reachable(address)
    run_store = RunStore.for_config(cfg)
    nested = holds_lease(run_store)
    with hold_lease(run_store) as lease:
        try:
            store = prepare_run(cfg, stages, address, backend, storage_checked=True)
        except BaseException:
            lease.record = nested  # refused before any work: the run's job record stays as it was
            raise
        yield store


def every_stage_done(store: RunStore) -> bool:
    """Whether every stage of the run has finished: a re-run then skips them all, and needs no backend (no Ray to
    start or join only to find nothing left to run)."""
    from flora_ray.records import StageMarker
    from flora_ray.stages import STAGES

    return all(StageMarker.read(store, stage=stage) is not None for stage in STAGES)


@contextlib.contextmanager
def open_backend(backend: str = DEFAULT_BACKEND, address: str | None = None) -> Iterator[Backend]:
    """The backend to run on: Ray (local on 127.0.0.1 unless ``address`` names a cluster; a Ray that this
    function starts is shut down at the end, one already running is left alone) or ``local`` (this process)."""
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "local":
        if address:
            raise InputError("an address (--address) joins a Ray cluster; it cannot be combined with the local backend")
        from flora_ray.backends.local import LocalBackend

        yield LocalBackend()
        return
    import ray

    from flora_ray.backends.ray import RayBackend, init_ray

    started_here = not ray.is_initialized() and address is None
    init_ray(address)
    try:
        yield RayBackend()
    finally:
        if started_here:
            ray.shutdown()


def run(
    config: Config | Mapping[str, Any] | str | os.PathLike,
    overrides: Sequence[str] = (),
    address: str | None = None,
    backend: str = DEFAULT_BACKEND,
    output: str | os.PathLike | None = None,
) -> Run:
    """Run every unfinished stage of an experiment (as ``flora-ray run``) and return the run.

    ``config``: a ``Config``, a mapping of sections or a YAML file; ``overrides``: ``section.key=value`` strings;
    ``address``: a Ray cluster to join (default: local Ray on 127.0.0.1); ``backend``: ``ray`` or ``local`` (this
    process, no Ray); ``output``: the parent directory of the run (``run.output_dir``). Bad input raises
    ``ValueError`` / ``FileNotFoundError`` before any compute starts.
    """
    from flora_ray.pipeline import run_pipeline
    from flora_ray.stages import STAGES

    if not os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local Ray binds to 127.0.0.1 only
    cfg = resolve_config(config, overrides, None if output is None else os.fspath(output))
    with writing_run(cfg, list(STAGES), address, backend) as store:
        if every_stage_done(store):
            backend, address = "local", None  # every stage is skipped: nothing would run on Ray
        with open_backend(backend, address) as chosen:
            run_pipeline(cfg, chosen)
    return Run(store)


class Run:
    """One run's results, read from its directory or storage URI (``Run.open``); frames are read on each access,
    so a running search shows its newest trials."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    @classmethod
    def open(cls, location: str | os.PathLike | RunStore) -> Run:
        """The run at ``location``: a run directory (``runs/quickstart``) or a storage URI (``s3://bucket/p/name``)."""
        store = location if isinstance(location, RunStore) else RunStore(location)
        if not store.is_file(ARTEFACTS.run_config):
            raise MissingInput(
                f"{store.location(ARTEFACTS.run_config)!r} does not exist: {store.root!r} is not a flora-ray run"
            )
        return cls(store)

    def __repr__(self) -> str:
        return f"Run({self.store.uri!r})"

    @property
    def location(self) -> str:
        """The run's directory or storage URI."""
        return self.store.uri

    @cached_property
    def config(self) -> Config:
        """The configuration the run was made with."""
        from flora_ray.stages.runs import load_run_config

        return load_run_config(self.store)

    @property
    def trials(self) -> pd.DataFrame:
        """Every trial (``trials.parquet``): trial, state, accuracy, macs, params, latency_ms, ranks, ..."""
        from flora_ray.results import load_trials

        return load_trials(self.store)

    @property
    def front(self) -> pd.DataFrame:
        """The Pareto front of cost against accuracy (``pareto.parquet``)."""
        from flora_ray.results import load_front

        return load_front(self.store)

    @property
    def uniform(self) -> pd.DataFrame:
        """The uniform-rank baseline (``uniform.parquet``)."""
        from flora_ray.results import load_uniform

        return load_uniform(self.store)

    @property
    def cost_axis(self) -> str:
        """The cost the search minimised: ``macs``, ``params`` or ``latency_ms``."""
        from flora_ray.results import cost_axis

        return cost_axis(self.front)

    @property
    def search_summary(self) -> SearchSummary:
        """The finished search's figures (``search_summary.json``): trials, front size, hypervolume, the dense
        model's accuracy and costs."""
        from flora_ray.records import SearchSummary

        return SearchSummary.read(self.store)

    @property
    def stages(self) -> dict[str, StageMarker]:
        """The finished stages' completion records (``stages/<stage>.json``: wall time, summary), in the order
        they finished."""
        from flora_ray.records import StageMarker

        return StageMarker.read_all(self.store)

    @property
    def finetunes(self) -> list[FinetuneReport]:
        """Every fine-tuned subnet's figures (``Run.finetune``, ``flora-ray finetune`` or the pipeline's stage), by
        trial."""
        from flora_ray.records import FinetuneReport

        return FinetuneReport.read_all(self.store)

    @property
    def report(self) -> str:
        """The run's report (``report.md``)."""
        return self.store.read_text(ARTEFACTS.report, "report")

    def latency_table(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The latency table and the device it was measured on (``flora_ray.results.load_latency_table``)."""
        from flora_ray.results import load_latency_table

        return load_latency_table(self.store)

    @property
    def study(self) -> optuna.Study:
        """The search's Optuna study, read from a copy of its journal (changes to it do not reach the run)."""
        import optuna

        from flora_ray.stages.inputs import study_name

        if not self.store.is_file(ARTEFACTS.journal):
            raise MissingInput(f"{self.store.location(ARTEFACTS.journal)!r} does not exist: run the search first")
        folder = tempfile.mkdtemp(prefix="flora-study-")
        weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        copy = Path(folder) / ARTEFACTS.journal
        copy.write_bytes(self.store.read_bytes(ARTEFACTS.journal))
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(copy)))
        return optuna.load_study(study_name=study_name(self.config), storage=storage)

    def knee(self, cost: str | None = None) -> pd.Series:
        """The front's knee point (``flora_ray.results.knee_point``) on ``cost`` (default: the searched axis)."""
        from flora_ray.stages.runs import select_trial

        return select_trial(self.store, knee=True, cost=cost)

    def best_under(
        self, max_macs: float | None = None, *, max_params: float | None = None, max_latency_ms: float | None = None
    ) -> pd.Series | None:
        """The most accurate front point within one budget (MACs per image, parameters or predicted latency in
        ms); ``None`` when no front point is within it."""
        from flora_ray.stages.runs import NothingWithin, budget_of, select_trial

        budget = budget_of(max_macs=max_macs, max_latency_ms=max_latency_ms, max_params=max_params)
        if budget is None:
            raise InputError("give a budget: max_macs, max_params or max_latency_ms")
        try:
            return select_trial(self.store, budget=budget)
        except NothingWithin:
            return None

    @cached_property
    def supernet(self) -> Supernet:
        """The trained supernet (read once per ``Run``)."""
        from flora_ray.stages.runs import run_supernet

        return run_supernet(self.store)

    def ranks(self, trial: int | pd.Series | Mapping[str, Any]) -> dict[str, int]:
        """The per-layer ranks of a completed trial (its number, or a row of ``trials``/``front``)."""
        from flora_ray.stages.runs import select_trial

        return json.loads(select_trial(self.store, trial=_trial_number(trial))["ranks"])

    def subnet(self, trial: int | pd.Series | Mapping[str, Any]) -> nn.Module:
        """A completed trial's subnet as a standalone timm model with the supernet's weights, in eval mode on
        CPU; nothing is evaluated. Its BatchNorm statistics, if it has any, are recalibrated as the search and
        the export do (``search.bn_recalibration_images``); the supernet's own are left as they were."""
        return self.subnet_at(self.ranks(trial))

    def subnet_at(self, ranks: Mapping[str, int]) -> nn.Module:
        """The subnet of any per-layer ``ranks`` of the supernet's layers (a configuration no trial evaluated, a
        uniform one the filter dropped), built as ``subnet`` builds a trial's."""
        from flora_ray.core.batchnorm import batchnorm_state, load_batchnorm_state
        from flora_ray.core.subnet import extract_subnet
        from flora_ray.stages.runs import calibrate_subnet

        supernet, ranks = self.supernet, dict(ranks)
        shared = batchnorm_state(supernet.model)
        try:
            calibrate_subnet(supernet, ranks, self.config)
            return extract_subnet(supernet, ranks, within_candidates=False).eval()
        finally:
            load_batchnorm_state(supernet.model, shared)

    def export(
        self,
        trial: int | pd.Series | Mapping[str, Any] | None = None,
        *,
        max_macs: float | None = None,
        max_latency_ms: float | None = None,
        knee: bool = False,
        output: str | os.PathLike | None = None,
        formats: Sequence[str] = ("safetensors",),
        evaluate: bool = True,
        threads: int = 1,
        backend: str = DEFAULT_BACKEND,
        address: str | None = None,
    ) -> dict[str, Any]:
        """Export a trial (or the best front point within ``max_macs`` / ``max_latency_ms``, or the ``knee``) as ``flora-ray
        export`` does, in ``formats`` (``safetensors``, ``pt2``, ``onnx``, ``int8``); ``evaluate=False`` skips the
        accuracy and latency passes. Returns the figures written to ``export.json`` (``directory``: where the files are)."""
        from flora_ray.stages.export import check_export, export_from_run

        number = None if trial is None else _trial_number(trial)
        choice = {"trial": number, "max_macs": max_macs, "max_latency_ms": max_latency_ms, "knee": knee,
                  "formats": tuple(formats)}  # fmt: skip
        check_export(self.store, **choice)
        with open_backend(backend, address) as chosen:
            return export_from_run(self.store, **choice, output=output, threads=threads, backend=chosen,
                                   evaluate=evaluate)  # fmt: skip

    def finetune(
        self,
        trial: int | pd.Series | Mapping[str, Any] | None = None,
        *,
        max_macs: float | None = None,
        knee: bool = False,
        overrides: Sequence[str] = (),
        output: str | os.PathLike | None = None,
        backend: str = DEFAULT_BACKEND,
        address: str | None = None,
    ) -> dict[str, Any]:
        """Fine-tune a trial (or the best front point within ``max_macs``, or the knee point) by distillation from
        the teacher and export it, as ``flora-ray finetune`` does (``overrides``: ``finetune.*`` keys such as
        ``finetune.epochs=3``). Returns the figures written to ``finetune.json`` (``test_accuracy_before``,
        ``test_accuracy``, ``directory``: where ``flora_ray.load_subnet`` finds the model)."""
        from flora_ray.stages.finetune import check_finetune, finetune_from_run

        number = None if trial is None else _trial_number(trial)
        check_finetune(self.store, trial=number, max_macs=max_macs, knee=knee, overrides=overrides)
        with open_backend(backend, address) as chosen:
            return finetune_from_run(self.store, trial=number, max_macs=max_macs, knee=knee, overrides=overrides,
                                     output=output, backend=chosen)  # fmt: skip

    def refine(
        self,
        budgets: Mapping[str, Any] | Sequence[tuple[str, float]],
        *,
        k: int | None = None,
        overrides: Sequence[str] = (),
        backend: str = DEFAULT_BACKEND,
        address: str | None = None,
    ) -> pd.DataFrame:
        """Choose the subnet of each budget after fine-tuning, as ``flora-ray refine`` does: ``budgets`` maps an axis
        (``macs``, ``params``, ``latency_ms``) to a value or a list of values (``{"macs": [2e6, 3e6]}``), or is a
        sequence of ``(axis, value)`` pairs; ``k``: front points fine-tuned per budget (default ``refine.k``);
        ``overrides``: ``refine.*``, ``finetune.*`` or speed-only keys. Returns ``refine.parquet``'s frame: one row
        per budget and candidate, ``winner`` marking each budget's choice; ``refine_summary`` reads the summary."""
        from flora_ray.stages.refine import check_refine, refine_from_run

        check_refine(self.store, budgets=budgets, k=k, overrides=overrides)
        with open_backend(backend, address) as chosen:
            frame, _ = refine_from_run(self.store, budgets=budgets, k=k, overrides=overrides, backend=chosen)
        return frame

    @property
    def refine_summary(self) -> RefineSummary:
        """The latest refine's choice per budget (``refine.json``; ``MissingInput`` when the run was never refined)."""
        from flora_ray.records import RefineSummary

        return RefineSummary.read(self.store)


def _trial_number(trial: int | pd.Series | Mapping[str, Any]) -> int:
    """The trial number of ``trial``: an integer, or a row (Series or mapping) with a ``trial`` entry."""
    if isinstance(trial, bool):
        raise TypeError("trial must be a trial number or a row of trials/front, not a bool")
    if isinstance(trial, numbers.Integral):
        return int(trial)
    try:
        return int(trial["trial"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise TypeError(
            f"trial must be a trial number or a row of trials/front with a 'trial', not {trial!r}"
        ) from None
