"""Data sources: audiofolder, CSV/JSONL manifests, split sub-directories, and clear errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import write_audiofolder, write_clip
from toolkit.data.sources import DataError, LocalSource, open_source


def test_audiofolder(tmp_path: Path) -> None:
    root = write_audiofolder(tmp_path / "af", 3)
    source = open_source(str(root), split="train", text_column="sentence")
    assert len(source) == 3
    item_id, audio, text = source.get(0)
    assert item_id == "clip-000.flac" and Path(audio).is_file() and text.startswith("The quick")


def test_split_subdirectories_and_expression(tmp_path: Path) -> None:
    write_audiofolder(tmp_path / "train", 3)
    write_audiofolder(tmp_path / "validation", 2, start_seed=10)
    assert len(open_source(str(tmp_path), split="train", text_column="sentence")) == 3
    assert len(open_source(str(tmp_path), split="train+validation", text_column="sentence")) == 5
    with pytest.raises(DataError, match="no metadata.csv"):
        open_source(str(tmp_path), split="test", text_column="sentence")


def test_csv_manifest_paths_relative_to_manifest(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    write_clip(tmp_path / "audio" / "a.wav", 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,transcript\naudio/a.wav,hello there\n")
    source = open_source(str(manifest), split="", text_column="transcript")
    _, audio, text = source.get(0)
    assert Path(audio) == (tmp_path / "audio" / "a.wav").resolve() and text == "hello there"


def test_jsonl_manifest_with_explicit_audio_column(tmp_path: Path) -> None:
    write_clip(tmp_path / "b.flac", 1.0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"wav": "b.flac", "sentence": "hi"}) + "\n\n")
    with pytest.raises(DataError, match="no audio path column"):
        open_source(str(manifest), split="", text_column="sentence")
    source = open_source(str(manifest), split="", text_column="sentence", audio_column="wav")
    assert len(source) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.csv", "file_name,text\na.wav,x\n", "no text column 'sentence' (columns: file_name, text); set data.text_column"),
        ("m.csv", "file_name,sentence\n", "the manifest has no rows"),
        ("m.jsonl", '{"file_name": "a.wav", "sentence": "x"}\n{broken\n', "m.jsonl:2: not valid JSON"),
        ("m.txt", "whatever", "a manifest must end in"),
        ("m.csv", "", "the manifest has no rows"),
        ("m.json", '[{"file_name": "a.wav",\n "sentence": }]', "m.json:2: not valid JSON"),
        ("m.json", '[{"file_name": "a.wav", "sentence": "x"}, 7]', "m.json: row 2: a row must be an object"),
        ("m.csv", "file_name,sentence\na.wav," + "x" * 200_000 + "\n", "m.csv:2: malformed row (field larger"),
    ],
)
def test_manifest_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_source(str(tmp_path / name), split="", text_column="sentence")


def _hub_must_not_be_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(HfApi, "dataset_info", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)


def _hub_online(monkeypatch: pytest.MonkeyPatch, online: bool) -> None:
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the offline switch at import time: patch the constants, not only the env.
    if online:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", not online)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", not online, raising=False)


@pytest.mark.parametrize(
    "spec", ["nope", "./relative/missing", "my_corpus.csv", "data/train/clips", "~/no-such-corpus-here", "corpus/",
             "my corpus", "x" * 100],
)
def test_missing_local_path_is_not_taken_for_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    """A spec that is a path (or no valid Hub id) is reported missing at once, without the Hub."""
    _hub_must_not_be_asked(monkeypatch)
    _hub_online(monkeypatch, True)
    monkeypatch.chdir(tmp_path)
    spec = str(tmp_path / spec) if spec == "nope" else spec
    with pytest.raises(DataError, match=f"^no such directory or file: {spec[:20]}") as info:
        open_source(spec, split="train", text_column="sentence")
    assert "\n" not in str(info.value)


def test_bare_name_with_the_hub_offline_is_a_missing_path_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.train=my_corpus`` offline: the cache is looked in (a Hub dataset may be there), no retries."""
    _hub_online(monkeypatch, False)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(DataError, match=f"^no such directory or file: my_corpus \\(relative to {tmp_path}\\)") as info:
        open_source("my_corpus", split="train", text_column="sentence")
    assert time.monotonic() - started < 10
    assert str(info.value).endswith("HF_HUB_OFFLINE is set: only the local Hub cache was searched.")
    assert "\n" not in str(info.value)


