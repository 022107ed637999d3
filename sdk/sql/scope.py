"""The datasets a SELECT names in FROM, and its columns read against them.

The hub joins an agreement's datasets on the person, always as an inner join; FROM and JOIN
only name those datasets (with aliases), and every other clause reads its columns through
`Scope.column`, which knows the names and refuses the person as a value.
"""

from __future__ import annotations

from sqlglot import exp

from entremise.sdk.sql.refusal import refuse

#: The pseudo-column naming the person (the join key): only in COUNT(DISTINCT person) and ON.
PERSON = "person"


class Scope:
    """The datasets named in FROM (in order) and the aliases that name them."""

    def __init__(self, select: exp.Select) -> None:
        self.tables: dict[str, str] = {}  # alias or name -> dataset name
        self.datasets: list[str] = []
        from_ = select.args.get("from_") or select.args.get("from")
        if from_ is None:
            raise refuse("SELECT without FROM", "name the agreement's datasets in FROM")
        self._table(from_.this)
        for join in select.args.get("joins") or []:
            self._join(join)

    def _table(self, node: exp.Expression) -> str:
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            if isinstance(node, exp.Subquery):
                raise refuse(node, "subqueries are not supported: the hub answers one SELECT")
            raise refuse(node, "FROM takes dataset names")
        if node.args.get("db") or node.args.get("catalog"):
            raise refuse(node, "FROM takes dataset names, without a schema")
        name = node.name.lower()
        if name in self.datasets:
            raise refuse(node, "a dataset is named twice: the hub joins each dataset once")
        self.datasets.append(name)
        self.tables[name] = name
        alias = node.alias
        if alias:
            self.tables[alias.lower()] = name
        return name

    def _join(self, join: exp.Join) -> None:
        side, kind = join.args.get("side"), join.args.get("kind")
        word = " ".join(str(w) for w in (side, kind) if w) or "comma"
        if side or (kind and str(kind).upper() not in ("INNER",)):
            raise refuse(f"{word.upper()} JOIN", "the hub joins on the person only: inner join")
        if join.args.get("method"):
            raise refuse(join, "the hub joins on the person only: inner join")
        name = self._table(join.this)
        using = join.args.get("using")
        on = join.args.get("on")
        if using:
            names = [u.name.lower() for u in using]
            if names != [PERSON]:
                raise refuse(join, f"the hub joins on the person only: USING ({PERSON})")
        elif on is not None:
            if not (
                isinstance(on, exp.EQ)
                and isinstance(on.this, exp.Column)
                and isinstance(on.expression, exp.Column)
                and on.this.name.lower() == PERSON
                and on.expression.name.lower() == PERSON
            ):
                raise refuse(on, f"the hub joins on the person only: ON a.{PERSON} = b.{PERSON}")
            for col in (on.this, on.expression):
                self.dataset_of(col)
        elif "pivots" not in join.args:  # sqlglot's mark of a comma, not a JOIN
            raise refuse(
                f"FROM ..., {name}", f"write JOIN {name}: the hub joins on the person only"
            )

    def dataset_of(self, column: exp.Column) -> str:
        """The dataset a column's qualifier names ("" when unqualified)."""
        table = column.table
        if not table:
            return ""
        if table.lower() not in self.tables:
            raise refuse(column, f"no dataset {table} in FROM")
        return self.tables[table.lower()]

    def column(self, node: exp.Expression, where: str) -> str:
        """The hub's name of a column ("dataset.column", or "column" unqualified)."""
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            if isinstance(node, exp.Column | exp.Star):
                raise refuse(node, f"{where} takes a column")
            raise refuse(node, f"{where} takes a column, not an expression")
        if node.args.get("db") or node.args.get("catalog"):
            raise refuse(node, "columns are DATASET.COLUMN")
        name = node.name.lower()
        if name == PERSON:
            raise refuse(
                node,
                f"the {PERSON} is the join key: it is only counted, COUNT(DISTINCT {PERSON})",
            )
        dataset = self.dataset_of(node)
        return f"{dataset}.{name}" if dataset else name
