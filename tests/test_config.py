from pathlib import Path

import pytest

from realtime.config import AgentConfig, ConfigError, load_config


def test_default_config_loads_into_dataclasses():
    cfg = load_config("embedded")
    assert isinstance(cfg, AgentConfig)
    assert cfg.engine.backend == "smollm2"
    assert cfg.vad.silence_duration_ms == 400
    assert cfg.engine.sampling.max_new_tokens == 96
    assert "voice assistant" in cfg.engine.system_prompt


CONFIGS = Path(__file__).parent.parent / "configs"


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {"embedded", "step-audio-r1", "step-audio-r1-random"} <= {p.stem for p in paths}
    for path in paths:
        assert isinstance(load_config(path), AgentConfig), path


def test_unknown_key_is_rejected_by_name(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("vad:\n  silence_ms: 300\n")
    with pytest.raises(ConfigError, match=r"unknown config key vad\.silence_ms"):
        load_config(p)


def test_unknown_top_level_and_nested_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("engnie: {}\n")
    with pytest.raises(ConfigError, match="engnie"):
        load_config(p)
    p.write_text("engine:\n  sampling:\n    temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"engine\.sampling\.temprature"):
        load_config(p)


def test_wrong_types_and_choices(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("vad:\n  aggressiveness: loud\n")
    with pytest.raises(ConfigError, match=r"vad\.aggressiveness: expected an integer"):
        load_config(p)
    p.write_text("engine:\n  backend: gpt5\n")
    with pytest.raises(ConfigError, match="not one of"):
        load_config(p)


def test_overrides_and_missing_file():
    cfg = load_config("embedded", {"vad.silence_duration_ms": 250, "engine.model": "/x"})
    assert cfg.vad.silence_duration_ms == 250 and cfg.engine.model == "/x"
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config")


def test_the_phone_playout_lead_is_small_and_checked():
    assert load_config("embedded").telephony.playout_lead_ms == 300
    assert load_config("embedded", {"telephony.playout_lead_ms": 0}).telephony.playout_lead_ms == 0
    for bad in (-20, 5000):
        with pytest.raises(
            ConfigError, match=r"telephony\.playout_lead_ms: .* not within 0\.\.1000"
        ):
            load_config("embedded", {"telephony.playout_lead_ms": bad})
