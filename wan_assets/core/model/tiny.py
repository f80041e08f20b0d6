"""The embedded tiny Wan 2.2 I2V-A14B model (docs/architecture.md §3), built offline from configs.

Same classes, folder layout and model_index.json as `Wan-AI/Wan2.2-I2V-A14B-Diffusers`; only the
sizes differ, so every code path (loading, LoRA, caching, training, sampling) is the real one.
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from wan_assets.core.experts import I2V_BOUNDARY_RATIO

MARKER_FILE = "wan_assets_tiny.json"

M = TypeVar("M", bound=torch.nn.Module)

# Text encoder: UMT5 like umt5-xxl (gated-gelu, relative attention), with toy widths.
TINY_TEXT_ENCODER: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "num_heads": 4,
    "d_ff": 64,
    "num_layers": 2,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "tie_word_embeddings": False,
}

# Each expert: the A14B block structure with toy widths. attention_head_dim 24 splits into rope parts
# t/h/w = 8/8/8 (h = w = 2 * (24 // 6)); text_dim must equal the text encoder's d_model.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 24,
    "in_channels": 36,  # noisy latent 16 + mask 4 + condition latent 16
    "out_channels": 16,
    "text_dim": TINY_TEXT_ENCODER["d_model"],
    "freq_dim": 32,
    "ffn_dim": 96,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,  # Wan 2.2 I2V has no CLIP image encoder
    "rope_max_seq_len": 1024,
}

# The Wan 2.1 VAE with a small base width; z_dim, the 4x temporal / 8x spatial compression and the
# real latents_mean / latents_std (class defaults) are kept so latent shapes and normalisation match.
TINY_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

# Wan 2.2 I2V-A14B's own scheduler: UniPC in flow-matching mode with the I2V sample shift 5.0.
SCHEDULER: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 5.0,
    "num_train_timesteps": 1000,
}

# Per-component offsets into the seed, so each part gets its own stream and the two experts differ.
_SEED_OFFSETS = {"transformer": 0, "transformer_2": 1, "vae": 2, "text_encoder": 3}

# Whole-word pieces of the offline tokenizer: captions of the synthetic clips and common prompts.
_WORDS = """
a an the this that these those it its is are was were be been being has have had do does did
and or but not no yes of in on at to from by with without for into onto over under above below
between through across around along toward towards away near far behind front back up down left
right top bottom middle center centre side edge corner inside outside out off again then while
as so very more most less few many much some all any each every other one two three four five six
seven eight nine ten first second last next small large big tiny huge little long short tall wide
narrow thin thick bright dark light heavy soft hard smooth rough fast slow quick quickly slowly
gently steady steadily still calm sudden suddenly new old young clean empty full open closed high
low red orange yellow green blue purple violet pink brown black white gray grey gold silver cyan
magenta teal colorful colourful color colour shade striped dotted
circle square triangle rectangle ellipse oval disc disk dot line stripe star heart cube sphere
ball box ring shape shapes pattern grid block blocks cone cylinder wave spiral cross diamond
moves move moving moved slides slide sliding rolls roll rolling bounces bounce bouncing spins spin
spinning rotates rotate rotating turns turn turning falls fall falling rises rise rising floats
float floating flies fly flying drifts drift drifting grows grow growing shrinks shrink shrinking
pulses pulse pulsing fades fade fading flashes flash flashing shakes shake shaking swings swing
swinging jumps jump jumping walks walk walking runs run running zooms zoom zooming pans pan panning
tilts tilt tilting orbits orbit orbiting follows follow following enters enter leaves leave
clockwise counterclockwise horizontally vertically diagonally forward backward sideways
camera shot view scene frame frames video clip background foreground surface floor ground
wall sky water sea ocean river lake beach sand grass tree trees forest field mountain hill road
street city house room window door table chair bed car train boat plane bird cat dog horse fish
person man woman boy girl child people face hand hands hair eyes head body arm arms leg legs
sun moon cloud clouds rain snow fire smoke light shadow night day morning evening sunset sunrise
smiling smile looking looks look standing stands sitting sits holding holds wearing wears
dancing dances talking talks eating eats playing plays reading reads watching watches
cinematic realistic style detailed sharp blurry blurred static motion movement animation
quality high-quality low-quality best worst overexposed underexposed ugly beautiful simple
"""

_SUFFIXES = ("s", "es", "ing", "ed", "ly", "er", "est")


def build_tiny_model(out_dir: Path, seed: int = 0, sizes: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the seeded tiny model to `out_dir` (diffusers layout) and return `out_dir`.

    `sizes` overrides the config of a component ("transformer" for both experts, "text_encoder",
    "vae"), for bigger random-weight models of the same layout (bench/gpu_e2e.py).
    The folder appears atomically (built beside it, then renamed), so a crash never leaves a half
    model; an existing folder is replaced only if it is an earlier tiny build.
    """

    def write(staging: Path) -> None:
        tiny_pipeline(seed, sizes).save_pretrained(staging)
        _check_model_index(staging)

    marker = {"seed": seed, "note": "embedded tiny Wan 2.2 I2V-A14B-shaped model (random weights)"}
    return write_tiny_folder(Path(out_dir), "tiny model", MARKER_FILE, marker, write)


