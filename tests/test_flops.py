"""toolkit.flops against torch's FlopCounterMode on a tiny random Whisper, plus peaks and MFU arithmetic."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import WhisperConfig, WhisperForConditionalGeneration

from toolkit.flops import (
    PEAK_TFLOPS,
    decoder_flops,
    encoder_flops,
    forward_flops,
    mfu,
    peak_flops,
    training_flops,
)

BATCH, T_DEC, VOCAB = 2, 48, 104
aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel SDPA picks here.
CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def tiny_config(attn: str = "eager", **overrides: int) -> WhisperConfig:
    kwargs = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                  num_mel_bins=80,
                  max_source_positions=1500, max_target_positions=64, pad_token_id=0, bos_token_id=2,
                  eos_token_id=2, decoder_start_token_id=1, use_cache=False)
    config = WhisperConfig(**{**kwargs, **overrides})
    config._attn_implementation = attn
    return config


def whisper_config(d: int, layers: int, heads: int, vocab: int = 51865, mels: int = 80) -> WhisperConfig:
    return WhisperConfig(d_model=d, encoder_layers=layers, decoder_layers=layers,
                         encoder_attention_heads=heads, decoder_attention_heads=heads,
                         encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, vocab_size=vocab, num_mel_bins=mels)


SIZES = {"tiny": whisper_config(384, 4, 6), "base": whisper_config(512, 6, 8),
         "small": whisper_config(768, 12, 12), "medium": whisper_config(1024, 24, 16),
         "large-v3": whisper_config(1280, 32, 20, vocab=51866, mels=128)}


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"input_features": torch.randn(BATCH, 80, 3000, generator=generator),
            "labels": torch.randint(3, VOCAB, (BATCH, T_DEC), generator=generator)}


def count(
    model: WhisperForConditionalGeneration, batch: dict[str, torch.Tensor], backward: bool
) -> FlopCounterMode:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, torch.set_grad_enabled(backward):
        loss = model(**batch).loss
        if backward:
            loss.backward()
    return counter


def model_for(config: WhisperConfig, train: bool) -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    return model.train() if train else model.eval()


def module_flops(counter: FlopCounterMode, *names: str) -> int:
    counts = counter.get_flop_counts()
    return sum(sum(counts[f"WhisperForConditionalGeneration.{name}"].values()) for name in names)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_matches_flop_counter(attn: str, batch: dict[str, torch.Tensor]) -> None:
    config = tiny_config(attn)
    counter = count(model_for(config, train=False), batch, backward=False)
    # Measured: exact (ratio 1.0) for the whole, the encoder and the decoder (which is ~5% of the whole here).
    assert counter.get_total_flops() == pytest.approx(forward_flops(config, [T_DEC] * BATCH), rel=0.05)
    assert module_flops(counter, "model.encoder") == pytest.approx(BATCH * encoder_flops(config), rel=0.05)
    decoder = module_flops(counter, "model.decoder", "proj_out")
    assert decoder == pytest.approx(BATCH * decoder_flops(config, T_DEC), rel=0.05)


def test_forward_sums_per_sample_lengths(batch: dict[str, torch.Tensor]) -> None:
    config = tiny_config()
    model = model_for(config, train=False)
    features = batch["input_features"][:1]
    runs = [count(model, {"input_features": features, "labels": batch["labels"][:1, :t]}, backward=False)
            for t in (7, 40)]
    measured = sum(run.get_total_flops() for run in runs)
    assert measured == forward_flops(config, [7, 40])


def _not_rerun(config: WhisperConfig, t: int) -> int:
    """Per sample forward FLOPs that torch's non-reentrant checkpointing does not replay: the convs and the
    output projection (outside the checkpointed layers) and each layer's fc2 (early stop)."""
    d, T = config.d_model, config.max_source_positions
    convs = 2 * 3 * 2 * T * config.num_mel_bins * d + 2 * 3 * T * d * d
    fc2 = (config.encoder_layers * T * 2 * d * config.encoder_ffn_dim
           + config.decoder_layers * t * 2 * d * config.decoder_ffn_dim)
    return convs + t * 2 * d * config.vocab_size + fc2


def _conv1_input_grad(config: WhisperConfig) -> int:
    """The first conv's input gradient, never computed (the mel features need none)."""
    return 2 * 3 * 2 * config.max_source_positions * config.num_mel_bins * config.d_model


