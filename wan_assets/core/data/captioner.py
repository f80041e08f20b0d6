"""Captions for clips that have none, from a local vision-language model (docs/architecture.md §4).

The model family is Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the open captioner video
LoRA trainers reach for (musubi-tuner ships a Qwen2.5-VL captioning script), trained on video as
well as images, with 3-D rotary positions that keep frames in order and apart. The sampled frames
of a clip go in as one ordered sequence of images, through Qwen's own processor (PIL backend):
transformers' video processors need torchvision, which a CPU build of torch cannot load from PyPI,
so the image path is the one that runs everywhere, and the one the tests run.

A generated caption is content-addressed like a latent: its key hashes the clip's bytes, the
model folder, the prompt and every setting that changes the text; decoding is greedy, so the same
key always means the same text and a second run loads no model. The record (text, model, prompt,
frames) lives in the cache folder, never next to the clip unless the dataset asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan_assets.core.config import CaptionerConfig, ConfigError
from wan_assets.core.data.latents import component_identity, content_key
from wan_assets.core.data.video_io import VideoError, read_frames
from wan_assets.core.devices import pick_device
from wan_assets.core.files import write_json
from wan_assets.core.precision import DTYPES

# Model types whose processor and generate() this module drives (config.json "model_type").
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)
RECORD_VERSION = 1


@dataclass(frozen=True)
class CaptionRequest:
    """One clip that needs a generated caption."""

    clip: str  # the clip's partition key
    path: Path
    sha256: str
    num_frames: int


@dataclass(frozen=True)
class GeneratedCaption:
    """A caption the captioner wrote for one clip, as stored under `captions/` in the cache."""

    key: str  # content key: clip bytes + model + prompt + settings
    file: str  # relative to the cache folder
    text: str  # as the model wrote it (whitespace collapsed); trigger handling comes after
    model_path: str
    model: str  # content hash of the model folder
    prompt: str  # the prompt the model was given ([trigger] already replaced)
    frame_indices: tuple[int, ...]
    seconds: float  # generation time of the batch it was in, per clip
    generated: bool = False  # True when this run ran the model for it (False: found in the cache)

    def metadata(self) -> dict[str, Any]:
        return {
            "captioner_model": self.model_path,
            "captioner_identity": self.model,
            "captioner_prompt": self.prompt,
            "caption_key": self.key,
            "caption_record": self.file,
            "caption_frames": list(self.frame_indices),
            "generated_now": self.generated,
        }


def check_captioner_folder(path: str | Path) -> None:
    """The folder holds a model this module can run (FileNotFoundError / ValueError otherwise)."""
    folder = Path(path)
    hint = (
        "point captioner.name_or_path at a local Qwen2.5-VL folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct, "
        "downloaded with `hf download`) or build the tiny one with `wan-assets tiny-captioner DIR`"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; {hint}")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a model folder; {hint}")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{folder} holds a {model_type!r} model; the captioner runs {SUPPORTED_MODEL_TYPES}")


def caption_frame_indices(num_frames: int, count: int) -> list[int]:
    """`count` frames spread over the clip: the middle of each of `count` equal stretches (so a
    fade-in first frame or a cut at the end never stands for the clip); fewer for a short clip."""
    spots = ((np.arange(count) + 0.5) * num_frames / count).astype(int)
    return sorted({int(i) for i in np.clip(spots, 0, num_frames - 1)})


class CaptionerHandle:
    """The captioner model and processor, loaded on first use and kept for the handle's life (one
    load for a whole batch of clips, as `EncoderHandle` does); a fully cached batch loads nothing."""

    def __init__(self, config: CaptionerConfig, trigger: str | None, device: torch.device | None = None):
        self.config = config
        self.trigger = trigger
        self.device = device or pick_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.num_loads = 0
        self.num_generate_calls = 0
        self._model: Any = None
        self._processor: Any = None
        self._identity: dict[str, Any] | None = None

    @property
    def prompt(self) -> str:
        """The prompt the model is given: the template with `[trigger]` replaced (config checks a
        trigger word is set when the template uses it)."""
        return self.config.prompt.replace("[trigger]", self.trigger or "")

    def identity(self) -> dict[str, Any]:
        """Everything that decides the text, for the content key; no model load needed."""
        if self._identity is None:
            try:
                check_captioner_folder(self.config.name_or_path)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"captioner.name_or_path: {exc}") from None
            self._identity = {
                "model": component_identity(self.config.name_or_path, ""),
                "dtype": str(self.dtype),
                "prompt": self.prompt,
                "frames_per_clip": self.config.frames_per_clip,
                "max_pixels": self.config.max_pixels,
                "max_new_tokens": self.config.max_new_tokens,
                "decoding": "greedy",
            }
        return self._identity

    def caption_key(self, sha256: str) -> str:
        return content_key(clip=sha256, **self.identity())

    def generate(self, clips_frames: Sequence[np.ndarray]) -> list[str]:
        """One caption per clip ([F, H, W, 3] uint8 frames each), in one batched greedy generate."""
        from PIL import Image

        model, processor = self._load()
        frames = [[Image.fromarray(frame) for frame in clip] for clip in clips_frames]
        content = [
            [*({"type": "image"} for _ in clip), {"type": "text", "text": self.prompt}] for clip in frames
        ]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
            )
            for c in content
        ]
        inputs = processor(
            text=texts, images=[image for clip in frames for image in clip], return_tensors="pt", padding=True
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=self.config.max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        self.num_generate_calls += 1
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [" ".join(t.split()) for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def release(self) -> None:
        """Free the model (the encoders load next); the counts stay."""
        self._model = self._processor = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoModelForImageTextToText

            self.identity()  # checks the folder first: one clear error, not a loader traceback
            self._processor = load_frames_processor(self.config.name_or_path, self.config.max_pixels)
            model: Any = AutoModelForImageTextToText.from_pretrained(
                self.config.name_or_path, dtype=self.dtype
            )
            self._model = model.to(self.device).eval()
            self.num_loads += 1
        return self._model, self._processor


@functools.cache
def frames_processor_class() -> type:
    """Qwen2.5-VL's processor for image input: without a video_processor argument it never needs
    a video processor class (whose import needs torchvision); everything else is its own. Made on
    first use: importing transformers' processors costs seconds every command would pay."""
    from transformers import Qwen2_5_VLProcessor

    class FramesProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    return FramesProcessor


