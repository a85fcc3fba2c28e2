"""SpeechDataset: what reaches the FLAC decoder."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from toolkit.data import dataset as dataset_module
from toolkit.data.preprocess import features


def test_flac_bytes_that_end_in_nul_reach_the_decoder_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy's bytes scalars drop trailing NULs: a FLAC stream ending in one would arrive truncated.
    stream = b"fLaC\x01\x02\x00\x00"
    table = datasets.Dataset.from_dict(
        {"id": ["a"], "flac": [stream], "scale": [1.0], "text": ["x"], "duration": [1.0], "segments": ["[]"],
         "recording": [""], "no_speech": [False]}, features=features()
    )
    seen: list[bytes] = []
    monkeypatch.setattr(dataset_module.pcm_codec, "decode", lambda data: seen.append(data) or np.zeros(1, np.int16))
    dataset = dataset_module.SpeechDataset(dataset_module.ArrowClips(table), np.arange(1), None, np.ones(1, dtype=np.float32))
    assert dataset[0].text == "x" and dataset[0].scale == 1.0
    assert seen[0] == stream and isinstance(seen[0], bytes)
