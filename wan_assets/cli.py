"""`wan-assets`: the command line (docs/architecture.md §8). Each command is a thin call into `wan_assets.core`."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from wan_assets.core.config import ConfigError, JobConfig, dump_config, load_config, with_experts
from wan_assets.core.errors import DiskFullError, MetricsDbError, TrainingError
from wan_assets.core.experts import EXPERTS
from wan_assets.core.workdir import Workdir

# Errors that are the user's to fix: printed as one line, exit status 1, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DiskFullError,
    FileNotFoundError,
    NotADirectoryError,
    TrainingError,
    MetricsDbError,
)


def cmd_check(args: argparse.Namespace) -> int:
    # The tiny model counts as present: cache and train build it on first use, check changes nothing.
    _workdir, job = _load(args, build_model=False)
    print(dump_config(job), end="")
    print(f"ok: {args.config} is valid and ready on this machine ({', '.join(job.experts)})", file=sys.stderr)
    return 0


def _load(
    args: argparse.Namespace, checks: Callable[..., list[str]] | None = None, *, build_model: bool = True
) -> tuple[Workdir, JobConfig]:
    """The workdir and the job once every check (`preflight` unless told otherwise) has passed."""
    from wan_assets.core.train.preflight import preflight

    workdir = Workdir.open(args.workdir)
    workdir.ensure_default_clips(args.config)
    loaded = load_config(args.config, workdir=workdir.root)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    job = loaded.job
    problems = (checks or preflight)(job, buildable_model=workdir.tiny_model)
    if problems:
        raise ConfigError(problems, source=job.source)
    if build_model:
        workdir.ensure_model(job.process.model.name_or_path)
    return workdir, job


def cmd_cache(args: argparse.Namespace) -> int:
    from wan_assets.core.data.cache import EncoderHandle, cache_dataset
    from wan_assets.core.progress import progress

    workdir, job = _load(args)
    encoder = EncoderHandle.create(job.process.model)
    report = cache_dataset(
        job,
        workdir.cache,
        encoder,
        progress=lambda it: progress(it, desc="caching clips"),
        caption_progress=lambda it: progress(it, desc="captioning (batches)"),
    )
    for row in report.index.table():
        print(
            f"{row['bucket']:>14}  {row['split']:>5}  {row['clips']:>3} clips  {row['samples']:>4} samples  "
            f"{row['bytes'] / 1e6:8.2f} MB"
        )
    num_samples = sum(len(r.samples) for r in report.index.clips.values())
    print(
        f"index: {workdir.cache / 'index' / (job.name + '.json')} ({len(report.index.clips)} clips, "
        f"{num_samples} samples; {report.decode.frames_decoded} frames decoded)"
    )
    for path, warning in report.warnings.items():
        print(f"warning: {path}: {warning}", file=sys.stderr)
    if report.kept:
        print(f"{len(report.kept)} failed clip(s) keep their previous latents in the index", file=sys.stderr)
    if report.failures:
        print(f"{len(report.failures)} clip(s) failed:", file=sys.stderr)
        for reason in report.failures.values():
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from wan_assets.core.data.cache import caption_clips, captioner_for, discover_clips
    from wan_assets.core.metrics.report import format_table
    from wan_assets.core.progress import progress
    from wan_assets.core.train.preflight import caption_preflight

    workdir, job = _load(args, checks=caption_preflight, build_model=False)
    if args.write:
        datasets = [
            d.model_copy(update={"write_auto_captions": d.auto_caption}) for d in job.process.datasets
        ]
        job = job.model_copy(update={"process": job.process.model_copy(update={"datasets": datasets})})
    captioner = captioner_for(job)
    if captioner is None:
        print(
            "no dataset has auto_caption: every caption below comes from its file or default_caption",
            file=sys.stderr,
        )
    results = caption_clips(
        discover_clips(job),
        job,
        workdir.cache,
        captioner,
        progress=lambda it: progress(it, desc="captioning (batches)"),
    )
    rows, failures = [], []
    for key, result in results.items():
        if isinstance(result, Exception):
            failures.append(str(result))
        else:
            new = "yes" if result.generated is not None and result.generated.generated else ""
            rows.append([key, result.origin, new, result.text])
    print(format_table(["clip", "origin", "new", "caption"], rows))
    if captioner is not None:
        generated = sum(row[2] == "yes" for row in rows)
        print(
            f"{generated} caption(s) generated in {captioner.num_generate_calls} batch(es); "
            f"records in {workdir.cache / 'captions'}",
            file=sys.stderr,
        )
    for result in results.values():
        if not isinstance(result, Exception) and result.sidecar:
            print(f"wrote {result.sidecar}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} clip(s) failed:", file=sys.stderr)
        for reason in failures:
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


def _use_workdir_compile_cache(workdir: Workdir) -> None:
    """torch.compile's caches (and the memory plan) in the workdir rather than /tmp: a later run (or
    machine, with the workdir on shared storage) reuses the compiled graphs. Set before anything
    imports torch._dynamo (the training loop's modules do, through diffusers): that import fixes
    the folder, at torch's /tmp default when unset, and writes it into the environment, so a parent
    process that imported it (Dagster's, a script's) hands its children torch's default: that value
    is replaced too. Any other setting is the user's and wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # imports no torch._dynamo

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workdir.compile_cache)


