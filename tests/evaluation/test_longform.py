"""Long-form evaluation: window counting on hand-made and scripted output, 1 vs 2 processes, the real tiny.en."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import LogitsProcessor

from tests.conftest import SHARED_DATA, SHARED_MODEL, last_json_line, launch, needs_shared
from toolkit.evaluation.longform import (
    LongFormCollator,
    LongFormSettings,
    WindowCounter,
    WindowCounts,
    lacks_timestamps,
    max_new_tokens_for,
    transcribe,
    window_tokens,
)

SR = 16_000
WINDOW_KEYS = ("windows", "windows_skipped", "windows_without_timestamps", "repetition_rate")
METRIC_KEYS = ("wer", "wer_ortho", "cer", "num_samples", "reference_words", *WINDOW_KEYS)


def write_long_audiofolder(root: Path, clips: Path, seconds: list[float], gap: float = 0.5) -> Path:
    """Recordings of at least ``seconds`` each: the audiofolder ``clips``' clips in turn, ``gap`` s apart
    (whole clips: a recording ends after the clip that reaches its length)."""
    rows = list(csv.DictReader((clips / "metadata.csv").open()))
    root.mkdir(parents=True, exist_ok=True)
    table, next_clip = [], 0
    for number, target in enumerate(seconds):
        parts, texts = [], []
        while sum(map(len, parts)) < target * SR:
            row = rows[next_clip % len(rows)]
            next_clip += 1
            audio, rate = sf.read(clips / row["file_name"], dtype="float32")
            assert rate == SR
            parts += [audio, np.zeros(int(gap * SR), dtype=np.float32)]
            texts.append(row["sentence"])
        name = f"recording-{number}.flac"
        sf.write(root / name, np.concatenate(parts[:-1]), SR)
        table.append({"file_name": name, "sentence": " ".join(texts)})
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "sentence"])
        writer.writeheader()
        writer.writerows(table)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """Decode in-process on one thread: on a small CPU machine shared with other jobs, two threads
    decode several times slower (measured: 53 s against 10 s for the tiny.en test below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- window counting on hand-made output ------------------------------------------------------------

def test_segments_of_one_window_share_its_result() -> None:
    first, second = object(), object()  # two windows' decodings
    segments = [
        {"tokens": torch.tensor([100, 1, 2, 150, 150]), "result": first},
        {"tokens": torch.tensor([150, 3, 200, 200]), "result": first},
        {"tokens": torch.tensor([100, 4, 5]), "result": second},
    ]
    assert window_tokens(segments) == [[100, 1, 2, 150, 150, 150, 3, 200, 200], [100, 4, 5]]
    assert window_tokens([]) == []
    # Timestamps start at 100: the first token of a window is forced to be one and does not count.
    assert [lacks_timestamps(tokens, 100) for tokens in window_tokens(segments)] == [False, True]
    assert not lacks_timestamps([100, 7, 120], 100)  # one closing timestamp is enough
    assert not lacks_timestamps([100], 100) and not lacks_timestamps([], 100)  # no text: nothing to segment
    assert lacks_timestamps([5, 7, 8], 100)  # timestamps suppressed altogether


def test_window_counter_counts_the_steps_each_recording_is_decoded_in() -> None:
    counter = WindowCounter(3)
    for seek in ([0, 0, 0], [3000, 1200, 3000], [4000, 4200, 5500], [4000, 6000, 7000]):
        counter(torch.stack([torch.tensor(seek), torch.tensor([4000, 7000, 7000])], dim=1))
    assert counter.counts == [2, 4, 3]


def test_window_shares_leave_skipped_windows_out() -> None:
    counts = WindowCounts(windows=10, skipped=2, without_timestamps=2, repeated=1)
    assert counts.metrics() == {"windows": 10, "windows_skipped": 2, "windows_without_timestamps": 0.25,
                                "repetition_rate": 0.125}
    assert WindowCounts().metrics()["windows_without_timestamps"] == 0.0


def test_the_token_limit_leaves_room_for_the_previous_text() -> None:
    from types import SimpleNamespace

    from toolkit.config import EvaluationConfig

    assert max_new_tokens_for(SimpleNamespace(max_target_positions=448), 225) == 220
    assert max_new_tokens_for(SimpleNamespace(max_target_positions=448), 100) == 100
    settings = LongFormSettings.from_config(EvaluationConfig(batch_size=3, temperature_fallback=True), num_workers=2)
    assert (settings.batch_size, settings.temperature_fallback, settings.num_workers) == (3, True, 2)


# -- transformers' window loop on scripted output ---------------------------------------------------

class ScriptedOutput(LogitsProcessor):
    """Forces generate's tokens: ``scripts[k % len(scripts)]`` in the k-th window step, then end of text."""

    def __init__(self, scripts: list[list[int]], eos: int):
        self.scripts, self.eos = scripts, eos
        self.begin_index, self.calls = 0, -1

    def set_begin_index(self, begin_index: int) -> None:  # generate sets it for each window's prompt
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.begin_index
        self.calls += step == 0
        script = self.scripts[self.calls % len(self.scripts)]
        forced = torch.full_like(scores, -math.inf)
        forced[:, script[step] if step < len(script) else self.eos] = 0.0
        return forced


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    from toolkit.config import ModelConfig
    from toolkit.modeling import load_model

    return load_model(ModelConfig(name_or_path=str(tiny_model)), dtype=None, device="cpu")


def tone_examples(seconds: list[float]) -> list:
    from toolkit.data.dataset import Example
    from toolkit.data.pcm import quantize

    examples = []
    for number, length in enumerate(seconds):
        t = np.arange(int(length * SR)) / SR
        pcm, scale = quantize((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
        examples.append(Example(f"r{number}", pcm, scale, "a b", None))
    return examples


def test_windows_follow_the_timestamps_the_model_puts(tiny) -> None:
    """Scripted windows alternate: A closes a segment at 10 s (the next window starts there), B has
    no timestamp after the forced first one (the next window starts 30 s on). 40 s and 70 s,
    batched: A both (0 -> 10 s), B both (-> 40 s: the first is done), A (-> 50 s), B (-> 70 s)."""
    from toolkit.evaluation.generate import generation_config_for

    model, tokenizer = tiny.model, tiny.processor.tokenizer
    gen = generation_config_for(model, max_new_tokens=8, num_beams=1)
    stamp = gen.no_timestamps_token_id + 1  # <|0.00|>
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    scripts = [[stamp, a, stamp + 500, stamp + 500, b], [stamp, a, b]]  # <|10.00|><|10.00|> closes a segment
    batch = LongFormCollator(tiny.processor.feature_extractor)(tone_examples([40.0, 70.0]))
    assert batch.input_features.shape[-1] == 7000 and batch.attention_mask.sum(-1).tolist() == [4000, 7000]
    rng = torch.get_rng_state()
    transcripts = transcribe(model, batch, gen, LongFormSettings(), logits_processor=[ScriptedOutput(scripts, gen.eos_token_id)])
    assert [t.windows for t in transcripts] == [2, 4]
    assert [[lacks_timestamps(w, stamp) for w in t.kept] for t in transcripts] == [[False, True], [False, True] * 2]
    assert transcripts[0].kept[0] == [stamp, a, stamp + 500, stamp + 500]  # what follows the last segment is dropped
    assert tokenizer.decode(transcripts[0].kept[1], skip_special_tokens=True) == "ab"  # no timestamp text
    assert torch.equal(torch.get_rng_state(), rng)  # the per-batch seed leaves the caller's generator alone


def test_a_short_recording_is_one_window_padded_to_30_s(tiny) -> None:
    batch = LongFormCollator(tiny.processor.feature_extractor)(tone_examples([12.0, 5.0]))
    assert batch.input_features.shape[-1] == 3000 and batch.attention_mask.sum(-1).tolist() == [1200, 500]


def test_the_fallback_samples_the_same_for_the_same_seed(tiny) -> None:
    from toolkit.evaluation.generate import generation_config_for

    gen = generation_config_for(tiny.model, max_new_tokens=4, num_beams=1)
    batch = LongFormCollator(tiny.processor.feature_extractor)(tone_examples([35.0]))
    settings = LongFormSettings(temperature_fallback=True)
    runs = [transcribe(tiny.model, batch, gen, settings, seed=seed) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0][0].windows >= 2


# -- end to end ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_tones(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four recordings of 40 to 72 s (tone clips of the ``corpus`` fixture, 0.5 s apart): 2, 2, 2 and 3 windows."""
    return write_long_audiofolder(tmp_path_factory.mktemp("long") / "dev", corpus / "train", [40.0, 50.0, 55.0, 70.0])


@pytest.mark.slow
def test_long_form_metrics_are_the_same_on_one_and_two_processes(tiny_model: Path, long_tones: Path) -> None:
    """The tiny model's generation config suppresses timestamp tokens: every window runs its full
    30 s, so the window count is known (2 + 2 + 2 + 3), and none has a timestamp."""
    from toolkit.config import DataConfig, EvaluationConfig, ModelConfig
    from toolkit.evaluation.run import run_evaluate

    one = run_evaluate(ModelConfig(name_or_path=str(tiny_model)), DataConfig(eval=str(long_tones), num_workers=0),
                       EvaluationConfig(batch_size=2, max_new_tokens=6, long_form=True))
    args = ["evaluate", "--model", str(tiny_model), "--data", str(long_tones), "--long-form", "--batch-size", "2",
            "--max-new-tokens", "6", "--num-workers", "1"]
    result = launch(args, processes=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = last_json_line(result.stdout)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert {k: two[k] for k in METRIC_KEYS} == {k: one[k] for k in METRIC_KEYS}
    assert (one["num_samples"], one["windows"], one["windows_without_timestamps"]) == (4, 9, 1.0)
    seconds = sum(sf.info(path).duration for path in long_tones.glob("*.flac"))
    assert one["skipped"] == 0 and one["temperature_fallback"] is False
    assert one["audio_seconds"] == pytest.approx(seconds, abs=0.01)


@pytest.mark.slow
def test_the_fallback_is_the_same_on_one_and_two_processes(tiny_model: Path, long_tones: Path) -> None:
    """A random model fails the fallback's thresholds: each window is sampled at every temperature."""
    from toolkit.config import DataConfig, EvaluationConfig, ModelConfig
    from toolkit.evaluation.run import run_evaluate

    one = run_evaluate(ModelConfig(name_or_path=str(tiny_model)), DataConfig(eval=str(long_tones), num_workers=0),
                       EvaluationConfig(batch_size=2, max_new_tokens=4, long_form=True, temperature_fallback=True))
    args = ["evaluate", "--model", str(tiny_model), "--data", str(long_tones), "--long-form", "--temperature-fallback",
            "--batch-size", "2", "--max-new-tokens", "4", "--num-workers", "0"]
    result = launch(args, processes=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = last_json_line(result.stdout)
    assert {k: two[k] for k in METRIC_KEYS} == {k: one[k] for k in METRIC_KEYS}
    assert one["temperature_fallback"] is True and one["windows"] >= 9


def _evaluate_long_form(tiny, data: Path, limit: int | None):
    """evaluate_long_form at eval batch 4, with forward passes over ``limit`` recordings out of memory."""
    from toolkit.config import DataConfig
    from toolkit.data.pipeline import load_split
    from toolkit.evaluation.longform import LONG_FORM_MAX_SECONDS, evaluate_long_form
    from toolkit.evaluation.normalize import make_normalizer
    from toolkit.oom import OutOfMemoryInjector

    split = load_split("eval", DataConfig(eval=str(data), max_duration_s=LONG_FORM_MAX_SECONDS), None)
    tokenizer = tiny.processor.tokenizer
    handle = OutOfMemoryInjector(rank=0, limit=limit).attach(tiny.model, 0) if limit is not None else None
    try:
        return evaluate_long_form(tiny.model, split.dataset, tiny.processor.feature_extractor, tokenizer,
                                  make_normalizer(tiny.english, tokenizer),
                                  LongFormSettings(batch_size=4, max_new_tokens=4, collect_predictions=True))
    finally:
        if handle is not None:
            handle.remove()


def test_long_form_generation_backs_off_to_the_size_that_fits(tiny, long_tones: Path) -> None:
    plain, backed = _evaluate_long_form(tiny, long_tones, None), _evaluate_long_form(tiny, long_tones, 1)
    assert (plain.batch_size, plain.backoffs) == (4, [])
    assert (backed.batch_size, backed.backoffs) == (1, [{"from": 4, "to": 2}, {"from": 2, "to": 1}])
    assert {k: backed.metrics[k] for k in METRIC_KEYS} == {k: plain.metrics[k] for k in METRIC_KEYS}
    assert backed.predictions == plain.predictions and plain.metrics["windows"] == 9


def test_bad_long_form_options_are_refused(tiny_model: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.cli import EXIT_CONFIG, main

    base = ["evaluate", "--model", str(tiny_model), "--data", str(corpus / "dev")]
    assert main([*base, "--temperature-fallback"]) == EXIT_CONFIG
    assert "evaluation.temperature_fallback needs evaluation.long_form" in capsys.readouterr().err
    assert main([*base, "--long-form", "--static-cache"]) == EXIT_CONFIG
    assert "static_cache is for short-form decoding" in capsys.readouterr().err


@needs_shared
@pytest.mark.slow
def test_pretrained_tiny_en_segments_long_espeak_recordings(tmp_path: Path) -> None:
    """Two 35 s recordings of espeak dev sentences: the pretrained model closes segments in its windows.
    Measured: wer 28.9, 4 windows, none without timestamps, no repetition."""
    from toolkit.config import DataConfig, EvaluationConfig, ModelConfig
    from toolkit.evaluation.run import run_evaluate

    data = write_long_audiofolder(tmp_path / "long", SHARED_DATA / "dev", [35.0, 35.0], gap=1.0)
    metrics = run_evaluate(ModelConfig(name_or_path=str(SHARED_MODEL)), DataConfig(eval=str(data), num_workers=0),
                           EvaluationConfig(batch_size=2, long_form=True))
    assert metrics["num_samples"] == 2
    assert metrics["windows"] >= 4  # each recording needs a second window
    assert metrics["windows_without_timestamps"] <= 0.25 and metrics["repetition_rate"] <= 0.25
    assert metrics["wer"] < 45
