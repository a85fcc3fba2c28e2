"""Which Whisper model to plan for: the official checkpoints' sizes and the config lookup.

:func:`resolve_config` turns what ``--model`` accepts (a size such as ``large-v3``, a local model
directory or ``config.json``, or a Hub id) into a ``WhisperConfig``. The official sizes are known
here (:data:`SIZES`), so the common case needs neither the Hub nor any download.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.config import WHISPER_MAX_TARGET_POSITIONS

ENCODER_POSITIONS = 1500
"""Encoder sequence after the conv stem for a 30 s window (3000 mel frames, stride 2)."""


class PlanError(ValueError):
    """The model cannot be resolved or an argument is out of range; the message says why."""


@dataclass(frozen=True)
class WhisperSize:
    """The architecture fields of an official checkpoint's ``config.json``."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    attention_heads: int
    ffn_dim: int
    vocab_size: int = 51865
    """51865 multilingual, 51864 English-only (.en), 51866 from large-v3 on (one more language)."""
    num_mel_bins: int = 80
    """128 from large-v3 on."""

    def config(self) -> Any:
        """The ``WhisperConfig`` of this size (transformers' defaults for everything else)."""
        from transformers import WhisperConfig

        return WhisperConfig(
            vocab_size=self.vocab_size,
            num_mel_bins=self.num_mel_bins,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            encoder_attention_heads=self.attention_heads,
            decoder_attention_heads=self.attention_heads,
            encoder_ffn_dim=self.ffn_dim,
            decoder_ffn_dim=self.ffn_dim,
            max_source_positions=ENCODER_POSITIONS,
            max_target_positions=WHISPER_MAX_TARGET_POSITIONS,
        )


_LARGE = dict(d_model=1280, attention_heads=20, ffn_dim=5120)
SIZES: dict[str, WhisperSize] = {
    "tiny": WhisperSize(384, 4, 4, 6, 1536),
    "tiny.en": WhisperSize(384, 4, 4, 6, 1536, vocab_size=51864),
    "base": WhisperSize(512, 6, 6, 8, 2048),
    "base.en": WhisperSize(512, 6, 6, 8, 2048, vocab_size=51864),
    "small": WhisperSize(768, 12, 12, 12, 3072),
    "small.en": WhisperSize(768, 12, 12, 12, 3072, vocab_size=51864),
    "medium": WhisperSize(1024, 24, 24, 16, 4096),
    "medium.en": WhisperSize(1024, 24, 24, 16, 4096, vocab_size=51864),
    "large": WhisperSize(encoder_layers=32, decoder_layers=32, **_LARGE),
    "large-v2": WhisperSize(encoder_layers=32, decoder_layers=32, **_LARGE),
    "large-v3": WhisperSize(encoder_layers=32, decoder_layers=32, vocab_size=51866, num_mel_bins=128, **_LARGE),
    # large-v3-turbo: large-v3's encoder with 4 decoder layers.
    "turbo": WhisperSize(encoder_layers=32, decoder_layers=4, vocab_size=51866, num_mel_bins=128, **_LARGE),
}
ALIASES = {"large-v1": "large", "large-v3-turbo": "turbo"}


def size_name(name: str) -> str | None:
    """The :data:`SIZES` key for ``small``, ``whisper-small``, ``openai/whisper-small.en``, ...; else None."""
    key = name.strip().lower()
    for prefix in ("openai/", "whisper-"):
        key = key.removeprefix(prefix)
    key = ALIASES.get(key, key)
    return key if key in SIZES else None


def resolve_config(name: str) -> tuple[str, Any]:
    """A display name and a ``WhisperConfig`` for a size name, a local directory or a Hub id."""
    known = size_name(name)
    if known is not None:
        return f"whisper-{known}", SIZES[known].config()
    path = Path(name).expanduser()
    if path.is_dir() or path.suffix == ".json":
        return _local_config(name, path)
    if "/" not in name:
        close = difflib.get_close_matches(name.lower().removeprefix("whisper-"), list(SIZES) + list(ALIASES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise PlanError(
            f"unknown Whisper model {name!r}{hint}: give a size ({', '.join(SIZES)}), "
            "a local directory with a config.json, or a Hub id"
        )
    return name.rsplit("/", 1)[-1], _hub_config(name)


def _local_config(name: str, path: Path) -> tuple[str, Any]:
    """A model directory's ``config.json``, or a JSON file given directly."""
    from transformers import WhisperConfig

    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise PlanError(f"{name}: no config.json there (a Whisper model directory has one)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{file}: not a readable JSON config ({exc})") from exc
    if raw.get("model_type", "whisper") != "whisper":
        raise PlanError(f"{file}: model_type is {raw.get('model_type')!r}, not 'whisper'")
    return path.name or str(path), WhisperConfig.from_dict(raw)


def _hub_config(name: str) -> Any:
    """The config of Hub repository ``name``; any failure becomes one :class:`PlanError` line."""
    from transformers import WhisperConfig

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # not one "Retrying in 1s" line per attempt when offline
    try:
        return WhisperConfig.from_pretrained(name)
    except Exception as exc:  # offline, unknown repository, not a Whisper config: all the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(
            f"could not read the config of {name!r} from the Hugging Face Hub ({first}). Offline, give the "
            f"size instead ({', '.join(SIZES)}) or a local directory with its config.json"
        ) from exc
    finally:
        hub_logger.setLevel(level)
