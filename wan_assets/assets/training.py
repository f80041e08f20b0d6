"""Training assets (docs/architecture.md §5, §6): the two experts' LoRAs from one run, and their evaluation.

`lora_high_noise` / `lora_low_noise` are one multi-asset: select both for one alternating run, or one
for a run of that expert only. It launches `wan-assets train` through Dagster Pipes; progress and
alpha-phase transitions arrive as asset observations while it runs.
"""

import math
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from resources.launcher import TrainingLauncher
from resources.project import WanProjectResource
from wan_assets.assets.data import latent_cache
from wan_assets.automation import EVALUATE
from wan_assets.core.config import with_experts
from wan_assets.core.experts import EXPERTS
from wan_assets.core.metrics.summary import summarize
from wan_assets.core.train.run_files import RunFiles
from wan_assets.metadata import table_metadata
from wan_assets.pipes_reporter import asset_key, criteria_summary, rounded

LORA_KEYS = {expert: AssetKey(asset_key(expert)) for expert in EXPERTS}


def _observation(message: dict) -> AssetObservation | None:
    """A progress tick or a phase transition of the running trainer, labelled as which it is."""
    kind = message.get("kind")
    expert = message.get("expert")
    if expert not in LORA_KEYS:
        return None
    if kind == "transition":
        description = f"phase transition at step {message['step']}: {describe_transition(message)}"
        metadata = {
            "kind": "transition",
            "event": "alpha phase transition",
            "step": message["step"],
            "expert": expert,
            "phase": f"{message['from_phase']} -> {message['to_phase']}",
            "alpha": f"{message['from_alpha']:g} -> {message['to_alpha']:g}",
            "forced": message["forced"],
            "criteria": criteria_summary(message["criteria"]),
        }
    else:
        description = f"progress: step {message.get('step')}"
        metadata = {"kind": "progress", "event": "progress"}
        metadata |= {
            k: rounded(v) for k, v in message.items() if k not in ("kind", "criteria") and v is not None
        }
    return AssetObservation(asset_key=LORA_KEYS[expert], description=description, metadata=metadata)


def describe_transition(message: dict) -> str:
    forced = ", forced" if message["forced"] else ""
    return (
        f"{message['expert']} {message['from_phase']} -> {message['to_phase']} "
        f"(alpha {message['from_alpha']:g} -> {message['to_alpha']:g}{forced})"
    )


@multi_asset(
    name="lora_training",
    specs=[
        AssetSpec(
            LORA_KEYS[expert],
            deps=[latent_cache],
            group_name="training",
            description=f"The {expert.replace('_', '-')} expert's LoRA ({'transformer/' if expert == 'high_noise' else 'transformer_2/'}), "
            "trained from the latent cache with the alpha schedule; ComfyUI / diffusers keys.",
            skippable=True,
        )
        for expert in EXPERTS
    ],
    check_specs=[
        AssetCheckSpec(
            "training_loss_finite", asset=LORA_KEYS[e], description="Final loss and EMA are finite"
        )
        for e in EXPERTS
    ],
    can_subset=True,
    pool="gpu",
)
def lora_training(context: AssetExecutionContext, project: WanProjectResource, launcher: TrainingLauncher):
    """One training run of the selected experts through `wan-assets train` (Dagster Pipes)."""
    experts = tuple(e for e in EXPERTS if LORA_KEYS[e] in context.selected_asset_keys)
    job = with_experts(project.job(), experts)
    project.root().ensure_model(job.process.model.name_or_path)
    command = launcher.command(project.config_path, str(project.root().root), experts)

    def observe(message: dict) -> None:
        observation = _observation(message)
        if observation is not None:
            context.log_event(observation)

    reported = list(launcher.run(context, command, observe))
    yield from reported
    summary = summarize(RunFiles.of(job), experts, plot=False)
    for expert in experts:
        mine = summary.experts[expert]
        finite = all(v is not None and math.isfinite(v) for v in (mine.final_loss, mine.loss_ema_50))
        yield AssetCheckResult(
            asset_key=LORA_KEYS[expert],
            check_name="training_loss_finite",
            passed=finite,
            severity=AssetCheckSeverity.ERROR,
            metadata={
                "final_loss": rounded(mine.final_loss) if mine.final_loss is not None else float("nan"),
                "skipped": MetadataValue.json(summary.skipped),
            },
        )


@asset(
    deps=[LORA_KEYS["high_noise"], LORA_KEYS["low_noise"]],
    group_name="training",
    pool="gpu",
    automation_condition=EVALUATE,
    check_specs=[
        AssetCheckSpec(
            "beats_base_model",
            asset="evaluated_checkpoints",
            description="The best checkpoint's held-out loss is below the base model's",
        )
    ],
)
def evaluated_checkpoints(context: AssetExecutionContext, project: WanProjectResource):
    """Held-out validation loss per expert at fixed timestep quantiles and noise seeds for the base
    model (step 0) and every kept checkpoint, sample videos from held-out first frames, a contact sheet,
    and the best checkpoint."""
    from wan_assets.core.eval.checkpoints import evaluate_run

    job = project.job()
    project.root().ensure_model(job.process.model.name_or_path)
    report = evaluate_run(job, project.root().cache, device=project.torch_device())
    means = report.mean_by_step()
    best = report.best_step
    metadata: dict[str, Any] = {
        # Validation loss per checkpoint step (0 = the base model), short column names.
        "checkpoints": table_metadata(
            [{k.removesuffix("_val_loss"): v for k, v in row.items()} for row in report.table()]
        ),
        "best_step": best,
        "best_val_loss": rounded(means[best]),
        "base_val_loss": rounded(means[0]),
        "improvement": rounded((means[0] - means[best]) / means[0] if means[0] else 0.0),
        "samples": MetadataValue.json({str(k): [p.name for p in v] for k, v in report.samples.items()}),
    }
    written = [path for paths in report.samples.values() for path in paths]
    if written:
        metadata["samples_dir"] = MetadataValue.path(str(written[0].parent))
    if report.contact_sheet is not None:
        metadata["contact_sheet"] = MetadataValue.path(str(report.contact_sheet))
        metadata["contact_sheet_preview"] = MetadataValue.md(_inline_png(report.contact_sheet))
    context.log.info(f"best checkpoint: step {best} (val loss {means[best]:.5f}, base {means[0]:.5f})")
    yield MaterializeResult(metadata=metadata)
    yield AssetCheckResult(
        check_name="beats_base_model",
        passed=report.beats_base,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "best_step": best,
            "best_val_loss": rounded(means[best]),
            "base_val_loss": rounded(means[0]),
        },
    )


def _inline_png(path) -> str:
    import base64

    return f"![contact sheet](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
