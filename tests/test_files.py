"""fnlm.files: atomic writes of files and directories, JSON reads whose errors name the file."""

import json

import pytest

from fnlm import files
from fnlm.errors import ConfigError, FnlmError


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    assert files.write_text(path, "new ü") == path
    assert path.read_text(encoding="utf-8") == "new ü"
    assert _listing(tmp_path) == ["a.txt"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, write)
    assert path.read_bytes() == b"old"
    assert _listing(tmp_path) == ["a.bin"]


def test_write_atomic_gives_the_writer_a_path_beside_the_target(tmp_path):
    seen = []
    files.write_atomic(tmp_path / "x.pt", lambda tmp: seen.append(tmp) or tmp.write_bytes(b"1"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".x.pt.")
    assert (tmp_path / "x.pt").read_bytes() == b"1"


def test_write_json_round_trips_and_keeps_non_ascii(tmp_path):
    value = {"b": [1, 2.5, None], "a": "Grüße"}
    path = files.write_json(tmp_path / "c.json", value, sort_keys=True)
    text = path.read_text(encoding="utf-8")
    assert "Grüße" in text and text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == value
    assert files.read_json(path, expect=dict) == value


def test_atomic_directory_swaps_in_a_new_directory_for_an_old_one(tmp_path):
    target = tmp_path / "nested" / "out"
    with files.atomic_directory(target) as work:
        assert work.parent == target.parent and not target.exists()
        (work / "one").write_text("1")
    assert _listing(target) == ["one"]
    with files.atomic_directory(target) as work:
        (work / "two").write_text("2")
        (work / "sub").mkdir()
        (work / "sub" / "three").write_text("3")
    assert _listing(target) == ["sub", "two"]
    assert _listing(target.parent) == ["out"]


def test_atomic_directory_keeps_the_old_directory_when_the_block_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with files.atomic_directory(target) as work:
            (work / "partial").write_text("x")
            raise RuntimeError("boom")
    assert _listing(target) == ["kept"]
    assert _listing(tmp_path) == ["out"]


def test_atomic_directory_replaces_a_file_of_that_name(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with files.atomic_directory(target) as work:
        (work / "f").write_text("1")
    assert target.is_dir() and _listing(target) == ["f"]
    assert _listing(tmp_path) == ["out"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"cfg\.json does not exist"),
        (b'{"a": 1,\n}', r"cfg\.json is not valid JSON: .* at line 2 column 1$"),
        (b"version https://git-lfs.github.com/spec/v1\n", r"cfg\.json .*Git LFS pointer"),
        (b"\xff\xfe{}", r"cfg\.json could not be read"),
        (b"[1, 2]", r"cfg\.json must hold a JSON object, got list"),
    ],
)
def test_read_json_errors_name_the_file_with_the_callers_error_class(tmp_path, content, message):
    path = tmp_path / "cfg.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        files.read_json(path, error=ConfigError, expect=dict)


def test_read_json_default_error_is_fnlm_error_and_any_value_is_taken(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert files.read_json(path) == [1, 2]
    with pytest.raises(FnlmError, match="missing.json does not exist"):
        files.read_json(tmp_path / "missing.json")
