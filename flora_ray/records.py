"""Typed records of the JSON files the stages write and read back: the search summary (``search_summary.json``), the
export report (``export/trial_N/export.json``), the fine-tune report (``finetune/trial_N/finetune.json`` and
``finetune/trial_N.json``) and a stage's completion marker (``stages/<stage>.json``).

Each record is a frozen dataclass with one ``to_dict`` (the JSON object as written: the keys, and their order, that
the files have always had) and one ``from_dict``. ``from_dict`` reads files of earlier versions: a key an earlier
version did not write gets its field's default; a key the record does not know (written by a later version, or
added by hand) is kept, in ``extra``, and written back after the known keys, so a read and rewrite loses nothing.
A missing key that every version wrote is a ``ValueError`` naming the key and the file. Writers, the report, the
command line, the API, the registry and notifications all go through these records; the JSON stays plain (no type
tags). Torch-free, and outside ``flora_ray.stages``: what only reads runs (``notify``, which the stages' preflight
imports, ``registry``, ``api``) imports it without an import loop between packages.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from flora_ray.storage.run_store import ARTEFACTS

if TYPE_CHECKING:
    from flora_ray.storage.run_store import RunStore

R = TypeVar("R", bound="Record")


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data: records as their ``to_dict``, containers walked."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """A JSON object with known keys (the fields) and the unknown ones it was read with (``extra``).

    Class attributes a record sets: ``NESTED`` (key -> record type of a nested object), ``NESTED_BY_KEY`` (key ->
    record type of each value of a nested mapping), ``NESTED_LIST`` (key -> record type of each item of a nested
    list), ``OMIT_NONE`` (keys not written while their value is ``None``).
    """

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    NESTED: ClassVar[dict[str, type[Record]]] = {}
    NESTED_BY_KEY: ClassVar[dict[str, type[Record]]] = {}
    NESTED_LIST: ClassVar[dict[str, type[Record]]] = {}
    OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def required_keys(cls) -> list[str]:
        """The keys every version wrote: ``from_dict`` refuses a file without one."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra" and _no_default(f)]

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any], *, source: str | None = None) -> R:
        """The record of ``data`` (a file's JSON object); ``source`` names the file in errors."""
        where = source or f"a {cls.__name__}"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in cls.required_keys() if k not in data]
        if missing:
            raise ValueError(f"{where} has no {missing[0]!r} (a {cls.__name__} needs {', '.join(cls.required_keys())})")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: cls._read(k, v, where) for k, v in data.items() if k in known}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def _read(cls, key: str, value: Any, where: str) -> Any:
        if value is None:
            return None
        if key in cls.NESTED:
            return cls.NESTED[key].from_dict(value, source=f"{where}, {key!r}")
        if key in cls.NESTED_BY_KEY:
            kind = cls.NESTED_BY_KEY[key]
            return {k: kind.from_dict(v, source=f"{where}, {key!r}[{k!r}]") for k, v in value.items()}
        if key in cls.NESTED_LIST:
            kind = cls.NESTED_LIST[key]
            return [kind.from_dict(v, source=f"{where}, {key!r}[{i}]") for i, v in enumerate(value)]
        return value

    def omitted(self) -> set[str]:
        """The keys ``to_dict`` leaves out: by default those of ``OMIT_NONE`` that are ``None``."""
        return {k for k in self.OMIT_NONE if getattr(self, k) is None}

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as the files hold it: known keys in field order, then the unknown ones read."""
        skip = self.omitted() | {"extra"}
        known = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip}
        return {**known, **self.extra}


def _no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunFile(Record):
    """A record that is one JSON file of a run: ``FILE`` (its ``ARTEFACTS`` name) and ``WHAT`` (how errors name it)."""

    FILE: ClassVar[str]
    WHAT: ClassVar[str]

    @classmethod
    def read(cls: type[R], store: RunStore) -> R:
        """The run's ``FILE`` (``MissingInput`` when it does not exist)."""
        data = store.read_json(cls.FILE, cls.WHAT)
        return cls.from_dict(data, source=store.location(cls.FILE))

    def write(self, store: RunStore) -> None:
        """Write ``FILE`` into the run (atomically, as every run file)."""
        store.write_json(self.FILE, self.to_dict())


