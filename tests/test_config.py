import pytest

from labkit.cli import parse_assignments
from labkit.config import ConfigError, get_config, parse_stages, resolve_device


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
        (
            lambda: get_config("cpu", model={"arch": "llama"}),
            "model.arch='llama' is not allowed; allowed: gpt2, modern",
        ),
        (
            lambda: get_config("cpu", train={"optimizer": "sgd"}),
            "train.optimizer='sgd' is not allowed; allowed: adamw, muon",
        ),
        (
            lambda: get_config("cpu", model={"arch": "modern", "n_embd": 20, "n_head": 4}),
            "model.arch='modern' rotates pairs of channels, and model.n_embd=20 // model.n_head=4 = 5 channels",
        ),
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


# --- every setting checked before any stage runs --------------------------------------------------


def float_fields(config_class=None, prefix=""):
    """Dotted names of every float field of Config."""
    import dataclasses
    import typing

    from labkit.config import Config

    config_class = config_class or Config
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from float_fields(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] is float:
            yield prefix + f.name


def nested(name: str, value) -> dict:
    """'train.learning_rate', 0.1 -> {'train': {'learning_rate': 0.1}}"""
    *sections, field = name.split(".")
    for section in reversed(sections):
        value, field = {field: value}, section
    return {field: value}


@pytest.mark.parametrize("name", list(float_fields()))
def test_every_float_field_refuses_nan_and_infinities(name, monkeypatch):
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match=f"^{name}={value!r} is not a finite number; allowed: a finite number"):
            get_config("cpu", **nested(name, value))
    for text in ("nan", "inf", "-inf", "NaN"):  # as --set gives it
        with pytest.raises(ConfigError, match=f"^{name}={float(text)!r} is not a finite number"):
            get_config("cpu", **parse_assignments([f"{name}={text}"]))


def test_a_non_finite_message_says_what_is_allowed():
    assert len(list(float_fields())) >= 40  # the walk above found the float fields of every section
    with pytest.raises(ConfigError) as error:
        get_config("cpu", train=dict(learning_rate=float("nan")))
    assert (
        str(error.value)
        == "train.learning_rate=nan is not a finite number; allowed: a finite number, between 0.0 and 1.0"
    )
    with pytest.raises(ConfigError) as error:
        get_config("cpu", **parse_assignments(["train.grad_clip=inf"]))
    assert str(error.value) == "train.grad_clip=inf is not a finite number; allowed: a finite number, >= 0.0"


