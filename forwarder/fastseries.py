"""The metric series the connection path updates: plain numbers in cells, with no lock and no label lookup, turned
into Prometheus families only at scrape time.

prometheus_client's Counter.inc and Histogram.observe take a lock and go through several Python calls (and, with
`workers: N`, a struct write into its mmap file): per connection that adds up to a large share of natfwd's own work.
Here a series is a few float cells that its owner adds to. Only the worker's event-loop thread writes them (the
exporter thread only reads, and reading one float is atomic under the GIL), so they need no lock.

With one process the cells are a Python list. With `workers: N` each series of each process is a small file of
doubles in the supervisor's metrics directory, mapped into memory: a worker's update is visible to the supervisor's
exporter at once, a worker that dies leaves its counts behind (counters and histograms sum over every file, as
prometheus_client's own multiprocess mode does), and the gauges of a dead worker are zeroed (`livesum`).
"""

from __future__ import annotations

import json
import mmap
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, Literal, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

Kind = Literal["counter", "gauge", "histogram"]
SUFFIX = ".cells"  # not prometheus_client's *.db, which its MultiProcessCollector reads as its own format
DOUBLE = 8


class Cells(Protocol):
    """Float cells indexed from 0: a list (one process) or a memoryview of doubles over a shared file."""

    def __getitem__(self, index: int, /) -> float: ...

    def __setitem__(self, index: int, value: float, /) -> None: ...

    def __len__(self) -> int: ...


def created_series() -> bool:
    """Whether prometheus_client exports `_created` samples (it reads the same variable when it is imported)."""
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


class CounterSeries:
    """One counter series: `inc` adds to its cell."""

    __slots__ = ("cell", "created")

    def __init__(self, cell: Cells) -> None:
        self.cell = cell
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.cell[0] += amount


class GaugeSeries(CounterSeries):
    """One gauge series: `inc`, `dec` and `set` its cell."""

    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        self.cell[0] -= amount

    def set(self, value: float) -> None:
        self.cell[0] = value


class HistogramSeries:
    """One histogram series: cell 0 holds the sum, then one count per bucket (not cumulative), the last for +Inf."""

    __slots__ = ("cell", "created", "bounds")

    def __init__(self, cell: Cells, bounds: tuple[float, ...]) -> None:
        self.cell = cell
        self.created = time.time()
        self.bounds = bounds

    def observe(self, value: float) -> None:
        cell = self.cell
        cell[0] += value
        # A bucket counts the values at or below its bound (`le`): the first bound >= value.
        cell[1 + bisect_left(self.bounds, value)] += 1.0


S = TypeVar("S", CounterSeries, GaugeSeries, HistogramSeries)


class Family(Generic[S]):
    """A labelled family of series. `labels` finds or makes a series: callers on the connection path bind theirs
    once (per forward), so they never look labels up per connection."""

    kind: Kind

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), directory: str | None = None
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.directory = directory  # with `workers: N`: where each series' cells file goes
        self.series: dict[tuple[str, ...], S] = {}

    @property
    def size(self) -> int:
        return 1

    def labels(self, *values: str) -> S:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {values!r}")
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = self._make(self._cells(values))
        return series

    def _make(self, cell: Cells) -> S:
        raise NotImplementedError

    def rows(self) -> list[tuple[tuple[str, ...], list[float], float | None]]:
        """(label values, cells, created time) of every series, read now."""
        # A copy made in C, with the GIL held: the loop thread may add a series (a new forward) meanwhile.
        series = list(self.series.items())
        return [(values, [s.cell[i] for i in range(self.size)], s.created) for values, s in series]

    def _cells(self, values: tuple[str, ...]) -> Cells:
        if self.directory is None:
            return [0.0] * self.size
        return map_cells(os.path.join(self.directory, file_name(os.getpid(), self.name, values)), self.size)


class CounterFamily(Family[CounterSeries]):
    kind = "counter"

    def _make(self, cell: Cells) -> CounterSeries:
        return CounterSeries(cell)


class GaugeFamily(Family[GaugeSeries]):
    kind = "gauge"

    def _make(self, cell: Cells) -> GaugeSeries:
        return GaugeSeries(cell)


class HistogramFamily(Family[HistogramSeries]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        directory: str | None = None,
        *,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames, directory)
        self.bounds = tuple(float(b) for b in buckets)

    @property
    def size(self) -> int:
        return 2 + len(self.bounds)  # the sum, the buckets, +Inf

    def _make(self, cell: Cells) -> HistogramSeries:
        return HistogramSeries(cell, self.bounds)


AnyFamily = CounterFamily | GaugeFamily | HistogramFamily


