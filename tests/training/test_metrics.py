"""The metrics writer: a torn last line (a kill during a write) and a full disk cost a line, not the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.training.metrics import MetricsLogger


def test_resume_drops_a_torn_line_and_the_redone_steps(tmp_path: Path) -> None:
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=2)
    logger.close()
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:2]


def test_a_full_disk_warns_once_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.path = Path("/dev/full")  # every write fails with ENOSPC
    for step in range(3):
        logger.log(step, {"loss": 1.0})
    logger.close()
    warnings = [r for r in caplog.records if "cannot write metrics.jsonl" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()


def test_a_tensorboard_write_error_drops_tensorboard_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = MetricsLogger(tmp_path, enabled=True)
    assert logger.writer is not None

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    logger.writer.add_scalar = full  # type: ignore[method-assign]
    for step in range(3):
        logger.log(step, {"loss": 1.0})
    logger.close()
    assert logger.writer is None and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert sum("cannot write tensorboard" in r.getMessage() for r in caplog.records) == 1