# (overrides, what the message must say: both fields with their values, and what is allowed)
RULES = {
    "train.min_lr": (
        dict(train=dict(learning_rate=0.001, min_lr=0.01)),
        "train.min_lr=0.01 is above train.learning_rate=0.001; min_lr must be <= learning_rate",
    ),
    "sft.min_lr": (
        dict(sft=dict(learning_rate=0.001, min_lr=0.01)),
        "sft.min_lr=0.01 is above sft.learning_rate=0.001; min_lr must be <= learning_rate",
    ),
    "halluc.min_lr": (
        dict(halluc=dict(learning_rate=0.001, min_lr=0.002)),
        "halluc.min_lr=0.002 is above halluc.learning_rate=0.001; min_lr must be <= learning_rate",
    ),
    "train.warmup_steps": (
        dict(train=dict(max_steps=100, warmup_steps=200)),
        "train.warmup_steps=200 is above train.max_steps=100; warmup_steps must be <= max_steps",
    ),
    "sft.warmup_steps": (
        dict(sft=dict(max_steps=10, warmup_steps=11)),
        "sft.warmup_steps=11 is above sft.max_steps=10; warmup_steps must be <= max_steps",
    ),
    "grpo.warmup_steps": (
        dict(grpo=dict(max_steps=3, warmup_steps=4)),
        "grpo.warmup_steps=4 is above grpo.max_steps=3; warmup_steps must be <= max_steps",
    ),
    "halluc.warmup_steps vs idk_steps": (
        dict(halluc=dict(idk_steps=5, warmup_steps=8)),
        "halluc.warmup_steps=8 is above halluc.idk_steps=5; warmup_steps must be <= idk_steps",
    ),
    "halluc.warmup_steps vs tool_steps": (
        dict(halluc=dict(tool_steps=5, warmup_steps=8)),
        "halluc.warmup_steps=8 is above halluc.tool_steps=5; warmup_steps must be <= tool_steps",
    ),
    "grpo.epsilon vs epsilon_high": (
        dict(grpo=dict(epsilon=0.3, epsilon_high=0.2)),
        "grpo.epsilon=0.3 is above grpo.epsilon_high=0.2; epsilon must be <= epsilon_high",
    ),
    "model.n_head": (
        dict(model=dict(n_embd=100, n_head=3)),
        "model.n_embd=100 is not a multiple of model.n_head=3; n_embd must be a multiple of n_head",
    ),
    "ppo.minibatches": (
        dict(ppo=dict(batch_size=10, minibatches=4)),
        "ppo.batch_size=10 is not a multiple of ppo.minibatches=4; batch_size must be a multiple of minibatches",
    ),
    "ppo.minibatches of 1": (
        dict(ppo=dict(batch_size=4, minibatches=4)),
        "ppo.batch_size=4 gives 1 rollout to each of ppo.minibatches=4; batch_size must be at least 2 * minibatches",
    ),
    "sft.max_new_tokens": (
        dict(model=dict(block_size=64), sft=dict(max_new_tokens=33)),
        "sft.max_new_tokens=33 is above half of model.block_size=64; max_new_tokens must be <= block_size // 2 = 32",
    ),
    "rlhf.max_new_tokens": (
        dict(rlhf=dict(max_new_tokens=65)),
        "rlhf.max_new_tokens=65 is above half of model.block_size=128; max_new_tokens must be <= block_size // 2 = 64",
    ),
    "grpo.max_new_tokens": (
        dict(model=dict(block_size=256), grpo=dict(max_new_tokens=256)),
        "grpo.max_new_tokens=256 is above half of model.block_size=256; max_new_tokens must be <= block_size // 2",
    ),
    "halluc.max_new_tokens": (
        dict(halluc=dict(max_new_tokens=65)),
        "halluc.max_new_tokens=65 is above half of model.block_size=128; max_new_tokens must be <= block_size // 2",
    ),
    "grpo.epsilon": (
        dict(grpo=dict(epsilon=1.0, epsilon_high=1.2)),
        "grpo.epsilon=1.0 puts the lower clip 1 - epsilon at 0, which no probability ratio goes below; "
        "epsilon must be < 1",
    ),
    "grpo.tasks": (
        dict(grpo=dict(tasks="nonsense")),
        "grpo.tasks='nonsense': unknown task 'nonsense'; allowed: one_digit, addition, multiplication, "
        "word_problem, larger, count_letter",
    ),
    "grpo.tasks empty": (dict(grpo=dict(tasks=" , ")), "grpo.tasks=' , ' names no task; allowed: one_digit"),
    "grpo.rewards": (
        dict(grpo=dict(rewards="bogus=1")),
        "grpo.rewards='bogus=1': unknown reward 'bogus'; allowed: correct, format, close, shows_work, each once",
    ),
    "grpo.rewards twice": (
        dict(grpo=dict(rewards="correct=1,correct=2")),
        "grpo.rewards='correct=1,correct=2': names reward 'correct' twice",
    ),
    "grpo.rewards weight": (
        dict(grpo=dict(rewards="correct=nan")),
        "grpo.rewards='correct=nan': weight of 'correct' is 'nan', not a number; allowed: a finite number",
    ),
    "grpo.rewards empty": (dict(grpo=dict(rewards=",")), "grpo.rewards=',' names no reward; allowed: correct"),
    "train.dtype": (
        dict(device="cpu", train=dict(dtype="bfloat16")),
        "train.dtype='bfloat16' needs a CUDA device, and device='cpu'; allowed: device='cuda' or 'auto'",
    ),
}