def file_name(pid: int, family: str, values: tuple[str, ...]) -> str:
    # Label values may hold any character: hex of their JSON keeps the name a plain file name.
    return f"{family}-{pid}-{json.dumps(list(values)).encode().hex()}{SUFFIX}"


def parse_file_name(name: str) -> tuple[str, int, tuple[str, ...]] | None:
    """(family, pid, label values) of a cells file, or None for any other file."""
    if not name.endswith(SUFFIX):
        return None
    family, _, rest = name[: -len(SUFFIX)].partition("-")
    pid, _, encoded = rest.partition("-")
    try:
        values = json.loads(bytes.fromhex(encoded))
        return family, int(pid), tuple(str(v) for v in values)
    except ValueError:
        return None


def map_cells(path: str, size: int) -> Cells:
    """`size` doubles in the file at `path`, mapped shared; an existing file (a reused pid) keeps its counts."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size * DOUBLE:
            os.ftruncate(fd, size * DOUBLE)  # zero-filled
        mapped = mmap.mmap(fd, size * DOUBLE)
    finally:
        os.close(fd)  # the mapping keeps the file
    return memoryview(mapped).cast("d")


def read_cells(path: str, size: int) -> list[float]:
    """The cells of a file written by `map_cells` (zeros past its end)."""
    with open(path, "rb") as file:
        data = file.read(size * DOUBLE)
    got = list(memoryview(data[: len(data) // DOUBLE * DOUBLE]).cast("d"))
    return got + [0.0] * (size - len(got))


def family_metric(family: AnyFamily, rows: Iterator[tuple[tuple[str, ...], list[float], float | None]]) -> Metric:
    """The Prometheus family for `rows` of (label values, cells, created time or None)."""
    created = created_series()
    if family.kind == "counter":
        counter = CounterMetricFamily(family.name, family.documentation, labels=family.labelnames)
        for values, cells, since in rows:
            counter.add_metric(values, cells[0], created=since if created else None)
        return counter
    if family.kind == "gauge":
        gauge = GaugeMetricFamily(family.name, family.documentation, labels=family.labelnames)
        for values, cells, _ in rows:
            gauge.add_metric(values, cells[0])
        return gauge
    assert isinstance(family, HistogramFamily)
    histogram = HistogramMetricFamily(family.name, family.documentation, labels=family.labelnames)
    bounds = [go_float(b) for b in family.bounds] + ["+Inf"]
    for values, cells, since in rows:
        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(bounds, cells[1:], strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        histogram.add_metric(list(values), buckets, cells[0])
        if created and since is not None:
            labels = dict(zip(family.labelnames, values, strict=True))
            histogram.samples.append(Sample(family.name + "_created", labels, since, None, None))
    return histogram


def go_float(value: float) -> str:
    """A bucket bound as prometheus_client's Histogram writes its `le` label."""
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


class LocalCollector:
    """This process's families, as Prometheus families (one process: the exporter runs in the worker)."""

    def __init__(self, families: Sequence[AnyFamily]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family_metric(family, iter(family.rows()))


class FilesCollector:
    """Every process's cells files in `directory`, summed per series (the supervisor's exporter with `workers: N`).

    Counters and histograms sum over every file, those of workers that died too; a dead worker's gauges were zeroed
    by `zero_gauges`, so gauges sum the live ones.
    """

    def __init__(self, directory: str, families: Sequence[AnyFamily]) -> None:
        self.directory = directory
        self.families = {family.name: family for family in families}

    def collect(self) -> Iterator[Metric]:
        sums: dict[str, dict[tuple[str, ...], list[float]]] = {name: {} for name in self.families}
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            names = []
        for name in names:
            parsed = parse_file_name(name)
            if parsed is None or parsed[0] not in self.families:
                continue
            family = self.families[parsed[0]]
            try:
                cells = read_cells(os.path.join(self.directory, name), family.size)
            except FileNotFoundError:
                continue  # removed since the listing
            into = sums[family.name].setdefault(parsed[2], [0.0] * family.size)
            for i, value in enumerate(cells):
                into[i] += value
        for name, family in self.families.items():
            rows = sums[name]
            if not rows and not family.labelnames:
                rows = {(): [0.0] * family.size}  # an unlabelled family exists from the start
            yield family_metric(family, ((values, cells, None) for values, cells in sorted(rows.items())))


def zero_gauges(directory: str, pid: int, families: Sequence[AnyFamily]) -> None:
    """A worker died: its gauges no longer count (prometheus_client's `livesum`); its counters stay."""
    gauges = {family.name for family in families if family.kind == "gauge"}
    for name in os.listdir(directory):
        parsed = parse_file_name(name)
        if parsed is not None and parsed[0] in gauges and parsed[1] == pid:
            with open(os.path.join(directory, name), "r+b") as file:
                file.write(bytes(DOUBLE))
