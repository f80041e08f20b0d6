"""The ai-toolkit keys this project does not model as fields: the one table (docs/architecture.md §9).

ai-toolkit reads a Wan job through hundreds of `kwargs.get` calls (toolkit/config_modules.py) and its
web UI writes many of them into every job (ui/src/app/jobs/new/jobConfig.ts). A key of a job file is:

- implemented: a field of the models in `wan_assets.core.config` (or an alias of one);
- in this table and its value asks for nothing here (`mask_path: null`, `controls: []`, a UI-only
  key): accepted, and listed in the one warning of `load_config`;
- in this table and its value asks for something not built (`mask_path: masks/`): one error naming
  the key, the value and what to do;
- none of these: a typo, an error naming the closest real key.

`accepts` is the values that ask for nothing: `ANY` (the key never changes training here: the device,
the UI's database path, logging integrations) or a tuple of values (mostly ai-toolkit's own default,
which leaves the feature off). `null` is accepted wherever a tuple is: it leaves a feature off too.
To add a key, add one row. Paths are sections as `load_config` walks them: `datasets[]` is every
dataset, `sample.samples[]` every sample prompt; the process keys have no section.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Final

ANY: Final = "any value"


@dataclass(frozen=True)
class AitkKey:
    path: str  # "train.noise_offset", "datasets[].mask_path", "device"
    accepts: tuple[Any, ...] | str  # ANY, or the values that ask for nothing
    asks: str  # what a value outside `accepts` asks ai-toolkit for (or why any value is inert)
    fix: str = ""  # what to do instead, when a value asks for something

    @property
    def section(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def key(self) -> str:
        return self.path.rpartition(".")[2]

    def inert(self, value: Any) -> bool:
        """Whether `value` asks for nothing here."""
        if self.accepts == ANY or value is None:
            return True
        return any(_same(value, accepted) for accepted in self.accepts)

    def refusal(self, where: str, value: Any) -> str:
        """The error line for a value that asks for something not built."""
        assert isinstance(self.accepts, tuple), "a key accepting any value is never refused"
        allowed = " or ".join(_show(v) for v in self.accepts)
        fix = self.fix or f"remove the key (or set it to {allowed})"
        return f"{where}: {_show(value)} asks for {self.asks}, which this project does not build; {fix}"


def _same(value: Any, accepted: Any) -> bool:
    # YAML gives 1 for 1.0 and the UI writes 1 where ai-toolkit defaults to 1.0; True is not 1 here.
    if isinstance(value, bool) or isinstance(accepted, bool):
        return type(value) is type(accepted) and value == accepted
    return bool(value == accepted)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def _rows(
    section: str, accepts: tuple[Any, ...] | str, asks: str, *keys: str, fix: str = ""
) -> list[AitkKey]:
    """Several keys of one section that share what they ask for."""
    prefix = f"{section}." if section else ""
    return [AitkKey(prefix + key, accepts, asks, fix) for key in keys]


_OFF = (False,)
_NO_PATH = (None, "")
_NO_LIST: tuple[list[Any], ...] = ([],)

KEYS: tuple[AitkKey, ...] = (
    # --- the process ---------------------------------------------------------------------------------
    *_rows(
        "", ANY, "the ai-toolkit UI's job database; runs are recorded in metrics.duckdb", "sqlite_db_path"
    ),
    *_rows(
        "", ANY, "the device: CUDA when present, else MPS, else CPU; torchrun gives one per rank", "device"
    ),
    *_rows("", ANY, "terminal timing output; step times are in the metrics JSONL", "performance_log_every"),
    *_rows("", ANY, "console output", "print_every"),
    *_rows("", _OFF, "memory offloading from the process section", "low_vram", fix="set model.low_vram"),
    # --- network ---------------------------------------------------------------------------------------
    *_rows("network", ANY, "conv layers (Wan has none: the alpha schedule sets the linear scale)", "conv"),
    *_rows("network", ANY, "conv layers (Wan has none)", "conv_alpha"),
    *_rows("network", (True,), "LoRA on the text encoder", "transformer_only"),
    *_rows("network", ANY, "a LoRA-extraction threshold", "network_threshold"),
    *_rows("network", (True,), "one LoRA over both experts", "split_multistage_loras"),
    *_rows("network", _OFF, "ai-toolkit's old LoKr file layout", "old_lokr_format"),
    *_rows("network", _OFF, "ramtorch layer offloading of the LoRA", "layer_offloading"),
    *_rows("network", _NO_PATH, "starting from a pretrained LoRA", "pretrained_lora_path"),
    *_rows("network", _OFF, "full-weight modules for non-linear layers", "all_layers"),
    *_rows("network", (None,), "LoRM (low-rank middle) extraction", "lorm"),
    *_rows("network.alpha_schedule", ANY, "conv alpha (Wan has no conv layers)", "conv_alpha"),
    *_rows("network.alpha_schedule", ANY, "the seed's log cadence; every step is logged", "log_every"),
    # --- save ------------------------------------------------------------------------------------------
    *_rows(
        "save", ANY, "ai-toolkit's output layout; LoRAs are safetensors in the seed layout", "save_format"
    ),
    *_rows("save", _OFF, "uploading to the Hugging Face Hub", "push_to_hub"),
    *_rows("save", ANY, "the Hub repository (used only with push_to_hub)", "hf_repo_id", "hf_private"),
    # --- logging ---------------------------------------------------------------------------------------
    *_rows("logging", ANY, "the ai-toolkit UI's log; metrics go to the JSONL and DuckDB", "use_ui_logger"),
    *_rows(
        "logging",
        _OFF,
        "Weights & Biases logging",
        "use_wandb",
        fix="remove it; query metrics with `wan-assets sql`",
    ),
    *_rows("logging", ANY, "console verbosity", "verbose"),
    *_rows("logging", ANY, "the W&B project and run names", "project_name", "run_name"),
    # --- datasets --------------------------------------------------------------------------------------
    *_rows(
        "datasets[]",
        ANY,
        "latent caching: latents are always cached to disk",
        "cache_latents",
        "cache_latents_to_disk",
    ),
    *_rows("datasets[]", ANY, "text caching: embeddings are always cached", "cache_text_embeddings"),
    *_rows(
        "datasets[]",
        ANY,
        "loader workers; training reads the cached latents",
        "num_workers",
        "prefetch_factor",
        "cache_latents_num_workers",
    ),
    *_rows(
        "datasets[]",
        ANY,
        "image buckets; video buckets are chosen per clip (docs/architecture.md §4)",
        "buckets",
        "bucket_tolerance",
    ),
    *_rows("datasets[]", ANY, "debug output", "debug"),
    *_rows("datasets[]", ("image", "video"), "a dataset type other than clips with captions", "type"),
    *_rows("datasets[]", _NO_PATH, "loss masks", "mask_path", "unconditional_path", "poi"),
    *_rows(
        "datasets[]", (0.0, 0.1), "a minimum loss-mask value (used only with mask_path)", "mask_min_value"
    ),
    *_rows("datasets[]", _OFF, "loss masks", "alpha_mask", "invert_mask"),
    *_rows("datasets[]", _NO_LIST, "control images", "controls"),
    *_rows(
        "datasets[]",
        _NO_PATH,
        "control images",
        "control_path",
        "control_path_1",
        "control_path_2",
        "control_path_3",
        "inpaint_path",
        "clip_image_path",
    ),
    *_rows("datasets[]", _OFF, "control images", "control_from_same_folder", "clip_image_from_same_folder"),
    *_rows("datasets[]", (1,), "control images", "num_controls_from_same_folder"),
    *_rows("datasets[]", ([0, 0, 0],), "control images", "control_transparent_color"),
    *_rows("datasets[]", (True,), "control images", "full_size_control_images"),
    *_rows("datasets[]", _OFF, "a regularisation dataset", "is_reg", "prior_reg"),
    *_rows("datasets[]", (1, 1.0), "a per-dataset network weight", "network_weight"),
    *_rows("datasets[]", (1, 1.0), "a per-dataset loss multiplier", "loss_multiplier"),
    *_rows("datasets[]", (0, 0.0), "caption token dropout", "token_dropout_rate"),
    *_rows("datasets[]", (0,), "kept caption tokens", "keep_tokens"),
    *_rows("datasets[]", _OFF, "caption token shuffling", "shuffle_tokens"),
    *_rows("datasets[]", _OFF, "flip augmentation", "flip_x", "flip_y"),
    *_rows(
        "datasets[]", _OFF, "random scale/crop augmentation", "random_scale", "random_crop", "square_crop"
    ),
    *_rows("datasets[]", (1, 1.0), "image scaling", "scale"),
    *_rows("datasets[]", _NO_LIST, "augmentations", "augments", "augmentations", "clip_image_augmentations"),
    *_rows("datasets[]", _OFF, "augmentations", "shuffle_augmentations", "clip_image_shuffle_augmentations"),
    *_rows("datasets[]", ANY, "augmentation replay", "replay_transforms"),
    *_rows("datasets[]", _OFF, "diff output preservation", "diff_output_preservation"),
    *_rows(
        "datasets[]",
        ANY,
        "the diff output preservation class (used only when it is on)",
        "diff_output_preservation_class",
    ),
    *_rows(
        "datasets[]",
        _NO_PATH,
        "a per-dataset trigger word",
        "trigger_word",
        fix="set the process's trigger_word",
    ),
    *_rows("datasets[]", _NO_LIST, "random trigger words", "random_triggers", "replacements"),
    *_rows("datasets[]", (1,), "random trigger words", "random_triggers_max"),
    *_rows("datasets[]", _OFF, "short captions from JSON", "use_short_captions"),
    *_rows("datasets[]", _NO_PATH, "JSON caption types", "caption_type"),
    *_rows(
        "datasets[]", _NO_PATH, "a dataset file instead of a folder", "dataset_path", fix="use folder_path"
    ),
    *_rows("datasets[]", (None,), "a per-dataset batch size", "batch_size", fix="set train.batch_size"),
    *_rows("datasets[]", _OFF, "image standardisation", "standardize_images"),
    *_rows(
        "datasets[]",
        _OFF,
        "caching CLIP vision or other tensors",
        "cache_clip_vision_to_disk",
        "cache_tensors_to_disk",
        "load_image_when_caching_latents",
    ),
    *_rows("datasets[]", _NO_LIST, "extra values", "extra_values"),
    *_rows("datasets[]", ANY, "a faster image size probe", "fast_image_size"),
    *_rows("datasets[]", ("targeted",), "guidance training", "guidance_type"),
    *_rows("datasets[]", _OFF, "audio", "do_audio", "audio_preserve_pitch", "audio_normalize"),
    # auto_frame_count and trim_auto_frame_count_tail are dataset fields (frame windows, §4).
    # --- train -----------------------------------------------------------------------------------------
    *_rows("train", (True,), "freezing the transformer", "train_unet"),
    *_rows("train", ANY, "text caching: embeddings are always cached per caption", "cache_text_embeddings"),
    *_rows(
        "train",
        _OFF,
        "replacing every caption by the trigger word's embedding",
        "unload_text_encoder",
        fix="remove it: captions are encoded once and cached, so the text encoder is never in memory while training",
    ),
    *_rows(
        "train",
        ANY,
        "the text encoder, refiner, embedding and adapter learning rates (none of them train here)",
        "text_encoder_lr",
        "refiner_lr",
        "embedding_lr",
        "adapter_lr",
    ),
    *_rows("train", _OFF, "training a refiner", "train_refiner", fix="remove it"),
    *_rows("train", ANY, "xformers / sdp attention", "xformers", "sdp", fix=""),
    *_rows("train", ("balanced",), "content/style timestep weighting", "content_or_style"),
    *_rows("train", ("mse",), "a loss other than flow-matching MSE", "loss_type"),
    *_rows(
        "train", (0, 0.0), "noise offset", "noise_offset", "random_noise_shift", "random_noise_multiplier"
    ),
    *_rows("train", (1, 1.0), "a noise multiplier", "noise_multiplier", "target_noise_multiplier"),
    *_rows(
        "train",
        (1, 1.0),
        "latent scaling",
        "img_multiplier",
        "noisy_latent_multiplier",
        "latent_multiplier",
        "pred_scaler",
    ),
    *_rows("train", _OFF, "dynamic noise offset", "dynamic_noise_offset"),
    *_rows("train", (None,), "min-SNR loss weighting", "min_snr_gamma", "snr_gamma"),
    *_rows("train", _OFF, "learnable SNR", "learnable_snr_gos"),
    *_rows("train", (0,), "a minimum denoising step", "min_denoising_steps"),
    *_rows("train", (999, 1000), "a maximum denoising step", "max_denoising_steps"),
    *_rows("train", (1000,), "a timestep count other than 1000", "num_train_timesteps"),
    *_rows("train", _OFF, "linear timestep weighting", "linear_timesteps", "linear_timesteps2"),
    *_rows("train", (8,), "next-sample timesteps", "next_sample_timesteps"),
    *_rows(
        "train", _OFF, "diff output preservation", "diff_output_preservation", "blank_prompt_preservation"
    ),
    *_rows(
        "train",
        ANY,
        "the preservation strength and class (used only when it is on)",
        "diff_output_preservation_multiplier",
        "diff_output_preservation_class",
        "blank_prompt_preservation_multiplier",
    ),
    *_rows("train", _OFF, "an inverted mask prior", "inverted_mask_prior"),
    *_rows(
        "train",
        ANY,
        "the inverted mask prior's strength (used only when it is on)",
        "inverted_mask_prior_multiplier",
    ),
    *_rows("train", _OFF, "CFG during training", "do_cfg", "do_random_cfg"),
    *_rows("train", (1, 1.0), "CFG during training", "cfg_scale", "max_cfg_scale"),
    *_rows("train", (None, 1, 1.0), "CFG rescale during training", "cfg_rescale"),
    *_rows("train", ANY, "Flux's guidance embedding (Wan has none)", "bypass_guidance_embedding"),
    *_rows("train", _OFF, "image or latent standardisation", "standardize_images", "standardize_latents"),
    *_rows("train", (None,), "a timestep bias", "timestep_bias"),
    *_rows("train", (0, 0.0), "weight jitter", "weight_jitter"),
    *_rows("train", _OFF, "merging the LoRA into the model on save", "merge_network_on_save"),
    *_rows(
        "train",
        ANY,
        "the merge strength (used only with merge_network_on_save)",
        "merge_network_on_save_strength",
    ),
    *_rows(
        "train",
        (None, 0),
        "a start step other than 0",
        "start_step",
        fix="remove it; `wan-assets train --resume` continues a run",
    ),
    *_rows("train", _OFF, "FreeU", "free_u"),
    *_rows("train", _NO_PATH, "an assistant adapter", "adapter_assist_name_or_path"),
    *_rows(
        "train",
        ANY,
        "the assistant adapter type (used only with adapter_assist_name_or_path)",
        "adapter_assist_type",
    ),
    *_rows(
        "train",
        _OFF,
        "signal correction or amplification noise",
        "do_signal_correction_noise",
        "do_batch_noise_correction",
        "do_signal_amplification",
    ),
    *_rows(
        "train",
        ANY,
        "their strengths (used only when they are on)",
        "batch_noise_correction_scale",
        "signal_amplification_strength",
        "signal_correction_noise_scale",
    ),
    *_rows("train", _NO_PATH, "a negative training prompt", "negative_prompt"),
    *_rows("train", (1,), "negative prompts", "max_negative_prompts"),
    *_rows("train", (1, 1.0), "a regularisation weight", "reg_weight"),
    *_rows("train", _OFF, "adaptive scaling", "adaptive_scaling_factor"),
    *_rows("train", (0, 0.0), "prompt dropout (use datasets[].caption_dropout_rate)", "prompt_dropout_prob"),
    *_rows("train", _OFF, "noise norm matching", "match_noise_norm"),
    *_rows(
        "train",
        _OFF,
        "short and long captions",
        "short_and_long_captions",
        "short_and_long_captions_encoder_split",
    ),
    *_rows("train", _OFF, "single item batching", "single_item_batching"),
    *_rows("train", _OFF, "adapter matching", "match_adapter_assist"),
    *_rows("train", (0, 0.0), "adapter matching", "match_adapter_chance"),
    *_rows("train", (None, "noise"), "a loss target other than the flow-matching velocity", "loss_target"),
    *_rows("train", _OFF, "prediction norm correction", "correct_pred_norm"),
    *_rows("train", ANY, "its multiplier (used only when it is on)", "correct_pred_norm_multiplier"),
    *_rows(
        "train",
        _OFF,
        "t0 / FFT losses",
        "t0_loss_target",
        "t0_velocity_equiv_weight",
        "do_fft_loss",
        "do_fft_velocity_equiv_weight",
    ),
    *_rows("train", (0, 0.0), "prompt saturation", "prompt_saturation_chance"),
    *_rows("train", _OFF, "prior divergence", "do_prior_divergence"),
    *_rows("train", (None,), "a target norm std loss", "target_norm_std"),
    *_rows("train", ANY, "its target (used only with target_norm_std)", "target_norm_std_value"),
    *_rows("train", _OFF, "parameter swapping", "do_paramiter_swapping"),
    *_rows("train", ANY, "its factor (used only with do_paramiter_swapping)", "paramiter_swapping_factor"),
    *_rows(
        "train",
        _NO_PATH,
        "a feature extractor loss",
        "latent_feature_extractor_path",
        "diffusion_feature_extractor_path",
    ),
    *_rows(
        "train",
        ANY,
        "its weight (used only with a feature extractor)",
        "latent_feature_loss_weight",
        "diffusion_feature_extractor_weight",
    ),
    *_rows("train", (1,), "optimal noise pairing", "optimal_noise_pairing_samples"),
    *_rows("train", _OFF, "consistent or blurred noise", "force_consistent_noise", "blended_blur_noise"),
    *_rows(
        "train",
        _OFF,
        "guidance losses",
        "do_guidance_loss",
        "do_guidance_loss_cfg_zero",
        "do_differential_guidance",
        "do_blank_stabilization",
    ),
    *_rows(
        "train",
        ANY,
        "their settings (used only when they are on)",
        "guidance_loss_target",
        "guidance_loss_schedule",
        "unconditional_prompt",
        "differential_guidance_scale",
    ),
    *_rows("train", _OFF, "turbo training", "train_turbo", "show_turbo_outputs"),
    *_rows("train", (1, 1.0), "an audio loss", "audio_loss_multiplier"),
    *_rows("train", _OFF, "loss debugging", "max_loss_debug"),
    *_rows("train", (None,), "a maximum loss", "max_loss"),
    *_rows(
        "train",
        (None,),
        "ai-toolkit's in-training validation",
        "validation_config",
        fix="use the validation section and `wan-assets eval` (docs/architecture.md §6)",
    ),
    *_rows("train.ema_config", _OFF, "EMA feedback into the weights", "use_feedback"),
    *_rows("train.ema_config", (1, 1.0), "an EMA parameter multiplier", "param_multiplier"),
    # --- model -----------------------------------------------------------------------------------------
    *_rows(
        "model",
        ANY,
        "the text encoder's quantization: the text encoder only runs when caching",
        "quantize_te",
        "qtype_te",
        "text_encoder_bits",
    ),
    *_rows(
        "model",
        _NO_PATH,
        "an assistant LoRA",
        "assistant_lora_path",
        "inference_lora_path",
        "unconditional_lora_path",
        "lora_path",
    ),
    *_rows(
        "model",
        _OFF,
        "another model family",
        "is_flux",
        "is_v3",
        "is_v2",
        "is_xl",
        "is_pixart",
        "is_pixart_sigma",
        "is_auraflow",
        "is_lumina2",
        "is_ssd",
        "is_vega",
        "is_v_pred",
        "use_flux_cfg",
        "experimental_xl",
    ),
    *_rows("model", ANY, "a model dtype; experts run in train.dtype", "dtype"),
    *_rows(
        "model",
        ANY,
        "where the VAE and text encoder run while caching (the cache picks the device)",
        "vae_device",
        "te_device",
        "vae_dtype",
        "te_dtype",
    ),
    *_rows("model", _NO_PATH, "a refiner", "refiner_name_or_path"),
    *_rows("model", ANY, "the refiner start (used only with a refiner)", "refiner_start_at"),
    *_rows("model", (None,), "a latent space version", "latent_space_version"),
    *_rows("model", (True,), "dropping a text encoder", "use_text_encoder_1", "use_text_encoder_2"),
    *_rows("model", _NO_PATH, "a separate transformer file", "unet_path"),
    *_rows("model", (None,), "a sample size override", "unet_sample_size"),
    *_rows("model", _OFF, "attention masking of the text", "attn_masking"),
    *_rows(
        "model",
        (None, []),
        "model-level module filters",
        "ignore_if_contains",
        "only_if_contains",
        fix="use network.network_kwargs.ignore_if_contains / only_if_contains",
    ),
    *_rows("model", ({},), "quantization options", "quantize_kwargs"),
    *_rows("model", _OFF, "splitting a model over GPUs", "split_model_over_gpus"),
    *_rows(
        "model",
        ANY,
        "its split ratio (used only with split_model_over_gpus)",
        "split_model_other_module_param_count_scale",
    ),
    *_rows(
        "model",
        _OFF,
        "ai-toolkit's automatic layer offloading",
        "layer_offloading",
        "auto_memory",
        fix="set model.low_vram: true (the inactive expert waits in CPU memory) or model.quantize: true",
    ),
    *_rows(
        "model",
        ANY,
        "layer offloading shares (used only with layer_offloading)",
        "layer_offloading_transformer_percent",
        "layer_offloading_text_encoder_percent",
    ),
    *_rows(
        "model",
        ANY,
        "torch.compile settings: blocks are compiled one by one, the token dimension dynamic (train.compile)",
        "block_compile",
        "compile_mode",
        "compile_fullgraph",
        "compile_dynamic",
        "cache_size_limit",
    ),
    *_rows("model", ({},), "per-component model paths", "model_paths"),
    *_rows("model", _OFF, "in-context training", "in_context"),
    # --- sample ----------------------------------------------------------------------------------------
    *_rows(
        "sample",
        ("flowmatch",),
        "a sampler other than the pipeline's flow-matching UniPC",
        "sampler",
        fix="set sampler: flowmatch",
    ),
    *_rows("sample", ANY, "the sample file format; samples are mp4 files", "format"),
    *_rows("sample", ANY, "the refiner start (Wan has no refiner)", "refiner_start_at"),
    *_rows("sample", (1, 1.0), "a LoRA strength other than 1 in samples", "network_multiplier"),
    *_rows("sample", (0, 0.0), "guidance rescale", "guidance_rescale"),
    *_rows("sample", (1, 1.0), "adapter conditioning", "adapter_conditioning_scale"),
    *_rows("sample", _NO_LIST, "extra values", "extra_values"),
    *_rows("sample", _OFF, "CFG normalisation", "do_cfg_norm"),
    *_rows("sample.samples[]", (1, 1.0), "a LoRA strength other than 1 in samples", "network_multiplier"),
    *_rows(
        "sample.samples[]",
        (None,),
        "per-prompt sample settings",
        "width",
        "height",
        "neg",
        "guidance_scale",
        "sample_steps",
        "fps",
        "num_frames",
        fix="set it in the sample section",
    ),
    *_rows(
        "sample.samples[]",
        _NO_PATH,
        "a control image under ai-toolkit's multi-image name",
        "ctrl_img_1",
        fix="use ctrl_img",
    ),
    *_rows("sample.samples[]", (0,), "a control image index", "ctrl_idx"),
    *_rows(
        "sample.samples[]",
        _NO_PATH,
        "extra control images (I2V takes one first frame: ctrl_img)",
        "ctrl_img_2",
        "ctrl_img_3",
    ),
    *_rows("sample.samples[]", _OFF, "CFG normalisation", "do_cfg_norm"),
)

BY_PATH: dict[str, AitkKey] = {k.path: k for k in KEYS}
assert len(BY_PATH) == len(KEYS), "one row per key"


def keys_in(section: str) -> list[str]:
    """The table's keys of one section (for the closest-key suggestion of a typo)."""
    return [k.key for k in KEYS if k.section == section]


