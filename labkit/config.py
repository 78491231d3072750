"""Parameters: one dataclass per stage, bundled in `Config`.

A preset (labkit/presets.py) is a named bundle of values for these fields. Any field can be overridden, by keyword in Python
(`get_config("cpu", seed=1, data={"n_people": 50})`), by `--set data.n_people=50` on the
command line, or by a notebook's papermill parameters. Every override is checked at once:
an unknown preset, field or stage, a value of the wrong type, out of range or not finite raises
`ConfigError` with one message naming the field, the value and what is allowed. Then
`check_config` checks the rules that tie fields together (min_lr <= learning_rate, a PPO batch
that splits into minibatches, a reply budget that leaves room for the prompt, ...), so that a bad
setting fails in the first second, not in its stage hours later.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .presets import LOSS_RECIPES, PRESETS
from .rules import LOSS_TYPES, REWARD_NAMES, TASK_NAMES, check_rules

STAGES = ("data", "tokenizer", "base", "sft", "rlhf", "grpo", "halluc")


def param(default, *, low=None, high=None, choices=None, help=""):
    """A dataclass field with its allowed range (inclusive) or choices, checked on every override."""
    return field(default=default, metadata=dict(low=low, high=high, choices=choices, help=help))


@dataclass
class DataConfig:
    source: str = param(
        "mini-web",
        help="'mini-web', a Hugging Face dataset name, a local .jsonl/.parquet path with a 'text' column, or a "
        "local Common Crawl .warc/.warc.gz file (its HTML pages are extracted)",
    )
    config: str = param("", help="the dataset's config on the hub, e.g. 'sample-10BT' ('': its default)")
    split: str = param("train", help="the dataset's split on the hub (a local file is one split)")
    text_column: str = param("text", help="column holding the text when source is a dataset")
    max_docs: int = param(0, low=0, help="read at most this many documents from a dataset (0: all, a local file only)")
    mini_web_share: float = param(
        0.0,
        low=0.0,
        high=0.99,
        help="with a dataset: the mini-web's share of the cleaned corpus's characters, planted so that later stages "
        "have known facts to judge by (labkit/data.py, mix_in_mini_web); 0: the dataset alone, no world",
    )
    workers: int = param(
        1, low=1, help="cleaning processes: 1 is this one (the lesson); more: datatrove (scale_out.py)"
    )
    n_people: int = param(100, low=5, high=1_000_000, help="people in the mini-web's world")
    median_pages: float = param(3.0, low=0.5, high=1000.0, help="median number of pages about a person")
    spread: float = param(1.2, low=0.0, high=5.0, help="log-normal spread of pages per person (heavy tail)")
    unseen_fraction: float = param(0.1, low=0.0, high=0.9, help="share of people with no page at all")
    max_pages_per_person: int = param(40, low=1, help="cap on pages about one person")
    filler_ratio: float = param(
        1.0, low=0.0, high=10.0, help="pages not about people (worksheets, stories, news) per person page"
    )
    noise: float = param(0.3, low=0.0, high=2.0, help="noisy pages (blocked, spam, duplicates) per clean page")
    pii_rate: float = param(0.15, low=0.0, high=1.0, help="share of clean pages that get personal data inserted")
    minhash_ngram: int = param(5, low=1, high=20, help="word n-gram size of MinHash shingles")
    minhash_bands: int = param(14, low=1, high=64, help="LSH bands")
    minhash_rows: int = param(8, low=1, high=64, help="LSH rows per band")
    min_words: int = param(50, low=1, help="Gopher: fewest words a page may have")
    foreign_share: float = param(
        0.1, low=0.0, high=2.0, help="mini-web pages in other languages (Chinese, French, German, Spanish) per page"
    )
    language: str = param("en", help="keep pages in this language (an ISO 639-1 code py3langid knows: en, fr, zh...)")
    language_threshold: float = param(0.65, low=0.0, high=1.0, help="least P(language) a page kept has (FineWeb: 0.65)")
    c4_terminal_punct: bool = param(False, help="C4: drop lines not ending in . ! ? or a quote (FineWeb: off)")
    c4_keep_title: bool = param(
        True, help="C4: spare a page's first line (its title) the length and punctuation rules (labkit's departure)"
    )
    site_line_share: float = param(
        0.5, low=0.0, high=1.0, help="drop a line on this share of its site's pages (and 3+)"
    )


@dataclass
class TokenizerConfig:
    vocab_size: int = param(
        2048, low=264, high=1_000_000, help="vocabulary size: 256 bytes + merges + 8 special tokens"
    )
    pattern: str = param("gpt4", choices=("gpt4", "gpt2"), help="regex that pre-splits text before BPE")
    heldout_fraction: float = param(0.05, low=0.0, high=0.5, help="share of pages held out to measure bytes per token")


@dataclass
class ModelConfig:
    n_layer: int = param(4, low=1, high=256, help="Transformer blocks")
    n_head: int = param(4, low=1, high=256, help="attention heads per block (n_embd must be a multiple of n_head)")
    n_embd: int = param(192, low=8, high=16384, help="width of the residual stream")
    block_size: int = param(128, low=8, high=65536, help="context length in tokens")
    dropout: float = param(0.0, low=0.0, high=0.9, help="dropout probability while training (0 for pretraining)")
    bias: bool = param(
        True, help="biases in Linear and LayerNorm layers, as in GPT-2 (arch gpt2 only: modern has none)"
    )
    arch: str = param(
        "gpt2",
        choices=("gpt2", "modern"),
        help="gpt2: GPT-2's architecture (learned positions, LayerNorm, GELU, tied head); modern: nanochat's and "
        "modded-nanogpt's (rotary positions, parameter-free RMSNorm, QK-norm, ReLU², untied head, no biases, "
        "zero-initialised output projections, logit softcap)",
    )
    softcap: float = param(
        15.0, low=0.0, high=1000.0, help="arch modern: logits squashed as softcap * tanh(logits / softcap) (0: off)"
    )


@dataclass
class TrainConfig:
    max_steps: int = param(1500, low=1, high=10_000_000, help="optimizer steps")
    batch_size: int = param(32, low=1, high=65536, help="sequences per micro-batch, over all processes")
    grad_accum: int = param(1, low=1, high=1024, help="micro-batches summed into one optimizer step")
    learning_rate: float = param(3e-3, low=0.0, high=1.0, help="peak learning rate, reached after warmup")
    min_lr: float = param(3e-4, low=0.0, high=1.0, help="learning rate at the end of the cosine decay")
    warmup_steps: int = param(50, low=0, help="steps of linear warmup from 0 to learning_rate")
    weight_decay: float = param(0.1, low=0.0, high=10.0, help="AdamW weight decay on 2-D weights")
    optimizer: str = param(
        "adamw",
        choices=("adamw", "muon"),
        help="adamw: AdamW on everything; muon: Muon on the blocks' 2-D weight matrices at muon_lr, AdamW on "
        "embeddings, head, norms and biases at learning_rate (orthogonalised in bfloat16 on CUDA, float32 "
        "elsewhere)",
    )
    muon_lr: float = param(
        0.02,
        low=0.0,
        high=10.0,
        help="optimizer muon: Muon's peak learning rate (the schedule scales it with learning_rate; later stages "
        "keep its ratio to learning_rate)",
    )
    muon_momentum: float = param(0.95, low=0.0, high=0.9999, help="optimizer muon: Muon's (Nesterov) momentum")
    beta1: float = param(0.9, low=0.0, high=0.9999, help="AdamW beta1")
    beta2: float = param(0.99, low=0.0, high=0.99999, help="AdamW beta2")
    grad_clip: float = param(1.0, low=0.0, help="clip the gradient norm to this (0: no clipping)")
    eval_every: int = param(100, low=1, help="steps between validation passes")
    eval_batches: int = param(8, low=1, help="batches in one validation pass")
    checkpoint_every: int = param(250, low=0, help="steps between training checkpoints (0: only at the end)")
    val_fraction: float = param(0.05, low=0.0, high=0.5, help="share of pages held out for validation")
    compile: bool = param(False, help="torch.compile the model (CUDA only)")
    dtype: str = param(
        "auto",
        choices=("auto", "float32", "bfloat16"),
        help="autocast dtype; 'auto' is bfloat16 on CUDA, float32 elsewhere",
    )


@dataclass
class SFTConfig:
    source: str = param(
        "mini-web",
        help="'mini-web' (conversations written from the world), a Hugging Face dataset name, or a local .jsonl/.parquet path with a 'messages' column",
    )
    messages_column: str = param(
        "messages", help="column holding the list of {role, content} messages when source is a dataset"
    )
    config: str = param("", help="the dataset's config on the hub ('': its default)")
    split: str = param("train", help="the dataset's split on the hub (a local file is one split)")
    max_conversations: int = param(0, low=0, help="read at most this many from a dataset (0: all, a local file only)")
    mini_web_share: float = param(
        0.0,
        low=0.0,
        high=0.99,
        help="with a dataset: the share of training conversations written from the mini-web (n_conversations; the "
        "dataset fills the rest), so that QA is judged against known facts; 0: the dataset alone",
    )
    n_conversations: int = param(3000, low=10, high=10_000_000, help="training conversations written from the mini-web")
    val_conversations: int = param(200, low=10, high=1_000_000, help="held-out conversations for the validation loss")
    heldout_people: float = param(
        0.25, low=0.05, high=0.9, help="share of people with pages kept out of training, asked about in evaluation"
    )
    max_steps: int = param(150, low=1, high=10_000_000, help="optimizer steps of fine-tuning")
    batch_size: int = param(32, low=1, high=65536, help="conversations per batch (padded to the longest)")
    learning_rate: float = param(5e-4, low=0.0, high=1.0, help="peak learning rate (lower than pretraining's)")
    min_lr: float = param(5e-5, low=0.0, high=1.0, help="learning rate at the end of the cosine decay")
    warmup_steps: int = param(15, low=0, help="steps of linear warmup")
    eval_every: int = param(50, low=1, help="steps between validation passes")
    max_new_tokens: int = param(
        48,
        low=1,
        high=4096,
        help="longest reply in evaluation; a reply that has not ended by then fails the format check",
    )


@dataclass
class RLHFConfig:
    n_prompts: int = param(
        120,
        low=4,
        high=1_000_000,
        help="prompts whose completions are ranked (a share is held out for the reward model's pair accuracy)",
    )
    k: int = param(
        4,
        low=2,
        high=16,
        help="completions sampled per prompt and ranked together (a ranking of K gives K(K-1)/2 pairs)",
    )
    temperature: float = param(
        1.0,
        low=0.01,
        high=10.0,
        help="sampling temperature of the completions to rank and of PPO's rollouts (PPO scores its tokens at it too)",
    )
    max_new_tokens: int = param(
        32, low=1, high=4096, help="longest completion; one that has not reached <|im_end|> by then is cut"
    )
    simulated_labeler: bool = param(
        True,
        help="training uses the simulated labeler's ranking of every prompt a person has not ranked (headless runs "
        "need it); False: only a person's rankings",
    )
    heldout_prompts: float = param(
        0.15, low=0.05, high=0.9, help="share of ranked prompts held out to measure the reward model's pair accuracy"
    )
    n_eval: int = param(
        60, low=2, high=100_000, help="held-out questions (held-out people and phrasings) for rewards and win rates"
    )
    hacking_steps: int = param(
        0,
        low=0,
        high=10_000_000,
        help="extra PPO run with kl_coef=0 for this many batches, to show reward hacking (0: skip)",
    )
    hacking_learning_rate: float = param(
        0.0,
        low=0.0,
        high=1.0,
        help="learning rate of the reward-hacking run (0: ppo.learning_rate); larger steps show the hacking sooner",
    )


@dataclass
class RewardModelConfig:
    steps: int = param(150, low=1, high=10_000_000, help="optimizer steps")
    batch_size: int = param(32, low=1, high=65536, help="pairs per batch")
    learning_rate: float = param(3e-4, low=0.0, high=1.0, help="peak learning rate")
    margin: float = param(
        0.0, low=0.0, high=100.0, help="the chosen must beat the rejected by this much (0: plain Bradley-Terry)"
    )
    center_rewards_coefficient: float = param(
        0.01, low=0.0, high=10.0, help="weight of mean((r_c + r_r)^2), keeps rewards near 0 (0: off)"
    )


@dataclass
class DPOConfig:
    steps: int = param(100, low=1, high=10_000_000, help="optimizer steps")
    batch_size: int = param(16, low=1, high=65536, help="pairs per batch")
    learning_rate: float = param(1e-4, low=0.0, high=1.0, help="peak learning rate")
    beta: float = param(
        0.1, low=0.0, high=100.0, help="how far from the reference the policy may move (higher: closer)"
    )


@dataclass
class PPOConfig:
    steps: int = param(40, low=1, high=10_000_000, help="batches of rollouts")
    batch_size: int = param(16, low=2, high=65536, help="rollouts (prompts) per batch")
    epochs: int = param(4, low=1, high=100, help="passes over each batch of rollouts")
    minibatches: int = param(
        2, low=1, high=1024, help="minibatches (optimizer steps) per pass (batch_size must be a multiple)"
    )
    micro_batch_size: int = param(
        64,
        low=1,
        high=65536,
        help="rollouts per forward/backward pass; a minibatch's gradients accumulate over them (bounds memory, not results)",
    )
    learning_rate: float = param(3e-5, low=0.0, high=1.0, help="learning rate of the policy and the value head")
    kl_coef: float = param(
        0.05,
        low=0.0,
        high=100.0,
        help="weight of the per-token KL penalty against the reference (0: none, reward hacking); with kl_target, where the adaptive coefficient starts",
    )
    kl_target: float = param(
        0.0,
        low=0.0,
        high=10_000.0,
        help="adaptive KL controller (Ziegler et al. 2019): the KL per answer (summed over its tokens) the coefficient steers toward, starting from kl_coef (0: the coefficient stays kl_coef)",
    )
    kl_horizon: int = param(
        10_000,
        low=1,
        high=100_000_000,
        help="rollouts over which the adaptive controller closes the gap to kl_target: after each batch the coefficient is multiplied by 1 + clip(KL / kl_target - 1, -0.2, 0.2) * batch_size / kl_horizon",
    )
    kl_estimator: str = param(
        "k1", choices=("k1", "k3"), help="per-token KL estimate, k1 = log pi - log ref, k3 = (r - 1) - log r"
    )
    gamma: float = param(1.0, low=0.0, high=1.0, help="discount")
    lam: float = param(0.95, low=0.0, high=1.0, help="GAE lambda")
    cliprange: float = param(0.2, low=0.0, high=10.0, help="clip of the probability ratio")
    cliprange_value: float = param(0.2, low=0.0, high=100.0, help="clip of the value head's move")
    vf_coef: float = param(0.1, low=0.0, high=100.0, help="weight of the value loss")
    missing_eos_penalty: float = param(
        1.0, low=0.0, high=100.0, help="subtracted from the score of an answer that never reaches <|im_end|> (0: off)"
    )


@dataclass
class GRPOConfig:
    source: str = param(
        "mini-web",
        help="'mini-web' (tasks generated from the world), a Hugging Face dataset name, or a local .jsonl/.parquet path in GSM8K's format ('question', 'answer' ending in '#### N')",
    )
    config: str = param("main", help="the dataset's config on the hub (GSM8K: 'main' or 'socratic')")
    split: str = param("train", help="the dataset's split on the hub (held-out problems are split from it)")
    tasks: str = param(
        "larger", help=f"comma-separated mini-web tasks to train and evaluate on; allowed: {', '.join(TASK_NAMES)}"
    )
    n_heldout: int = param(200, low=1, high=100_000, help="held-out problems per task, for pass@1 (greedy)")
    cold_start_steps: int = param(
        30,
        low=0,
        high=10_000_000,
        help="steps of SFT on worked solutions of training problems before GRPO, DeepSeek-R1's 'cold start' (0: GRPO straight from the SFT model)",
    )
    cold_start_learning_rate: float = param(
        1e-3,
        low=0.0,
        high=1.0,
        help="peak learning rate of the cold start (it decays to a tenth; batch size and warmup are sft's)",
    )
    rewards: str = param(
        "correct=1.0,format=0.2",
        help=f"reward functions and weights, 'name=weight,...'; allowed names: {', '.join(REWARD_NAMES)}",
    )
    num_generations: int = param(8, low=2, high=1024, help="G: samples per prompt, compared with each other")
    prompts_per_step: int = param(
        8, low=1, high=4096, help="prompts per optimizer step (a step trains on prompts_per_step * G samples)"
    )
    max_steps: int = param(120, low=1, high=10_000_000, help="optimizer steps")
    num_iterations: int = param(
        1,
        low=1,
        high=64,
        help="mu: optimizer steps on each batch of samples (more than 1 makes the ratio and its clipping matter)",
    )
    learning_rate: float = param(2e-4, low=0.0, high=1.0, help="constant learning rate (after warmup)")
    warmup_steps: int = param(5, low=0, help="steps of linear warmup")
    epsilon: float = param(0.2, low=0.0, high=10.0, help="lower clip: the ratio may not go below 1 - epsilon")
    epsilon_high: float = param(
        0.2, low=0.0, high=10.0, help="upper clip: the ratio may not go above 1 + epsilon_high (DAPO raises it to 0.28)"
    )
    beta: float = param(
        0.04, low=0.0, high=10.0, help="KL coefficient to the frozen reference (k3 estimator); 0 drops the reference"
    )
    scale_rewards: bool = param(
        True, help="divide advantages by the group's std (GRPO); False gives Dr. GRPO's plain r - mean"
    )
    loss_type: str = param(
        "grpo",
        choices=LOSS_TYPES,
        help="per sequence then mean (grpo), over all the step's tokens (bnpo, dapo), sum / (batch * max_new_tokens) (dr_grpo), or nanochat's on-policy REINFORCE (reinforce); changes no other field: labkit.presets.LOSS_RECIPES pairs each with its paper's settings (dapo: epsilon_high=0.28)",
    )
    max_new_tokens: int = param(
        48,
        low=1,
        high=4096,
        help="longest completion; one that has not ended by then is cut and fails the format reward",
    )
    temperature: float = param(
        0.7,
        low=0.01,
        high=10.0,
        help="sampling temperature of the G samples (below 1 for a small model: at 1 its numbers come out garbled and a right answer is luck)",
    )
    eval_every: int = param(
        20, low=1, high=1_000_000, help="steps between pass@1 measurements on the held-out problems"
    )
    micro_batch_size: int = param(
        64,
        low=1,
        high=65536,
        help="samples per forward/backward pass; a step's gradients accumulate over them (bounds memory, not results)",
    )


@dataclass
class HallucConfig:
    n_samples: int = param(
        4, low=0, high=64, help="sampled answers per probe question, to measure consistency (0: greedy only)"
    )
    temperature: float = param(1.0, low=0.01, high=10.0, help="sampling temperature of those answers")
    max_new_tokens: int = param(24, low=4, high=4096, help="longest answer (and longest search call)")
    idk_conversations: int = param(
        1200,
        low=10,
        high=10_000_000,
        help='mitigation 1: conversations of the refusal fine-tuning ("I don\'t know" for what the model got wrong, the rest as they were)',
    )
    idk_steps: int = param(100, low=1, high=10_000_000, help="mitigation 1: optimizer steps")
    tool_conversations: int = param(
        3000, low=10, high=10_000_000, help="mitigation 2: search-tool conversations made from the world"
    )
    tool_steps: int = param(300, low=1, high=10_000_000, help="mitigation 2: optimizer steps")
    batch_size: int = param(32, low=1, high=65536, help="conversations per batch in both fine-tunings")
    learning_rate: float = param(1e-3, low=0.0, high=1.0, help="peak learning rate of both fine-tunings")
    min_lr: float = param(1e-4, low=0.0, high=1.0, help="learning rate at the end of the cosine decay")
    warmup_steps: int = param(10, low=0, help="steps of linear warmup")
    search_results: int = param(2, low=1, high=20, help="passages the search tool returns")
    result_chars: int = param(
        240, low=20, high=100_000, help="the tool's answer is cut to this many characters (it must fit the context)"
    )


@dataclass
class Config:
    preset: str = param("cpu", choices=tuple(PRESETS), help="the preset these values started from")
    seed: int = param(1337, low=0, help="drives data, initialisation and sampling")
    device: str = param("auto", choices=("auto", "cpu", "cuda", "mps"), help="'auto' picks cuda, then mps, then cpu")
    max_batch: int = param(
        64,
        low=1,
        high=65536,
        help="rows through the model at once when sampling, scoring and evaluating (bounds memory; greedy results do not depend on it)",
    )
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    halluc: HallucConfig = field(default_factory=HallucConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def get_config(preset: str | None = None, **overrides) -> Config:
    """The preset's `Config` with `overrides` applied (nested dicts for sections; None keeps a value).

    `preset=None` reads the environment variable LABKIT_PRESET, else "cpu"; when
    LABKIT_PRESET is set it wins over the argument, so CI can run every notebook on `tiny`.
    """
    preset = os.environ.get("LABKIT_PRESET") or preset or "cpu"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    config = Config(preset=preset)
    _apply(config, PRESETS[preset], "")
    _apply(config, overrides, "")
    return check_config(config)


def loss_recipe(name: str) -> dict:
    """The `grpo` fields of a GRPO loss variant as its paper runs it (labkit/presets.py), e.g.
    loss_recipe("dapo") == {"loss_type": "dapo", "epsilon_high": 0.28}, for get_config(grpo=...)."""
    if name not in LOSS_RECIPES:
        raise ConfigError(f"unknown GRPO loss recipe {name!r}; allowed: {', '.join(LOSS_RECIPES)}")
    return dict(LOSS_RECIPES[name])


def parse_stages(text: str | list[str] | None) -> list[str]:
    """'data,tokenizer' -> ['data', 'tokenizer'] in pipeline order; None -> all stages."""
    if text is None:
        return list(STAGES)
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    for name in names:
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]


def check_config(config: Config, stages: list[str] | None = None) -> Config:
    """Every setting of every stage, checked before any stage runs (get_config calls this; so may a
    stage handed a config built by hand): each field's type and range (floats finite), then every
    rule that ties fields together (labkit/rules.py). With `stages` (what `labkit run --stages`
    will build), also the rules of those stages. Returns `config`; a ConfigError names the
    fields, their values and what is allowed."""
    _check_fields(config, "")
    check_rules(config, stages or ())
    return config


def describe(config_class=Config, prefix="") -> list[str]:
    """One line per field: dotted name and help (for --help and notebooks)."""
    lines, hints = [], _hints(config_class)
    for f in dataclasses.fields(config_class):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
    return lines


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, then mps, then cpu; an explicit device must be available."""
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if device not in available:
        raise ConfigError(f"device={device!r} is not allowed; allowed: auto, cpu, cuda, mps")
    if not available[device]:
        raise ConfigError(f"device={device!r} is not available on this machine; use 'auto' or 'cpu'")
    return device


