from typer.testing import CliRunner

from ragkit import __version__
from ragkit.cli import app

runner = CliRunner()


def test_help_lists_the_stages():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "mine", "evaluate", "hybrid", "train", "export", "index"):
        assert command in result.output
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "retriever" in result.output
    result = runner.invoke(app, ["index", "--help"])
    assert result.exit_code == 0 and all(command in result.output for command in ("build", "update", "rollback"))


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ragkit {__version__}"


def test_stage_functions_are_importable():
    import ragkit

    for name in ("ingest", "mine", "evaluate", "hybrid", "train_retriever", "export_dpr", "index"):
        assert callable(getattr(ragkit, name))