def lookup(section: str, key: str) -> AitkKey | None:
    """The row of `key` in `section` ("" for the process, "datasets[]" for any dataset, ...)."""
    return BY_PATH.get(f"{section}.{key}" if section else key)


# --- aliases: ai-toolkit keys that set a field under another name ---------------------------------


@dataclass(frozen=True)
class Alias:
    """`path` sets the field `target`, as ai-toolkit reads it.

    how: "rename" (both given must agree), "fallback" (used only when `target` is absent, as
    ai-toolkit's `linear_alpha` defaults to `alpha`), "or" (true turns the target on: ai-toolkit's
    `model.compile` and this project's `train.compile` are one switch), "equal" (ai-toolkit reads
    it but trains LoRAs at the target's value: accepted only when the two agree).
    """

    path: str
    target: str
    how: str
    note: str


ALIASES: tuple[Alias, ...] = (
    Alias("network.rank", "network.linear", "rename", "the LoRA rank; ai-toolkit's rank wins over linear"),
    Alias("network.alpha", "network.linear_alpha", "fallback", "linear_alpha's default in ai-toolkit"),
    Alias("model.compile", "train.compile", "or", "torch.compile of the transformer blocks"),
    Alias(
        "train.lr_warmup_steps",
        "train.lr_scheduler_params.num_warmup_steps",
        "rename",
        "warm-up of constant_with_warmup",
    ),
    Alias("train.unet_lr", "train.lr", "equal", "ai-toolkit trains a LoRA at train.lr whatever unet_lr says"),
)