def write_tiny_folder(
    out_dir: Path, what: str, marker_file: str, marker: dict[str, Any], write: Callable[[Path], None]
) -> Path:
    """`write` fills a folder built beside `out_dir`, which then appears atomically (renamed), so a
    crash never leaves half a model; an existing folder is replaced only if it holds `marker_file`
    (an earlier build of the same kind)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"cannot build the {what} at {out_dir}: it is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / marker_file).is_file():
        raise FileExistsError(
            f"cannot build the {what} at {out_dir}: the folder is not empty and is not an earlier "
            f"{what} build; choose another folder or empty it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(staging)
        (staging / marker_file).write_text(json.dumps(marker, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def tiny_pipeline(seed: int = 0, sizes: dict[str, dict[str, Any]] | None = None) -> WanImageToVideoPipeline:
    """The tiny model in memory, as the pipeline that `build_tiny_model` saves."""
    sizes = sizes or {}
    text_config = {**TINY_TEXT_ENCODER, **sizes.get("text_encoder", {})}
    expert_config = {**TINY_TRANSFORMER, "text_dim": text_config["d_model"], **sizes.get("transformer", {})}
    vae_config = {**TINY_VAE, **sizes.get("vae", {})}
    tokenizer = tiny_tokenizer()
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(seed, "text_encoder", lambda: _tiny_text_encoder(len(tokenizer), text_config)),
        vae=_seeded(seed, "vae", lambda: AutoencoderKLWan(**vae_config)),
        scheduler=UniPCMultistepScheduler(**SCHEDULER),
        transformer=_seeded(seed, "transformer", lambda: WanTransformer3DModel(**expert_config)),
        transformer_2=_seeded(seed, "transformer_2", lambda: WanTransformer3DModel(**expert_config)),
        boundary_ratio=I2V_BOUNDARY_RATIO,
        expand_timesteps=False,
    )


def tiny_tokenizer() -> T5Tokenizer:
    """A T5-style Unigram tokenizer over an embedded English vocabulary, built with no download.

    Ids as in T5/UMT5: <pad>=0, </s>=1 (appended to every sequence), <unk>=2. Known words are one
    piece; other words fall back to stem + suffix or single characters.
    """
    tokenizer = T5Tokenizer(vocab=_tiny_vocab(), extra_ids=0, model_max_length=512)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    return tokenizer


def tiny_words() -> list[str]:
    """The embedded English words of the tiny tokenizers, in order, without repeats."""
    return list(dict.fromkeys(_WORDS.split()))


def _tiny_vocab() -> list[tuple[str, float]]:
    # Unigram picks the segmentation with the highest summed log-probability, so a whole word
    # (-6) always beats stem + suffix (-6 - 9), which beats spelling it out (-12 per character).
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -4.0}
    for word in tiny_words():
        pieces.setdefault(f"▁{word}", -6.0)
    for suffix in _SUFFIXES:
        pieces.setdefault(suffix, -9.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault(f"▁{char}", -12.0)
        pieces.setdefault(char, -12.0)
    return list(pieces.items())


def _tiny_text_encoder(vocab_size: int, sizes: dict[str, Any]) -> UMT5EncoderModel:
    config = UMT5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, **sizes)
    return UMT5EncoderModel(config).eval()


def _seeded(seed: int, component: str, build: Callable[[], M]) -> M:
    # fork_rng keeps the caller's global RNG untouched; the seed alone fixes every weight.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * len(_SEED_OFFSETS) + _SEED_OFFSETS[component])
        return build()


def _check_model_index(model_dir: Path) -> None:
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline", index
    assert index["boundary_ratio"] == I2V_BOUNDARY_RATIO and index["expand_timesteps"] is False, index
    assert index["image_encoder"] == [None, None] and index["image_processor"] == [None, None], index