def load_frames_processor(path: str | Path, max_pixels: int) -> Any:
    """The folder's image processor (PIL backend whatever is installed, so the pixels and the
    cache keys never depend on torchvision), tokenizer and chat template."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(path)
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil", max_pixels=max_pixels)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    chat_template = _chat_template(folder, tokenizer)
    return frames_processor_class()(image_processor, tokenizer, chat_template=chat_template)


def _chat_template(folder: Path, tokenizer: Any) -> str:
    """The tokenizer's template, else the processor's file (chat_template.json of the hub folders)."""
    if tokenizer.chat_template:
        return str(tokenizer.chat_template)
    for name in ("chat_template.jinja", "chat_template.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return str(json.loads(text)["chat_template"]) if name.endswith(".json") else text
    raise ConfigError(f"captioner.name_or_path: {folder} has no chat template (an Instruct model ships one)")


def generated_captions(
    requests: Sequence[CaptionRequest],
    captioner: CaptionerHandle,
    cache_dir: Path,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, GeneratedCaption | Exception]:
    """The caption of each requested clip: from the cache when its key is there, else generated in
    batches of `batch_size` and stored. A clip whose frames cannot be read fails alone (its
    VideoError is its entry); the others go on."""
    out: dict[str, GeneratedCaption | Exception] = {}
    todo: list[tuple[CaptionRequest, str]] = []
    for request in requests:
        key = captioner.caption_key(request.sha256)
        stored = load_generated(cache_dir, key)
        if stored is not None:
            out[request.clip] = stored
        else:
            todo.append((request, key))
    size = captioner.config.batch_size
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    for batch in progress(batches):
        readable, frames = [], []
        for request, key in batch:
            picked = caption_frame_indices(request.num_frames, captioner.config.frames_per_clip)
            try:
                frames.append(read_frames(request.path, picked))
            except VideoError as exc:
                out[request.clip] = exc
                continue
            readable.append((request, key, tuple(picked)))
        if not readable:
            continue
        start = time.perf_counter()
        texts = captioner.generate(frames)
        seconds = round((time.perf_counter() - start) / len(readable), 3)
        for (request, key, indices), text in zip(readable, texts, strict=True):
            out[request.clip] = _store(cache_dir, key, request, captioner, text, indices, seconds)
    return out


def _record_path(key: str) -> str:
    return f"captions/{key[:2]}/{key}.json"


def load_generated(cache_dir: Path, key: str) -> GeneratedCaption | None:
    path = cache_dir / _record_path(key)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version") != RECORD_VERSION:
        return None
    fields = {k: v for k, v in data.items() if k not in ("version", "clip", "clip_sha256", "settings")}
    return GeneratedCaption(**{**fields, "frame_indices": tuple(fields["frame_indices"]), "generated": False})


def _store(
    cache_dir: Path,
    key: str,
    request: CaptionRequest,
    captioner: CaptionerHandle,
    text: str,
    indices: tuple[int, ...],
    seconds: float,
) -> GeneratedCaption:
    identity = captioner.identity()
    caption = GeneratedCaption(
        key=key,
        file=_record_path(key),
        text=text,
        model_path=captioner.config.name_or_path,
        model=identity["model"],
        prompt=identity["prompt"],
        frame_indices=indices,
        seconds=seconds,
    )
    record = {k: v for k, v in asdict(caption).items() if k != "generated"}
    settings = {k: v for k, v in identity.items() if k not in ("model", "prompt")}
    extra = {
        "version": RECORD_VERSION,
        "clip": request.clip,
        "clip_sha256": request.sha256,
        "settings": settings,
    }
    write_json(cache_dir / caption.file, record | extra)
    return dataclasses.replace(caption, generated=True)
