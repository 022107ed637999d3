"""Prepare a large file in chunks of rows, on every local core, spooled to a temporary file.

Reading a whole file into pandas and encoding it in memory took more than 5 GB at 10M rows.
Here memory is bounded by a few chunks: the file is read `chunk_rows` at a time, each chunk is
prepared exactly as `prepare_table` prepares a whole file (every row is decided on its own), and
the prepared chunks are appended, in file order, to an Arrow IPC stream on the partner's own
disk while its SHA-256 is computed (the hub's upload header carries it before the first chunk).
The spooled file holds pseudonyms only, never a raw identifier.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import multiprocessing
import os
import re
import resource
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq

from entremise.partners.prepare import (
    CHUNK_BYTES,
    PlaceholderReport,
    PrepareError,
    Progress,
    check_columns,
    identified_rows,
    prepare_rows,
    summarise,
)
from entremise.partners.schema import UploadSchema

#: Rows prepared at a time: large enough to amortise a chunk's fixed costs, small enough that a
#: few chunks in flight (one being read, one per worker) stay well under a gigabyte.
DEFAULT_CHUNK_ROWS = 250_000
#: Record batches of the spooled stream, as `prepare.encode` writes them.
BATCH_ROWS = 256_000
#: CSV read 1 MB at a time, on this thread: with 4 MB blocks, or Arrow's reader threads, peak
#: memory grew with the file (by ~60% of a 460 MB file), allocators keeping the freed blocks.
_CSV_BLOCK_BYTES = 1024 * 1024
_CSV_SUFFIXES = (".csv", ".txt")
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class SpooledUpload:
    """An encoded upload in a temporary file: `EncodedUpload`'s interface, read from disk.

    The file is removed by `discard`, or when this object is garbage-collected (or at exit),
    so an upload that is never sent leaves nothing behind; it stays while the object lives, so
    an interrupted send can be retried with the same request id.
    """

    path: Path
    sha256: str
    rows: int
    size: int
    _finalizer: weakref.finalize[[str], None] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        finalizer = weakref.finalize(self, _unlink, str(self.path))
        object.__setattr__(self, "_finalizer", finalizer)

    @property
    def payload(self) -> bytes:
        """The whole stream in memory: for small uploads and tests only (chunks() streams)."""
        return self.path.read_bytes()

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The stream in fixed-size chunks, read from disk one at a time."""
        with self.path.open("rb") as stream:
            while chunk := stream.read(size):
                yield chunk

    def discard(self) -> None:
        """Remove the spooled file now (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class StreamedPrepared:
    """A file prepared chunk by chunk: its spooled upload and the whole file's reports."""

    encoded: SpooledUpload
    placeholders: tuple[PlaceholderReport, ...]
    rows_dropped: int
    columns: tuple[str, ...]  # the file's own columns, in order
    # What the workers cost (0: prepared in this process): the largest one's peak RSS, and
    # their CPU seconds (they are the fork server's children: getrusage here cannot see them).
    workers_peak_rss_kib: int = 0
    workers_cpu_s: float = 0.0


def check_source(path: Path) -> None:
    """Refuse a missing file or an unsupported type before any key is fetched."""
    if path.suffix.lower() not in _CSV_SUFFIXES + _PARQUET_SUFFIXES:
        raise PrepareError(
            f"{path}: unsupported file type {path.suffix.lower()!r} (use .csv or .parquet)"
        )
    if not path.is_file():
        raise PrepareError(f"{path}: no such file")


