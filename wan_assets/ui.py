"""`wan-assets ui` (docs/architecture.md §8, §11): the Dagster UI and daemon over one workdir, behind WAN_ASSETS_AUTH.

The webserver runs in this process so that `TokenAuth` wraps Dagster's own ASGI app; the daemon
(sensors, automation, run monitoring) runs as a child in its own process group, so that stopping it
also stops the code servers it started, and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
from dagster import DagsterInstance
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster_webserver.app import create_app_from_workspace_process_context
from dagster_webserver.cli import (
    DEFAULT_DB_STATEMENT_TIMEOUT,
    DEFAULT_POOL_MAX_OVERFLOW,
    DEFAULT_POOL_RECYCLE,
)
from dagster_webserver.version import __version__

from wan_assets.core.workdir import Workdir
from wan_assets.ui_auth import RefusedWebsocketFilter, TokenAuth

REPO = Path(__file__).resolve().parents[1]
WORKSPACE_YAML = REPO / "workspace.yaml"
GPU_POOL = "gpu"
DUCKDB_WRITER_POOL = "duckdb_writer"
DAEMON_STOP_TIMEOUT_S = 20.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Written once; later edits are the user's. Pool limits are not here because dagster.yaml only
# takes a default: `apply_pool_limits` sets them through the instance at every start.
DAGSTER_YAML = """\
# Written by `wan-assets ui` when absent; edit freely. The `gpu` and `duckdb_writer` pool limits
# are (re)set at every `wan-assets ui` start (gpu = number of CUDA GPUs, at least 1).
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  # A run that dies without releasing its pool slots gives them back this long after it ends.
  free_slots_after_run_end_seconds: 30
retention:
  # Sensor and automation ticks (every 30 s) are purged; runs are kept: they hold the lineage.
  schedule:
    purge_after_days: 90
  sensor:
    purge_after_days: {skipped: 1, failure: 30, success: 7}
  auto_materialize:
    purge_after_days: {skipped: 1, failure: 30, success: 7}
concurrency:
  runs:
    # Runs executing at once (each is a process; a clip batch run loads its encoders once); more
    # wait in the queue.
    max_concurrent_runs: 4
  pools:
    # Limits are per step (op), so a `gpu` slot is held only while a GPU step runs.
    granularity: op
    # A pool nobody configured runs one step at a time, the safe choice for GPUs and databases.
    default_limit: 1
"""


def serve(
    workdir: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 3000,
    token: str | None = None,
    config: str | Path | None = None,
) -> None:
    """Serve the Dagster UI for `workdir` on host:port, with the daemon, until SIGTERM or SIGINT.

    `workdir` None is the default workdir; `token` None reads $WAN_ASSETS_AUTH; an empty token means
    no auth; `config` (the job file) None keeps $WAN_ASSETS_CONFIG, else the tiny demo config.
    """
    token = os.environ.get("WAN_ASSETS_AUTH") if token is None else token
    workspace = workspace_yaml()
    root = Workdir.open(workdir)
    home = root.dagster_home
    write_instance_config(home)
    # The daemon and the code servers (children of both) read these: one workdir for everything.
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["WAN_ASSETS_HOME"] = str(root.root)
    if config is not None:
        os.environ["WAN_ASSETS_CONFIG"] = str(Path(config).resolve())
    if not token and not is_loopback(host):
        print(
            f"warning: serving on {host} without WAN_ASSETS_AUTH: anyone who reaches it can run jobs",
            file=sys.stderr,
        )

    # Installed before the daemon starts, which then inherits default dispositions: never a SIGINT
    # ignored by a background shell, which the daemon would copy onto SIGTERM and so not stop.
    previous_handlers = _raise_on_stop_signals()
    daemon: subprocess.Popen[bytes] | None = None
    try:
        # The instance (its SQLite storage) exists before the daemon starts, so that the two
        # processes never race to create it.
        with DagsterInstance.get() as instance:
            apply_pool_limits(instance, pool_limits())
            daemon = start_daemon(workspace)
            print(f"dagster daemon: pid {daemon.pid}; DAGSTER_HOME={home}", file=sys.stderr)
            serve_webserver(instance, workspace, host, port, token or None)
    except KeyboardInterrupt:
        pass  # SIGINT or SIGTERM: a normal way to stop the UI
    finally:
        # A second Ctrl-C must not abandon the daemon half-stopped; the stop is bounded anyway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if daemon is not None:
            stop_process_group(daemon)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def write_instance_config(home: Path) -> Path:
    """`<home>/dagster.yaml`, written only when absent so that user edits survive."""
    path = home / "dagster.yaml"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(DAGSTER_YAML)
    return path


def pool_limits() -> dict[str, int]:
    """gpu = CUDA GPUs visible here (1 without any, so CPU runs still take turns); one DuckDB writer."""
    import torch

    return {GPU_POOL: max(1, torch.cuda.device_count()), DUCKDB_WRITER_POOL: 1}


def apply_pool_limits(instance: DagsterInstance, limits: dict[str, int]) -> None:
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def workspace_yaml() -> Path:
    """The repo's workspace.yaml: the one place that names the code location."""
    if not WORKSPACE_YAML.is_file():
        raise FileNotFoundError(
            f"{WORKSPACE_YAML} not found: run `wan-assets ui` from a checkout installed with `pip install -e .`"
        )
    return WORKSPACE_YAML


