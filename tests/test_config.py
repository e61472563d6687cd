import pytest

from ragkit.config import IngestConfig, as_dict, load_config
from ragkit.errors import RagkitError


def test_defaults_then_toml_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[ingest]\nwindow = 50\nstride = 25\nseed = 3\n')
    cfg = load_config(IngestConfig, toml, "ingest", inputs=["x"], seed=7, window=None)
    assert (cfg.window, cfg.stride, cfg.seed, cfg.format) == (50, 25, 7, "auto")
    assert as_dict(cfg)["inputs"] == ["x"]


def test_flat_toml_and_unknown_key(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("window = 80\nstride = 80\n")
    assert load_config(IngestConfig, toml, "ingest").window == 80
    toml.write_text("windw = 80\n")
    with pytest.raises(RagkitError, match="unknown setting 'windw'"):
        load_config(IngestConfig, toml, "ingest")
    toml.write_text("window = \n")
    with pytest.raises(RagkitError, match="invalid TOML"):
        load_config(IngestConfig, toml, "ingest")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"format": "xml"}, "format"), ({"window": 10, "stride": 20}, "stride"), ({"dev_fraction": 1.0}, "dev_fraction")],
)
def test_validation(kwargs, match):
    with pytest.raises(RagkitError, match=match):
        IngestConfig(**kwargs)
