"""A translation bound to an agreement and a budget, and the hub's release post-processed.

FROM names datasets; the hub asks for an agreement id. `choose_agreement` finds the caller's one
active agreement joining exactly those datasets, `bind` adds the budget (and any accuracy
targets) to make the message sent, and `processed_result` applies HAVING, ORDER BY and LIMIT
to the release that comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from entremise.sdk.results import Agreement, AgreementStatus, QueryResult
from entremise.sdk.sql.model import SqlQuery, post_process
from entremise.sdk.sql.refusal import SqlRefusal
from entremise.v1 import query_service_pb2


def dataset_names(agreement: Agreement) -> tuple[str, ...]:
    """The agreement's dataset (slot) names, as FROM names them."""
    return tuple(slot.name for slot in agreement.datasets)


def _described(agreement: Agreement) -> str:
    return f"{agreement.agreement_id} ({', '.join(dataset_names(agreement))})"


def check_agreement(sql: SqlQuery, agreement: Agreement) -> None:
    """FROM names exactly the agreement's datasets (the hub always joins them all)."""
    names = dataset_names(agreement)
    unknown = [d for d in sql.datasets if d not in names]
    if unknown:
        raise SqlRefusal(
            f"FROM {', '.join(unknown)}: not a dataset of agreement {agreement.agreement_id}, "
            f"which joins {', '.join(names)}"
        )
    missing = [d for d in names if d not in sql.datasets]
    if missing:
        raise SqlRefusal(
            f"FROM must name every dataset of agreement {agreement.agreement_id}: missing "
            f"{', '.join(missing)} (the hub always joins them all)"
        )


def choose_agreement(sql: SqlQuery, agreements: Sequence[Agreement]) -> Agreement:
    """The caller's one active agreement whose datasets are exactly those named in FROM.

    Dataset names are the agreement's slot names (`DatasetSlot.name`), as partners upload
    into them; `SqlRefusal` lists the candidates when there is none or more than one.
    """
    active = [a for a in agreements if a.status is AgreementStatus.ACTIVE]
    wanted = set(sql.datasets)
    matches = [a for a in active if set(dataset_names(a)) == wanted]
    if len(matches) == 1:
        return matches[0]
    tables = ", ".join(sql.datasets)
    if matches:
        raise SqlRefusal(
            f"FROM {tables}: several active agreements join these datasets: "
            f"{'; '.join(_described(a) for a in matches)}; give one (--agreement)"
        )
    yours = "; ".join(_described(a) for a in active) or "none"
    raise SqlRefusal(
        f"FROM {tables}: none of your active agreements joins exactly these datasets "
        f"(yours: {yours})"
    )


def with_accuracy(sql: SqlQuery, accuracy: Mapping[str, float]) -> SqlQuery:
    """The translation with a 95% half-width target for the aggregates named in `accuracy`."""
    if not accuracy:
        return sql
    names = {o.name: o.aggregate for o in sql.outputs if o.aggregate is not None}
    query = query_service_pb2.Query()
    query.CopyFrom(sql.query)
    for name, target in accuracy.items():
        if name not in names:
            known = ", ".join(names) or "none"
            raise SqlRefusal(f"accuracy {name}: no aggregate of that name (aggregates: {known})")
        index = names[name]
        assert index is not None
        agg = query.aggregates[index]
        if agg.kind == query_service_pb2.AGGREGATE_KIND_QUANTILE:
            raise SqlRefusal(
                f"accuracy {name}: an accuracy target applies to counts, sums, means, variances"
            )
        agg.epsilon = ""
        agg.target_ci95 = float(target)
    return replace(sql, query=query)


def post_process_response(
    sql: SqlQuery, response: query_service_pb2.RunQueryResponse
) -> query_service_pb2.RunQueryResponse:
    """A copy of the hub's answer whose results hold the post-processed cells only."""
    out = query_service_pb2.RunQueryResponse()
    out.CopyFrom(response)
    del out.release.results[:]
    out.release.results.extend(post_process(sql, response.release.results))
    return out


def processed_result(sql: SqlQuery, result: QueryResult) -> QueryResult:
    """`result` with post-processed cells; its `raw` (and its release's) keep the full release."""
    processed = QueryResult.from_proto(post_process_response(sql, result.raw))
    return replace(
        processed, release=replace(processed.release, raw=result.release.raw), raw=result.raw
    )


@dataclass(frozen=True)
class SqlRequest:
    """A translated SELECT bound to its agreement and budget: the message the hub is sent."""

    sql: SqlQuery
    agreement: Agreement
    message: query_service_pb2.Query


def _budget_text(value: str | float | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else repr(float(value))


def bind(
    sql: SqlQuery,
    agreements: Sequence[Agreement],
    *,
    agreement: Agreement | None = None,
    epsilon: str | float | None = None,
    rho: str | float | None = None,
    delta: str | float | None = None,
    accuracy: Mapping[str, float] | None = None,
) -> SqlRequest:
    """Bind a translation to `agreement` (else the one `choose_agreement` finds) and a budget."""
    if epsilon is None and rho is None:
        raise SqlRefusal("no budget: give epsilon (or rho on a zCDP agreement)")
    chosen = agreement if agreement is not None else choose_agreement(sql, agreements)
    check_agreement(sql, chosen)
    sql = with_accuracy(sql, accuracy or {})
    message = sql.message(
        chosen.agreement_id,
        epsilon=_budget_text(epsilon),
        rho=_budget_text(rho),
        delta=_budget_text(delta),
    )
    return SqlRequest(sql, chosen, message)