def prepare_file(
    path: Path,
    schema: UploadSchema,
    key: bytes,
    *,
    default_region: str = "FR",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    workers: int | None = None,
    spool_dir: Path | None = None,
    on_progress: Progress | None = None,
) -> StreamedPrepared:
    """Prepare a CSV or Parquet file as `prepare_table(read_table(path))` would, in chunks.

    `workers` processes (default: every core) prepare chunks while this one reads the next;
    with 1, or for a file of one chunk, all happens here (workers take ~0.3 s to start).
    The result is the same bytes for any number of workers. `on_progress` hears
    ("reading NAME", bytes of the file prepared, file size) and, per key column,
    ("pseudonymising COLUMN", rows done, rows estimated) as each chunk is written.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    check_source(path)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    size = path.stat().st_size
    step = f"reading {path.name}"
    source = _Source(path, size)
    columns = source.columns()
    check_columns(list(columns), schema)
    if on_progress is not None:
        on_progress(step, 0, size)
    handle, name = tempfile.mkstemp(prefix="entremise-upload-", suffix=".arrows", dir=spool_dir)
    spooled = Path(name)
    try:
        with os.fdopen(handle, "wb") as raw:
            sink = _HashingFile(raw)
            out = _Writer(
                sink,
                _reporter(on_progress, step, size, tuple(schema.keys)),
            )
            rows = _spool(
                source.chunks(schema.sent_columns, chunk_rows),
                _ChunkPreparer(schema, key, default_region),
                out,
                workers,
            )
        if rows == 0:
            raise PrepareError("the file has no data rows")
        placeholders, dropped = summarise(out.reports, out.dropped, rows)
    except BaseException:
        _unlink(name)
        raise
    if on_progress is not None:
        on_progress(step, size, size)
        for column in schema.keys:
            on_progress(f"pseudonymising {column}", rows, rows)
    encoded = SpooledUpload(spooled, sink.sha256.hexdigest(), rows - dropped, sink.size)
    return StreamedPrepared(
        encoded, placeholders, dropped, columns, out.workers_peak_rss_kib, out.workers_cpu_s
    )


def _reporter(
    on_progress: Progress | None, step: str, size: int, keys: tuple[str, ...]
) -> Callable[[int, int], None]:
    """After each chunk: bytes of the file prepared, and rows pseudonymised per key column.

    The rows' total is only known at the end of the file: until then it is estimated from the
    bytes read. (The per-column steps are the ones a DataFrame's preparation reports.)
    """

    def report(read: int, rows: int) -> None:
        if on_progress is None:
            return
        on_progress(step, min(read, size), size)
        estimate = max(rows, rows * size // max(read, 1))
        for column in keys:
            on_progress(f"pseudonymising {column}", rows, estimate)

    return report


class _HashingFile:
    """A file written once, front to back, hashed and counted as it goes."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        self._raw.write(data)


class _Source:
    """A CSV or Parquet file read as record batches of its declared columns, all as sent."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.csv = path.suffix.lower() in _CSV_SUFFIXES
        self.read = 0  # bytes of the file read so far (approximate for Parquet)

    def _failed(self, exc: BaseException) -> PrepareError:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        ragged = _RAGGED.search(first)
        if ragged:  # Arrow's message goes on to quote the line: names, emails...
            expected, fields = ragged.groups()
            where = _ragged_line(self.path, int(expected))
            first = f"{where} has {fields} fields, the header {expected}"
        kind = "csv" if self.csv else "parquet"
        return PrepareError(f"{self.path}: cannot read as {kind} ({first})")

    def columns(self) -> tuple[str, ...]:
        try:
            if self.csv:
                with pv.open_csv(self.path, read_options=_csv_read_options()) as reader:
                    return tuple(reader.schema.names)
            schema = pq.ParquetFile(self.path).schema_arrow
            # A DataFrame's index saved as a column is its index again for read_parquet.
            index = (schema.pandas_metadata or {}).get("index_columns", [])
            return tuple(n for n in schema.names if n not in index)
        except (ValueError, OSError, pa.ArrowException) as exc:
            raise self._failed(exc) from None

    def chunks(self, wanted: Iterable[str], chunk_rows: int) -> Iterator[tuple[pa.Table, int]]:
        """`chunk_rows` rows at a time (the last chunk fewer), with the bytes read by then."""
        names = list(dict.fromkeys(wanted))
        try:
            for table in _rebatch(self._batches(names, chunk_rows), chunk_rows):
                yield table, self.read
        except (ValueError, OSError, pa.ArrowException) as exc:
            raise self._failed(exc) from None

    def _batches(self, names: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
        if self.csv:
            # Every column as text, empty cells missing: read_csv(dtype=str,
            # keep_default_na=False, na_values=[""]) as the in-memory path reads it.
            convert = pv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
                include_columns=names,
            )
            with (
                self.path.open("rb") as raw,
                pv.open_csv(
                    _Counted(raw, self),
                    read_options=_csv_read_options(),
                    convert_options=convert,
                ) as reader,
            ):
                yield from reader
            return
        parquet = pq.ParquetFile(self.path)
        total = max(1, parquet.metadata.num_rows)
        seen = 0
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=names):
            seen += batch.num_rows
            self.read = self.size * seen // total
            yield batch


_RAGGED = re.compile(r"Expected (\d+) columns, got (\d+)")


def _ragged_line(path: Path, expected: int) -> str:
    """'line N': the first line whose field count is not the header's (only when one failed)."""
    with path.open(newline="", errors="replace") as text:
        reader = csv.reader(text)
        for row in reader:
            if row and len(row) != expected:
                return f"line {reader.line_num}"
    return "a line"


def _csv_read_options() -> pv.ReadOptions:
    return pv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=False)