def cmd_train(args: argparse.Namespace) -> int:
    _use_workdir_compile_cache(Workdir.open(args.workdir))
    from wan_assets.core.train.distributed import init_from_env, shutdown
    from wan_assets.core.train.loop import train

    workdir, job = _load(args)
    if args.experts is not None:
        job = with_experts(job, EXPERTS if args.experts == "both" else (args.experts,))
    # Read by the CUDA allocator when it starts (first CUDA use, below): growing segments in place
    # instead of caching fixed ones keeps fragmentation from pushing a near-full card (memory mode on
    # 24 GB) out of memory. A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    dist = init_from_env()  # torchrun: one process per GPU
    options = {"resume_run": args.resume, "restart_on_new_data": args.restart_on_new_data, "dist": dist}
    try:
        if os.environ.get("DAGSTER_PIPES_CONTEXT") and dist.is_main:  # launched by the training asset
            from wan_assets.pipes_reporter import pipes_reporter

            with pipes_reporter(job) as reporter:
                train(job, workdir.cache, reporter=reporter, **options)
            return 0
        result = train(job, workdir.cache, **options)
    finally:
        shutdown(dist)
    if dist.is_main:
        from wan_assets.core.metrics.database import load_run

        # The run goes into the metrics database as the training_metrics asset loads it, so SQL
        # works right after a CLI-only training.
        stats = load_run(workdir.database, result.files.root)
        print(f"metrics: {stats.num_metrics} steps of run {stats.run_id} loaded into {workdir.database}")
        print(
            f"run {result.run_id}: {result.steps} steps in {result.seconds:.1f}s, files in {result.files.root}"
        )
        for t in result.transitions:
            print(f"  {t.expert}: {t.from_phase} -> {t.to_phase} at step {t.step}")
        if job.process.train.compile:
            from wan_assets.core.speed.memory_plan import plan_summary
            from wan_assets.core.speed.options import compile_summary

            print(compile_summary() or "compile: no graph compiled")
            if (plan := plan_summary()) is not None:
                print(plan)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from wan_assets.core.metrics.report import format_table, query

    columns, rows = query(Workdir.open(args.workdir).database, args.query)
    print(format_table(columns, rows))
    print(f"({len(rows)} rows)", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from wan_assets.core.eval.checkpoints import evaluate_run
    from wan_assets.core.train.preflight import model_problems

    workdir, job = _load(args, checks=model_problems)  # scores cached clips, trains nothing
    report = evaluate_run(job, workdir.cache)
    for row in report.table():
        cells = "  ".join(
            f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items()
            if k != "checkpoint"
        )
        print(cells)
    print(
        f"best checkpoint: step {report.best_step}{'' if report.beats_base else ' (does not beat the base model)'}"
    )
    if report.contact_sheet is not None:
        print(f"contact sheet: {report.contact_sheet}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from wan_assets.ui import serve  # lazy: keeps the other commands from importing dagster

    if args.config is not None:  # a bad job file is one line here, not a broken code location
        load_config(args.config, workdir=Workdir.open(args.workdir).root)
    serve(args.workdir, host=args.host, port=args.port, config=args.config)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from wan_assets.core.model.tiny import build_tiny_model

    out = build_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny Wan 2.2 I2V model written to {out}")
    return 0


def cmd_tiny_captioner(args: argparse.Namespace) -> int:
    from wan_assets.core.model.tiny_captioner import build_tiny_captioner

    out = build_tiny_captioner(Path(args.dir), seed=args.seed)
    print(f"tiny Qwen2.5-VL captioner (random weights) written to {out}")
    return 0


def cmd_sample_videos(args: argparse.Namespace) -> int:
    from wan_assets.core.data.synthetic import write_sample_videos

    clips = write_sample_videos(Path(args.dir), seed=args.seed)
    print(f"{len(clips)} synthetic clips with captions written to {args.dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # Model saving and loading bars (here and in the trainer it starts) say nothing about the demo;
    # read when huggingface_hub is first imported, so set before the demo imports anything.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from wan_assets.demo import print_demo, run_demo

    return print_demo(run_demo(Path(args.workdir) if args.workdir else None))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wan-assets", description="Wan 2.2 I2V LoRA training as a Dagster asset graph."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--workdir", default=None, help="work folder (default: $WAN_ASSETS_HOME, else ./.wan_assets)"
        )
        p.set_defaults(func=func)
        return p

    add("demo", cmd_demo, "build the tiny model and clips if absent and run the pipeline on them")
    p = add("check", cmd_check, "validate a config: print it resolved, with warnings; exit 1 on error")
    p.add_argument("config")
    p = add("cache", cmd_cache, "build the latent cache without Dagster; list failed clips, exit 1 if any")
    p.add_argument("config")
    p = add(
        "caption", cmd_caption, "caption clips without a caption file with the local captioner; print them"
    )
    p.add_argument("config")
    p.add_argument(
        "--write",
        action="store_true",
        help="also write each generated caption next to its clip (never over an existing file)",
    )
    p = add("train", cmd_train, "train the LoRA(s) from the latent cache, no Dagster needed")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--restart-on-new-data",
        action="store_true",
        help="with --resume: if the latent cache changed, keep the old run aside and start afresh",
    )
    p.add_argument(
        "--experts",
        choices=["high_noise", "low_noise", "both"],
        default=None,
        help="train only this expert (overrides model.model_kwargs)",
    )
    p = add("eval", cmd_eval, "score the base model and every kept checkpoint on held-out clips")
    p.add_argument("config")
    p = add("sql", cmd_sql, "read-only SQL over the metrics database, printed as a table")
    p.add_argument("query")
    p = add("ui", cmd_ui, "Dagster UI + daemon; every request needs $WAN_ASSETS_AUTH when it is set")
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="the job file (default: $WAN_ASSETS_CONFIG, else the tiny demo)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=3000)
    p = add("tiny-model", cmd_tiny_model, "write the embedded tiny Wan 2.2 I2V model to DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p = add("tiny-captioner", cmd_tiny_captioner, "write the embedded tiny Qwen2.5-VL captioner to DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p = add("sample-videos", cmd_sample_videos, "write the synthetic clips with captions to DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`wan-assets sql ... | head`): stop quietly, as `cat` does. Python
        # flushes stdout again at exit, so point it at devnull first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file is written to a temporary name and renamed, so nothing finished is damaged.
        print(
            f"error: disk full while writing {exc.filename or 'a file'}; free some space and run the "
            "command again (`train --resume` continues from the last checkpoint)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
