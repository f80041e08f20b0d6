"""Sidecar captions (docs/architecture.md §4): `[trigger]` / `[name]` handling and `default_caption`.

Caption dropout happens at training time (through the cached empty embedding), never here.
"""

from __future__ import annotations

import re
from pathlib import Path

_PLACEHOLDER = re.compile(r"\[(trigger|name)\]")


class CaptionError(ValueError):
    """A caption that cannot be used: missing with no default, not UTF-8, or empty."""


def caption_path(clip: Path, caption_ext: str) -> Path:
    return clip.with_suffix(caption_ext)


def read_caption(
    clip: Path, caption_ext: str, *, trigger: str | None, default: str | None, generated: str | None = None
) -> str:
    """The caption text of one clip, with the trigger word applied: the caption file when there is
    one (a user's caption always wins), else the captioner's `generated` text, else `default`."""
    path = caption_path(clip, caption_ext)
    if path.is_file():
        try:
            # utf-8-sig: Windows editors start UTF-8 files with a byte-order mark; it is not caption text.
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise CaptionError(f"{path}: caption is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    elif generated is not None:
        text = generated
    elif default is not None:
        text = default
    else:
        raise CaptionError(
            f"{path}: caption file missing for {clip.name}; write one, or set default_caption or "
            "auto_caption in the dataset"
        )
    # May be empty: the `captions` asset check and `wan-assets cache` report that (require_caption).
    return apply_trigger(" ".join(text.split()), trigger)


def require_caption(caption: str, clip: Path, caption_ext: str) -> str:
    if not caption.strip():
        raise CaptionError(f"{caption_path(clip, caption_ext)}: caption is empty")
    return caption


def apply_trigger(text: str, trigger: str | None) -> str:
    """Replace `[trigger]` and `[name]`; prepend the trigger when set and absent (as ai-toolkit)."""
    if not trigger:
        return " ".join(_PLACEHOLDER.sub("", text).split())
    text = _PLACEHOLDER.sub(trigger, text)
    if trigger not in text:
        text = f"{trigger}, {text}" if text else trigger
    return text
