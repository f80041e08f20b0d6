"""The embedded tiny captioner: a Qwen2.5-VL-shaped vision-language model built offline (docs/architecture.md §4).

Same classes and folder files as `Qwen/Qwen2.5-VL-7B-Instruct` (`config.json`, safetensors weights,
`preprocessor_config.json`, a byte-level BPE `tokenizer.json` with Qwen's special tokens and chat
template), with toy widths and random weights, so the captioning code path is the real one; the
captions it writes are gibberish made of English words and bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from wan_assets.core.model.tiny import tiny_words, write_tiny_folder

MARKER_FILE = "wan_assets_tiny_captioner.json"

# Qwen2's special tokens, in Qwen's order (there they start at id 151643; here at 0).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL / Qwen2.5-VL's chat template (the Instruct models ship it): each image becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the processor widens to the image's tokens.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The language model: Qwen2.5's decoder (GQA, M-RoPE over time/height/width) with toy widths.
# head_dim 8 -> 4 rotary pairs, split over (t, h, w) as mrope_section.
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1_000_000.0},
}

# The vision tower: Qwen2.5-VL's ViT (14px patches, 2x2 merge, windowed attention with one
# full-attention block), with toy widths; its output width must equal the language model's.
TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 4,
    "out_hidden_size": TINY_TEXT["hidden_size"],
    "fullatt_block_indexes": [1],
    "window_size": 56,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def build_tiny_captioner(out_dir: Path, seed: int = 0) -> Path:
    """Write the seeded tiny captioner to `out_dir` and return it.

    The folder appears atomically (built beside it, then renamed); an existing folder is replaced
    only if it is an earlier tiny captioner build.
    """

    def write(staging: Path) -> None:
        tokenizer = tiny_qwen_tokenizer()
        tiny_captioner_model(tokenizer, seed).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # The real folder's image processor settings (Qwen2.5-VL-7B-Instruct's preprocessor_config).
        Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(staging)

    marker = {"seed": seed, "note": "embedded tiny Qwen2.5-VL-shaped captioner (random weights)"}
    return write_tiny_folder(Path(out_dir), "tiny captioner", MARKER_FILE, marker, write)


def tiny_captioner_model(tokenizer: Qwen2Tokenizer, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}  # as tiny_qwen_tokenizer asserts
    text = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=TINY_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # fork_rng keeps the caller's global RNG untouched; the seed alone fixes every weight.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE (its pre-tokenizer, special tokens and chat template), with merges
    learnt offline from the embedded English words, so known words are one token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    text = " ".join(tiny_words())
    bpe.train_from_iterator([text, text.capitalize(), text.upper()], trainer)
    learnt = json.loads(bpe.to_str())["model"]
    # Pairs, as tokenizers' BPE takes them (transformers annotates the argument as strings).
    merges: Any = [tuple(pair) for pair in learnt["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=learnt["vocab"],
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",  # generation pads on the left, as the Qwen2.5-VL processor does
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tokenizer
