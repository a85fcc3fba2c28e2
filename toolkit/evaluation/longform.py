"""Long-form evaluation: whole recordings through transformers' sequential long-form generation.

Each recording (of any length) is transcribed by ``WhisperForConditionalGeneration.generate`` on
its complete log-mel features with an attention mask, ``return_timestamps=True`` and
``condition_on_prev_tokens=True``: transformers decodes a 30 s window, cuts the output into
segments at its timestamp tokens, moves on to the last complete segment's end and decodes the next
window with the previous text as prompt, as openai-whisper's ``transcribe`` does. With
``temperature_fallback``, a window whose output compresses too well (a loop) or is too unlikely is
decoded again at higher temperatures, and a window judged silent is skipped (Whisper's thresholds,
:data:`FALLBACK`).

Besides the WER of the whole transcripts it counts, per 30 s window:

* ``windows``: windows decoded (transformers' ``monitor_progress`` reports each step of its window
  loop; a temperature retry of a window is not another window);
* ``windows_skipped``: windows that the fallback's no-speech rule dropped (no output kept);
* ``windows_without_timestamps``: the share of the windows with output in which the model wrote
  text but no timestamp token of its own (:func:`lacks_timestamps`). transformers' timestamp logits
  processor forces the first token of every window to be a timestamp, so that one says nothing
  about the model; what shows that the model segments is a timestamp after it. A model fine-tuned
  on ``<|notimestamps|>`` targets only talks on to the end of the window after the forced ``<|0.00|>``.
  A window with no text (``<|0.00|>`` and the end) is not counted: there was nothing to segment;
* ``repetition_rate``: the share of windows with output whose text repeats a 4-gram 3 or more times
  (:mod:`toolkit.evaluation.signals`). Per window and not per recording: a transcript of minutes
  can repeat a phrase honestly; a window that loops is the failure.

Sharding is :mod:`~toolkit.evaluation.generate`'s: recordings sorted by duration (longest first),
batch ``i`` of that order on rank ``i % world``, generation in rounds with the same out-of-memory
back-off, and exact counts summed over ranks; every batch holds the same recordings on 1 process
as on N, so the metrics are identical. With the fallback, sampling is seeded per batch (by its
first position in the sorted order), so that it too does not depend on the world size. Unlike
short-form evaluation this does not support ZeRO-3's synced generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from accelerate import PartialState

from toolkit.config import EvaluationConfig
from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.dataset import Example, SpeechDataset
from toolkit.evaluation.generate import (
    EvalResult,
    evaluating,
    gather_results,
    generation_config_for,
    walk_rounds,
)
from toolkit.evaluation.signals import repeated_ngram, share
from toolkit.evaluation.wer import CorpusCounts
from toolkit.oom import is_out_of_memory

logger = logging.getLogger(__name__)

LONG_FORM_MAX_SECONDS = 4 * 3600.0
"""Longest recording a long-form eval set may hold (the cache keeps each one whole, as 16-bit FLAC)."""

WINDOW_SAMPLES = 30 * SAMPLING_RATE
"""Whisper's window. A batch of shorter recordings is padded to it with silence, as short-form input is."""

FALLBACK: dict[str, Any] = {
    "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    # transformers compresses token ids, not text as openai-whisper does (2.4 there); 1.35 is its documented value
    "compression_ratio_threshold": 1.35,
    "logprob_threshold": -1.0,
    "no_speech_threshold": 0.6,
}
"""Whisper's temperature fallback, as transformers' long-form generate takes it."""

LONG_FORM_ADVICE = ("lower evaluation.max_new_tokens or evaluation.num_beams, cut the recordings shorter, or load "
                    "the model in a smaller dtype")
FALLBACK_SEED = 1234
"""Sampling seed of the fallback; a batch adds its first position in the sorted order."""