# -- the search ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSummary(RunFile):
    """``search_summary.json`` (and, without ``dense_correct``, the search stage's summary).

    Defaults are what a summary of an earlier version means: ``finished`` (2026-12-07) falls back to complete +
    failed trials, ``distinct_configurations`` to ``complete``, ``budget`` to ``search.trials``, ``cost_axis`` to
    ``macs``; costs of the dense model it did not record are ``None`` (``dense`` gives NaN).
    """

    trials: int
    complete: int
    failed: int
    front_size: int | None = None
    hypervolume: float | None = None
    hypervolume_share: float = 0.0
    trials_per_second: float = 0.0
    distinct_configurations: int | None = None
    repeats_answered: int = 0
    finished: int | None = None
    dense_macs: float
    dense_params: float | None = None
    dense_latency_ms: float | None = None
    cost_axis: str = "macs"
    latency_batch: int | None = None
    dense_accuracy: float
    dense_accuracy_se: float | None = None
    eval_images: int | None = None
    seconds: float | None = None
    evaluator_builds: dict[str, int] = dataclasses.field(default_factory=dict)
    budget: int | None = None
    guided_anchors: int = 0  # sensitivity-guided allocations evaluated first (earlier versions: none)
    dense_correct: Any = None  # the dense model's per-image correctness: in the file, not in the stage's summary

    OMIT_NONE: ClassVar[tuple[str, ...]] = ("dense_correct",)

    FILE: ClassVar[str] = ARTEFACTS.search_summary  # MissingInput from read() until the search has finished
    WHAT: ClassVar[str] = "search summary"

    def stage_summary(self) -> dict[str, Any]:
        """The search stage's summary (its marker, what ``search_stage`` returns): all but ``dense_correct``."""
        return dataclasses.replace(self, dense_correct=None).to_dict()

    @property
    def spent(self) -> int:
        """The trials spent from the budget (``finished``; complete + failed in summaries before it)."""
        return self.finished if self.finished is not None else self.complete + self.failed

    @property
    def distinct(self) -> int:
        """Distinct configurations evaluated (``complete`` in summaries before they were counted)."""
        return self.distinct_configurations if self.distinct_configurations is not None else self.complete

    def dense(self, axis: str) -> float:
        """The dense model's cost on ``axis`` (``macs``, ``params``, ``latency_ms``); NaN where not recorded."""
        value = {"macs": self.dense_macs, "params": self.dense_params, "latency_ms": self.dense_latency_ms}[axis]
        return math.nan if value is None else float(value)

    def describe(self) -> str:
        """What ``flora-ray search`` prints when it finishes."""
        seconds = f"{self.seconds:.0f} s" if self.seconds is not None else "? s"
        return (
            f"search: {self.complete}/{self.trials} trials complete ({self.failed} failed) in {seconds} "
            f"({self.trials_per_second:.2f} trials/s); front of {self.front_size}, hypervolume "
            f"{self.hypervolume_share:.4f} (share of the box)"
        )


def describe_search(summary: Mapping[str, Any], *, seconds: float) -> str:
    """``Stage.describe`` of the search: its ``SearchSummary``'s line."""
    return SearchSummary.from_dict(summary, source="the search stage's summary").describe()


# -- the export ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CpuLatency(Record):
    """The export's CPU latency of the subnet and the dense model (median ms) at batch 1 and 32."""

    subnet_batch1_ms: float
    dense_batch1_ms: float
    subnet_batch32_ms: float
    dense_batch32_ms: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Latency(Record):
    """CPU latency (ms) of the int8 and the fp32 subnet at batch 1 and 32."""

    int8_batch1_ms: float
    fp32_batch1_ms: float
    int8_batch32_ms: float
    fp32_batch32_ms: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Figures(Record):
    """The int8 subnet (``--format int8``) against the fp32 one."""

    scheme: str
    test_accuracy: float
    fp32_test_accuracy: float
    accuracy_drop: float
    latency: Int8Latency
    speedup_batch1: float
    speedup_batch32: float
    threads: int

    NESTED: ClassVar[dict[str, type[Record]]] = {"latency": Int8Latency}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchLatency(Record):
    """Measured against predicted latency (ms) of the export and the dense model at one batch size."""

    measured_ms: float
    dense_measured_ms: float
    predicted_ms: float
    dense_predicted_ms: float
    error_pct: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetLatency(Record):
    """The export timed on a node of the target kind (``device``), per profiled batch size (``"1"``, ...)."""

    device: dict[str, Any]
    batches: dict[str, BatchLatency]
    table_device: dict[str, Any] | None = None

    NESTED_BY_KEY: ClassVar[dict[str, type[Record]]] = {"batches": BatchLatency}