@pytest.mark.parametrize("overrides, message", list(RULES.values()), ids=list(RULES))
def test_each_rule_names_both_fields_their_values_and_what_is_allowed(overrides, message, monkeypatch):
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    with pytest.raises(ConfigError) as error:
        get_config("cpu", **overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_rules_hold_at_their_boundary(monkeypatch):
    """The values just inside each rule pass: equal rates, warmup over the whole run, half the context."""
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    get_config(
        "cpu",
        train=dict(learning_rate=0.01, min_lr=0.01, max_steps=50, warmup_steps=50),
        grpo=dict(epsilon=0.28, epsilon_high=0.28, max_new_tokens=64, tasks="addition, larger", rewards="correct"),
        ppo=dict(batch_size=8, minibatches=4),
        model=dict(n_embd=96, n_head=3),
        halluc=dict(max_new_tokens=64),
        device="cuda",  # a setting may name a device this machine lacks: resolve_device checks that
    )
    assert get_config("cpu", train=dict(dtype="bfloat16")).device == "auto"  # auto may find a GPU
    # a dataset's problems make grpo.tasks unused, so a name there is not checked
    assert get_config("cpu", grpo=dict(source="openai/gsm8k", tasks="nonsense")).grpo.tasks == "nonsense"


def test_stage_rules_refuse_what_a_dataset_cannot_feed(monkeypatch):
    from labkit.config import STAGES, check_config

    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    config = get_config("cpu", data=dict(source="HuggingFaceFW/fineweb-edu", max_docs=1000))  # fine for data..base
    assert check_config(config, ["data", "tokenizer", "base"]) is config
    with pytest.raises(ConfigError) as error:
        check_config(config, list(STAGES))
    assert str(error.value) == (
        "stage rlhf judges answers by the mini-web's facts, and data.source='HuggingFaceFW/fineweb-edu' is a "
        "dataset with data.mini_web_share=0; allowed: data.source='mini-web', data.mini_web_share > 0 (mixes the "
        "mini-web in), or stages without rlhf and halluc"
    )
    with pytest.raises(ConfigError) as error:
        check_config(config, ["base", "grpo"])
    assert str(error.value).startswith(
        "data.source='HuggingFaceFW/fineweb-edu' is a dataset with data.mini_web_share=0, and sft.source='mini-web' "
        "writes conversations from the mini-web's world (stage grpo starts from them)"
    )
    mixed = get_config("cpu", data=dict(source="HuggingFaceFW/fineweb-edu", max_docs=1000, mini_web_share=0.5))
    assert check_config(mixed, list(STAGES)) is mixed  # the mini-web mixed in: a world for every stage
    both = get_config("cpu", data=dict(source="docs.jsonl"), sft=dict(source="chats.jsonl"))
    assert check_config(both, ["sft", "grpo"]) is both


def test_a_config_built_by_hand_is_checked_too():
    from labkit.config import Config, check_config

    config = Config()
    assert check_config(config) is config
    config.train.learning_rate = float("nan")
    with pytest.raises(ConfigError, match="^train.learning_rate=nan is not a finite number"):
        check_config(config)
    config = Config()
    config.model.n_layer = "4"
    with pytest.raises(ConfigError, match="^model.n_layer='4' has the wrong type; expected int"):
        check_config(config)
    config = Config()
    config.sft.min_lr = 1.0
    with pytest.raises(ConfigError, match=r"^sft.min_lr=1.0 is above sft.learning_rate=0.0005"):
        check_config(config)


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu", "gpu-check", "real"])
def test_every_preset_passes_every_rule(preset, monkeypatch):
    from labkit.config import PRESETS, STAGES, check_config

    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    assert set(PRESETS) == {"tiny", "cpu", "gpu", "gpu-check", "real"}
    config = get_config(preset)
    assert config.preset == preset and check_config(config, list(STAGES)) is config


def test_the_config_module_stays_light():
    """Checking settings imports neither torch nor a stage: the first cell of a notebook fails fast."""
    import subprocess
    import sys

    code = (
        "import sys, labkit.config as c; c.get_config('gpu'); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('labkit.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['labkit.config', 'labkit.errors', 'labkit.presets', 'labkit.rules']"
