"""Side-by-side benchmark: this toolkit against a port of the Hugging Face Audio course recipe.

*recipe*: our own port of the Audio course's unit 5 "Fine-tuning the ASR model" (whisper-small, Common
Voice 13 Dhivehi), in this process: ``load_dataset("audiofolder")``, a ``prepare_dataset`` ``map`` that
stores 80x3000 float32 ``input_features`` + ``labels`` in the datasets cache, the 30 s ``input_length``
filter, ``DataCollatorSpeechSeq2SeqWithPadding`` and ``Seq2SeqTrainer`` with the course's arguments
(batch 16, lr 1e-5, ``constant_with_warmup``, gradient checkpointing, ``predict_with_generate``,
``generation_max_length=225``, eval batch 16). *toolkit*: ``toolkit bench`` (and each
``--toolkit-variant``) in a subprocess; its last JSON line is read. Both sides train on the same number
of clips (steps x global batch) and evaluate on the same dev set. Figures: training clips/s and
audio-hours/hour (train wall time only), eval utterances/s (generation over the dev set, metrics
included), preprocessing wall time with a fresh cache (recipe: both ``load_dataset`` + ``map`` +
filter), bytes on disk of the preprocessed train split (recipe: the map's Arrow files), and WER.

This 2-core CPU box (tiny runs only; the toolkit side defaults to two CPU processes)::

    .venv/bin/python scripts/bench_seed.py --model ../shared/models/whisper-tiny.en \\
        --train ../shared/data/espeak-en/train --dev ../shared/data/espeak-en/dev \\
        --steps 2 --global-batch 4 --max-train 32 --max-dev 16

A GPU (one process per side; with several GPUs visible, set CUDA_VISIBLE_DEVICES to one)::

    python scripts/bench_seed.py --model PATH/whisper-small --train TRAIN --dev DEV --precision bf16 \\
        --toolkit-launch "accelerate launch --num_processes 1" \\
        --toolkit-variant packing:data.packing=true,training.global_batch_size=2 --out bench.json

Deviations from the course (local audiofolders replace the Hub datasets):

* datasets>=4 decodes audio with torchcodec, which fails here: the audio column is cast to
  ``Audio(decode=False)`` and ``prepare_dataset`` decodes with soundfile (+ soxr to 16 kHz). As
  ``load_dataset`` imports torchcodec even to store file paths, ``Audio.encode_example`` is swapped for a
  torchcodec-free one while it runs; it gets ``data_files={split: "**"}``, else files named
  ``dev-00000.flac`` make datasets infer split patterns that leave ``metadata.csv`` out.
* ``warmup_steps`` defaults to min(50, steps) (course: 50 of 4000). No evaluation or saving during
  training (``eval_strategy``/``save_strategy`` "no", ``report_to`` none): one timed ``evaluate`` at the end.
* transformers 5 loads checkpoints in their stored dtype: the model is loaded in float32 as 4.x did (the
  course's fp16 is mixed precision over float32 weights, and its evaluation generates with those float32
  weights, as here); fp16 needs CUDA.
* ``generate`` gets ``use_cache=True`` (and language/task) through ``functools.partial`` as in the course;
  English-only (``.en``) checkpoints get no language/task.
* WER with ``jiwer`` (the course's ``evaluate`` "wer" wraps it and needs the Hub) and
  ``BasicTextNormalizer``; empty normalised references are dropped (as the course does), and empty raw
  ones for the orthographic WER (jiwer refuses them); ``-100`` in generated ids becomes the pad token.
* Audio-hours/hour = mean clip duration of the (filtered) train split x clips drawn.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LAUNCH = ("ACCELERATE_USE_CPU=1 {python} -m accelerate.commands.launch --multi_gpu --num_processes 2 "
                  "--num_machines 1 --mixed_precision no --dynamo_backend no")
ROWS = [("train_samples_per_second", "training clips/s"), ("audio_hours_per_hour", "audio-hours/hour"),
        ("eval_utterances_per_second", "eval utterances/s"), ("preprocess_seconds", "preprocess wall s"),
        ("preprocessed_bytes", "preprocessed MB"), ("eval_wer_normalized", "WER normalised %"),
        ("eval_wer", "WER orthographic %"), ("train_clips", "train clips"), ("world_size", "processes"),
        ("device", "device"), ("mfu", "MFU")]
RATIOS = [("train_clips_per_s_x", "train_samples_per_second", False),  # (label, key, recipe/toolkit?)
          ("audio_hours_per_hour_x", "audio_hours_per_hour", False),
          ("eval_utt_per_s_x", "eval_utterances_per_second", False),
          ("preprocess_speedup_x", "preprocess_seconds", True), ("bytes_on_disk_x", "preprocessed_bytes", True)]


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """The course's collator: pad features and labels, -100 on label padding, drop a shared start token."""

    processor: Any
    decoder_start_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = [{"input_features": f["input_features"][0]} for f in features]
        batch = self.processor.feature_extractor.pad(inputs, return_tensors="pt")
        labels_batch = self.processor.tokenizer.pad([{"input_ids": f["labels"]} for f in features],
                                                    return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def encode_audio_without_torchcodec(audio: Any, value: Any) -> dict[str, Any]:
    """``Audio.encode_example`` for paths and bytes, minus its unconditional torchcodec import."""
    if isinstance(value, (str, Path)):
        return {"bytes": None, "path": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, dict) and "array" not in value:
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    raise TypeError(f"cannot encode {type(value).__name__} audio without torchcodec")


def read_audio(audio: dict[str, Any], rate: int) -> Any:
    import numpy as np
    import soundfile as sf
    import soxr

    data, sr = sf.read(io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"], dtype="float32")
    if data.ndim > 1:
        data = data.mean(axis=1)
    return np.asarray(soxr.resample(data, sr, rate) if sr != rate else data, dtype=np.float32)


def compute_metrics(pred: Any, processor: Any) -> dict[str, float]:
    import jiwer
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    pad = processor.tokenizer.pad_token_id
    pred_ids, label_ids = pred.predictions, pred.label_ids
    pred_ids[pred_ids == -100] = pad
    label_ids[label_ids == -100] = pad
    preds = processor.batch_decode(pred_ids, skip_special_tokens=True)
    refs = processor.batch_decode(label_ids, skip_special_tokens=True)
    keep = [i for i, r in enumerate(refs) if r.strip()]
    wer_ortho = 100 * jiwer.wer([refs[i] for i in keep], [preds[i] for i in keep])
    normalizer = BasicTextNormalizer()
    preds_n, refs_n = [normalizer(p) for p in preds], [normalizer(r) for r in refs]
    keep = [i for i, r in enumerate(refs_n) if len(r) > 0]
    wer = 100 * jiwer.wer([refs_n[i] for i in keep], [preds_n[i] for i in keep])
    return {"wer_ortho": wer_ortho, "wer": wer}


def cache_bytes(dataset: Any) -> int:
    return sum(os.path.getsize(f["filename"]) for f in dataset.cache_files if os.path.exists(f["filename"]))


def run_recipe(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import datasets
    import torch
    import transformers as tf

    english_only = ".en" in str(args.model)  # e.g. whisper-tiny.en: no language/task
    language = None if english_only else args.language
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise SystemExit("--precision fp16 needs CUDA (the course's fp16=True)")
    processor = tf.WhisperProcessor.from_pretrained(args.model, **({"language": language, "task": "transcribe"}
                                                                 if language else {}))
    rate = processor.feature_extractor.sampling_rate

    cache = workdir / "recipe-cache"
    shutil.rmtree(cache, ignore_errors=True)
    tick = time.perf_counter()
    splits, encode = {}, datasets.Audio.encode_example
    datasets.Audio.encode_example = encode_audio_without_torchcodec  # type: ignore[method-assign]
    try:
        for name, path, cap in (("train", args.train, args.max_train), ("test", args.dev, args.max_dev)):
            ds = datasets.load_dataset("audiofolder", data_dir=str(path), data_files={name: "**"},
                                       cache_dir=str(cache))[name]
            splits[name] = ds.select(range(min(cap, len(ds)))) if cap else ds
    finally:
        datasets.Audio.encode_example = encode  # type: ignore[method-assign]
    common_voice = datasets.DatasetDict(splits).select_columns(["audio", "sentence"])
    common_voice = common_voice.cast_column("audio", datasets.Audio(decode=False))

    def prepare_dataset(example: dict[str, Any]) -> dict[str, Any]:
        array = read_audio(example["audio"], rate)
        out = processor(audio=array, sampling_rate=rate, text=example["sentence"])
        out["input_length"] = len(array) / rate
        return out

    common_voice = common_voice.map(prepare_dataset, remove_columns=common_voice.column_names["train"],
                                     num_proc=args.num_proc)
    preprocessed_bytes = cache_bytes(common_voice["train"])
    common_voice["train"] = common_voice["train"].filter(lambda n: 0 < n < 30.0, input_columns=["input_length"])
    preprocess_s = time.perf_counter() - tick
    train_ds, dev_ds = common_voice["train"], common_voice["test"]
    mean_s = sum(train_ds["input_length"]) / max(1, len(train_ds))

    model = tf.WhisperForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)  # 4.x default
    model.config.use_cache = False
    if language:
        model.generation_config.language, model.generation_config.task = language, "transcribe"
        model.generate = partial(model.generate, language=language, task="transcribe", use_cache=True)
    else:
        model.generate = partial(model.generate, use_cache=True)
    half = {"fp16": args.precision == "fp16", "bf16": args.precision == "bf16"}
    targs = tf.Seq2SeqTrainingArguments(
        output_dir=str(workdir / "recipe-run"), per_device_train_batch_size=args.global_batch,
        gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup, max_steps=args.steps, gradient_checkpointing=True, **half,
        eval_strategy="no",
        per_device_eval_batch_size=16, predict_with_generate=True, generation_max_length=225,
        save_strategy="no", logging_steps=25, report_to="none")
    trainer = tf.Seq2SeqTrainer(
        model=model, args=targs, train_dataset=train_ds, eval_dataset=dev_ds,
        data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
        compute_metrics=partial(compute_metrics, processor=processor), processing_class=processor)
    if targs.n_gpu > 1:
        print(f"[bench_seed] {targs.n_gpu} GPUs visible: the recipe's batch is {targs.n_gpu}x{args.global_batch} "
              "(DataParallel); set CUDA_VISIBLE_DEVICES to one GPU", file=sys.stderr)
    res: dict[str, Any] = {"preprocess_seconds": preprocess_s, "preprocessed_bytes": preprocessed_bytes,
                           "world_size": 1, "device": str(targs.device), "mfu": None, "train_clips": None}
    if not args.skip_recipe_train:
        tick = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - tick
        clips = args.steps * args.global_batch
        res.update(train_clips=clips, train_seconds=train_s, train_samples_per_second=clips / train_s,
                   audio_hours_per_hour=clips * mean_s / train_s, train_loss=out.training_loss)
    tick = time.perf_counter()
    metrics = trainer.evaluate()
    eval_s = time.perf_counter() - tick
    res.update(eval_seconds=eval_s, eval_utterances=len(dev_ds), eval_utterances_per_second=len(dev_ds) / eval_s,
               eval_wer_normalized=metrics["eval_wer"], eval_wer=metrics["eval_wer_ortho"])
    settings = {"processes": 1, "torch_threads": torch.get_num_threads(), "per_device_batch": args.global_batch,
                "gradient_accumulation_steps": 1, "precision": args.precision, "gradient_checkpointing": True,
                "steps": 0 if args.skip_recipe_train else args.steps, "warmup_steps": args.warmup,
                "num_proc": args.num_proc, "language": language, "device": str(targs.device), "n_gpu": targs.n_gpu,
                "train_split": len(train_ds), "dev_split": len(dev_ds), "mean_clip_seconds": mean_s,
                "audio_hours_method": "mean clip duration of the train split x clips drawn"}
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res, settings


def split_launch(launch: str) -> tuple[dict[str, str], list[str]]:
    words, env = shlex.split(launch.format(python=sys.executable)), {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def last_json(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.lstrip().startswith("{")]
    if not lines:
        raise SystemExit("the toolkit printed no JSON line")
    return json.loads(lines[-1])


def run_toolkit(args: argparse.Namespace, workdir: Path, name: str, extra: list[str]) -> tuple[dict[str, Any], str]:
    env_extra, launch = split_launch(args.toolkit_launch)
    cache, out = workdir / f"{name}-cache", workdir / f"{name}-run"
    overrides = [f"model.name_or_path={args.model}", f"data.train={args.train}", f"data.eval={args.dev}",
                 f"data.cache_dir={cache}", f"output.dir={out}", f"training.global_batch_size={args.global_batch}",
                 # the recipe's optimisation, so that the WERs compare implementations, not settings
                 "training.learning_rate=1e-5", "training.lr_scheduler=constant", f"training.warmup_steps={args.warmup}",
                 "training.micro_batch_size=auto", "evaluation.batch_size=16", "evaluation.max_new_tokens=225",
                 f"training.mixed_precision={ {'fp32': 'no'}.get(args.precision, args.precision) }",
                 # and its samples: one clip per sample, <|notimestamps|> labels, no prompts (variants may
                 # override these: later overrides win)
                 "data.packing=false", "data.timestamp_probability=0", "data.condition_on_prev_probability=0"]
    overrides += [f"data.max_train_samples={args.max_train}"] if args.max_train else []
    overrides += [f"data.max_eval_samples={args.max_dev}"] if args.max_dev else []
    cmd = [*launch, "-m", "toolkit", "bench", "--config", "recipes/demo.yaml", *overrides,
           "--clips", str(args.steps * args.global_batch), *args.toolkit_override, *extra]
    if args.skip_recipe_train:  # eval only: the same (untrained) model on both sides
        cmd = [*launch, "-m", "toolkit", "evaluate", "--model", str(args.model), "--data", str(args.dev),
               "--batch-size", "16", "--max-new-tokens", "225", "--cache-dir", str(cache),
               *(["--max-samples", str(args.max_dev)] if args.max_dev else []),
               *(["--dtype", {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.precision]]), *extra]
    shown = shlex.join([f"{k}={v}" for k, v in env_extra.items()] + cmd)
    if args.fake_toolkit_json:
        return last_json(Path(args.fake_toolkit_json).read_text()), shown
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[bench_seed] {name}: {shown}", file=sys.stderr, flush=True)
    tick = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env_extra}, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:  # its stderr went straight to ours
        sys.stderr.write(result.stdout[-3000:])
        raise SystemExit(f"{name} failed ({result.returncode}): {shown}")
    data = last_json(result.stdout)
    if args.skip_recipe_train:  # `evaluate`'s keys, as the table names them
        data = {"eval_utterances_per_second": data["utterances_per_second"], "eval_wer_normalized": data["wer"],
                "eval_wer": data["wer_ortho"], "eval_utterances": data["num_samples"], "world_size": data["world_size"],
                "eval_seconds": data["seconds"]}
    data.setdefault("subprocess_wall_seconds", time.perf_counter() - tick)
    return data, shown


def ratio(num: Any, den: Any) -> float | None:
    return num / den if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den else None


def fmt(key: str, value: Any) -> str:
    if key == "preprocessed_bytes" and isinstance(value, (int, float)):
        value = value / 1e6
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Whisper checkpoint directory (model + processor)")
    p.add_argument("--train", type=Path, default=REPO / "demo/data/train", help="train audiofolder")
    p.add_argument("--dev", type=Path, default=REPO / "demo/data/dev", help="dev audiofolder")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (the recipe's max_steps)")
    p.add_argument("--global-batch", type=int, default=16, help="clips per optimizer step (course: 16)")
    p.add_argument("--warmup", type=int, default=None, help="recipe warmup steps (default min(50, steps))")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="recipe precision")
    p.add_argument("--language", default=None, help="multilingual checkpoints: e.g. sinhalese (the course)")
    p.add_argument("--num-proc", type=int, default=1, help="recipe datasets.map num_proc")
    p.add_argument("--workdir", type=Path, default=None, help="caches and runs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--max-train", type=int, default=None, help="first N train clips (both sides)")
    p.add_argument("--max-dev", type=int, default=None, help="first N dev utterances (both sides)")
    p.add_argument("--skip-recipe-train", action="store_true",
                   help="eval only, on the same untrained model: the recipe preprocesses and evaluates, the toolkit "
                   "runs `toolkit evaluate`")
    p.add_argument("--toolkit-launch", default=DEFAULT_LAUNCH, help="toolkit command prefix ({python}: this one)")
    p.add_argument("--toolkit-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toolkit-variant", action="append", default=[], metavar="NAME:KEY=V,KEY=V")
    p.add_argument("--only", choices=["recipe", "toolkit"], default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the final JSON here")
    p.add_argument("--fake-toolkit-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = min(50, args.steps) if args.warmup is None else args.warmup
    args.train, args.dev = args.train.resolve(), args.dev.resolve()  # the toolkit runs from the repo root
    args.model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    args.workdir = args.workdir.resolve() if args.workdir else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-seed-")) if temp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    sides: dict[str, dict[str, Any]] = {}
    commands: dict[str, str] = {}
    settings: dict[str, Any] = {}
    variants = [("toolkit", [])] + [(v.partition(":")[0], [o for o in v.partition(":")[2].split(",") if o])
                                     for v in args.toolkit_variant]
    try:
        if args.only != "toolkit":
            sides["recipe"], settings = run_recipe(args, workdir)
        if args.only != "recipe":
            for name, extra in variants:
                sides[name], commands[name] = run_toolkit(args, workdir, name, extra)
    finally:
        if temp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    names = list(sides)
    width = max(12, *(len(n) + 2 for n in names))
    print(f"\n{'':<22}" + "".join(f"{n:>{width}}" for n in names))
    for key, label in ROWS:
        print(f"{label:<22}" + "".join(f"{fmt(key, sides[n].get(key)):>{width}}" for n in names))
    ratios: dict[str, dict[str, float | None]] = {}
    base = sides.get("recipe", {})
    for name in [n for n in names if n != "recipe" and base]:
        tk = sides[name]
        ratios[name] = {label: ratio(base.get(key), tk.get(key)) if inverse else ratio(tk.get(key), base.get(key))
                        for label, key, inverse in RATIOS}
        for label, key in (("wer_normalized_diff_pts", "eval_wer_normalized"), ("wer_diff_pts", "eval_wer")):
            ok = isinstance(tk.get(key), (int, float)) and isinstance(base.get(key), (int, float))
            ratios[name][label] = tk[key] - base[key] if ok else None
    if ratios:
        print("\nratios vs recipe (x: >1 means the toolkit is better; WER: points, <0 better)")
        print(f"{'':<26}" + "".join(f"{n:>{width}}" for n in ratios))
        for key in next(iter(ratios.values())):
            print(f"{key:<26}" + "".join(f"{fmt(key, ratios[n][key]):>{width}}" for n in ratios))
    if settings:
        print("\nrecipe ran: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for name, cmd in commands.items():
        print(f"{name} ran: {cmd}" + (" (faked from --fake-toolkit-json)" if args.fake_toolkit_json else ""))
    line = json.dumps({"sides": sides, "ratios": ratios, "recipe_settings": settings, "toolkit_commands": commands,
                       "steps": args.steps, "global_batch": args.global_batch, "max_train": args.max_train,
                       "max_dev": args.max_dev, "fake_toolkit": bool(args.fake_toolkit_json)})
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
