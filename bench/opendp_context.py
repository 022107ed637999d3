"""Stage-4 peer: OpenDP's Polars `Context` called directly on the already joined data.

Our release path computes exact, person-bounded aggregates in DuckDB and adds OpenDP noise;
this peer asks OpenDP's Polars Context for the same releases, so the comparison includes
everything OpenDP does per release: plan checking, scale calibration (a binary search over
the plan's privacy map), per-person truncation, the aggregation and the noise.

Choices, each to give the peer a fair, best-shot run:

* privacy unit = one person: ``unit_of(contributions=1, identifier=email)``, and every query
  truncates to ``MAX_ROWS_PER_PERSON`` rows per person inside the plan (``truncate_per_group``),
  as our engine bounds after the join; no query falls back to row-level contributions;
* distinct people = ``truncate_per_group(1)`` then ``dp_len()``: one row per person makes the
  row count exactly the number of people, with sensitivity 1 (no approximation);
* public keys are passed with ``with_keys`` (a left join from the public key-set, missing
  cells released as noisy zeros), the 0.16 way to use public keys without declaring the data's
  keys an invariant (``Margin(invariant="keys")``), so every cell is released, like ours;
* float sums, means and quantiles need a public ``max_length`` (a loose bound on the rows);
* one fresh ``Context.compositor`` with a one-query budget per release: building the Context
  hands the data to OpenDP and is part of releasing, and a one-query Context cannot be reused;
  `resolve_once` also reports OpenDP's floor, with each plan's calibration done beforehand;
* the joined data is written to Parquet once and given as ``scan_parquet`` (`main` does so by
  default): building a Context over an in-memory LazyFrame serialises the data, ~6 s at size M
  against 0.05 s for the Parquet scan, which makes releases ~10x faster at M.

    python -m bench.opendp_context --size S [--runs 3] [--input parquet|memory] [--resolve-once]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import opendp.prelude as dp
import pandas as pd
import polars as pl
from opendp.extras.polars import LazyFrameQuery, Margin, OnceFrame, dp_len

from .data import AMOUNT_BOUNDS, CATEGORIES, MAX_ROWS_PER_PERSON, SEGMENTS, SHOPS, generate

dp.enable_features("contrib")

# Same grid as a 257-point quantile search over the public amount bounds.
CANDIDATES = [
    AMOUNT_BOUNDS[0] + i * (AMOUNT_BOUNDS[1] - AMOUNT_BOUNDS[0]) / 256 for i in range(257)
]
# Public upper bound on joined rows (float sums need one); loose, so it only widens the slack.
MAX_LENGTH = 100_000_000
# Key-sets at least this long are given to OpenDP as Parquet when a directory is available.
LARGE_KEY_SET = 1_000

Release = Callable[[], pl.DataFrame]
Plan = Callable[[LazyFrameQuery], LazyFrameQuery]


def _dp(expr: pl.Expr) -> Any:
    """The `.dp` namespace OpenDP registers on Polars expressions (untyped, hence Any)."""
    return expr.dp  # type: ignore[attr-defined]


def _collect(frame: OnceFrame) -> pl.DataFrame:
    """Materialise a release (OpenDP's `OnceFrame.collect` is untyped)."""
    result: pl.DataFrame = frame.collect()  # type: ignore[no-untyped-call]
    return result


def joined_frame(
    bank: pd.DataFrame, panel: pd.DataFrame, parquet_dir: str | Path | None = None
) -> pl.LazyFrame:
    """Consented inner join on email (email, segment, category, shop, amount), done once.

    With `parquet_dir` the join is written there and returned as a `scan_parquet` plan (the
    faster input for the Context); otherwise as an in-memory LazyFrame.
    """
    consented_bank = pl.from_pandas(bank[bank["ok"]][["email", "segment"]])
    consented_panel = pl.from_pandas(panel[panel["ok"]][["email", "category", "shop", "amount"]])
    joined = consented_bank.join(consented_panel, on="email", how="inner")
    if parquet_dir is None:
        return joined.lazy()
    path = Path(parquet_dir) / "joined.parquet"
    joined.write_parquet(path)
    return pl.scan_parquet(path)


def _key_set(column: str, keys: tuple[str, ...], keys_dir: str | Path | None) -> pl.LazyFrame:
    """A public key-set; a large one is read from Parquet when `keys_dir` is given.

    Calibration rebuilds the plan about a thousand times, serialising an in-memory key-set
    each time: for 10,000 shops a Parquet key-set took a release from ~6 s to ~3 s, while for
    20 categories in-memory stayed faster (2.1 s vs 2.9 s), hence the threshold.
    """
    frame = pl.DataFrame({column: list(keys)})
    if keys_dir is None or len(keys) < LARGE_KEY_SET:
        return frame.lazy()
    path = Path(keys_dir) / f"{column}_keys.parquet"
    frame.write_parquet(path)
    return pl.scan_parquet(path)


def _plans(keys_dir: str | Path | None) -> dict[str, Plan]:
    """Each release as a plan over a Context query already truncated per person."""
    amount = pl.col("amount").fill_null(0.0)
    segments = _key_set("segment", SEGMENTS, keys_dir)
    categories = _key_set("category", CATEGORIES, keys_dir)
    shops = _key_set("shop", SHOPS, keys_dir)

    def count_by(keys: pl.LazyFrame) -> Plan:
        by = keys.collect_schema().names()
        return lambda q: q.group_by(by).agg(dp_len(signed=True)).with_keys(keys)

    return {
        # 50 rows per person, then 1: one row per person, so the row count is the people count.
        "people": lambda q: q.truncate_per_group(1).select(dp_len(signed=True).alias("people")),
        "rows": lambda q: q.select(dp_len(signed=True)),
        "sum_amount": lambda q: q.select(_dp(amount).sum(AMOUNT_BOUNDS)),
        "mean_amount": lambda q: q.select(_dp(amount).mean(AMOUNT_BOUNDS)),
        "hist_category": count_by(categories),
        "hist_shop": count_by(shops),
        "sum_by_category": lambda q: (
            q.group_by("category").agg(_dp(amount).sum(AMOUNT_BOUNDS)).with_keys(categories)
        ),
        "median_amount": lambda q: q.select(_dp(amount).quantile(0.5, CANDIDATES)),
        "rows_by_segment": count_by(segments),
        "rows_by_segment_category": count_by(segments.join(categories, how="cross")),
    }


def context_queries(
    joined: pl.LazyFrame,
    epsilon: float = 1.0,
    max_length: int = MAX_LENGTH,
    resolve_once: bool = False,
    keys_dir: str | Path | None = None,
) -> dict[str, Release]:
    """One callable per release, each through a fresh one-query Context.

    By default each release also resolves its plan (OpenDP's scale calibration, a binary
    search that dominates small releases). `resolve_once` resolves every plan once here, so a
    release is only the Context, truncation, aggregation and noise: OpenDP's lower bound.
    With `keys_dir`, large public key-sets (the shops) are written there and scanned.
    """

    def new_context() -> dp.Context:
        return dp.Context.compositor(
            data=joined,
            privacy_unit=dp.unit_of(contributions=1, identifier="email"),
            privacy_loss=dp.loss_of(epsilon=epsilon),
            split_evenly_over=1,
            margins=[Margin(by=[], max_length=max_length)],
        )

    def new_query() -> LazyFrameQuery:
        query = new_context().query()
        assert isinstance(query, LazyFrameQuery)
        return query.truncate_per_group(MAX_ROWS_PER_PERSON)

    def releasing(plan: Plan) -> Release:
        if not resolve_once:
            return lambda: _collect(plan(new_query()).release())
        measurement = plan(new_query()).resolve()
        return lambda: _collect(new_context()(measurement))

    return {name: releasing(plan) for name, plan in _plans(keys_dir).items()}


def main() -> None:
    """Warm-up then timed runs of each release at one size; prints {query: median seconds}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="S", choices=("S", "M", "L"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--input", default="parquet", choices=("parquet", "memory"))
    parser.add_argument("--resolve-once", action="store_true")
    args = parser.parse_args()
    bank, panel = generate(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        joined = joined_frame(bank, panel, tmp if args.input == "parquet" else None)
        del bank, panel
        medians: dict[str, float] = {}
        releases = context_queries(
            joined,
            args.epsilon,
            resolve_once=args.resolve_once,
            keys_dir=tmp if args.input == "parquet" else None,
        )
        for name, release in releases.items():
            release()
            walls = []
            for _ in range(args.runs):
                start = time.perf_counter()
                release()
                walls.append(time.perf_counter() - start)
            medians[name] = round(statistics.median(walls), 4)
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