def apply_aliases(process: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """`process` (a raw process mapping) with every alias moved onto its field; conflicts -> `problems`."""
    process = copy.deepcopy(process)
    for alias in ALIASES:
        parent = _section(process, alias.path.rpartition(".")[0], create=False)
        key = alias.path.rpartition(".")[2]
        if parent is None or key not in parent:
            continue
        value = parent.pop(key)
        target = _section(process, alias.target.rpartition(".")[0], create=True)
        if target is None:  # the section is not a mapping: validation reports it
            continue
        problem = _merge(alias, value, target, alias.target.rpartition(".")[2])
        if problem is not None:
            problems.append(problem)
    return process


def _merge(alias: Alias, value: Any, target: dict[str, Any], key: str) -> str | None:
    present = key in target and target[key] is not None
    if alias.how == "rename":
        if present and not _same_number(target[key], value):
            return f"{alias.path}: {_show(value)} and {alias.target}: {_show(target[key])} disagree ({alias.note}); keep one"
        target[key] = value
    elif alias.how == "fallback":
        if not present:
            target[key] = value
    elif alias.how == "or":
        if value is True:
            target[key] = True
        elif value not in (False, None):
            return f"{alias.path}: expected true or false, got {_show(value)}"
    else:
        assert alias.how == "equal", f"unknown alias kind {alias.how}"
        if not present or not _same_number(target[key], value):
            given = _show(target[key]) if present else "not set"
            return (
                f"{alias.path}: {_show(value)} is not what trains: {alias.note} ({alias.target} is "
                f"{given}); set {alias.target} to the rate you want and remove {alias.path}"
            )
    return None


def _section(process: dict[str, Any], path: str, *, create: bool) -> dict[str, Any] | None:
    node: Any = process
    for part in path.split(".") if path else []:
        if not isinstance(node, dict):
            return None
        if part not in node or node[part] is None:
            if not create:
                return None
            node[part] = {}
        node = node[part]
    return node if isinstance(node, dict) else None


def _same_number(a: Any, b: Any) -> bool:
    """YAML reads `1e-4` as a string: compare numbers as numbers."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return bool(a == b)


# --- the README's key reference (tests/test_aitk_files.py checks README.md against it) -------------


def reference_markdown(fields: dict[str, list[str]]) -> str:
    """The ai-toolkit keys and what each does here, as markdown: `fields` are the implemented keys
    by section (from the config models), then the aliases, then this table grouped."""
    lines = ["| section | implemented keys |", "|---|---|"]
    lines += [f"| `{s or '(process)'}` | {', '.join(f'`{k}`' for k in keys)} |" for s, keys in fields.items()]
    lines += ["", "| ai-toolkit key | here |", "|---|---|"]
    lines += [f"| `{a.path}` | `{a.target}` ({_ALIAS_WORDS[a.how]}; {a.note}) |" for a in ALIASES]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for row in KEYS:
        accepted = "any value" if row.accepts == ANY else " or ".join(f"`{_show(v)}`" for v in row.accepts)
        groups.setdefault((row.section or "(process)", accepted, row.asks), []).append(row.key)
    lines += [
        "",
        "| section | keys | accepted (listed in the one warning) | any other value asks for (an error) |",
    ]
    lines += ["|---|---|---|---|"]
    for (section, accepted, asks), keys in groups.items():
        refused = "never refused: " + asks if accepted == "any value" else asks
        lines.append(f"| `{section}` | {', '.join(f'`{k}`' for k in keys)} | {accepted} | {refused} |")
    return "\n".join(lines) + "\n"


_ALIAS_WORDS = {
    "rename": "the same key",
    "fallback": "used when that is not set",
    "or": "true turns it on",
    "equal": "accepted when equal",
}