def _hub_error(cls: type, message: str) -> Exception:
    """A huggingface_hub HTTP error without an HTTP response (their constructor wants one)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (ConnectionError("[Errno -2] Name or service not known\nTraceback..."),
         "the Hub is unreachable to look up 'someone/nonexistent-ds' (ConnectionError: [Errno -2] Name or service "
         "not known); with a cached copy of a Hub dataset, set HF_HUB_OFFLINE=1"),
        (TimeoutError("timed out"), "the Hub is unreachable"),
        ("RepositoryNotFoundError", "and no Hub dataset 'someone/nonexistent-ds' (a private one needs `hf auth login`)"),
    ],
)
def test_hub_lookup_failures_are_one_line_at_once(
    monkeypatch: pytest.MonkeyPatch, raised: object, message: str
) -> None:
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    if raised == "RepositoryNotFoundError":
        raised = _hub_error(RepositoryNotFoundError, "404 Client Error.\n\nRepository Not Found for url: ...")

    def lookup(self, repo_id: str, **kwargs):  # noqa: ANN001, ANN003, ANN202
        raise raised

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("load_dataset would retry for about 30 s")

    _hub_online(monkeypatch, True)
    monkeypatch.setattr(HfApi, "dataset_info", lookup)
    monkeypatch.setattr(datasets, "load_dataset", load)
    with pytest.raises(DataError) as info:
        open_source("someone/nonexistent-ds", split="train", text_column="sentence")
    text = str(info.value)
    assert text.startswith("no such directory or file: someone/nonexistent-ds") and "\n" not in text
    assert message in text


def test_hub_id_with_whatever_network_there_is_fails_in_one_line() -> None:
    """No mocks: without a network (or with one, and no such dataset) a one-line error, quickly."""
    started = time.monotonic()
    with pytest.raises(DataError, match="^no such directory or file: someone/nonexistent-ds-9f3a") as info:
        open_source("someone/nonexistent-ds-9f3a", split="train", text_column="sentence")
    assert time.monotonic() - started < 20 and "\n" not in str(info.value)


def test_hub_source_offline_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    _hub_online(monkeypatch, False)
    with pytest.raises(DataError, match="could not load Hub dataset 'someone/nonexistent-ds'.*only the local Hub cache"):
        open_source("someone/nonexistent-ds", split="train", text_column="sentence")


def test_hub_text_column_must_hold_text(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    table = datasets.Dataset.from_dict({"audio": ["a.wav"], "sentence": [[1, 2]]})
    _hub_online(monkeypatch, False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: table)
    with pytest.raises(DataError, match="Hub dataset someone/ds: column 'sentence' holds List.*not text"):
        open_source("someone/ds", split="train", text_column="sentence")


def test_hub_rows_carry_their_segments_recording_and_no_speech(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from toolkit.data.preprocess import process_chunk

    write_clip(tmp_path / "a.flac", 2.0)
    audio = {"bytes": (tmp_path / "a.flac").read_bytes(), "path": "a.flac"}
    segments = [{"start": 0.1, "end": 0.9, "text": "One."}, {"start": 1.0, "end": 1.9, "text": "Two."}]
    rows = {"audio": [audio, audio, audio], "sentence": ["One. Two.", "One. Two.", ""],
            "recording": ["r1", "r1", ""], "no_speech": [False, False, True]}
    as_list = datasets.Dataset.from_dict({**rows, "segments": [segments, segments, []]})
    columns = {key: [s[key] for s in segments] for key in ("start", "end", "text")}  # a Sequence feature's form
    as_sequence = datasets.Dataset.from_dict({**rows, "segments": [columns, columns, {k: [] for k in columns}]})
    _hub_online(monkeypatch, False)
    for table in (as_list, as_sequence):
        monkeypatch.setattr(datasets, "load_dataset", lambda *args, table=table, **kwargs: table)
        source = open_source("someone/ds", split="train", text_column="sentence")
        extras = source.extras(0)
        assert extras.recording == "r1" and not extras.no_speech
        assert [s["text"] for s in json.loads(extras.segments)] == ["One.", "Two."]
        assert source.extras(2).no_speech and source.extras(2).recording is None
        decoded, skips = process_chunk(source, 0, 3, "train", target_sr=16_000, max_duration_s=30.0)
        assert not skips and decoded["recording"] == ["r1", "r1", ""] and decoded["no_speech"] == [False, False, True]
        assert [s[2] for s in json.loads(decoded["segments"][0])] == ["One.", "Two."]


def test_fingerprint_changes_with_text_and_file(tmp_path: Path) -> None:
    root = write_audiofolder(tmp_path / "af", 2)
    source = open_source(str(root), split="", text_column="sentence")
    assert isinstance(source, LocalSource)
    before = source.fingerprint(0, 2)
    assert before == open_source(str(root), split="", text_column="sentence").fingerprint(0, 2)
    write_clip(root / "clip-001.flac", 2.0, seed=9)
    assert open_source(str(root), split="", text_column="sentence").fingerprint(0, 2) != before


def test_byte_order_mark_is_not_part_of_the_header(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: it once became part of the first column's name."""
    root = write_audiofolder(tmp_path / "af", 2)
    meta = root / "metadata.csv"
    meta.write_text(meta.read_text(), encoding="utf-8-sig")
    assert meta.read_bytes().startswith(b"\xef\xbb\xbf")
    assert len(open_source(str(root), split="", text_column="sentence")) == 2
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"file_name": "af/clip-000.flac", "sentence": "hi"}) + "\n", encoding="utf-8-sig")
    assert open_source(str(jsonl), split="", text_column="sentence").get(0)[2] == "hi"


