"""The rules that tie settings together, for every stage, checked before any stage runs.

Each field's own type and range is checked where it is set (labkit/config.py). What is left are the
rules a stage would otherwise discover hours later, inside its loop: a learning rate that decays
*up* to min_lr, a warmup longer than the run, a width that does not split into heads, a PPO batch
that does not split into minibatches, a reply budget that leaves no room for the prompt, a GRPO task
or reward that does not exist, a GRPO loss given settings it has no place for, bf16 asked of a CPU. `labkit.config.check_config` runs them all on
every config `get_config` makes; every message names the fields, their values and what is allowed.

The names `grpo.tasks` and `grpo.rewards` may use live here, once: labkit/tasks.py and
labkit/rewards.py map each name to its function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError

TASK_NAMES = ("one_digit", "addition", "multiplication", "word_problem", "larger", "count_letter")
REWARD_NAMES = ("correct", "format", "close", "shows_work")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "reinforce")  # defined in labkit/grpo.py's docstring

# (field, its upper bound)
NOT_ABOVE = (
    ("train.min_lr", "train.learning_rate"),  # the cosine decays from learning_rate down to min_lr
    ("sft.min_lr", "sft.learning_rate"),
    ("halluc.min_lr", "halluc.learning_rate"),
    ("train.warmup_steps", "train.max_steps"),
    ("sft.warmup_steps", "sft.max_steps"),
    ("grpo.warmup_steps", "grpo.max_steps"),
    ("halluc.warmup_steps", "halluc.idk_steps"),  # stage 7's two fine-tunings warm up alike
    ("halluc.warmup_steps", "halluc.tool_steps"),
    ("grpo.epsilon", "grpo.epsilon_high"),  # DAPO's clip-higher raises the upper clip, never lowers it
)
# sections whose replies are sampled by labkit.engine, which gives a reply at most half the context
REPLY_BUDGETS = ("sft", "rlhf", "grpo", "halluc")
# the stages that start from the SFT model, and those that judge answers by the mini-web's facts
FROM_SFT, NEED_WORLD = ("sft", "rlhf", "grpo", "halluc"), ("rlhf", "halluc")
# a dataset source that is a local file, by its suffix, and the `datasets` loader that reads it
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# (section, its field that caps the rows read): the big hub datasets (FineWeb-Edu: 1.3T tokens) need a cap
ROW_CAPS = (("data", "max_docs"), ("sft", "max_conversations"))


def check_rules(config, stages: Sequence[str] = ()) -> None:
    """Every rule that ties two settings of `config` (a labkit.config.Config) together; with
    `stages`, also the rules of the stages that will be built. Raises ConfigError."""
    for name, limit in NOT_ABOVE:
        value, bound = get(config, name), get(config, limit)
        if value > bound:
            short, short_limit = name.rpartition(".")[2], limit.rpartition(".")[2]
            raise ConfigError(f"{name}={value} is above {limit}={bound}; {short} must be <= {short_limit}")
    check_shapes(config)
    g = config.grpo
    if g.epsilon >= 1:
        raise ConfigError(
            f"grpo.epsilon={g.epsilon} puts the lower clip 1 - epsilon at {1 - g.epsilon:g}, which no probability "
            f"ratio goes below; epsilon must be < 1"
        )
    check_loss_type(g)
    check_sources(config)
    if g.source == "mini-web":
        parse_tasks(g.tasks)
    parse_weights(g.rewards)
    if config.train.dtype == "bfloat16" and config.device in ("cpu", "mps"):
        raise ConfigError(
            f"train.dtype='bfloat16' needs a CUDA device, and device={config.device!r}; allowed: "
            f"device='cuda' or 'auto', or train.dtype='auto' or 'float32'"
        )
    check_language(config.data.language)
    check_stages(config, stages)


def check_language(language: str) -> None:
    """data.language must be one the identifier knows (English needs no look-up)."""
    if language == "en":
        return
    from .language import identifier

    known = sorted(set(identifier().nb_classes))
    if language not in known:
        raise ConfigError(f"data.language={language!r} is not a language py3langid knows; allowed: {', '.join(known)}")


def check_shapes(config) -> None:
    """Sizes that must divide or fit one another: heads, PPO's minibatches, reply budgets."""
    m, p = config.model, config.ppo
    if m.n_embd % m.n_head:
        raise ConfigError(
            f"model.n_embd={m.n_embd} is not a multiple of model.n_head={m.n_head}; n_embd must be a multiple "
            f"of n_head (each head gets n_embd // n_head channels)"
        )
    if m.arch == "modern" and (m.n_embd // m.n_head) % 2:
        raise ConfigError(
            f"model.arch='modern' rotates pairs of channels, and model.n_embd={m.n_embd} // model.n_head={m.n_head} "
            f"= {m.n_embd // m.n_head} channels per head is odd; allowed: an even head size"
        )
    if p.batch_size % p.minibatches:
        raise ConfigError(
            f"ppo.batch_size={p.batch_size} is not a multiple of ppo.minibatches={p.minibatches}; "
            f"batch_size must be a multiple of minibatches (each minibatch gets batch_size // minibatches rollouts)"
        )
    if p.batch_size < 2 * p.minibatches:
        raise ConfigError(
            f"ppo.batch_size={p.batch_size} gives 1 rollout to each of ppo.minibatches={p.minibatches}; "
            f"batch_size must be at least 2 * minibatches (at least 2 rollouts in each minibatch)"
        )
    if p.kl_target > 0 and p.kl_coef == 0:
        raise ConfigError(
            f"ppo.kl_target={p.kl_target} needs ppo.kl_coef > 0, got ppo.kl_coef={p.kl_coef}: the adaptive "
            f"coefficient starts at kl_coef and is multiplied from there (0 stays 0); set kl_coef (e.g. 0.05) "
            f"or kl_target=0"
        )
    for section in REPLY_BUDGETS:
        budget = getattr(config, section).max_new_tokens
        if budget > m.block_size // 2:
            raise ConfigError(
                f"{section}.max_new_tokens={budget} is above half of model.block_size={m.block_size}; "
                f"max_new_tokens must be <= block_size // 2 = {m.block_size // 2} (the prompt keeps the other half)"
            )


def check_loss_type(g) -> None:
    """grpo.loss_type='reinforce' is plain on-policy REINFORCE (labkit/grpo.py): the settings it has no
    place for are refused, not ignored. Its advantages are r - mean(group), and they are made once for
    every loss type (labkit/groups.py), so the std must be off there; it has no KL, no ratio and so no
    clip, and with no ratio a second step on the same samples would no longer be on-policy."""
    if g.loss_type != "reinforce":
        return
    recipe = "as labkit.config.loss_recipe('reinforce') sets it (beta=0 and scale_rewards=False together)"
    if g.scale_rewards:
        raise ConfigError(
            f"grpo.loss_type='reinforce' takes the advantage r - mean(group), and grpo.scale_rewards=True divides "
            f"it by the group's std; allowed: scale_rewards=False, {recipe}"
        )
    if g.beta != 0.0:
        raise ConfigError(
            f"grpo.loss_type='reinforce' has no KL penalty, and grpo.beta={g.beta}; allowed: beta=0, {recipe}"
        )
    if g.num_iterations != 1:
        raise ConfigError(
            f"grpo.loss_type='reinforce' is on-policy (no ratio), and grpo.num_iterations={g.num_iterations} takes "
            f"more steps on the same samples; allowed: num_iterations=1"
        )
    for f in dataclasses.fields(g):
        if f.name in ("epsilon", "epsilon_high") and getattr(g, f.name) != f.default:
            raise ConfigError(
                f"grpo.loss_type='reinforce' has no ratio to clip, and grpo.{f.name}={getattr(g, f.name)}; "
                f"allowed: {f.name} left at {f.default}"
            )


def from_hub(source: str) -> bool:
    """Is a dataset source a name on the Hugging Face hub (not the mini-web, not a local file)?"""
    path = Path(source)
    return source != "mini-web" and path.suffix not in LOCAL_FORMATS and not path.exists()


def check_sources(config) -> None:
    """A hub dataset is read with a cap on its rows (a local file may be read whole)."""
    for section, cap in ROW_CAPS:
        source, limit = getattr(config, section).source, getattr(getattr(config, section), cap)
        if from_hub(source) and limit == 0:
            raise ConfigError(
                f"{section}.source={source!r} is read from the Hugging Face hub, and {section}.{cap}=0 reads every row "
                f"(FineWeb-Edu has 1.3T tokens, SmolTalk 1M conversations); allowed: {section}.{cap} > 0, e.g. 100000"
            )


def has_world(config) -> bool:
    """Stage 1 writes the mini-web's world: it crawls the mini-web alone or mixes it into a dataset."""
    return config.data.source == "mini-web" or config.data.mini_web_share > 0


def check_stages(config, stages: Sequence[str]) -> None:
    """A dataset in data.source, with no mini-web mixed in, leaves no world: the stages that write or
    judge by it cannot run."""
    if has_world(config):
        return
    source, mix = config.data.source, "data.mini_web_share > 0 (mixes the mini-web in)"
    for stage in NEED_WORLD:
        if stage in stages:
            raise ConfigError(
                f"stage {stage} judges answers by the mini-web's facts, and data.source={source!r} is a dataset "
                f"with data.mini_web_share=0; allowed: data.source='mini-web', {mix}, or stages without "
                f"{' and '.join(NEED_WORLD)}"
            )
    after_sft = [s for s in stages if s in FROM_SFT]
    if after_sft and (config.sft.source == "mini-web" or config.sft.mini_web_share > 0):
        field = "sft.source='mini-web'" if config.sft.source == "mini-web" else "sft.mini_web_share>0"
        raise ConfigError(
            f"data.source={source!r} is a dataset with data.mini_web_share=0, and {field} writes conversations "
            f"from the mini-web's world (stage {after_sft[0]} starts from them); allowed: sft.source a dataset or "
            f"file with a 'messages' column and sft.mini_web_share=0, {mix}, or data.source='mini-web'"
        )


def parse_tasks(text: str) -> list[str]:
    """grpo.tasks: 'addition,count_letter' -> ['addition', 'count_letter'], refusing unknown names."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"grpo.tasks={text!r} names no task; allowed: {', '.join(TASK_NAMES)}")
    for name in names:
        if name not in TASK_NAMES:
            raise ConfigError(f"grpo.tasks={text!r}: unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")
    return names


def parse_weights(text: str) -> dict[str, float]:
    """grpo.rewards: 'correct=1.0,format=0.2' -> {'correct': 1.0, 'format': 0.2} (a name alone weighs 1)."""
    weights: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, sep, value = (s.strip() for s in part.partition("="))
        if name not in REWARD_NAMES or name in weights:
            problem = f"names reward {name!r} twice" if name in weights else f"unknown reward {name!r}"
            raise ConfigError(f"grpo.rewards={text!r}: {problem}; allowed: {', '.join(REWARD_NAMES)}, each once")
        try:
            weights[name] = float(value) if sep else 1.0
        except ValueError:
            weights[name] = math.nan
        if not math.isfinite(weights[name]):
            raise ConfigError(
                f"grpo.rewards={text!r}: weight of {name!r} is {value!r}, not a number; "
                f"allowed: a finite number, e.g. '{name}=1.0'"
            )
    if not weights:
        raise ConfigError(f"grpo.rewards={text!r} names no reward; allowed: {', '.join(REWARD_NAMES)}")
    return weights


def get(config, name: str):
    """The value of a dotted field name: get(config, 'sft.min_lr')."""
    return functools.reduce(getattr, name.split("."), config)