@contextlib.contextmanager
def _backend(attn: str) -> Iterator[None]:
    # "sdpa" runs SDPA's math backend (plain matmuls); the fused kernels are checked in the next test.
    with sdpa_kernel(SDPBackend.MATH) if attn == "sdpa" else contextlib.nullcontext():
        yield


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_training_matches_flop_counter(
    attn: str, checkpointing: bool, batch: dict[str, torch.Tensor]
) -> None:
    config = tiny_config(attn)
    model = model_for(config, train=True)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with _backend(attn):
        measured = count(model, batch, backward=True).get_total_flops()
    analytic = training_flops(config, [T_DEC] * BATCH, checkpointing)
    # Measured / analytic: 0.980 plain, 0.957 with checkpointing (both attention implementations).
    assert measured == pytest.approx(analytic, rel=0.05)
    # The gap, exactly: what the 3x / 4x round numbers count but no kernel runs.
    missing = BATCH * (_conv1_input_grad(config) + (_not_rerun(config, T_DEC) if checkpointing else 0))
    assert measured == analytic - missing


def test_fused_attention_backward_recomputes_scores(batch: dict[str, torch.Tensor]) -> None:
    config = tiny_config("sdpa")
    model = model_for(config, train=True)
    fused = count(model, batch, backward=True).get_total_flops()
    with _backend("sdpa"):
        math = count(model, batch, backward=True).get_total_flops()
    d, T, t = config.d_model, config.max_source_positions, T_DEC
    qk = BATCH * 2 * d * (config.encoder_layers * T * T + config.decoder_layers * (t * t + t * T))
    assert fused - math == qk  # the flash backward redoes Q K^T: hardware FLOPs, not model FLOPs


def _ignored(config: WhisperConfig, t: int) -> int:
    """Rough FLOPs of what the analytic count ignores: 8 per layer-norm or GELU element, 1 per bias,
    residual or positional add, 7 per attention score (scale, mask, softmax), 5 per logit (loss)."""
    d, T = config.d_model, config.max_source_positions
    f, h = config.encoder_ffn_dim, config.encoder_attention_heads
    encoder_layer = T * (2 * 8 * d + 8 * f + (4 * d + f) + 2 * d) + 7 * h * T * T
    decoder_layer = t * (3 * 8 * d + 8 * f + (8 * d + f) + 3 * d) + 7 * h * (t * t + t * T)
    norms_and_embeddings = 8 * (T + t) * d + (T + t) * d
    layers = config.encoder_layers * encoder_layer + config.decoder_layers * decoder_layer
    return layers + norms_and_embeddings + 5 * t * config.vocab_size


@pytest.mark.parametrize("t", [32, 448])
@pytest.mark.parametrize("size", list(SIZES))
def test_ignored_ops_are_small(size: str, t: int) -> None:
    config = SIZES[size]
    share = _ignored(config, t) / forward_flops(config, [t])
    # About 1.3% for tiny, 1.1% for base, 0.8% for small, 0.65% for medium, 0.55% for large-v3.
    assert share < (0.015 if size in ("tiny", "base") else 0.01)


def test_whisper_small_numbers() -> None:
    config = SIZES["small"]
    total = forward_flops(config, [32])
    assert total / 1e9 == pytest.approx(397.3, abs=0.1)
    assert encoder_flops(config) / total == pytest.approx(0.866, abs=0.001)
    assert forward_flops(config, [448]) / 1e9 == pytest.approx(543.3, abs=0.1)
    assert training_flops(config, [32, 32], True) == 8 * total


@pytest.mark.parametrize(("name", "dtype", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H100 PCIe", "torch.float16", 756.0),
    ("NVIDIA H100 80GB HBM3", "float32", 67.0),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA A100 80GB PCIe", "float32", 19.5),
    ("NVIDIA A10G", "bfloat16", 70.0),
    ("NVIDIA A10", "bfloat16", 125.0),
    ("NVIDIA L40S", "bfloat16", 362.0),
    ("NVIDIA L4", "bfloat16", 121.0),
    ("Tesla V100-SXM2-16GB", "float16", 125.0),
    ("Tesla V100-PCIE-32GB", "float16", 112.0),
    ("Tesla T4", "fp16", 65.0),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2),
])
def test_peak_flops(name: str, dtype: str, tflops: float) -> None:
    assert peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(("name", "dtype"), [
    ("cpu", "float32"), ("NVIDIA B200", "bfloat16"), ("Tesla T4", "bfloat16"),
    ("NVIDIA RTX A1000", "float16"), ("NVIDIA H100 80GB HBM3", "float8"),
])
def test_peak_flops_unknown(name: str, dtype: str) -> None:
    assert peak_flops(name, dtype) is None


def test_peak_table_is_dense_numbers() -> None:
    for name, table in PEAK_TFLOPS.items():
        assert set(table) <= {"bfloat16", "float16", "tf32", "float32"}, name
        assert all(0 < value < 2000 for value in table.values()), name


def test_mfu() -> None:
    assert mfu(989e12 * 0.4, 1.0, 989e12) == pytest.approx(0.4)
    assert mfu(3e15, 10.0, 1e15) == pytest.approx(0.3)
    assert mfu(1e12, 1.0, None) is None
    assert mfu(1e12, 0.0, 1e15) is None
