"""Test support that needs no download: a tiny, randomly initialised Whisper with a real tokenizer layout.

The tokenizer is byte-level BPE with no merges (every byte is a token), followed by Whisper's
special tokens in Whisper's order (end of text, start of transcript, 100 languages, tasks,
no-timestamps, timestamps), so prompts, generation and decoding behave as with a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def special_tokens() -> list[str]:
    tokens = ["<|endoftext|>", "<|startoftranscript|>"]
    tokens += [f"<|{code}|>" for code in LANGUAGES]
    tokens += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    return tokens


def tiny_tokenizer() -> WhisperTokenizer:
    vocab = {char: index for index, char in enumerate(_bytes_to_unicode().values())}
    specials = special_tokens()
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    for token in specials + timestamps:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.add_tokens(timestamps)
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def vocab_size_of(tokenizer: WhisperTokenizer) -> int:
    return len(tokenizer)


def make_tiny_whisper(path: str | Path, *, multilingual: bool = False, seed: int = 0, d_model: int = 64) -> Path:
    """Write a tiny random Whisper (model, processor, generation config) to ``path`` and return it."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special_tokens()}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        dropout=0.1,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    space = tokenizer.convert_tokens_to_ids("Ġ")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=448,
        begin_suppress_tokens=[space, eot],
        # A random model would mostly emit timestamps and prompt tokens, which decode to "": keep
        # them out so that predictions are real text and eval comparisons in tests mean something.
        suppress_tokens=[ids[t] for t in special_tokens()[1:]] + [vocab_size_of(tokenizer) - 1501 + i for i in range(1501)],
        is_multilingual=multilingual,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        alignment_heads=[[1, 0]],
    )
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
