"""Small helpers that turn core results into Dagster metadata (the UI's tables and images)."""

from __future__ import annotations

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from wan_assets.pipes_reporter import rounded

_TYPES = {bool: "bool", int: "int", float: "float"}


def table_metadata(rows: list[dict]) -> MetadataValue:
    """A list of flat dicts (same keys) as a UI table; column types from the first row, floats
    rounded to 4 significant digits."""
    if not rows:
        return MetadataValue.table(records=[], schema=TableSchema(columns=[]))
    columns = [TableColumn(name, _TYPES.get(type(value), "string")) for name, value in rows[0].items()]
    records = [
        TableRecord(
            {k: (rounded(v) if isinstance(v, int | float | bool) else str(v)) for k, v in row.items()}
        )
        for row in rows
    ]
    return MetadataValue.table(records=records, schema=TableSchema(columns=columns))
