"""Out-of-memory detection and the test-only fault injector (:mod:`toolkit.oom`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit import oom
from toolkit.testing import make_tiny_whisper


def test_out_of_memory_errors_are_recognised() -> None:
    assert oom.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert oom.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
    assert oom.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 10 GB"))
    assert not oom.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not oom.is_out_of_memory(ValueError("out of memory."))


def test_the_injector_raises_a_real_out_of_memory_error_on_its_rank_only() -> None:
    assert oom.OutOfMemoryInjector.from_env({}) is None
    injector = oom.OutOfMemoryInjector.from_env({oom.INJECT_ENV: "1:4"})
    assert injector is not None and (injector.rank, injector.limit, injector.spare) == (1, 4, 0)
    injector.check(0, 64)  # another rank
    injector.check(1, 4)  # at the limit
    with pytest.raises(torch.OutOfMemoryError, match="injected") as caught:
        injector.check(1, 5)
    assert oom.is_out_of_memory(caught.value)
    spared = oom.OutOfMemoryInjector.from_env({oom.INJECT_ENV: "0:1:2"})
    assert spared is not None
    spared.check(0, 2)
    spared.check(0, 2)
    with pytest.raises(torch.OutOfMemoryError):
        spared.check(0, 2)
    for bad in ("1", "a:b", "1:2:3:4", "-1:2"):
        with pytest.raises(ValueError, match=oom.INJECT_ENV):
            oom.OutOfMemoryInjector.from_env({oom.INJECT_ENV: bad})


def test_the_injector_hook_sees_the_batch_of_training_and_generation_calls(tmp_path: Path) -> None:
    import transformers

    model = transformers.WhisperForConditionalGeneration.from_pretrained(make_tiny_whisper(tmp_path / "m")).eval()
    oom.OutOfMemoryInjector(0, 2).attach(model, rank=0)
    features = torch.zeros(3, model.config.num_mel_bins, 3000)
    with pytest.raises(torch.OutOfMemoryError):
        model(input_features=features, decoder_input_ids=torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(torch.OutOfMemoryError):
        model.generate(features, max_new_tokens=2)
    model(input_features=features[:2], decoder_input_ids=torch.ones(2, 2, dtype=torch.long))




def test_a_backoff_record_carries_its_step_only_when_it_has_one() -> None:
    assert oom.Backoff(8, 4, step=3).to_dict() == {"step": 3, "from": 8, "to": 4}
    assert oom.Backoff(8, 4).to_dict() == {"from": 8, "to": 4}