# Written only when the export was evaluated (``--no-eval`` leaves them out).
EVALUATION_KEYS = ("test_accuracy", "dense_test_accuracy", "latency", "threads", "device", "int8", "target_latency")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportReport(Record):
    """``export.json`` (and the export stage's summary). Exports before ``--no-eval`` were all evaluated."""

    trial: int
    macs: float
    dense_macs: float
    params: float
    search_accuracy: float
    bn_recalibration_images: int = 0
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    formats: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    evaluated: bool = True
    test_accuracy: float | None = None
    dense_test_accuracy: float | None = None
    latency: CpuLatency | None = None
    threads: int | None = None
    device: str | None = None
    int8: Int8Figures | None = None
    target_latency: TargetLatency | None = None
    directory: str

    NESTED: ClassVar[dict[str, type[Record]]] = {
        "latency": CpuLatency,
        "int8": Int8Figures,
        "target_latency": TargetLatency,
    }
    OMIT_NONE: ClassVar[tuple[str, ...]] = ("int8",)

    def omitted(self) -> set[str]:
        return super().omitted() | (set() if self.evaluated else set(EVALUATION_KEYS))

    @property
    def macs_share(self) -> float:
        """MACs as a share of the dense model's."""
        return self.macs / self.dense_macs


# -- the fine-tune -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneReport(Record):
    """``finetune.json`` / ``finetune/trial_N.json`` (and, without ``history``, the fine-tune stage's summary)."""

    trial: int
    ranks: dict[str, int]
    macs: float
    dense_macs: float
    params: float
    search_accuracy: float
    test_accuracy_before: float
    test_accuracy: float
    device: str | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    epochs: int
    seconds: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] | None = None
    directory: str

    OMIT_NONE: ClassVar[tuple[str, ...]] = ("history",)

    @classmethod
    def read_all(cls, store: RunStore) -> list[FinetuneReport]:
        """Every fine-tuned subnet of the run (``finetune/trial_N.json``), by trial."""
        found = [
            cls.from_dict(store.read_json(n), source=store.location(n))
            for n in store.list(ARTEFACTS.finetunes, ".json")
        ]
        return sorted(found, key=lambda r: r.trial)

    def write(self, store: RunStore) -> None:
        """The run's copy of the figures (``finetune/trial_N.json``), which the report reads."""
        store.write_json(ARTEFACTS.finetune_result(self.trial), self.to_dict())

    def stage_summary(self) -> dict[str, Any]:
        """The fine-tune stage's summary: all but ``history``."""
        return dataclasses.replace(self, history=None).to_dict()

    @property
    def change(self) -> float:
        """Test accuracy gained by fine-tuning (points)."""
        return self.test_accuracy - self.test_accuracy_before