def test_header_names_are_stripped(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file_name, sentence\na.wav, hello\n")
    assert open_source(str(tmp_path / "m.csv"), split="", text_column="sentence").get(0)[2] == " hello"


def test_csv_row_with_more_fields_than_the_header(tmp_path: Path) -> None:
    """An unquoted comma in a transcript once cut it to its first field, silently."""
    (tmp_path / "m.csv").write_text("file_name,sentence\na.wav,hello\nb.wav,hello, world\nc.wav,x\n")
    with pytest.raises(DataError) as info:
        open_source(str(tmp_path / "m.csv"), split="", text_column="sentence")
    assert str(info.value) == (
        f"{tmp_path / 'm.csv'}:3: 3 fields but the header has 2; quote a transcript that holds a comma (\"...\")"
    )
    (tmp_path / "m.tsv").write_text("file_name\tsentence\na.wav\thello\tworld\n")
    with pytest.raises(DataError, match=r"m.tsv:2: 3 fields but the header has 2; quote a transcript that holds a tab"):
        open_source(str(tmp_path / "m.tsv"), split="", text_column="sentence")
    # Quoted, the comma is text; a short row is an empty transcript (a counted skip later), not an error.
    (tmp_path / "ok.csv").write_text('file_name,sentence\n\na.wav,"hello, world"\nb.wav\n')
    source = open_source(str(tmp_path / "ok.csv"), split="", text_column="sentence")
    assert [source.get(i)[2] for i in range(2)] == ["hello, world", None]


def test_csv_quote_left_open_names_its_line(tmp_path: Path) -> None:
    """An unclosed quote once swallowed every row after it into one transcript."""
    (tmp_path / "m.csv").write_text('file_name,sentence\na.wav,fine\nb.wav,"oops\nc.wav,lost\nd.wav,lost too\n')
    with pytest.raises(DataError, match=r"m.csv:3: malformed row \(unexpected end of data\); is a quote left open\?"):
        open_source(str(tmp_path / "m.csv"), split="", text_column="sentence")


@pytest.mark.parametrize(
    ("value", "kind"), [(["a", "b"], "a list"), (42, "a number"), (1.5, "a number"), (True, "a boolean"),
                        ({"t": "x"}, "an object")],
)
def test_json_transcript_must_be_a_string(tmp_path: Path, value: object, kind: str) -> None:
    """A list, number or boolean transcript was once trained on as its Python repr ("['a', 'b']", "True")."""
    rows = [{"file_name": "a.wav", "sentence": "fine"}, {"file_name": "b.wav", "sentence": value}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as info:
        open_source(str(tmp_path / "m.jsonl"), split="", text_column="sentence")
    assert str(info.value).startswith(f"{tmp_path / 'm.jsonl'}:2: 'sentence' is {kind} ({json.dumps(value)}")
    (tmp_path / "m.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=f"m.json: row 2: 'sentence' is {kind}"):
        open_source(str(tmp_path / "m.json"), split="", text_column="sentence")
    (tmp_path / "p.jsonl").write_text(json.dumps({"file_name": 3, "sentence": "x"}) + "\n")
    with pytest.raises(DataError, match="p.jsonl:1: 'file_name' is a number"):
        open_source(str(tmp_path / "p.jsonl"), split="", text_column="sentence")


def test_jsonl_transcript_may_hold_a_line_separator(tmp_path: Path) -> None:
    """U+2028 is valid inside a JSON string; it is no line break of a JSONL file."""
    (tmp_path / "m.jsonl").write_text(json.dumps({"file_name": "a.wav", "sentence": "a\u2028b"}, ensure_ascii=False))
    assert open_source(str(tmp_path / "m.jsonl"), split="", text_column="sentence").get(0)[2] == "a\u2028b"


def test_non_utf8_metadata_names_the_line(tmp_path: Path) -> None:
    root = write_audiofolder(tmp_path / "af", 3)
    meta = root / "metadata.csv"
    meta.write_bytes(meta.read_bytes() + "clip-000.flac,Caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        open_source(str(root), split="", text_column="sentence")
    assert str(info.value) == f"{meta} is not UTF-8 text (byte 0xe9 on line 5); save it as UTF-8"


def test_nul_bytes_are_an_error_not_a_traceback(tmp_path: Path) -> None:
    """A NUL in a path once raised ValueError from pathlib; a UTF-16 file without a BOM is full of them."""
    (tmp_path / "m.jsonl").write_text(json.dumps({"file_name": "a\u0000b.wav", "sentence": "x"}) + "\n")
    with pytest.raises(DataError, match="m.jsonl:1: 'file_name' holds a NUL character"):
        open_source(str(tmp_path / "m.jsonl"), split="", text_column="sentence")
    (tmp_path / "m.csv").write_bytes("file_name,sentence\na.wav,x\n".encode("utf-16-le"))
    with pytest.raises(DataError, match="m.csv holds a NUL byte on line 1: a binary file, or UTF-16 text"):
        open_source(str(tmp_path / "m.csv"), split="", text_column="sentence")


def test_duplicates_are_the_same_file_and_transcript(tmp_path: Path) -> None:
    root = write_audiofolder(tmp_path / "af", 3)
    with (root / "metadata.csv").open("a") as handle:
        handle.write("clip-000.flac,The quick brown fox jumps over the lazy dog.\n")  # a duplicate of row 0
        handle.write("./clip-001.flac,  A stitch in time saves nine. \n")  # of row 1: same path and stripped text
        handle.write("clip-002.flac,Another transcript\n")  # same file, other text: not a duplicate
        handle.write(",\n,\n")  # no path, no text: skipped later, never "duplicates"
    source = open_source(str(root), split="", text_column="sentence")
    assert isinstance(source, LocalSource)
    assert source.duplicates() == [3, 4]
    assert [item.id for item in source.without([3, 4]).items] == [
        "clip-000.flac", "clip-001.flac", "clip-002.flac", "clip-002.flac", "<empty path>", "<empty path>",
    ]
