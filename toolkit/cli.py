"""Command line: ``python -m toolkit {train,evaluate,bench,synth,prepare,plan}`` (also ``whisper-toolkit``).

Every command runs alone or under ``accelerate launch``; the launch decides the world size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
import warnings
from pathlib import Path

import yaml

from toolkit.config import (
    ConfigError,
    DataConfig,
    EvaluationConfig,
    ModelConfig,
    check_writable_dir,
    load_config,
)
from toolkit.config_sets import Corpus
from toolkit.recipe import build_dataclass

logger = logging.getLogger("toolkit")

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_OUT_OF_MEMORY = 4
EXIT_NONFINITE = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-toolkit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a Whisper checkpoint (resumes automatically)")
    train.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    train.add_argument("overrides", nargs="*", help="dotted recipe overrides: training.learning_rate=3e-5")

    ev = sub.add_parser("evaluate", help="WER/CER of a model on a data set; prints one JSON line")
    _add_evaluate_arguments(ev)

    bench = sub.add_parser(
        "bench", help="speed of a recipe (training + one eval: clips/s, audio-hours/hour, MFU, memory); "
        "`bench features`: cached vs per-batch log-mel features",
    )
    bench.add_argument("overrides", nargs="*", help="dotted recipe overrides; or the word `features`")
    bench.add_argument("--config", help="recipe YAML to bench")
    bench.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    bench.add_argument("--clips", type=int, default=None, help="train until this many clips are seen")
    bench.add_argument("--peak-tflops", type=float, default=None, help="one device's peak, for MFU")
    bench.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the steady_* figures")
    bench.add_argument("--data", help="bench features: an audiofolder or manifest")
    bench.add_argument("--model", help="bench features: a Whisper directory (for its feature extractor)")
    bench.add_argument("--samples", type=int, default=256, help="bench features: clips")
    bench.add_argument("--batch-size", type=int, default=16, help="bench features: batch size")
    bench.add_argument("--workdir", default=None, help="bench features: where to write the feature store")

    from toolkit.synth_words import LANGUAGES  # stdlib only: no audio stack at parse time

    synth = sub.add_parser(
        "synth", help="synthesise an English or French audiofolder corpus with espeak-ng (no download)"
    )
    synth.add_argument(
        "--out", required=True, help="output directory; gets train/ and dev/ (and longform/, nospeech/) audiofolders"
    )
    synth.add_argument(
        "--train", type=int, default=400, help="number of training utterances (0, with --dev 0: no train/dev)"
    )
    synth.add_argument("--dev", type=int, default=100, help="number of dev utterances")
    synth.add_argument(
        "--long-form", type=int, default=0, metavar="N",
        help="also write N long-form recordings (dev sentences with pauses, segment times) to longform/",
    )
    synth.add_argument(
        "--long-minutes", type=float, nargs=2, default=[2.0, 5.0], metavar=("MIN", "MAX"),
        help="length range of a long-form recording, in minutes (default 2 5)",
    )
    synth.add_argument(
        "--no-speech", type=int, default=0, metavar="N",
        help="also write N clips of silence, noise or hum (2-30 s) to nospeech/",
    )
    synth.add_argument(
        "--language", choices=sorted(LANGUAGES), default="en",
        help="language of the sentences and espeak-ng voices (default en)",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="espeak-ng processes at once")
    synth.add_argument("--overwrite", action="store_true", help="replace existing splits and sets")

    prepare = sub.add_parser("prepare", help="decode a source once into WebDataset tar shards plus an index")
    prepare.add_argument("--data", required=True, help="an audiofolder, a manifest or a Hub dataset id")
    prepare.add_argument("--out", required=True, help="directory for index.json, skipped.jsonl and the tar shards")
    prepare.add_argument("--shard-size", type=int, default=1000, help="source rows per shard")
    prepare.add_argument("--split", default="train", help="Hub split, or an audiofolder's split sub-directory")
    prepare.add_argument("--hub-config", default=None, help="Hub dataset configuration")
    prepare.add_argument("--text-column", default="sentence", help="transcript column")
    prepare.add_argument("--audio-column", default=None, help="audio column (default: auto-detected)")
    prepare.add_argument("--max-duration-s", type=float, default=30.0,
                         help="longer clips are dropped, longer recordings with segments cut into windows")
    prepare.add_argument("--language", default=None, help="language of every sample (multi-corpus runs)")
    prepare.add_argument("--max-samples", type=int, default=None, help="only the first N source rows")
    prepare.add_argument("--num-proc", type=int, default=1, help="worker processes of this task")
    prepare.add_argument("--task", type=int, default=0, help="this task's number (a Slurm array's task id)")
    prepare.add_argument("--tasks", type=int, default=1, help="tasks sharing the work (a Slurm array's task count)")

    plan = sub.add_parser("plan", help="estimate peak GPU memory per training mode; recommend the fastest that fits")
    from toolkit.memory.report import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    return parser


def _add_evaluate_arguments(ev: argparse.ArgumentParser) -> None:
    """The ``evaluate`` options. Their defaults are the config dataclasses' own, so that a recipe and
    the command line cannot drift apart; ``--help`` shows them."""
    model, data, evaluation = ModelConfig(), DataConfig(), EvaluationConfig()
    shown = " (default: %(default)s)"
    ev.add_argument("--model", required=True, help="model directory or Hub id")
    ev.add_argument("--data", required=True,
                    help="audiofolder directory, .csv/.jsonl manifest or Hub dataset id; or a YAML list of sets, "
                         "'[{path: A, language: fr, name: fr}, {path: B, language: en}]', each decoded in its "
                         "language and reported per set, per language and in total")
    ev.add_argument("--split", default=data.eval_split,
                    help="split expression for Hub data or split sub-directories" + shown)
    ev.add_argument("--hub-config", default=data.hub_config, help="Hub dataset configuration name")
    ev.add_argument("--text-column", default=data.text_column, help="column holding the transcript" + shown)
    ev.add_argument("--audio-column", default=data.audio_column,
                    help="column holding the audio (default: auto-detected)")
    ev.add_argument("--language", default=model.language,
                    help="Whisper language (default: the one the checkpoint's generation config records; "
                         "multilingual checkpoints need one)")
    ev.add_argument("--task", default=None, choices=_choices(ModelConfig, "task"),
                    help=f"Whisper task (default: the checkpoint's, else {model.task})")
    ev.add_argument("--quantization", default=model.quantization, choices=_choices(ModelConfig, "quantization"),
                    help="load the base quantised (for a LoRA adapter directory trained that way)" + shown)
    ev.add_argument("--batch-size", type=int, default=evaluation.batch_size,
                    help="utterances per generate() call on one process, at most (halved on out-of-memory)" + shown)
    ev.add_argument("--max-new-tokens", type=int, default=evaluation.max_new_tokens,
                    help="generation length limit (tokens after the prompt)" + shown)
    ev.add_argument("--num-beams", type=int, default=evaluation.num_beams, help="beams; 1 is greedy decoding" + shown)
    ev.add_argument("--static-cache", action="store_true",
                    help="decode with a static KV cache (compiled by transformers on CUDA)")
    ev.add_argument("--long-form", action="store_true",
                    help="the data holds long recordings (any length, the whole transcript each): transcribe them "
                         "with sequential long-form decoding and report windows, windows_without_timestamps and "
                         "repetition_rate (--max-new-tokens then counts per 30 s window, at most 220)")
    ev.add_argument("--temperature-fallback", action="store_true",
                    help="with --long-form: Whisper's temperature fallback and no-speech skipping")
    ev.add_argument("--max-samples", type=int, default=data.max_eval_samples,
                    help="evaluate only the first N samples (default: all)")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="weights dtype; auto is bf16 (fp16 without bf16 support) on a GPU, fp32 on CPU" + shown)
    ev.add_argument("--cache-dir", default=data.cache_dir,
                    help="preprocessing cache (default: $WHISPER_TOOLKIT_CACHE or ~/.cache/whisper-toolkit)")
    ev.add_argument("--num-workers", type=int, default=data.num_workers,
                    help="DataLoader worker processes per process" + shown)
    ev.add_argument("--predictions", default=None, help="also write id/reference/prediction JSON lines here")


def _choices(config_class: type, name: str) -> tuple[str, ...]:
    """The values of a ``Literal`` config field: argparse choices taken from their one definition."""
    return typing.get_args(typing.get_type_hints(config_class)[name])


def setup_logging(verbose: bool) -> None:
    from toolkit.distributed import is_main_process_env

    main = is_main_process_env()
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:
        import datasets
        import transformers

        logging.getLogger("accelerate").setLevel(logging.WARNING)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-call int8 cast notices
        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a launched process (one of several ranks) then leaves without interpreter teardown."""
    code = _run(argv)
    from toolkit.distributed import leave

    return leave(code)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; recipe overrides may also follow options (``bench --clips 64 a.b=1``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _run(argv: list[str] | None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from toolkit.data.sources import DataError
    from toolkit.modeling import ModelLoadError, check_model_source
    from toolkit.oom import OutOfMemoryAtMicroBatchOne, UnrecoverableOutOfMemory

    try:
        if args.command == "train":
            # Logging first, so that what validation clamps is logged like the rest (the imports it
            # costs are already made: ModelLoadError's module above).
            setup_logging(args.verbose)
            config = load_config(args.config, args.overrides)
            check_model_source(config.model.name_or_path)
            from toolkit.training.checkpoint import CheckpointWriteError
            from toolkit.training.loop import train
            from toolkit.training.signals import EXIT_PREEMPTED, Preempted
            from toolkit.training.step import NonFiniteTraining

            try:
                train(config)
            except Preempted as exc:
                print(str(exc), file=sys.stderr)
                return EXIT_PREEMPTED
            except CheckpointWriteError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return EXIT_DATA
            except NonFiniteTraining as exc:
                print(f"non-finite training [rank {os.environ.get('RANK', '0')}]: {exc}", file=sys.stderr, flush=True)
                return EXIT_NONFINITE
        elif args.command == "evaluate":
            setup_logging(args.verbose)
            return _evaluate(args)
        elif args.command == "bench":
            setup_logging(args.verbose)
            return _bench(args)
        elif args.command == "synth":
            from toolkit import synth_long

            check_writable_dir("--out", args.out)

            def progress(done: int, total: int, unit: str = "clips") -> None:
                # A long-form recording is minutes of audio: each one is worth a line.
                if done % 100 == 0 or done == total or unit == "long-form recordings":
                    print(f"synth: {done}/{total} {unit}", file=sys.stderr, flush=True)

            summary = synth_long.synthesize_sets(
                args.out, train=args.train, dev=args.dev, long_form=args.long_form,
                long_minutes=tuple(args.long_minutes), no_speech=args.no_speech, seed=args.seed,
                jobs=args.jobs, overwrite=args.overwrite, progress=progress, language=args.language,
            )
            print(json.dumps(summary), flush=True)
        elif args.command == "prepare":
            setup_logging(args.verbose)
            from toolkit.data.prepare import run_cli as run_prepare

            return run_prepare(args)
        elif args.command == "plan":
            from toolkit.memory.report import run_cli as run_plan

            return run_plan(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA
    except (OutOfMemoryAtMicroBatchOne, UnrecoverableOutOfMemory) as exc:
        # Every rank prints it: they all agreed on it (or the launcher is about to stop them).
        print(f"out of memory [rank {os.environ.get('RANK', '0')}]: {exc}", file=sys.stderr, flush=True)
        return EXIT_OUT_OF_MEMORY
    return 0


def _bench(args: argparse.Namespace) -> int:
    from toolkit.modeling import check_model_source

    if args.overrides[:1] == ["features"]:
        from toolkit.bench.features import run_features

        if not args.data or not args.model:
            raise ConfigError("bench features needs --data and --model")
        check_model_source(args.model)
        if args.workdir:
            check_writable_dir("--workdir", args.workdir)
        print(json.dumps(run_features(args.data, args.model, args.samples, args.batch_size, args.workdir)))
        return 0
    if not args.config:
        raise ConfigError("bench needs --config RECIPE (or `bench features`)")
    from toolkit.bench.training import BenchOptions, bench

    options = BenchOptions(steps=args.steps, clips=args.clips, peak_tflops=args.peak_tflops,
                           warmup_steps=args.warmup_steps)
    config = load_config(args.config, args.overrides)
    check_model_source(config.model.name_or_path)
    bench(config, options)
    return 0


def eval_sets(spec: str) -> str | list[Corpus]:
    """``--data``: one data spec, or (a YAML list) several ``{path, language, task, name}`` sets."""
    if not spec.lstrip().startswith("["):
        return spec
    try:
        raw = yaml.safe_load(spec)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--data: not a YAML list of {{path, language, task, name}} sets: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, list):
        raise ConfigError("--data: a list of sets must be a YAML list, [{path: A, language: fr}, ...]")
    return [build_dataclass(Corpus, item, prefix=f"--data[{i}].") for i, item in enumerate(raw)]


def _evaluate(args: argparse.Namespace) -> int:
    from toolkit.distributed import init_state
    from toolkit.evaluation.run import evaluation_prompt, run_evaluate
    from toolkit.modeling import check_model_source

    check_model_source(args.model)
    if args.predictions:  # checked now: it is written after the whole evaluation
        if Path(args.predictions).is_dir():
            raise ConfigError(f"--predictions: {args.predictions} is a directory; give a file name")
        check_writable_dir("--predictions", str(Path(args.predictions).parent))
    language, task = evaluation_prompt(args.model, args.language, args.task)
    model_cfg = ModelConfig(name_or_path=args.model, language=language, task=task, quantization=args.quantization)
    data_cfg = DataConfig(
        eval=eval_sets(args.data), eval_split=args.split, hub_config=args.hub_config, text_column=args.text_column,
        audio_column=args.audio_column, max_eval_samples=args.max_samples, cache_dir=args.cache_dir,
        num_workers=args.num_workers,
    )
    eval_cfg = EvaluationConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                static_cache=args.static_cache, long_form=args.long_form,
                                temperature_fallback=args.temperature_fallback)
    for section in (model_cfg, data_cfg, eval_cfg):
        section.validate()
    state = init_state()
    metrics = run_evaluate(model_cfg, data_cfg, eval_cfg, dtype=args.dtype, predictions_path=args.predictions)
    if state.is_main_process:
        print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
