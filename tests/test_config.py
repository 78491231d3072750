import pytest

from labkit.config import ConfigError, get_config, parse_assignments, parse_stages, resolve_device


def test_presets_differ_and_default_is_cpu(monkeypatch):
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    assert get_config().preset == "cpu"
    assert get_config("tiny").data.n_people < get_config("cpu").data.n_people < get_config("gpu").data.n_people


def test_keyword_and_nested_overrides():
    config = get_config("tiny", seed=7, data={"n_people": 12, "noise": 0.5}, tokenizer=dict(vocab_size=400))
    assert (config.seed, config.data.n_people, config.data.noise, config.tokenizer.vocab_size) == (7, 12, 0.5, 400)
    assert config.data.min_words == get_config("tiny").data.min_words  # untouched fields keep the preset


def test_none_keeps_the_preset_value():
    assert get_config("tiny", seed=None, data={"n_people": None}).data.n_people == get_config("tiny").data.n_people


def test_command_line_assignments_are_parsed_and_converted():
    overrides = parse_assignments(["data.n_people=50", "seed=3", "data.noise=0.25", "tokenizer.pattern=gpt2"])
    config = get_config("cpu", **overrides)
    assert (config.data.n_people, config.seed, config.data.noise, config.tokenizer.pattern) == (50, 3, 0.25, "gpt2")


def test_environment_preset_wins(monkeypatch):
    monkeypatch.setenv("LABKIT_PRESET", "tiny")
    assert get_config("cpu").preset == "tiny"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: get_config("huge"), "unknown preset 'huge'; allowed: tiny, cpu, gpu"),
        (lambda: get_config("cpu", data={"n_peple": 3}), "unknown field 'data.n_peple'; allowed: data.source"),
        (lambda: get_config("cpu", colour="red"), "unknown field 'colour'; allowed: preset, seed, device"),
        (lambda: get_config("cpu", data={"n_people": "many"}), "data.n_people='many' has the wrong type; expected int"),
        (lambda: get_config("cpu", data={"n_people": 2.5}), "data.n_people=2.5 has the wrong type; expected int"),
        (
            lambda: get_config("cpu", data={"noise": -1}),
            "data.noise=-1.0 is out of range; allowed: between 0.0 and 2.0",
        ),
        (
            lambda: get_config("cpu", tokenizer={"pattern": "gpt5"}),
            "tokenizer.pattern='gpt5' is not allowed; allowed: gpt4, gpt2",
        ),
        (lambda: get_config("cpu", device="tpu"), "device='tpu' is not allowed; allowed: auto, cpu, cuda, mps"),
        (lambda: get_config("cpu", data=3), "data=3: data is a section; give a dict of its fields"),
        (lambda: parse_stages("data,tokeniser"), "unknown stage 'tokeniser'; allowed: data, tokenizer, base"),
        (lambda: parse_assignments(["seed"]), "--set expects FIELD=VALUE, got 'seed'"),
    ],
)
def test_bad_values_fail_at_once_with_a_clear_message(call, message, monkeypatch):
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    with pytest.raises(ConfigError) as error:
        call()
    assert message in str(error.value)


def test_stages_come_back_in_pipeline_order():
    assert parse_stages("tokenizer,data") == ["data", "tokenizer"]
    assert parse_stages(None)[0] == "data"


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cuda", "mps", "cpu")
    with pytest.raises(ConfigError, match="not allowed"):
        resolve_device("tpu")
