"""Memory planner: parameter counts, hand-computed estimates, DeepSpeed's formulas, CLI and recommendation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit import plan
from toolkit.cli import main
from toolkit.plan import GIB, Estimate, ModelStats, PlanError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small() -> ModelStats:
    return ModelStats.from_config(plan.SIZES["small"].config(), "whisper-small")


@pytest.fixture(scope="module")
def large_v3() -> ModelStats:
    return ModelStats.from_config(plan.SIZES["large-v3"].config(), "whisper-large-v3")


# -- parameter counts (meta device) ---------------------------------------------------------------


def test_parameter_counts_match_the_official_checkpoints(small: ModelStats, large_v3: ModelStats) -> None:
    assert small.total == 241_734_912  # whisper-small: 241.7M
    assert large_v3.total == 1_543_490_560  # whisper-large-v3: 1,543.5M
    for stats in (small, large_v3):
        assert stats.encoder + stats.decoder + stats.embeddings == stats.total
        # Only the encoder's sinusoidal positions (1500 x d_model) are frozen.
        assert stats.total - stats.trainable == 1500 * stats.d_model
    # DeepSpeed's largest layer is the token embedding: vocab x d_model.
    assert small.largest_layer == 51865 * 768
    assert large_v3.largest_layer == 51866 * 1280
    # LoRA r=32 on q_proj, v_proj of every attention block (encoder self, decoder self and cross):
    # blocks x 2 targets x r x (in + out).
    assert small.lora_params() == (12 + 2 * 12) * 2 * 32 * (768 + 768) == 3_538_944
    assert large_v3.lora_params() == (32 + 2 * 32) * 2 * 32 * (1280 + 1280) == 15_728_640


def test_known_names_aliases_and_english_only_vocabularies() -> None:
    assert plan.size_name("openai/whisper-large-v3-turbo") == "turbo"
    assert plan.size_name("whisper-small.en") == "small.en"
    assert plan.size_name("LARGE-V2") == "large-v2"
    assert plan.size_name("large-v3.en") is None
    name, config = plan.resolve_config("openai/whisper-medium.en")
    assert name == "whisper-medium.en" and config.vocab_size == 51864 and config.num_mel_bins == 80
    turbo = plan.SIZES["turbo"]
    assert (turbo.encoder_layers, turbo.decoder_layers, turbo.num_mel_bins, turbo.vocab_size) == (32, 4, 128, 51866)


# -- hand-computed figures ------------------------------------------------------------------------


def test_full_ddp_model_states_are_16_bytes_per_parameter(small: ModelStats, large_v3: ModelStats) -> None:
    e = plan.estimate("full", small)
    trainable = 241_734_912 - 1500 * 768  # = 240,582,912
    assert e.weights == 4 * 241_734_912 == 966_939_648  # fp32 master weights
    assert e.grads == 4 * trainable == 962_331_648  # fp32 gradients
    assert e.optimizer == 8 * trainable == 1_924_663_296  # AdamW m, v
    e = plan.estimate("full", large_v3)
    trainable = 1_543_490_560 - 1500 * 1280
    assert (e.weights, e.grads, e.optimizer) == (6_173_962_240, 4 * trainable, 8 * trainable)
    # Two GPUs: DDP's flat gradient buckets hold a second fp32 copy of the gradients.
    assert plan.estimate("full", large_v3, gpus=2).grads == 8 * trainable


def test_zero2_small_activations_by_hand(small: ModelStats) -> None:
    """whisper-small under ZeRO-2 (pure bf16), micro-batch 16, 448 label tokens, checkpointing on."""
    e = plan.estimate("zero2", small, gpus=1, micro_batch=16, label_tokens=448, gradient_checkpointing=True)
    b, L, h, s, V = 16, 448, 768, 1500, 51865
    conv = 2 * b * (2 * s * 80 + 5 * s * h)  # 192,000,000: conv1 input, GELU in/out, conv2's GELU input
    enc_ckpt = 12 * 2 * s * b * h  # 442,368,000: each encoder layer's bf16 input
    dec_ckpt = 12 * 2 * L * b * h  # 132,120,576
    enc_out = (2 + 2) * s * b * h  # 73,728,000: final layer norm input and output (the encoder output)
    dec_out = (2 + 2) * L * b * h  # 22,020,096: final layer norm input and output (proj_out's input)
    kept = conv + enc_ckpt + dec_ckpt + enc_out + dec_out
    assert kept == 862_236_672
    loss = 12 * b * L * V  # 4,461,219,840: fp32 log-softmax, its gradient, the logits' gradient
    # One encoder layer recomputed: 32sbh + 2sbh (SDPA output) + 16 B/token norm stats + the
    # log-sum-exp (4*b*heads*s), less its checkpointed input (2sbh): 591,360,000 < the loss term.
    recompute = s * b * (34 * h + 16) + 4 * b * 12 * s - 2 * s * b * h
    assert recompute == 591_360_000 < loss
    assert e.activations == kept + loss == 5_323_456_512
    # DeepSpeed: 2P + 18P/N on one GPU.
    assert e.weights + e.grads + e.optimizer == 2 * 241_734_912 + 18 * 241_734_912 == 4_834_698_240
    assert e.allocated == 4_834_698_240 + 5_323_456_512
    assert e.total == e.allocated + plan.CUDA_CONTEXT_BYTES + int(plan.FRAGMENTATION * e.allocated)
    assert round(e.total / GIB, 2) == 10.43


def test_large_v3_offload_and_quantised_bases_by_hand(large_v3: ModelStats) -> None:
    P = 1_543_490_560
    e = plan.estimate("zero2-offload", large_v3)
    assert (e.weights, e.grads, e.optimizer) == (2 * P, 0, 0)  # bf16 weights only; states on the CPU
    assert e.cpu == int(P * 16 * 1.5)  # DeepSpeed: P * max(4 * gpus, 16) * 1.5
    e = plan.estimate("zero3-offload", large_v3)
    # DeepSpeed: 4 * largest layer; plus up to stage3_max_live_parameters (1e9) gathered bf16 weights.
    assert e.weights == 4 * 51866 * 1280 + 2 * 1_000_000_000 == 2_265_553_920
    # Linear weights in the layers (what bitsandbytes quantises):
    enc = 32 * (4 * 1280**2 + 2 * 1280 * 5120)  # 629,145,600
    dec = 32 * (8 * 1280**2 + 2 * 1280 * 5120)  # 838,860,800 (self- and cross-attention, MLP)
    Q = enc + dec
    assert large_v3.quantizable == Q == 1_468_006_400
    lora = 15_728_640
    nf4 = Q // 2 + Q // 64 + 4 * Q // (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 absmax per 256 blocks
    assert nf4 == 757_299_200
    e = plan.estimate("qlora-nf4", large_v3)
    assert e.weights == nf4 + 4 * (P - Q) + 4 * lora == 1_122_150_400  # rest fp32 (prepare_model_for_kbit_training)
    assert (e.grads, e.optimizer) == (4 * lora, 8 * lora)
    rows = 32 * (4 * 1280 + 1280 + 5120) + 32 * (8 * 1280 + 5120 + 1280)  # int8 keeps an fp32 scale per row
    assert plan.estimate("lora-int8", large_v3).weights == Q + 4 * rows + 4 * (P - Q) + 4 * lora


def test_checkpointing_off_and_eager_attention_cost_more(small: ModelStats) -> None:
    on = plan.estimate("full", small, micro_batch=8)
    off = plan.estimate("full", small, micro_batch=8, gradient_checkpointing=False)
    eager = plan.estimate("full", small, micro_batch=8, attention="eager")
    assert off.activations > 2 * on.activations
    assert eager.activations >= on.activations
    assert plan.estimate("full", small, micro_batch=8, label_tokens=100).activations < on.activations


# -- DeepSpeed's own estimators -------------------------------------------------------------------


def test_zero_formulas_are_deepspeeds() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for total, largest in ((241_734_912, 39_832_320), (1_543_490_560, 66_388_480)):
        for gpus in (1, 2, 8):
            for offload in (False, True):
                ours = plan.zero2_model_states(total, gpus, offload)
                assert ours == estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
                ours = plan.zero3_model_states(total, largest, gpus, offload)
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    total, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload, zero_init=False
                )
                assert ours == (cpu, gpu)


def test_zero3_model_states_shrink_with_gpus(large_v3: ModelStats) -> None:
    states = []
    for gpus in (1, 2, 4, 8):
        e = plan.estimate("zero3", large_v3, gpus=gpus)
        states.append(e.weights + e.grads + e.optimizer)
        P, largest = large_v3.total, large_v3.largest_layer
        # DeepSpeed: 4 * largest layer + 18P/N, plus the live gathered parameters (2 * min(P, 1e9)).
        assert states[-1] == 4 * largest + int(18 * P / gpus) + 2 * 1_000_000_000
        assert e.activations == plan.estimate("zero3", large_v3, gpus=1).activations
    assert states == sorted(states, reverse=True) and len(set(states)) == 4
    assert plan.estimate("zero2", large_v3, gpus=8).optimizer < plan.estimate("zero2", large_v3, gpus=1).optimizer


# -- constants that must follow the rest of the toolkit ---------------------------------------------


def test_assumptions_match_the_toolkit() -> None:
    import torch

    from toolkit.adapters import quantization_config
    from toolkit.config import LoraConfig, ModelConfig
    from toolkit.modeling import load_dtype

    base = load_dtype(ModelConfig(name_or_path="x"), "cuda", frozen_base=True)
    assert torch.tensor([], dtype=base).element_size() == plan.LORA_BASE_BYTES
    lora = LoraConfig()
    assert (lora.rank, tuple(lora.target_modules), lora.dropout) == (plan.LORA_RANK, plan.LORA_TARGETS, plan.LORA_DROPOUT)
    nf4 = quantization_config(ModelConfig(name_or_path="x", quantization="nf4"))
    assert nf4.bnb_4bit_use_double_quant and nf4.bnb_4bit_quant_type == "nf4"


@pytest.mark.skipif(not (ROOT / "launch_configs" / "ds_zero3.yaml").is_file(), reason="no DeepSpeed launch configs")
def test_assumptions_match_the_deepspeed_launch_configs() -> None:
    for name in ("ds_zero3.yaml", "ds_zero3_offload.yaml"):  # zero_init=False in zero3_model_states
        assert "zero3_init_flag: false" in (ROOT / "launch_configs" / name).read_text()
    for name in ("zero3.json", "zero3_offload.json"):
        zero = json.loads((ROOT / "launch_configs" / "deepspeed" / name).read_text())["zero_optimization"]
        assert zero["stage3_max_live_parameters"] == plan.ZERO3_MAX_LIVE_PARAMETERS
    for mode in plan.MODES:  # every launch config a mode names exists
        assert (ROOT / plan.launch_config(mode, 1).split()[0]).is_file(), mode.name


# -- recommendation -------------------------------------------------------------------------------


def fake(mode: str, gib: float) -> Estimate:
    return Estimate(mode, weights=int(gib * GIB), grads=0, optimizer=0, activations=0, overhead=0)


def test_recommend_picks_the_fastest_fitting_mode() -> None:
    estimates = [fake("full", 20), fake("full-adamw8bit", 15), fake("zero2", 12), fake("lora", 6), fake("qlora-nf4", 3)]
    assert plan.recommend(estimates, 16 * GIB).mode == "full-adamw8bit"
    assert plan.recommend(estimates, 13 * GIB).mode == "zero2"
    assert plan.recommend(list(reversed(estimates)), 13 * GIB).mode == "zero2"  # by speed, not list order
    assert plan.recommend(estimates, 2 * GIB) is None


def test_order_is_fastest_first() -> None:
    assert plan.MODE_NAMES == (
        "full", "full-adamw8bit", "zero2", "zero3", "lora", "zero2-offload", "zero3-offload", "lora-int8", "qlora-nf4"
    )


def test_recommendations_on_a_16gb_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "small", "--gpu-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "recommended: full " in out and "launch_configs/1gpu.yaml" in out
    assert main(["plan", "--model", "openai/whisper-large-v3", "--gpu-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    # A frozen 16-bit base + adapters fits; it ranks above the offload modes (no CPU Adam, no PCIe).
    assert "recommended: lora (LoRA adapters on a frozen 16-bit base)" in out and "13.53 of 14.90 GiB" in out
    assert "(with --gpus 8, zero2 fits" in out  # sharded over 8 GPUs, ZeRO-2 needs no offload
    assert main(["plan", "--model", "large-v3", "--gpu-memory", "16GB", "--micro-batch", "32"]) == 0
    assert "nothing fits in 14.90 GiB per GPU; try --micro-batch 16 (lora" in capsys.readouterr().out
    for row in ("full ", "zero3 ", "qlora-nf4 "):
        assert any(line.startswith(row) for line in out.splitlines())


def test_nothing_fits_says_so_and_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "large-v3", "--gpu-memory", "6GB", "--micro-batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits in 5.59 GiB per GPU" in out
    assert "try --micro-batch 4 (zero2-offload" in out
    assert main(["plan", "--model", "large-v3", "--gpu-memory", "500MB", "--micro-batch", "1"]) == 0
    assert "use GPUs with more memory" in capsys.readouterr().out


# -- CLI ----------------------------------------------------------------------------------------


def test_json_lines_parse_and_carry_the_components(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "turbo", "--gpu-memory", "24GiB", "--gpus", "2", "--micro-batch", "8", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["mode"] for line in lines] == list(plan.MODE_NAMES)
    for line in lines:
        for key in ("estimated_gib", "fits", "weights_gib", "grads_gib", "optimizer_gib", "activations_gib",
                    "overhead_gib", "allocated_gib", "recipe", "launch_config", "bytes", "detail"):
            assert key in line, key
        assert isinstance(line["fits"], bool) and line["gpus"] == 2 and line["micro_batch"] == 8
        assert line["fits"] == (line["estimated_gib"] <= 24)
        parts = sum(line["bytes"][k] for k in ("weights", "grads", "optimizer", "activations", "overhead"))
        assert abs(parts - line["estimated_gib"] * GIB) <= 0.005 * GIB
    by_mode = {line["mode"]: line for line in lines}
    assert by_mode["zero3"]["launch_config"] == "launch_configs/ds_zero3.yaml --num_processes 2"
    assert plan.launch_config(plan.get_mode("zero2-offload"), 1) == "launch_configs/ds_zero2_offload.yaml --num_processes 1"
    assert plan.launch_config(plan.get_mode("lora"), 1) == "launch_configs/1gpu.yaml"
    assert by_mode["full"]["launch_config"] == "launch_configs/multi_gpu.yaml --num_processes 2"
    assert "model.quantization=nf4 training.method=lora" in by_mode["qlora-nf4"]["recipe"]


def test_local_config_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "my-whisper"
    model.mkdir()
    config = plan.SIZES["tiny"].config().to_dict()
    (model / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(model), "--gpu-memory", "8GB", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["model"] == "my-whisper" and lines[0]["fits"]
    tiny = plan.load_stats("tiny")
    assert plan.load_stats(str(model)).total == tiny.total == 37_760_640
    assert lines[0]["bytes"]["weights"] == 4 * tiny.total

    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="no config.json"):
        plan.load_stats(str(tmp_path / "empty"))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PlanError, match="not 'whisper'"):
        plan.load_stats(str(other))


def test_unknown_names_fail_clearly(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["plan", "--model", "larg-v3", "--gpu-memory", "16GB"]) == 2
    err = capsys.readouterr().err
    assert "unknown Whisper model 'larg-v3' (did you mean large-v3?)" in err and "turbo" in err

    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.WhisperConfig, "from_pretrained", offline)
    assert main(["plan", "--model", "someone/whisper-finetuned", "--gpu-memory", "16GB"]) == 2
    err = capsys.readouterr().err
    assert "could not read the config of 'someone/whisper-finetuned'" in err and "give the size instead" in err


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "small", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "--model", "small", "--gpu-memory", "16GB", "--label-tokens", "449"]) == 2
    assert "--label-tokens" in capsys.readouterr().err
    assert main(["plan", "--model", "small", "--gpu-memory", "16GB", "--lora-targets", "q_proj,wq"]) == 2
    assert "LoRA targets" in capsys.readouterr().err


def test_parse_memory() -> None:
    assert plan.parse_memory("16GB") == 16 * 10**9
    assert plan.parse_memory("15GiB") == 15 * GIB
    assert plan.parse_memory("15360 MiB") == 15 * GIB  # nvidia-smi --query-gpu=memory.total
    assert plan.parse_memory("80") == 80 * GIB
    assert plan.parse_memory("0.5TB") == 5 * 10**11
    for bad in ("", "GB", "-1GB", "16 gigs"):
        with pytest.raises(PlanError):
            plan.parse_memory(bad)


def test_estimate_accepts_a_config_or_a_name(small: ModelStats) -> None:
    by_stats = plan.estimate("lora", small, 1, 4, 200, True)
    assert plan.estimate("lora", plan.SIZES["small"].config(), 1, 4, 200, True).total == by_stats.total
    assert plan.estimate("lora", "openai/whisper-small", 1, 4, 200, True).total == by_stats.total
    with pytest.raises(PlanError, match="unknown mode"):
        plan.estimate("zero4", small)
