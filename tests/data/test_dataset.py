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


def test_cache_clips_pickle_as_a_reference_to_the_cache(tmp_path) -> None:  # noqa: ANN001
    import pickle

    from tests.conftest import write_audiofolder
    from toolkit.data.preprocess import prepare_split
    from toolkit.data.sources import open_source

    root = write_audiofolder(tmp_path / "af", 200, seconds=0.2)
    prepared = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", tmp_path / "cache")
    clips = dataset_module.ArrowClips(prepared.dataset)
    payload = pickle.dumps(clips)
    assert len(payload) < len(pickle.dumps(clips.meta)) / 2  # the table itself is not in it
    copy = pickle.loads(payload)
    assert copy.meta.equals(clips.meta) and copy.audio(7) == clips.audio(7)