def _check_fields(obj, prefix: str) -> None:
    """Each field of a config (built by get_config or by hand) has its type and is in its range."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        path, value, kind = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(kind):
            _check_fields(value, path + ".")
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        has_kind = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number}
        if not has_kind.get(kind, isinstance(value, kind)):
            raise ConfigError(f"{path}={value!r} has the wrong type; expected {kind.__name__}")
        _check(path, value, f.metadata)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _apply(obj, overrides: dict, prefix: str) -> None:
    hints = _hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in overrides.items():
        if value is None:  # a notebook knob left at None keeps the preset's value
            continue
        path = prefix + name
        if name not in fields:
            raise ConfigError(f"unknown field {path!r}; allowed: {', '.join(prefix + f for f in fields)}")
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}={value!r}: {path} is a section; give a dict of its fields")
            _apply(getattr(obj, name), value, path + ".")
        else:
            setattr(obj, name, _check(path, _convert(path, value, kind), fields[name].metadata))


def _convert(path: str, value: Any, kind) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{path}={value!r} has the wrong type; expected {kind.__name__}")


def _check(path: str, value: Any, meta) -> Any:
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}={value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
    allowed = f">= {low}" if high is None else f"<= {high}" if low is None else f"between {low} and {high}"
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        bounds = "" if low is None and high is None else f", {allowed}"
        raise ConfigError(f"{path}={value!r} is not a finite number; allowed: a finite number{bounds}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{path}={value!r} is out of range; allowed: {allowed}")
    return value
