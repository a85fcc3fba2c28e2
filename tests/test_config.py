"""Recipe loading: overrides, types, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.config import ConfigError, load_config
from toolkit.launch import LaunchInfo

ROOT = Path(__file__).resolve().parents[1]

BASE = """
model: {name_or_path: some/model}
data: {train: /data/train}
training: {max_steps: 10}
output: {dir: /tmp/out}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_load() -> None:
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        overrides = ["model.name_or_path=x"] if "demo" in recipe.name else []
        config = load_config(recipe, overrides)
        assert config.training.max_steps > 0


def test_seed_recipe_matches_the_course() -> None:
    config = load_config(ROOT / "recipes" / "dhivehi-whisper-small.yaml")
    assert config.model.language == "sinhalese" and config.model.stand_in_for == "dhivehi"
    assert config.data.train_split == "train+validation"
    t = config.training
    assert (t.max_steps, t.global_batch_size, t.learning_rate, t.warmup_steps) == (500, 16, 1e-5, 50)
    assert t.mixed_precision == "fp16" and t.gradient_checkpointing


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, BASE),
        ["training.learning_rate=3e-5", "training.max_grad_norm=null", "model.freeze_encoder=true", "data.num_proc=4"],
    )
    assert config.training.learning_rate == pytest.approx(3e-5)
    assert config.training.max_grad_norm is None
    assert config.model.freeze_encoder is True
    assert config.data.num_proc == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.lerning_rate=1", "unknown key training.lerning_rate (did you mean training.learning_rate?)"),
        ("bogus.key=1", "unknown key bogus"),
        ("training.max_steps=ten", "training.max_steps must be an integer, got 'ten'"),
        ("training.max_steps=1.5", "training.max_steps must be an integer"),
        ("training.learning_rate=-1", "training.learning_rate must be positive"),
        ("training.mixed_precision=fp8", "training.mixed_precision must be one of 'no', 'fp16', 'bf16'"),
        ("model.freeze_encoder=maybe", "model.freeze_encoder must be true or false"),
        ("training.warmup_steps=-1", "training.warmup_steps must be >= 0, got -1"),
        ("training.seed=-1", "training.seed must be in [0, 2**32), got -1"),
        ("training.seed=4294967296", "training.seed must be in [0, 2**32)"),
        # NaN passes a check written `x <= 0`; it and infinity are refused for every float key.
        ("training.learning_rate=nan", "training.learning_rate must be a finite number, got 'nan'"),
        ("training.learning_rate=.inf", "training.learning_rate must be a finite number, got inf"),
        ("training.adam_epsilon=nan", "training.adam_epsilon must be a finite number"),
        ("training.max_grad_norm=nan", "training.max_grad_norm must be a finite number"),
        ("training.max_grad_norm=inf", "training.max_grad_norm must be a finite number"),
        ("training.weight_decay=nan", "training.weight_decay must be a finite number"),
        ("training.weight_decay=-.inf", "training.weight_decay must be a finite number, got -inf"),
        ("training.adam_beta1=nan", "training.adam_beta1 must be a finite number"),
        ("model.mask_time_prob=.nan", "model.mask_time_prob must be a finite number"),
        ("lora.dropout=nan", "lora.dropout must be a finite number"),
        ("data.max_duration_s=40", "data.max_duration_s must be in (0, 30]"),
        ("model.language=dhivehi", "model.language: Whisper has no language 'dhivehi'"),
        ("output.push_to_hub=true", "output.push_to_hub needs output.hub_model_id"),
        ("data.timestamp_probability=1.5", "data.timestamp_probability must be in [0, 1], got 1.5"),
        ("data.condition_on_prev_probability=-0.1", "data.condition_on_prev_probability must be in [0, 1]"),
        ("evaluation.guard=[{name: g, data: x, kind: bogus}]",
         "evaluation.guard[0].kind must be one of 'general', 'no_speech', 'long_form', got 'bogus'"),
        ("evaluation.guard=[{name: g}]", "evaluation.guard[0].data is required"),
        ("evaluation.guard=[{name: a, data: x}, {name: a, data: y}]", "evaluation.guard: names must differ, got a, a"),
        ("evaluation.guard=[{nme: a}]", "unknown key evaluation.guard[0].nme (did you mean evaluation.guard[0].name?)"),
        ("evaluation.guard=[{name: 'a b', data: x}]", "evaluation.guard[0].name must be a non-empty name"),
        ("evaluation.guard=[{name: a, data: x, max_rise: -1}]", "evaluation.guard[0].max_rise must be >= 0"),
        ("training=3", "override key 'training' must be dotted"),
        ("nodots", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE), [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_guard_sets_round_trip_through_the_saved_recipe(tmp_path: Path) -> None:
    from toolkit.config import dump_config

    guard = "evaluation.guard=[{name: gen, data: x, weight: 0.5}, {name: quiet, data: y, kind: no_speech, max_rise: 2}]"
    config = load_config(write(tmp_path, BASE), [guard])
    assert [(g.name, g.kind, g.weight, g.max_rise) for g in config.evaluation.guard] == [
        ("gen", "general", 0.5, None), ("quiet", "no_speech", 0.0, 2.0)
    ]
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(config))
    assert load_config(saved).evaluation.guard == config.evaluation.guard


