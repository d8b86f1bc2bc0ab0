"""The export-format table owns each format's files: the size of an IR is its .xml and its .bin."""

import pytest

from edgeclr.formats import EXPORT_FORMATS, RUNTIME_SUFFIXES, format_of


def test_files_and_size_follow_the_table(tmp_path):
    (tmp_path / "m.xml").write_bytes(b"x" * 10)
    (tmp_path / "m.bin").write_bytes(b"x" * 90)
    (tmp_path / "m.onnx").write_bytes(b"x" * 7)
    assert format_of(tmp_path / "m.xml").files(tmp_path / "m.xml") == [tmp_path / "m.xml", tmp_path / "m.bin"]
    assert format_of(tmp_path / "m.xml").size_bytes(tmp_path / "m.xml") == 100
    assert format_of(tmp_path / "m.onnx").size_bytes(tmp_path / "m.onnx") == 7
    assert RUNTIME_SUFFIXES == (".onnx", ".xml")


def test_an_unknown_suffix_names_the_known_ones():
    with pytest.raises(KeyError, match=r"\.onnx, \.xml, \.pt"):
        format_of("model.tflite")


def test_every_writer_exists():
    from edgeclr import export

    assert set(export.WRITERS) == set(EXPORT_FORMATS) and all(map(callable, export.WRITERS.values()))


def test_every_format_names_an_install_extra_that_exists():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for f in EXPORT_FORMATS.values():
        assert f.extra in extras and f.install == f"pip install 'edgeclr[{f.extra}]'"
    assert format_of("deploy/model.xml").install.endswith("[openvino]'")  # the report and deploy's README say this one