# -- refine: the choice per budget after fine-tuning ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefineCandidate(Record):
    """One fine-tuned candidate of a budget: a front point (``trial``) or a uniform configuration (``ratio``)."""

    kind: str
    trial: int | None = None
    ratio: float | None = None
    macs: float
    params: float
    latency_ms: float | None = None
    inherited_accuracy: float
    test_accuracy: float

    def describe(self) -> str:
        """``trial 7`` or ``uniform 0.25``."""
        return f"trial {self.trial}" if self.kind == "front" else f"uniform {self.ratio:g}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefineBudget(Record):
    """One budget's choice: the candidate most accurate after fine-tuning (``winner``), the best uniform
    configuration within the budget (``uniform``), the winner's paired accuracy difference to it on the test images
    (``difference`` and its standard error ``se``, points) and the ``verdict``: ``uniform`` (the uniform
    configuration won), ``close call`` (``|difference| < se``, or no difference), ``gain`` (a front point won by at
    least one paired standard error) or ``no uniform`` (no uniform configuration is within the budget)."""

    axis: str
    value: float
    candidates: int
    winner: RefineCandidate
    uniform: RefineCandidate | None = None
    difference: float | None = None
    se: float | None = None
    verdict: str

    NESTED: ClassVar[dict[str, type[Record]]] = {"winner": RefineCandidate, "uniform": RefineCandidate}

    def describe(self) -> str:
        """What ``flora-ray refine`` prints for the budget."""
        from flora_ray.results import format_cost

        w = self.winner
        line = (
            f"{self.axis} <= {format_cost(self.axis, self.value)}: {w.describe()} ({format_cost(self.axis, getattr(w, self.axis))}) "
            f"{w.test_accuracy:.2f}% after fine-tuning (inherited {w.inherited_accuracy:.2f}%), best of {self.candidates}"
        )
        if self.uniform is None:
            return line + "; no uniform configuration is within the budget"
        if self.verdict == "uniform":
            return line + "; the best uniform configuration wins"
        u = self.uniform
        return line + (
            f"; best uniform ({u.describe()}) {u.test_accuracy:.2f}%: {self.difference:+.2f} ± {self.se:.2f} pt "
            f"(paired), {self.verdict}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefineSummary(RunFile):
    """``refine.json``: per budget the choice after fine-tuning (``budgets``), with what made it: ``k`` front points
    per budget, the schedule (``settings``: the ``finetune`` recipe, ``epochs``, ``train_images``), the distinct
    candidates fine-tuned (``fine_tunes``: one fine-tune per configuration, however many budgets share it), the test
    images every candidate was scored on, the seed, device, package versions and wall time."""

    budgets: list[RefineBudget]
    k: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    fine_tunes: int
    test_images: int
    seed: int
    device: str | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float

    NESTED_LIST: ClassVar[dict[str, type[Record]]] = {"budgets": RefineBudget}

    FILE: ClassVar[str] = ARTEFACTS.refine_summary  # MissingInput from read() until the run is refined
    WHAT: ClassVar[str] = "refine summary"

    def describe(self) -> str:
        """What ``flora-ray refine`` prints: one line per budget, then what was fine-tuned."""
        lines = [b.describe() for b in self.budgets]
        epochs = self.settings.get("epochs")
        return "\n".join([*lines, f"  {self.fine_tunes} fine-tune(s) of {epochs} epoch(s), scored on the same "
                           f"{self.test_images} test images, in {self.seconds:.0f} s"])  # fmt: skip


# -- a stage's completion ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageMarker(Record):
    """``stages/<stage>.json``: the stage finished, in ``seconds`` of wall time, at ``finished_at`` (ISO 8601, UTC, to the
    microsecond; markers written before 2026-12-07 have whole seconds).
        ``summary`` is what the stage returned, as it returned it: its shape is the stage's (``SearchSummary``,
        ``ExportReport``, ``FinetuneReport`` for those stages, ``{"skipped": why}`` for a stage that had nothing to do)."""

    stage: str
    seconds: float
    finished_at: str
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, store: RunStore, *, stage: str) -> StageMarker | None:
        """The marker of ``stage``, or ``None`` while the stage has not finished."""
        name = ARTEFACTS.stage_marker(stage)
        if not store.is_file(name):
            return None
        return cls.from_dict(store.read_json(name, "stage marker"), source=store.location(name))

    @classmethod
    def read_all(cls, store: RunStore) -> dict[str, StageMarker]:
        """The markers of the run's finished stages, in the order they finished."""
        markers = [cls.from_dict(store.read_json(n, "stage marker"), source=store.location(n))
                   for n in store.list(ARTEFACTS.stages, ".json")]  # fmt: skip
        return {m.stage: m for m in sorted(markers, key=lambda m: m.finished_at)}

    def write(self, store: RunStore) -> None:
        store.write_json(ARTEFACTS.stage_marker(self.stage), self.to_dict())

    @property
    def skipped(self) -> str | None:
        """Why the stage had nothing to do, when it had nothing to do."""
        return self.summary.get("skipped")


__all__ = [
    "BatchLatency",
    "CpuLatency",
    "ExportReport",
    "FinetuneReport",
    "Int8Figures",
    "Int8Latency",
    "Record",
    "RefineBudget",
    "RefineCandidate",
    "RefineSummary",
    "SearchSummary",
    "StageMarker",
    "TargetLatency",
    "describe_search",
]
