"""What the hub learns from an accepted upload: row and pseudonym counts, duplicate keys.

Computed on the validated table after an upload (and after an erasure), and reported to the
uploading partner: it is their data, and duplicates or shared identifiers usually mean a
problem on their side (a placeholder phone, a join that repeated rows).
"""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow as pa

from entremise.server.domain.models import DatasetSchema, DuplicateReport
from entremise.server.domain.ports import IngestResult
from entremise.server.files.pseudonyms import key_multiplicities, pseudonym_chars


def shared_pseudonyms(table: pa.Table, keys: list[str]) -> dict[str, tuple[int, int]]:
    """Per key column: pseudonyms seen beside several values of another key column, and the most.

    A phone found on the rows of 34 different emails is a shared line or a placeholder: it links
    those 34 records into one person. Reported to the uploading partner (it is their data).
    """
    out = {key: (0, 0) for key in keys}
    if len(keys) < 2:
        return out
    with duckdb.connect(config={"threads": max(1, os.cpu_count() or 1)}) as conn:
        conn.register("upload", table.select(keys))
        for key in keys:
            distinct = ", ".join(f'count(DISTINCT "{other}")' for other in keys if other != key)
            most = f"greatest({distinct})" if len(keys) > 2 else distinct
            row = conn.execute(
                f"SELECT count(*) FILTER (WHERE n > 1), coalesce(max(n), 0) FROM (SELECT "
                f'{most} AS n FROM upload WHERE "{key}" IS NOT NULL GROUP BY "{key}")'
            ).fetchone()
            assert row is not None
            out[key] = (int(row[0]), int(row[1]))
    return out


def upload_stats(table: pa.Table, schema: DatasetSchema, sha256: str, size: int) -> IngestResult:
    """Row and pseudonym counts, and the duplicate-key report of each key column."""
    duplicates: list[DuplicateReport] = []
    shared = shared_pseudonyms(table, schema.key_columns)
    every_key: list[np.ndarray] = []
    distinct_keys = 0
    max_rows = 0
    for key in schema.key_columns:
        chars = [c for _, c in pseudonym_chars(table.column(key)) if len(c)]
        if not chars:
            continue
        every_key.extend(chars)
        counts = key_multiplicities(np.concatenate(chars) if len(chars) > 1 else chars[0])
        repeated = counts[counts > 1]
        duplicates.append(
            DuplicateReport(
                column=key,
                duplicated_pseudonyms=len(repeated),
                rows_involved=int(repeated.sum()),
                max_rows_per_pseudonym=int(counts.max()),
                shared_pseudonyms=shared[key][0],
                max_other_identifiers=shared[key][1],
            )
        )
        max_rows = max(max_rows, int(counts.max()))
        distinct_keys = len(counts)
    if len(schema.keys) > 1 and every_key:
        # The same pseudonym may appear under several identifiers; count it once.
        distinct_keys = len(key_multiplicities(np.concatenate(every_key)))
    return IngestResult(
        row_count=table.num_rows,
        distinct_keys=distinct_keys,
        # With several identifiers per row, a person's rows are only known after linking.
        max_rows_per_key=max_rows if len(schema.keys) == 1 else 0,
        content_sha256=sha256,
        size_bytes=size,
        duplicates=tuple(duplicates),
    )