class _Counted(io.RawIOBase):
    """The CSV file as Arrow reads it, counting the bytes it has read."""

    def __init__(self, raw: io.BufferedReader, source: _Source) -> None:
        super().__init__()
        self._raw, self._source = raw, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        self._source.read += n or 0
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._source.read += len(data)
        return data


def _rebatch(batches: Iterable[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    """Regroup record batches of any sizes into tables of exactly `chunk_rows` rows."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        while count >= chunk_rows:
            table = pa.Table.from_batches(held)
            yield table.slice(0, chunk_rows)
            rest = table.slice(chunk_rows)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held)


class _ChunkPreparer:
    """One chunk of a file prepared as `prepare_table` would, without the whole-file checks."""

    def __init__(self, schema: UploadSchema, key: bytes, default_region: str) -> None:
        self.schema, self.key, self.default_region = schema, key, default_region

    def __call__(
        self, chunk: pa.Table, first_row: int
    ) -> tuple[pa.Table, list[PlaceholderReport], int]:
        frame = chunk.to_pandas()  # the dtypes read_table gives (str for text, NaN for empty)
        try:
            table, reports = prepare_rows(
                frame,
                self.schema,
                self.key,
                default_region=self.default_region,
                first_row=first_row,
            )
        except PrepareError as exc:
            last = first_row + chunk.num_rows
            raise PrepareError(f"{exc} (counted in data rows {first_row + 1}-{last})") from None
        identified, dropped = identified_rows(table, self.schema)
        if dropped:
            table = table.filter(pa.array(identified))
        return table, reports, dropped


#: A prepared chunk as Arrow IPC messages: its schema, then its record batches. Concatenated
#: after one schema message and closed by END_OF_STREAM, they are one IPC stream, so the main
#: process only hashes and writes bytes (parsing and re-encoding cost it as much as reading).
Encoded = tuple[bytes, list[bytes]]
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _encode(table: pa.Table) -> Encoded:
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    return table.schema.serialize().to_pybytes(), [b.serialize().to_pybytes() for b in batches]


class _Done(NamedTuple):
    """A prepared chunk, what it reports, and what it cost a worker (peak RSS in KiB, CPU s)."""

    encoded: Encoded
    reports: list[PlaceholderReport]
    dropped: int
    peak_rss_kib: int = 0
    cpu_s: float = 0.0


def _prepared(prepare: _ChunkPreparer, chunk: pa.Table, first_row: int) -> _Done:
    table, reports, dropped = prepare(chunk, first_row)
    return _Done(_encode(table), reports, dropped)


_WORKER: _ChunkPreparer | None = None


def _context() -> multiprocessing.context.BaseContext:
    """Workers forked from a server process that imported this module once, else spawned.

    Never forked from this process: it may run gRPC's threads, which a fork would copy
    mid-lock. The fork server is started once and kept, so later uploads start at once.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # not __main__: a script would run again
        return context
    return multiprocessing.get_context("spawn")


def _start_worker(schema: UploadSchema, key: bytes, default_region: str) -> None:
    """Receive the key over the pool's pipe (never through a file) and keep it for each chunk."""
    global _WORKER  # one preparer per worker process
    _WORKER = _ChunkPreparer(schema, key, default_region)


def _in_worker(chunk: bytes, first_row: int) -> _Done:
    """A chunk prepared in a worker; tables cross the pipe as Arrow IPC, never as objects."""
    assert _WORKER is not None
    start = time.process_time()
    done = _prepared(_WORKER, pa.ipc.open_stream(chunk).read_all(), first_row)
    return done._replace(
        peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        cpu_s=time.process_time() - start,
    )


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def _spool(
    chunks: Iterator[tuple[pa.Table, int]],
    prepare: _ChunkPreparer,
    out: _Writer,
    workers: int,
) -> int:
    """Prepare every chunk and append it to `sink` in file order; the rows read.

    At most `workers` + 1 chunks are in flight, so memory does not grow with the file.
    """
    rows = 0
    head = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(head, chunks)
    if workers == 1 or len(head) < 2:  # a file of one chunk: starting workers costs more
        for chunk, read in chunks:
            rows += chunk.num_rows
            out.write(_prepared(prepare, chunk, rows - chunk.num_rows), read, rows)
        out.close()
        return rows
    with ProcessPoolExecutor(
        workers,
        mp_context=_context(),
        initializer=_start_worker,
        initargs=(prepare.schema, prepare.key, prepare.default_region),
    ) as pool:
        pending: deque[tuple[Future[_Done], int, int]] = deque()
        try:
            for chunk, read in chunks:
                pending.append(
                    (pool.submit(_in_worker, _to_ipc(chunk), rows), read, rows + len(chunk))
                )
                rows += chunk.num_rows
                while len(pending) > workers:
                    future, done, through = pending.popleft()
                    out.write(future.result(), done, through)
            while pending:
                future, done, through = pending.popleft()
                out.write(future.result(), done, through)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    out.close()
    return rows


class _Writer:
    """Prepared chunks appended to one Arrow IPC stream, with the reports they bring."""

    def __init__(self, sink: _HashingFile, progress: Callable[[int, int], None]) -> None:
        self._sink, self._progress = sink, progress
        self._schema: bytes | None = None
        self.reports: list[PlaceholderReport] = []
        self.dropped = self.workers_peak_rss_kib = 0
        self.workers_cpu_s = 0.0

    def write(self, done: _Done, read: int, rows: int) -> None:
        """Append a prepared chunk; `read`: bytes of the file read, `rows`: rows through it."""
        schema, batches = done.encoded
        if self._schema is None:
            self._schema = schema
            self._sink.write(schema)
        elif schema != self._schema:  # not seen: every chunk's columns have the schema's types
            batches = _recast(schema, batches, self._schema)
        for batch in batches:
            self._sink.write(batch)
        self.reports += done.reports
        self.dropped += done.dropped
        self.workers_peak_rss_kib = max(self.workers_peak_rss_kib, done.peak_rss_kib)
        self.workers_cpu_s += done.cpu_s
        self._progress(read, rows)

    def close(self) -> None:
        if self._schema is not None:
            self._sink.write(END_OF_STREAM)


def _recast(schema: bytes, batches: list[bytes], target: bytes) -> list[bytes]:
    """Batches encoded under `schema` re-encoded under `target` (cast column by column)."""
    source, wanted = (pa.ipc.read_schema(pa.py_buffer(s)) for s in (schema, target))
    table = pa.Table.from_batches(
        [pa.ipc.read_record_batch(pa.py_buffer(b), source) for b in batches], source
    )
    return _encode(table.cast(wanted))[1]
