"""training_metrics (docs/architecture.md §7): every JSONL field, transition, checkpoint and evaluation in DuckDB."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from resources.project import WanProjectResource
from wan_assets.assets.training import LORA_KEYS, evaluated_checkpoints
from wan_assets.automation import EVALUATE
from wan_assets.core.metrics.database import load_run
from wan_assets.core.metrics.report import query, summary
from wan_assets.core.train.run_files import RunFiles
from wan_assets.metadata import table_metadata


@asset(
    deps=[LORA_KEYS["high_noise"], LORA_KEYS["low_noise"], evaluated_checkpoints],
    group_name="training",
    pool="duckdb_writer",
    automation_condition=EVALUATE,
)
def training_metrics(context: AssetExecutionContext, project: WanProjectResource) -> MaterializeResult:
    """The run's metrics JSONL, phase transitions, checkpoints and evaluation scores loaded into the
    workdir's DuckDB file (tables runs, metrics, phase_transitions, checkpoints, evaluations and
    views). Re-materializing replaces the run's rows: no duplicates. Open readers never block it (it
    writes a copy and swaps it in). Query with `wan-assets sql`."""
    files = RunFiles.of(project.job())
    database = project.root().database
    stats = load_run(database, files.root)  # the same call `wan-assets train` makes when it ends
    columns, rows = query(database, "SELECT * FROM run_summary WHERE run_id = ?", [stats.run_id])
    context.log.info(summary(database))
    return MaterializeResult(
        metadata={
            "database": MetadataValue.path(str(database)),
            "run_id": stats.run_id,
            "metrics_rows": stats.num_metrics,
            "phase_transitions": stats.num_transitions,
            "checkpoints": stats.num_checkpoints,
            "evaluation_rows": stats.num_evaluations,
            "run_summary": table_metadata([dict(zip(columns, row, strict=True)) for row in rows]),
        }
    )
