"""The CLI refuses a wrong option or --out before it loads a model (the model path here does not
exist, so reaching the load would give a different error)."""

from __future__ import annotations

import pytest

from jaxlens import cli

NO_MODEL = "/nonexistent/model.gguf"


def refuse(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    return capsys.readouterr().err


def test_out_not_empty_is_refused_before_load(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("x")
    err = refuse(capsys, "eval", "--model", NO_MODEL, "--langs", "zh", "--out", str(tmp_path / "o"))
    assert "--out" in err and "already exists and is not empty" in err and "nonexistent" not in err


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = refuse(capsys, "eval", "--model", NO_MODEL, "--out", str(tmp_path / "f"))
    assert "--out" in err and "is a file, not a directory" in err


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = refuse(capsys, "steer", "--model", NO_MODEL, "--out", str(tmp_path / "f" / "sub"))
    assert "--out" in err and "is a file, so nothing can be written under it" in err


@pytest.mark.parametrize("argv, option", [
    (["eval", "--limit", "0"], "--limit"),
    (["eval", "--batch-rows", "-2"], "--batch-rows"),
    (["steer", "--limit", "-1"], "--limit"),
    (["transplant", "--batch-rows", "0"], "--batch-rows"),
    (["neurons", "stats", "--budget", "0"], "--budget"),
    (["neurons", "stats", "--seq-len", "0"], "--seq-len"),
    (["latent-language", "--batch-size", "0"], "--batch-size"),
])
def test_non_positive_counts(tmp_path, capsys, argv, option):
    err = refuse(capsys, *argv, "--model", NO_MODEL, "--out", str(tmp_path / "o"))
    assert f"{option} must be a positive integer" in err


def test_empty_out_dir_is_accepted(tmp_path):
    from jaxlens.report.io import output_dir

    (tmp_path / "o").mkdir()
    with output_dir(tmp_path / "o") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "o" / "a.txt").read_text() == "a"


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("jaxlens ")


def test_xcopa_ships_with_the_package(monkeypatch):
    import jaxlens
    from jaxlens.data.xcopa import xcopa, xcopa_dir

    monkeypatch.delenv("JAXLENS_XCOPA", raising=False)
    root = xcopa_dir()
    assert root.is_relative_to(__import__("pathlib").Path(jaxlens.__file__).parent)
    assert (root / "LICENSE.md").is_file() and "CC BY 4.0" in (root / "README.md").read_text()
    assert len(xcopa("zh", "val")) == 100


def test_jaxlens_xcopa_still_honoured(monkeypatch, tmp_path):
    from jaxlens.data.xcopa import xcopa_dir

    monkeypatch.setenv("JAXLENS_XCOPA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="JAXLENS_XCOPA"):
        xcopa_dir()
    (tmp_path / "data").mkdir()
    assert xcopa_dir() == tmp_path


def test_report_embeds_a_subset_cjk_font():
    import base64
    import re

    from jaxlens.report.html import Section, render

    page = render("猫 test", [Section("Привет", text="日本語")])
    url = re.search(r"@font-face \{ font-family: 'jaxlens-noto'; src: url\(data:font/otf;base64,([A-Za-z0-9+/=]+)\)", page)
    assert url, "no embedded font"
    font = base64.b64decode(url.group(1))
    assert font[:4] == b"OTTO" and len(font) < 200_000  # a subset, not the 16 MB font
    assert "@font-face" not in render("plain", [Section("ascii only")])


# ---- the shared model options (commands/options.py) ------------------------------------------------

MODEL_COMMANDS = (["lens"], ["latent-language"], ["mc-lens"], ["eval"], ["neurons", "stats"], ["neurons", "deactivate", "x"],
                  ["steer"], ["transplant"], ["subspace", "probe"], ["subspace", "report"], ["subspace", "steer"],
                  ["subspace", "train"], ["tuned-lens"], ["shared-space"], ["bench"])


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_every_model_command_has_the_model_options(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command[:2 if command[0] in ("neurons", "subspace") else 1], "--help"])
    text = capsys.readouterr().out
    for option in ("--models" if command == ["shared-space"] else "--model", "--dtype", "--mesh", "--coordinator", "--num-processes", "--process-id", "--distributed",
                   "--init-timeout"):
        assert option in text, (command, option)


@pytest.mark.parametrize("mesh, message", [
    ("4x2", "expected named axes AXIS=N"),
    ("data=4,batch=2", "unknown axis 'batch'; the axes are data, fsdp, model"),
    ("data=2,data=2", "axis 'data' given twice"),
    ("data=0", "must have at least 1 device"),
    ("data=4096", "needs 4096 devices; only"),
])
def test_mesh_refused_before_load(tmp_path, capsys, mesh, message):
    err = refuse(capsys, "lens", "--model", NO_MODEL, "--mesh", mesh, "--out", str(tmp_path / "o"))
    assert "--mesh" in err and message in err and "nonexistent" not in err


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "localhost:1234"], "--coordinator also needs --num-processes, --process-id"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--distributed", "--num-processes", "2"], "--distributed takes the cluster's settings"),
    (["--init-timeout", "0"], "--init-timeout must be a positive number"),
])
def test_distributed_options_refused_before_start(tmp_path, capsys, argv, message):
    err = refuse(capsys, "neurons", "stats", "--model", NO_MODEL, *argv, "--out", str(tmp_path / "o"))
    assert message in err


def test_mesh_builds_named_axes():
    import argparse

    from jaxlens.commands import options

    assert options.parse_mesh("data=4, model=2") == {"data": 4, "model": 2}
    args = argparse.Namespace(mesh="model=1")
    mesh = options.build_mesh(args)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1}
    assert options.build_mesh(argparse.Namespace(mesh=None)) is None  # jaxlens.load's one-device default
