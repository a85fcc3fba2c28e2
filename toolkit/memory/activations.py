"""Activation memory per GPU: what a training step keeps for its backward, at its peak.

For a micro-batch of B 30 s windows (3000 mel frames, 1500 encoder positions after the conv stem)
and L label tokens, the figures follow Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models" (arXiv:2205.05198): a transformer layer keeps ``s*b*h*(34 + 5*a*s/h)``
bytes in 16-bit without recomputation, and with full recomputation only its input (2*s*b*h) plus,
during the backward, one layer's full activations. Adapted to Whisper as trained here (see
:func:`_layer_bytes`): dropout is 0 in every Whisper config, so no masks (34 -> 32); attention is
PyTorch SDPA (transformers' default), whose flash/memory-efficient kernels keep a log-sum-exp per
query and head instead of the a*s*s score matrix (``--attention eager`` restores it); decoder
layers add cross-attention over the 1500 encoder positions (their own K and V of the encoder
output); and dtypes follow each mode (:func:`saved_tensors`): under autocast (DDP modes) the
residual stream and layer-norm outputs are fp32 and each linear saves its own bf16 cast of its
input, under DeepSpeed the model is bf16 throughout, and a frozen linear saves no input at all.
Plus the conv stem, the logits (12 bytes per logit: the fp32 log-softmax saved for the loss, its
gradient and the gradient of the logits) and bf16 weight copies made by autocast. The peak is the
larger of the end of the forward and the start of the backward (:func:`activations`).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.memory.modes import Mode
from toolkit.memory.params import LINEAR_NAMES
from toolkit.memory.scenario import Scenario


@dataclass(frozen=True)
class SavedTensors:
    """Bytes a layer keeps for the backward, per element of each tensor (see :func:`saved_tensors`)."""

    residual: int
    """Residual stream = layer-norm inputs = checkpointed layer inputs."""
    norm_out: int
    """Encoder output (final layer-norm output), kept for every decoder layer."""
    qkv_in: int
    """Self-attention input (layer-norm output) as saved by the q/k/v projections, all copies."""
    out_in: int
    """Attention output as saved by out_proj."""
    fc1_in: int
    mlp: int
    """fc1 output (GELU input)."""
    fc2_in: int
    """GELU output as saved by fc2."""
    cross_q_in: int
    cross_kv_in: int
    """Per encoder position and decoder layer, beyond the shared encoder output."""
    head_in: int
    """proj_out input."""
    conv: bool
    """The conv stem is trained (keeps its activations)."""
    score: int
    """Eager attention: bytes per attention score."""
    lora_targets: tuple[str, ...] = ()
    weight_copies: int = 0
    """Bytes per layer-linear parameter saved as a 16-bit copy (autocast over fp32 weights)."""
    head_copy: int = 0
    """Bytes per output-projection parameter saved as a 16-bit copy."""
    cast_cache: bool = False
    """Autocast caches bf16 copies of trainable fp32 weights during the forward."""

    def targeted(self, *names: str) -> int:
        """How many of the linears ``names`` carry a LoRA adapter."""
        return sum(1 for n in names if n in self.lora_targets)


def saved_tensors(mode: Mode, scenario: Scenario) -> SavedTensors:
    """Which tensors each mode keeps, and in which dtype.

    * DDP full fine-tuning: fp32 weights under CUDA autocast. Layer norms run in fp32, so the
      residual stream is fp32 (4); each linear casts its fp32 input to bf16 and saves that copy (q,
      k and v make three, and every decoder layer's k/v two of the encoder output); SDPA saves bf16
      q, k, v. Autocast caches bf16 copies of all trainable weights during the forward.
    * ZeRO: DeepSpeed casts the model to bf16, no autocast: 2 bytes everywhere, one saved tensor
      per distinct input.
    * LoRA, fp32 base: as DDP, but a frozen linear saves no input (only its bf16 weight copy); a LoRA
      target saves the bf16 cast of its dropped-out input (2) and the dropout mask (1).
    * LoRA on int8: LLM.int8 saves its input as is (fp32 after prepare_model_for_kbit_training's
      fp32 norms) and returns its input's dtype, so the MLP runs in fp32.
    * QLoRA: bitsandbytes' 4-bit matmul saves no input and returns the input's dtype (fp32).
    """
    if mode.deepspeed:
        return SavedTensors(residual=2, norm_out=2, qkv_in=2, out_in=2, fc1_in=2, mlp=2, fc2_in=2, cross_q_in=2,
                            cross_kv_in=0, head_in=2, conv=True, score=2)
    if mode.trainable == "full":
        return SavedTensors(residual=4, norm_out=4, qkv_in=6, out_in=2, fc1_in=2, mlp=2, fc2_in=2, cross_q_in=2,
                            cross_kv_in=4, head_in=2, conv=True, score=6, weight_copies=2, head_copy=2,
                            cast_cache=True)
    targets = scenario.lora_targets
    t = {n: ((3 if scenario.lora_dropout > 0 else 2) if n in targets else 0) for n in LINEAR_NAMES}
    # LLM.int8 saves its input as is: fp32 where it follows a norm or the fp32 MLP, bf16 for the
    # attention output (SDPA autocasts to bf16). The other bases save no input of a frozen linear.
    fp32_in, bf16_in = (4, 2) if mode.base == "int8" else (0, 0)
    return SavedTensors(
        residual=4, norm_out=4, qkv_in=fp32_in + t["q_proj"] + t["k_proj"] + t["v_proj"],
        out_in=bf16_in + t["out_proj"], fc1_in=fp32_in + t["fc1"], mlp=4 if mode.quantized else 2,
        fc2_in=fp32_in + t["fc2"], cross_q_in=fp32_in + t["q_proj"], cross_kv_in=t["k_proj"] + t["v_proj"],
        head_in=0, conv=False, score=6, lora_targets=targets, weight_copies=0 if mode.quantized else 2,
        head_copy=2, cast_cache=True,
    )


def _scores(p: SavedTensors, attention: str, b: int, heads: int, s_q: int, s_k: int) -> int:
    """What one attention of ``s_q`` queries over ``s_k`` keys keeps besides q, k, v."""
    if attention == "eager":
        return p.score * b * heads * s_q * s_k  # softmax output (fp32 under autocast) + its bf16 copy
    return 4 * b * heads * s_q  # SDPA flash / memory-efficient: fp32 log-sum-exp per query and head


def _layer_bytes(p: SavedTensors, scenario: Scenario, kind: str) -> int:
    """One layer's activations without recomputation (Korthikanti et al. eq. 2, adapted; see module doc).

    Pure 16-bit (the ZeRO modes): an encoder layer keeps 32*s*b*h bytes, Korthikanti's 34 less the
    two dropout masks (2 layer-norm inputs 4sbh, q/k/v input 2sbh, q, k, v 6sbh, out_proj input
    2sbh, fc1 input 2sbh, GELU input and output 2*2*s*b*4h), plus 2sbh for the attention output
    that SDPA keeps (eager keeps the 2*a*s*s softmax output instead) and 16 bytes per token of
    layer-norm statistics. A decoder layer keeps 40*L*b*h (+ 4Lbh SDPA outputs) + 4*1500*b*h:
    self-attention and MLP as above, a third layer norm, cross-attention's q input, q and out_proj
    input, and its own K and V over the 1500 encoder positions. Checked on CPU against the tensors
    autograd saves for transformers' WhisperEncoderLayer/WhisperDecoderLayer in bf16 (within 1%).
    """
    stats, attention = scenario.stats, scenario.attention
    b, L, h = scenario.micro_batch, scenario.label_tokens, stats.d_model
    lora_mid = 2 * scenario.lora_rank  # the bf16 input of a lora_B (rank values per token)
    # SDPA's backward also keeps the attention output (bf16), next to the copy out_proj saves; every
    # layer norm keeps an fp32 mean and rstd per token.
    attn_out = 2 * h if attention == "sdpa" else 0
    ln_stats = 8
    if kind == "encoder":
        s, f, heads = stats.encoder_positions, stats.encoder_ffn, stats.encoder_heads
        per_token = (2 * p.residual * h + p.qkv_in * h + 6 * h + attn_out + p.out_in * h + p.fc1_in * h + p.mlp * f
                     + p.fc2_in * f + 2 * ln_stats + lora_mid * p.targeted(*LINEAR_NAMES))
        return s * b * per_token + _scores(p, attention, b, heads, s, s)
    s_e, f, heads = stats.encoder_positions, stats.decoder_ffn, stats.decoder_heads
    per_token = (3 * p.residual * h + p.qkv_in * h + 6 * h + attn_out + p.out_in * h  # self-attention
                 + p.cross_q_in * h + 2 * h + attn_out + p.out_in * h  # cross-attention at the decoder positions
                 + p.fc1_in * h + p.mlp * f + p.fc2_in * f + 3 * ln_stats
                 + lora_mid * (p.targeted(*LINEAR_NAMES) + p.targeted("q_proj", "out_proj")))
    per_encoder_position = 4 * h + p.cross_kv_in * h + lora_mid * p.targeted("k_proj", "v_proj")
    return (L * b * per_token + s_e * b * per_encoder_position
            + _scores(p, attention, b, heads, L, L) + _scores(p, attention, b, heads, L, s_e))


def activations(mode: Mode, scenario: Scenario) -> tuple[int, dict[str, int]]:
    """Peak activation bytes on one GPU and their parts.

    The peak is the larger of two moments: the end of the forward (everything kept, bf16 logits,
    autocast's cache of bf16 weights) and the start of the backward (everything kept, the loss's
    12 bytes per logit, or the recompute of the largest layer, whichever is larger; the logit
    gradients are freed before the last decoder layer is recomputed).
    """
    p = saved_tensors(mode, scenario)
    stats = scenario.stats
    b, L, h = scenario.micro_batch, scenario.label_tokens, stats.d_model
    s_e, mel, V = stats.encoder_positions, stats.num_mel_bins, stats.vocab_size
    enc_layer = _layer_bytes(p, scenario, "encoder")
    dec_layer = _layer_bytes(p, scenario, "decoder")
    enc_copies = p.weight_copies * stats.layer_linear_params("encoder")
    dec_copies = p.weight_copies * stats.layer_linear_params("decoder")
    parts: dict[str, int] = {}
    # Conv stem: conv1 input (mel x 3000), GELU input and output (h x 3000), conv2's GELU input (h x 1500).
    parts["conv_stem"] = 2 * b * (2 * s_e * mel + 5 * s_e * h) if p.conv else 0
    if scenario.gradient_checkpointing:
        parts["encoder_checkpoints"] = stats.encoder_layers * p.residual * s_e * b * h
        parts["decoder_checkpoints"] = stats.decoder_layers * p.residual * L * b * h
        recompute = max(enc_layer - p.residual * s_e * b * h + enc_copies, dec_layer - p.residual * L * b * h + dec_copies)
        layer_copies = 0
    else:
        parts["encoder_layers"] = stats.encoder_layers * enc_layer
        parts["decoder_layers"] = stats.decoder_layers * dec_layer
        recompute = 0
        layer_copies = stats.encoder_layers * enc_copies + stats.decoder_layers * dec_copies
    parts["encoder_output"] = (p.residual + p.norm_out) * s_e * b * h  # final layer norm's input and output
    parts["decoder_output"] = (p.residual + p.head_in) * L * b * h
    parts["weight_copies"] = layer_copies + p.head_copy * V * h
    kept = sum(parts.values())
    logits = b * L * V
    if p.cast_cache:
        # Autocast caches only casts of leaf tensors that require grad: every matmul weight when
        # fully fine-tuned, only the adapters under LoRA.
        cached = 2 * (stats.matmul if mode.trainable == "full" else scenario.lora_params)
        cast_cache = max(cached - parts["weight_copies"], 0)
    else:
        cast_cache = 0
    forward_end = kept + cast_cache + 2 * logits
    backward = kept + max(12 * logits, recompute)
    parts["logits_loss"] = 12 * logits
    parts["recompute_layer"] = recompute
    parts["autocast_cache"] = cast_cache
    parts["peak_phase_forward"] = int(forward_end >= backward)
    return max(forward_end, backward), parts
