"""DP SQL: one PostgreSQL SELECT translated into the hub's query, plus post-processing.

::

    sql = translate(
        "SELECT bank.segment, COUNT(DISTINCT person) AS people, AVG(panel.amount) AS spend "
        "FROM bank JOIN panel GROUP BY bank.segment HAVING COUNT(DISTINCT person) > 100 "
        "ORDER BY spend DESC LIMIT 2"
    )
    sql.query          # the query_service_pb2.Query (no agreement id, no budget yet)
    sql.datasets       # ("bank", "panel"): the datasets named in FROM
    sql.columns        # ("segment", "people", "spend"): the output columns, in SELECT order
    sql.post           # HAVING, ORDER BY, LIMIT/OFFSET, applied to the released (noisy) cells

The hub releases every cell of the grouping's public domain, with noise; HAVING, ORDER BY and
LIMIT then act on those noisy values on the analyst's side (`PostProcessing.select`,
`post_process`), which is post-processing and costs nothing. Anything outside the supported
subset raises `SqlRefusal`, a `QueryError`, with one line naming the construct and why.

The modules, in the order a SELECT goes through them:

- `select`: `translate`; the statement's checks, GROUP BY, the select list, HAVING, ORDER BY
  and LIMIT, reading FROM and columns through `scope`, literals through `literals`, WHERE
  through `where`, groupings through `grouping` and aggregates through `aggregates`;
- `model`: what a translation holds, and its post-processing of released rows;
- `binding`: the agreement chosen, the budget set, the release post-processed;
- `words`: a translation in words; `refusal`: `SqlRefusal`, raised by them all.

Every public name is re-exported here: import from `entremise.sdk.sql`.
"""

from __future__ import annotations

from entremise.sdk.sql.binding import (
    SqlRequest,
    bind,
    check_agreement,
    choose_agreement,
    post_process_response,
    processed_result,
    with_accuracy,
)
from entremise.sdk.sql.model import (
    AllOf,
    AnyOf,
    Compare,
    Negate,
    Op,
    OrderKey,
    OutputColumn,
    PostProcessing,
    Predicate,
    SqlQuery,
    Value,
    post_process,
)
from entremise.sdk.sql.refusal import SqlRefusal
from entremise.sdk.sql.scope import PERSON
from entremise.sdk.sql.select import translate
from entremise.sdk.sql.words import (
    aggregate_words,
    describe,
    filter_words,
    grouping_words,
    share_words,
)

__all__ = [
    "PERSON",
    "AllOf",
    "AnyOf",
    "Compare",
    "Negate",
    "Op",
    "OrderKey",
    "OutputColumn",
    "PostProcessing",
    "Predicate",
    "SqlQuery",
    "SqlRefusal",
    "SqlRequest",
    "Value",
    "aggregate_words",
    "bind",
    "check_agreement",
    "choose_agreement",
    "describe",
    "filter_words",
    "grouping_words",
    "post_process",
    "post_process_response",
    "processed_result",
    "share_words",
    "translate",
    "with_accuracy",
]
