"""Model loading: language rules for English-only and multilingual checkpoints, training options."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.config import ConfigError, ModelConfig, TrainingConfig
from toolkit.modeling import ModelLoadError, compile_layers, load_model, trainable_parameters


def test_english_only_takes_no_language(tiny_model: Path) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(tiny_model)))
    assert loaded.english and loaded.language is None
    prefix = loaded.processor.tokenizer.convert_ids_to_tokens(loaded.processor.tokenizer("x").input_ids[:2])
    assert prefix == ["<|startoftranscript|>", "<|notimestamps|>"]
    assert load_model(ModelConfig(name_or_path=str(tiny_model), language="english")).language is None
    with pytest.raises(ConfigError, match="is English-only; it cannot transcribe 'french'"):
        load_model(ModelConfig(name_or_path=str(tiny_model), language="french"))


def test_multilingual_needs_a_language_and_sets_the_prompt(tiny_multilingual_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.language is required for the multilingual checkpoint .* \(evaluate: "
                                          r"--language\), whose generation config records none"):
        load_model(ModelConfig(name_or_path=str(tiny_multilingual_model)))
    loaded = load_model(ModelConfig(name_or_path=str(tiny_multilingual_model), language="si", stand_in_for="dhivehi"))
    assert loaded.language == "sinhala" and not loaded.english  # "si" -> its canonical name
    assert loaded.model.generation_config.language == "sinhala"
    assert loaded.model.generation_config.task == "transcribe"
    tokens = loaded.processor.tokenizer.convert_ids_to_tokens(loaded.processor.tokenizer("x").input_ids[:4])
    assert tokens == ["<|startoftranscript|>", "<|si|>", "<|transcribe|>", "<|notimestamps|>"]


def test_training_options(tiny_model: Path) -> None:
    model_cfg = ModelConfig(name_or_path=str(tiny_model), freeze_encoder=True, spec_augment=True, mask_time_prob=0.1)
    training_cfg = TrainingConfig(max_steps=1, gradient_checkpointing=True)
    model = load_model(model_cfg, training_cfg).model
    assert model.config.use_cache is False
    assert model.config.apply_spec_augment and model.config.mask_time_prob == 0.1
    assert model.is_activation_checkpointing
    assert not any(p.requires_grad for p in model.model.encoder.parameters())
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total


def test_compiled_layers_train_like_eager_ones(tiny_model: Path) -> None:
    """Regional compilation keeps the parameter names (checkpoints load either way) and the numbers:
    one forward and backward, with activation checkpointing on, matches eager."""
    import torch

    training_cfg = TrainingConfig(max_steps=1, gradient_checkpointing=True)
    eager, compiled = (load_model(ModelConfig(name_or_path=str(tiny_model)), training_cfg).model for _ in range(2))
    keys = list(compiled.state_dict())
    with pytest.raises(ConfigError, match="training.compile does not work with DeepSpeed ZeRO-3"):
        compile_layers(compiled, zero_stage=3)
    layers = compiled.config.encoder_layers + compiled.config.decoder_layers
    assert compile_layers(compiled, zero_stage=2) == layers
    assert list(compiled.state_dict()) == keys
    torch.manual_seed(0)
    batch = {"input_features": torch.randn(2, compiled.config.num_mel_bins, 3000),
             "labels": torch.randint(0, compiled.config.vocab_size, (2, 7))}
    losses = []
    for model in (eager, compiled):
        model.train()
        for module in model.modules():  # Whisper's dropout is functional, read from these attributes
            for name in ("dropout", "attention_dropout", "activation_dropout"):
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_text("x")
    expected = {
        str(tmp_path / "nope"): f"no such model directory: {tmp_path / 'nope'}",
        "runs/x/final": "no such model directory: runs/x/final",  # two slashes: no Hub id
        "./final": "no such model directory: ./final",
        "no such dir": "no such model directory: no such dir",  # not a valid Hub id either
        "weights.bin": "model weights.bin is a file; give the Whisper checkpoint's directory",
    }
    for name, message in expected.items():
        with pytest.raises(ModelLoadError) as info:
            load_model(ModelConfig(name_or_path=name))
        assert str(info.value) == message
    # A name that may be a Hub id goes to the Hub; its several-line error comes back as one line.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the variable is too late
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(name_or_path="someone/not-here"))
    text = str(info.value)
    assert text.startswith("could not load Whisper checkpoint 'someone/not-here': not a local directory; from the Hub: ")
    assert "\n" not in text
