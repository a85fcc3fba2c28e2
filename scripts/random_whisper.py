"""Write a randomly initialised Whisper of a published size, with a local checkpoint's processor.

Speed and memory depend on the architecture, not on the weights, so a random ``whisper-small``
benchmarks training throughput and MFU exactly like the real one where the Hub is out of reach
(the GPU machines here). Not for WER: a random model's transcripts are noise.

    python scripts/random_whisper.py --size small --processor ../shared/models/whisper-tiny.en --out /tmp/small
"""

from __future__ import annotations

import argparse

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

SIZES = {  # d_model, layers (encoder = decoder), heads, ffn: the published checkpoints' configs
    "tiny": (384, 4, 6, 1536),
    "base": (512, 6, 8, 2048),
    "small": (768, 12, 12, 3072),
    "medium": (1024, 24, 16, 4096),
    "large": (1280, 32, 20, 5120),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--processor", required=True, help="a local Whisper directory: tokenizer, feature extractor")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    d, layers, heads, ffn = SIZES[args.size]
    config = WhisperConfig.from_pretrained(args.processor)
    config.update({
        "d_model": d, "encoder_layers": layers, "decoder_layers": layers, "encoder_attention_heads": heads,
        "decoder_attention_heads": heads, "encoder_ffn_dim": ffn, "decoder_ffn_dim": ffn,
        "num_hidden_layers": layers,
    })
    torch.manual_seed(args.seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(args.processor)
    model.save_pretrained(args.out)
    WhisperProcessor.from_pretrained(args.processor).save_pretrained(args.out)
    print(f"{args.out}: random whisper-{args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