def test_stand_in_language_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.stand_in_for: dhivehi"):
        load_config(write(tmp_path, BASE), ["model.language=dhivehi"])
    config = load_config(write(tmp_path, BASE), ["model.language=sinhalese", "model.stand_in_for=dhivehi"])
    assert config.model.language == "sinhalese"


def test_missing_required_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(write(tmp_path, "data: {train: x}\ntraining: {max_steps: 1}\noutput: {dir: o}\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="training must be a mapping, got int"):
        load_config(write(tmp_path, BASE.replace("training: {max_steps: 10}", "training: 3")))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_cli_reports_config_error_in_one_line(tmp_path: Path) -> None:
    import contextlib
    import io

    from toolkit.cli import EXIT_CONFIG, main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", str(write(tmp_path, BASE)), "training.max_steps=0"])
    assert code == EXIT_CONFIG
    assert err.getvalue().strip() == "config error: training.max_steps must be positive, got 0"


@pytest.mark.parametrize(
    ("overrides", "launch", "message"),
    [
        (["model.quantization=int8"], LaunchInfo(), "model.quantization=int8 needs training.method=lora"),
        (["model.quantization=nf4", "training.method=lora"], LaunchInfo(2, True, 3),
         "model.quantization=nf4 cannot run under DeepSpeed ZeRO-3: ZeRO partitions"),
        (["model.quantization=int8", "training.method=lora"], LaunchInfo(2, True, 2, offload_optimizer=True),
         "cannot run under DeepSpeed ZeRO-2 with optimizer offload"),
        (["training.optimizer=adamw8bit"], LaunchInfo(2, True, 2), "use training.optimizer=adamw with DeepSpeed"),
        (["training.method=lora"], LaunchInfo(2, True, 3), "training.method=lora cannot run under DeepSpeed ZeRO-3"),
    ],
)
def test_impossible_mode_combinations_are_refused(tmp_path: Path, overrides: list[str], launch: LaunchInfo, message: str) -> None:
    config = load_config(write(tmp_path, BASE), overrides[:0])
    for item in overrides:
        apply_override_to(config, item)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.validate(launch=launch)


def test_valid_low_memory_modes_load(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, BASE),
        ["training.method=lora", "model.quantization=nf4", "lora.target_modules=q_proj,k_proj,v_proj", "lora.rank=8"],
    )
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj"] and config.lora.rank == 8
    config.validate(launch=LaunchInfo(world_size=2))


def test_launch_info_reads_the_deepspeed_json(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}')
    info = LaunchInfo.from_env({"WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true",
                                "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})
    assert (info.world_size, info.zero_stage, info.offload_params, info.offload_optimizer) == (4, 3, True, False)
    assert info.description == "DeepSpeed ZeRO-3 with parameters offload"
    assert LaunchInfo.from_env({"WORLD_SIZE": "2"}).description == "DDP"


def apply_override_to(config, item: str) -> None:  # noqa: ANN001
    section, _, rest = item.partition(".")
    key, _, value = rest.partition("=")
    setattr(getattr(config, section), key, value)


def test_micro_batch_auto_is_the_per_process_batch_and_turns_the_probe_on() -> None:
    base = ["model.name_or_path=m", "output.dir=o", "data.train=x", "training.max_steps=1", "training.global_batch_size=32"]
    auto = load_config(None, base).training
    assert auto.micro_batch_size == "auto" and auto.probe and auto.micro_batch_ceiling(4) == 8
    fixed = load_config(None, [*base, "training.micro_batch_size=16"]).training
    assert not fixed.probe and fixed.micro_batch_ceiling(4) == 8 and fixed.micro_batch_ceiling(1) == 16
    assert load_config(None, [*base, "training.micro_batch_size=4", "training.probe_micro_batch=true"]).training.probe
    with pytest.raises(ConfigError, match="positive or auto"):
        load_config(None, [*base, "training.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(None, [*base, "training.micro_batch_size=big"])


def test_nan_in_a_recipe_file_is_refused(tmp_path: Path) -> None:
    recipe = write(tmp_path, BASE.replace("{max_steps: 10}", "{max_steps: 10, learning_rate: .nan}"))
    with pytest.raises(ConfigError, match=r"^training.learning_rate must be a finite number, got nan$"):
        load_config(recipe)


def test_validation_refuses_nan_in_a_config_built_in_code(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    for key in ("learning_rate", "adam_epsilon", "max_grad_norm", "weight_decay"):
        setattr(config.training, key, float("nan"))
        with pytest.raises(ConfigError, match=f"training.{key} must be"):
            config.validate()
        setattr(config.training, key, 1e-3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "training: {max_steps: 3}\n",
         r"recipe .*recipe.yaml: duplicate key training on line 6 \(first on line 4\); keep one$"),
        ("model:\n  name_or_path: a\n  language: german\n  name_or_path: b\n",
         r"duplicate key model.name_or_path on line 4 \(first on line 2\)"),
        ("lora:\n  target_modules:\n    - {a: 1, a: 2}\n", r"duplicate key lora.target_modules\[0\].a on line 3"),
    ],
)
def test_duplicate_keys_are_refused_with_their_lines(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_unreadable_recipes_are_one_line_errors(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(BASE.encode() + "# café\n".encode("latin-1"))
    errors = []
    for path in (latin1, tmp_path):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        errors.append(str(info.value))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "model:\n  name_or_path: [a,\n"))
    errors.append(str(info.value))
    assert errors[0] == f"recipe {latin1} is not UTF-8 text (byte 0xe9 on line 6); save it as UTF-8"
    assert errors[1] == f"recipe {tmp_path} is not a file"
    assert errors[2].startswith(f"recipe {tmp_path / 'recipe.yaml'} is not valid YAML: line 3, column 1: ")
    assert all("\n" not in error for error in errors)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_config(bom).training.max_steps == 10


def test_output_dir_must_be_a_writable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    recipe = write(tmp_path, BASE)
    cases = {
        str(a_file): f"output.dir: {a_file} is a file, not a directory",
        str(a_file / "run" / "x"): f"output.dir: {a_file / 'run' / 'x'} lies under {a_file}, which is a file",
    }
    for value, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(recipe, [f"output.dir={value}"])
        assert str(info.value) == message
    assert load_config(recipe, [f"output.dir={tmp_path / 'new' / 'run'}"]).output.dir.endswith("run")
    # Root passes permission bits, so a read-only directory is simulated where the check asks.
    import toolkit.config

    monkeypatch.setattr(toolkit.config.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=f"output.dir: {tmp_path / 'new'} is not writable"):
        load_config(recipe, [f"output.dir={tmp_path / 'new'}"])


def test_uneven_global_batch_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from toolkit.cli import EXIT_CONFIG, main

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="training.global_batch_size=16 cannot be split evenly over 3 processes"):
        load_config(write(tmp_path, BASE))
    assert load_config(write(tmp_path, BASE), ["training.global_batch_size=18"]).training.micro_batch_ceiling(3) == 6
    # The model does not exist: a config error (2), not the model's (3), shows the check ran first.
    assert main(["train", "--config", str(write(tmp_path, BASE)), f"model.name_or_path={tmp_path / 'none'}"]) == EXIT_CONFIG
    assert "cannot be split evenly over 3 processes" in capsys.readouterr().err


def test_ceilings_are_clamped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    demo = ROOT / "recipes" / "demo.yaml"  # micro-batch 8, warm-up 6
    with caplog.at_level("WARNING", logger="toolkit.config"):
        small = load_config(demo, ["model.name_or_path=x", "training.global_batch_size=4"]).training
        short = load_config(demo, ["model.name_or_path=x", "training.max_steps=3"]).training
    assert small.micro_batch_size == 8 and small.micro_batch_ceiling(1) == 4
    assert "training.micro_batch_size=8 is more than the 4 samples per process" in caplog.text
    assert (short.max_steps, short.warmup_steps) == (3, 3)
    assert "training.warmup_steps=6 is more than training.max_steps=3: warming up over all 3 steps" in caplog.text


def test_bad_launcher_settings_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match=f"DeepSpeed config {broken} is not valid JSON: "):
        LaunchInfo.from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(broken)})
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='two' \(set by the launcher\) must be a positive integer"):
        LaunchInfo.from_env({"WORLD_SIZE": "two"})


def test_an_unquoted_no_is_the_string_for_keys_that_take_it(tmp_path: Path) -> None:
    # YAML 1.1 reads `no` as false: `training.mixed_precision=no` must still mean "no".
    base = ["model.name_or_path=m", "data.train=d", f"output.dir={tmp_path}", "training.max_steps=1"]
    config = load_config(None, [*base, "training.mixed_precision=no"])
    assert config.training.mixed_precision == "no"
    with pytest.raises(ConfigError, match="true or false or 'auto'"):
        load_config(None, [*base, "training.gradient_checkpointing=maybe"])
