"""What a run produces: one Record per (case, level, implementation), one Group per timing group,
the run's Meta. The JSON file is `Result.to_json()`: these dataclasses as dicts (`asdict`), each
case written flat by `Case.to_json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Union

from .cases import Case


@dataclass
class Speedup:
    """selfattn's speedup over another row: the median (min-max) of the per-round ratios."""

    median: float
    min: float
    max: float


@dataclass
class Summary:
    """Milliseconds per call over the rounds."""

    median_ms: float
    min_ms: float
    max_ms: float
    times_ms: List[float]


@dataclass
class Timed(Summary):
    calls_per_sample: int
    flops: float
    flop_rate: float  # FLOP/s at the median time
    pct_gemm: float  # of the GEMM rate timed in the same rounds
    speedup: Optional[Speedup]  # None for selfattn itself
    backend: str = ""  # the SDPA backend it ran, when it says
    status: str = field(default="ok", init=False)


@dataclass
class Measured:
    """A peak memory growth over the baseline of inputs and parameters, next to its estimate."""

    estimate_bytes: float
    peak_bytes: float
    method: str
    status: str = field(default="ok", init=False)


@dataclass
class Failed:
    """A memory measurement that raised, or whose child process died."""

    estimate_bytes: float
    error: str
    status: str = field(default="error", init=False)


@dataclass
class Skipped:
    """Not run: the estimated peak, inputs included, exceeds the memory budget."""

    estimate_bytes: float
    reason: str
    status: str = field(default="skipped", init=False)


@dataclass
class Unavailable:
    """Could not run these inputs (e.g. a forced SDPA backend that refuses them): why."""

    reason: str
    status: str = field(default="unavailable", init=False)


TimingOutcome = Union[Timed, Skipped, Unavailable]
MemoryOutcome = Union[Measured, Failed, Skipped, Unavailable]


def _case_flat(obj) -> dict:
    """asdict, with the case as Case.to_json writes it."""
    return dict(asdict(obj), case=obj.case.to_json())


@dataclass
class Record:
    """One implementation at one (case, level): an outcome per timed mode and per memory mode."""

    case: Case
    level: str
    impl: str
    note: str = ""
    modes: Dict[str, TimingOutcome] = field(default_factory=dict)
    memory: Dict[str, MemoryOutcome] = field(default_factory=dict)

    def to_json(self) -> dict:
        return _case_flat(self)


@dataclass
class Group:
    """The implementations of one (case, level, mode) and the GEMM, timed in the same rounds."""

    case: Case
    level: str
    mode: str
    gemm: str
    gemm_flop_rate: float
    repeats: int
    input_sets: int

    def to_json(self) -> dict:
        return _case_flat(self)


@dataclass
class Meta:
    device: str
    device_type: str
    torch: str
    selfattn_build: str
    python: str
    date: str
    argv: List[str]
    levels: List[str]
    modes: List[str]
    repeats: int
    memory_budget_bytes: float
    flop_unit: str
    flop_scale: float
    memory_method: str
    gemm_note: str
    threads: Optional[int]
    note: str
    wall_s: float


@dataclass
class Result:
    meta: Meta
    records: List[Record]
    groups: List[Group]

    def to_json(self) -> dict:
        return {"meta": asdict(self.meta), "records": [r.to_json() for r in self.records],
                "groups": [g.to_json() for g in self.groups]}