def max_new_tokens_for(config: Any, wanted: int) -> int:
    """``wanted``, capped so that the longest prompt transformers builds still fits the decoder.

    With the previous text as prompt, a window starts with up to ``max_target_positions // 2 - 1``
    previous tokens, ``<|startofprev|>`` and up to 4 start tokens (start of transcript, language,
    task); generate refuses a ``max_new_tokens`` that would not fit after them (448 positions: 220).
    """
    positions = config.max_target_positions
    return min(wanted, positions - (positions // 2 - 1) - 1 - 4)


@dataclass(frozen=True)
class LongFormSettings:
    """How :func:`evaluate_long_form` decodes: the recipe's ``evaluation`` section plus the run's settings."""

    batch_size: int = EvaluationConfig.batch_size
    """Recordings per generate() call on one process, at most (halved on out-of-memory)."""
    max_new_tokens: int = EvaluationConfig.max_new_tokens
    """Tokens generated per 30 s window, at most (capped by :func:`max_new_tokens_for`)."""
    num_beams: int = EvaluationConfig.num_beams
    """1 is greedy decoding (the fallback's sampled retries use one beam)."""
    temperature_fallback: bool = EvaluationConfig.temperature_fallback
    """Whisper's temperature fallback and no-speech skipping (:data:`FALLBACK`)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (they decode audio and compute the features)."""
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Context each generate() call runs in (the training run's mixed precision)."""
    collect_predictions: bool = False
    """Also return id/reference/prediction rows (gathered on every rank)."""
    language: str | None = None
    """Whisper language to decode in; None: the model's generation config's."""
    task: str | None = None
    """Whisper task to decode with; None: the model's generation config's."""

    @classmethod
    def from_config(cls, eval_cfg: EvaluationConfig, **run: Any) -> LongFormSettings:
        """``eval_cfg``'s batch size and decoding settings; ``run`` sets (or overrides) any field."""
        recipe = cls(batch_size=eval_cfg.batch_size, max_new_tokens=eval_cfg.max_new_tokens,
                     num_beams=eval_cfg.num_beams, temperature_fallback=eval_cfg.temperature_fallback)
        return dataclasses.replace(recipe, **run)


@dataclass
class LongFormBatch:
    """Whole recordings' features, padded to the longest (at least 30 s), and which frames are real."""

    input_features: torch.Tensor
    attention_mask: torch.Tensor
    ids: list[str]
    texts: list[str]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LongFormBatch:
        features = self.input_features.to(device, dtype=dtype) if dtype else self.input_features.to(device)
        return dataclasses.replace(self, input_features=features, attention_mask=self.attention_mask.to(device))

    def __len__(self) -> int:
        return len(self.ids)


class LongFormCollator:
    """Examples of any length -> :class:`LongFormBatch` (the feature extractor, without truncation)."""

    def __init__(self, feature_extractor: Any):
        self.feature_extractor = feature_extractor

    def __call__(self, examples: list[Example]) -> LongFormBatch:
        audio = [ex.audio for ex in examples]
        # Shorter than a window: padded to 30 s of silence, as Whisper's short-form input is.
        padding = "longest" if max(len(a) for a in audio) > WINDOW_SAMPLES else "max_length"
        out = self.feature_extractor(
            audio, sampling_rate=SAMPLING_RATE, padding=padding, max_length=WINDOW_SAMPLES, truncation=False,
            return_attention_mask=True, return_tensors="pt",
        )
        return LongFormBatch(out.input_features, out.attention_mask, [ex.id for ex in examples],
                             [ex.text for ex in examples])


class WindowCounter:
    """``monitor_progress`` for transformers' long-form generate: counts the windows of each recording.

    generate calls it once per step of its window loop with ``(seek, max_frames)`` of every recording
    in the batch; a recording whose ``seek`` is short of its ``max_frames`` gets a window decoded in
    that step.
    """

    def __init__(self, batch_size: int):
        self.counts = [0] * batch_size

    def __call__(self, progress: torch.Tensor) -> None:
        active = (progress[:, 0] < progress[:, 1]).tolist()
        for row, decoding in enumerate(active):
            self.counts[row] += int(decoding)


def window_tokens(segments: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """One recording's kept tokens, per window with output, in order.

    generate returns segments, not windows: the segments cut from one window's output all hold that
    decoding's ``result`` (the same object), so consecutive segments sharing it form one window. A
    window's tokens after its last complete segment are not kept (the next window decodes them again).
    """
    windows: list[list[int]] = []
    previous: Any = None
    for segment in segments:
        tokens = [int(t) for t in segment["tokens"].tolist()]
        if windows and segment["result"] is previous:
            windows[-1] += tokens
        else:
            windows.append(tokens)
        previous = segment["result"]
    return windows


def lacks_timestamps(tokens: Sequence[int], timestamp_begin: int) -> bool:
    """Whether a window's output has text but no timestamp token after its first token (which
    transformers' logits processor forces to be one, so it says nothing about the model)."""
    return len(tokens) > 1 and not any(token >= timestamp_begin for token in tokens[1:])


@dataclass
class Transcript:
    """One recording's long-form output."""

    windows: int
    """Windows decoded, skipped ones included."""
    kept: list[list[int]]
    """Tokens of each window with output (timestamps included)."""


@dataclass
class WindowCounts:
    """Per-window failure signals, as counts that add up across processes."""

    windows: int = 0
    skipped: int = 0
    without_timestamps: int = 0
    repeated: int = 0

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    def metrics(self) -> dict[str, float | int]:
        with_output = self.windows - self.skipped
        return {
            "windows": self.windows,
            "windows_skipped": self.skipped,
            "windows_without_timestamps": share(self.without_timestamps, with_output),
            "repetition_rate": share(self.repeated, with_output),
        }


def transcribe(
    model: Any, batch: LongFormBatch, gen_config: Any, settings: LongFormSettings, *, seed: int = FALLBACK_SEED,
    logits_processor: Any = None,
) -> list[Transcript]:
    """Long-form generate on one batch (on the model's device); ``seed`` seeds the fallback's sampling.

    ``logits_processor``: extra processors for generate (tests script the output with one).
    """
    counter = WindowCounter(len(batch))
    fallback = FALLBACK if settings.temperature_fallback else {}
    rng_devices = [batch.input_features.device] if batch.input_features.device.type == "cuda" else []
    # Sampling draws from the global generator: seed it per batch, and leave the caller's stream as it was.
    with torch.random.fork_rng(devices=rng_devices), settings.autocast():
        torch.manual_seed(seed)
        out = model.generate(
            batch.input_features, attention_mask=batch.attention_mask, generation_config=gen_config,
            return_timestamps=True, condition_on_prev_tokens=True, return_segments=True,
            monitor_progress=counter, logits_processor=logits_processor, **fallback,
        )
    transcripts = [Transcript(n, window_tokens(segments)) for n, segments in zip(counter.counts, out["segments"],
                                                                                   strict=True)]
    for transcript in transcripts:
        if len(transcript.kept) > transcript.windows:
            raise RuntimeError(f"long-form generate returned {len(transcript.kept)} windows with output but "
                               f"decoded {transcript.windows}: this transformers version groups segments otherwise")
    return transcripts


@dataclass
class _LongForm:
    """One :func:`evaluate_long_form` call: what every round uses, and what the rounds kept so far."""

    model: Any
    dataset: SpeechDataset
    collator: LongFormCollator
    tokenizer: Any
    normalize: Callable[[str], str]
    settings: LongFormSettings
    state: PartialState
    gen_config: Any
    device: torch.device
    dtype: torch.dtype
    counts: CorpusCounts = field(default_factory=CorpusCounts.zero)
    windows: WindowCounts = field(default_factory=WindowCounts)
    predictions: list[dict[str, str]] = field(default_factory=list)

    @property
    def timestamp_begin(self) -> int:
        return self.gen_config.no_timestamps_token_id + 1

    def record(self, batch: LongFormBatch, transcripts: list[Transcript]) -> None:
        """Count a round's batch (called only once every rank has agreed that the round succeeded)."""
        hypotheses = []
        for transcript in transcripts:
            tokens = [token for window in transcript.kept for token in window]
            hypotheses.append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
            self.windows.windows += transcript.windows
            self.windows.skipped += transcript.windows - len(transcript.kept)
            for window in transcript.kept:
                self.windows.without_timestamps += lacks_timestamps(window, self.timestamp_begin)
                text = self.normalize(self.tokenizer.decode(window, skip_special_tokens=True))
                self.windows.repeated += repeated_ngram(text.split())
        self.counts.add_batch(batch.texts, hypotheses, self.normalize)
        if self.settings.collect_predictions:
            self.predictions += [{"id": i, "reference": r, "prediction": h}
                                 for i, r, h in zip(batch.ids, batch.texts, hypotheses, strict=True)]


@torch.no_grad()
def evaluate_long_form(
    model: Any,
    dataset: SpeechDataset,
    feature_extractor: Any,
    tokenizer: Any,
    normalize: Callable[[str], str],
    settings: LongFormSettings,
) -> EvalResult:
    """Transcribe every recording of ``dataset`` on all ranks; the corpus metrics are the same on every rank.

    ``metrics``: the short-form corpus metrics of the whole transcripts (``wer``, ``wer_ortho``,
    ``cer``, ``num_samples``, ``reference_words``), ``insertion_rate``, the window signals of
    :class:`WindowCounts`, ``audio_seconds`` and ``seconds``.
    """
    state = PartialState()
    start = time.perf_counter()
    with evaluating(model) as param:
        run = _LongForm(
            model, dataset, LongFormCollator(feature_extractor), tokenizer, normalize, settings, state,
            gen_config=generation_config_for(
                model, max_new_tokens=max_new_tokens_for(model.config, settings.max_new_tokens),
                num_beams=settings.num_beams, language=settings.language, task=settings.task,
            ),
            device=param.device, dtype=param.dtype,
        )
        size, backoffs = walk_rounds(run, _decode_round, "recording", LONG_FORM_ADVICE)
    local = torch.tensor([*run.counts.to_tensor().tolist(), *run.windows.as_list()], dtype=torch.long)
    summed, predictions = gather_results(state, local, run.predictions, settings.collect_predictions)
    total = CorpusCounts.from_tensor(summed[:-4])
    windows = WindowCounts(*(int(v) for v in summed[-4:].tolist()))
    metrics = {**total.metrics(), **windows.metrics(), "temperature_fallback": settings.temperature_fallback,
               "audio_seconds": round(float(dataset.durations.sum()), 3)}
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return EvalResult(metrics, predictions, batch_size=size, backoffs=[b.to_dict() for b in backoffs], counts=total)


def _decode_round(run: _LongForm, batch: LongFormBatch | None, size: int, first: int) -> tuple[list[Transcript], bool]:
    """This rank's part of one round: ``(transcripts, False)``, or ``([], True)`` if it ran out of memory.
    The fallback's sampling is seeded by the batch's place in the sorted order (``first``)."""
    if batch is None:
        return [], False
    try:
        seed = FALLBACK_SEED + first
        return transcribe(run.model, batch.to(run.device, run.dtype), run.gen_config, run.settings, seed=seed), False
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    return [], True
