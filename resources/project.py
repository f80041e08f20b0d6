"""Where the project's files live and which job config the graph runs: swapped per environment."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

from dagster import ConfigurableResource
from pydantic import Field

from wan_assets.core.config import JobConfig, load_config
from wan_assets.core.data.cache import ClipSource, EncoderHandle, captioner_for, discover_clips
from wan_assets.core.data.captioner import CaptionerHandle
from wan_assets.core.devices import claim_device, pick_device
from wan_assets.core.workdir import TINY_CONFIG, Workdir


class WanProjectResource(ConfigurableResource):
    """The job config file and the workdir (latent cache, runs, metrics database, example data).

    `device` picks where encoders run: "auto" is the first CUDA device when there is one.
    """

    config_path: str = Field(default=str(TINY_CONFIG), description="The job config (WAN_ASSETS_CONFIG)")
    workdir: str = Field(default="", description="The workdir (WAN_ASSETS_HOME); empty: ./.wan_assets")
    device: str = Field(default="auto", description="Where encoders run: auto, cpu, cuda, cuda:N")

    @cached_property
    def _workdir(self) -> Workdir:
        wd = Workdir.open(self.workdir or None)
        wd.ensure_default_clips(self.config_path)
        return wd

    def root(self) -> Workdir:
        return self._workdir

    def job(self) -> JobConfig:
        return load_config(self.config_path, workdir=self._workdir.root).job

    def clips(self) -> list[ClipSource]:
        return discover_clips(self.job())

    def source(self, partition_key: str) -> ClipSource:
        for source in self.clips():
            if source.key == partition_key:
                return source
        raise FileNotFoundError(
            f"clip {partition_key!r} is no longer under the dataset folders of {self.config_path}"
        )

    def torch_device(self):
        return pick_device(self.device)

    @contextmanager
    def encoder(self) -> Iterator[EncoderHandle]:
        """Encoders on a GPU this step holds alone (one per GPU across concurrent steps)."""
        model = self.job().process.model
        self._workdir.ensure_model(model.name_or_path)
        with claim_device(self._workdir.root / "locks", self.device) as device:
            yield EncoderHandle.create(model, str(device))

    @contextmanager
    def captioner(self) -> Iterator[CaptionerHandle | None]:
        """The job's captioner (None when no dataset auto-captions), on a GPU this step holds alone;
        it loads on the first clip that needs a caption and is freed when the step ends."""
        job = self.job()
        if job.process.captioner is None or captioner_for(job) is None:
            yield None
            return
        with claim_device(self._workdir.root / "locks", job.process.captioner.device) as device:
            handle = CaptionerHandle(job.process.captioner, job.process.trigger_word, device)
            try:
                yield handle
            finally:
                handle.release()
