"""How the training asset starts `wan-assets train`: a local subprocess speaking Dagster Pipes."""

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    PipesEnvContextInjector,
    PipesExecutionResult,
    PipesTempFileMessageReader,
    open_pipes_session,
)

from wan_assets.core.experts import EXPERTS

REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainingLauncher(ConfigurableResource):
    """Runs the training engine out of process, so a crash or OOM never takes the Dagster worker
    down and the very same `wan-assets train` runs from a shell. `python` defaults to this one.

    `nproc_per_node` > 1 starts it under torchrun (data parallel, one process per GPU; rank 0 alone
    writes files and talks to Dagster)."""

    python: str = sys.executable
    nproc_per_node: int = 1
    poll_seconds: float = 0.5

    def command(self, config_path: str, workdir: str, experts: tuple[str, ...]) -> list[str]:
        which = "both" if set(experts) == set(EXPERTS) else experts[0]
        train = [
            "-m", "wan_assets.cli", "train", config_path, "--workdir", workdir,
            "--experts", which, "--resume", "--restart-on-new-data",
        ]  # fmt: skip
        if self.nproc_per_node > 1:
            torchrun = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={self.nproc_per_node}",
            ]
            return [self.python, *torchrun, *train]
        return [self.python, *train]

    def run(
        self,
        context: AssetExecutionContext,
        command: list[str],
        on_message: Callable[[dict], None],
    ) -> Iterator[PipesExecutionResult]:
        """Start the command with Pipes; hand each custom message to `on_message` as it arrives."""
        with open_pipes_session(
            context=context,
            context_injector=PipesEnvContextInjector(),
            message_reader=PipesTempFileMessageReader(),
        ) as session:
            env = {**os.environ, **session.get_bootstrap_env_vars(), "PYTHONUNBUFFERED": "1"}
            context.log.info(f"launching: {' '.join(command)}")
            proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
            seen = 0
            try:
                while True:
                    done = proc.poll() is not None
                    messages = session.get_custom_messages()
                    for message in messages[seen:]:
                        on_message(message)
                    seen = len(messages)
                    if done:
                        break
                    time.sleep(self.poll_seconds)
            finally:
                if proc.poll() is None:  # the run was cancelled: stop the trainer we started
                    proc.terminate()
                    proc.wait(timeout=60)
        # Messages that arrived between the last poll and the session closing.
        for message in session.get_custom_messages()[seen:]:
            on_message(message)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` exited with {proc.returncode}; see the run logs above")
        yield from session.get_results()