def start_daemon(workspace: Path) -> subprocess.Popen[bytes]:
    """`dagster-daemon run` on `workspace`, in its own process group, from the repo root."""
    # `python -m dagster._daemon` is the `dagster-daemon` script, run by this very interpreter.
    command = [sys.executable, "-m", "dagster._daemon", "run", "-w", str(workspace)]
    return subprocess.Popen(
        command, cwd=workspace.parent, start_new_session=True, preexec_fn=_die_with_parent()
    )


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: the daemon gets SIGTERM should this process be killed outright (SIGKILL), not orphaned."""
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None)  # loaded before the fork: only the one syscall runs between fork and exec
    return lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> None:
    """SIGTERM the child's process group, wait for all of it, SIGKILL what is left after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
    # The group can outlive its leader (code servers the daemon started); its id stays reserved
    # while any member lives, so signalling it cannot reach an unrelated process.
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _raise_on_stop_signals() -> dict[int, Callable[[int, FrameType | None], object] | int | None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt; returns the handlers they replace."""

    # uvicorn restores the handlers it found and re-raises the signal once it has shut down; with
    # these, that lands in `serve`'s `finally` (daemon stopped) rather than killing the process.
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}


def serve_webserver(
    instance: DagsterInstance, workspace: Path, host: str, port: int, token: str | None
) -> None:
    """Dagster's own webserver app, wrapped in `TokenAuth` when there is a token, served by uvicorn."""
    # As `dagster-webserver` does: settings meant for a long-running server process.
    instance.optimize_for_webserver(
        DEFAULT_DB_STATEMENT_TIMEOUT, DEFAULT_POOL_RECYCLE, DEFAULT_POOL_MAX_OVERFLOW
    )
    target = WorkspaceFileTarget(paths=[str(workspace)])
    with WorkspaceProcessContext(instance, version=__version__, workspace_load_target=target) as context:
        app = create_app_from_workspace_process_context(context)
        print(f"Dagster UI: http://{host}:{port}" + (" (token required)" if token else ""), file=sys.stderr)
        if not token:
            uvicorn.run(app, host=host, port=port, log_level="warning")
            return
        auth = TokenAuth(app, token)
        refused = RefusedWebsocketFilter(auth)
        logger = logging.getLogger("uvicorn.error")
        logger.addFilter(refused)
        try:
            uvicorn.run(auth, host=host, port=port, log_level="warning")
        finally:
            logger.removeFilter(refused)
