"""The presets: named bundles of sizes for the fields of `labkit.config.Config`.

- `tiny`: every stage in seconds (unit tests, and CI's notebook run);
- `cpu` (the default): every notebook in a few minutes on a 2-core laptop;
- `gpu`: a real single-GPU run, a GPT-2-small-class model;
- `gpu-check`: `gpu` cut to a few steps per stage, to prove every GPU path in minutes;
- `real`: `gpu` on real data through every stage (REAL_DATA, below).

A preset gives only the values that differ from the dataclasses' defaults (which are `cpu`'s).

Beside the presets, LOSS_RECIPES: GRPO's loss variants (labkit/grpo.py) with the settings their
papers pair them with. Setting `grpo.loss_type` alone changes no other field; a recipe sets them
together, on any preset: `get_config("cpu", grpo=loss_recipe("dapo"))` (labkit/config.py).
"""

PRESETS: dict[str, dict] = {
    "tiny": dict(
        data=dict(n_people=30, median_pages=2.0, max_pages_per_person=12, filler_ratio=0.5),
        tokenizer=dict(vocab_size=300),
        model=dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
        train=dict(
            max_steps=30,
            batch_size=8,
            learning_rate=1e-2,
            min_lr=1e-3,
            warmup_steps=5,
            eval_every=10,
            eval_batches=2,
            checkpoint_every=10,
            val_fraction=0.1,
        ),
        sft=dict(
            n_conversations=200,
            val_conversations=20,
            heldout_people=0.3,
            max_steps=10,
            batch_size=8,
            learning_rate=3e-3,
            min_lr=3e-4,
            warmup_steps=2,
            eval_every=5,
            max_new_tokens=16,
        ),
        # the tiny models never finish an answer at temperature 1 (0 of 160 samples): at 5, about 1 in 20
        # do, and the labeler has finished answers to prefer to unfinished ones (no pair comes from a tie)
        rlhf=dict(
            n_prompts=32, k=4, temperature=5.0, max_new_tokens=32, heldout_prompts=0.25, n_eval=8, hacking_steps=3
        ),
        reward_model=dict(steps=6, batch_size=8),
        dpo=dict(steps=4, batch_size=4),
        ppo=dict(steps=3, batch_size=4, epochs=2, minibatches=2, kl_target=1.0, kl_horizon=20),
        grpo=dict(
            cold_start_steps=3,
            n_heldout=3,
            num_generations=4,
            prompts_per_step=2,
            max_steps=3,
            warmup_steps=1,
            max_new_tokens=16,
            eval_every=2,
        ),
        halluc=dict(
            n_samples=2,
            max_new_tokens=12,
            idk_conversations=60,
            idk_steps=4,
            tool_conversations=60,
            tool_steps=4,
            batch_size=8,
            learning_rate=3e-3,
            min_lr=3e-4,
            warmup_steps=1,
            search_results=1,
            result_chars=60,
        ),
    ),
    "cpu": dict(
        train=dict(max_steps=450, eval_every=50, checkpoint_every=150),
        # answers up to half the context: a refusal or the assistant's identity takes 31-37 tokens
        rlhf=dict(hacking_steps=60, hacking_learning_rate=3e-5, max_new_tokens=64, n_eval=200),
        reward_model=dict(steps=100, batch_size=16),
        # small steps and a tight KL: the reward model is right on 61-76% of held-out pairs, and a policy
        # that moves far from SFT exploits its errors (at PPO 3e-5 / KL target 2 and DPO 1e-4 / beta 0.1 both
        # scored below SFT by the labeler, and PPO stopped refusing harmful requests; measured on 184 prompts)
        dpo=dict(steps=60, beta=0.5, learning_rate=3e-5),
        ppo=dict(steps=30, learning_rate=1e-5, kl_coef=0.2, kl_target=1.0, kl_horizon=100),
    ),
    "gpu": dict(
        max_batch=128,
        data=dict(n_people=5000, median_pages=4.0, max_pages_per_person=200),
        # what the 5,000-person mini-web supports: its last merge's pair occurs 6 times (at 32,768 the last
        # 8,000 merges are of pairs seen once or twice: made-up names)
        tokenizer=dict(vocab_size=16384),
        model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
        # 400 steps of 131,072 tokens: 52M tokens, about 5 epochs over the cleaned corpus's 10M (README, GPU)
        train=dict(
            max_steps=400,
            batch_size=32,
            grad_accum=4,
            learning_rate=6e-4,
            min_lr=6e-5,
            warmup_steps=40,
            beta2=0.95,
            eval_every=50,
            eval_batches=20,
            checkpoint_every=100,
            val_fraction=0.01,
            compile=True,
        ),
        sft=dict(
            n_conversations=50000,
            val_conversations=1000,
            heldout_people=0.1,
            max_steps=1500,
            batch_size=64,
            learning_rate=1e-4,
            min_lr=1e-5,
            warmup_steps=100,
            eval_every=250,
            max_new_tokens=128,
        ),
        rlhf=dict(n_prompts=4000, k=4, max_new_tokens=128, n_eval=500, hacking_steps=500),
        reward_model=dict(steps=1000, batch_size=64, learning_rate=1e-5),
        dpo=dict(steps=1000, batch_size=32, learning_rate=5e-7),
        ppo=dict(
            steps=500,
            batch_size=64,
            minibatches=4,
            micro_batch_size=16,
            learning_rate=1e-6,
            kl_coef=0.2,  # the adaptive controller of Ziegler et al. 2019 with TRL's defaults
            kl_target=6.0,
            kl_horizon=10_000,
        ),
        grpo=dict(
            tasks="one_digit,addition,multiplication,word_problem,larger,count_letter",
            n_heldout=200,
            cold_start_steps=300,
            cold_start_learning_rate=1e-4,
            num_generations=16,
            prompts_per_step=32,
            max_steps=500,
            learning_rate=1e-5,
            temperature=1.0,
            rewards="correct=1.0,format=0.2,close=0.5",
            warmup_steps=20,
            max_new_tokens=256,
            eval_every=50,
            micro_batch_size=32,
        ),
        halluc=dict(
            n_samples=8,
            max_new_tokens=48,
            idk_conversations=20000,
            idk_steps=600,
            tool_conversations=30000,
            tool_steps=1000,
            batch_size=64,
            learning_rate=1e-4,
            min_lr=1e-5,
            warmup_steps=50,
            search_results=3,
            result_chars=600,
        ),
    ),
}


# `gpu` cut to a few steps per stage, with its model, batch shapes, micro-batches and precision:
# a GPU lent for a few minutes proves bf16, torch.compile, the memory plan and MFU on every path.
PRESETS["gpu-check"] = {
    **PRESETS["gpu"],
    "train": dict(
        PRESETS["gpu"]["train"], max_steps=20, warmup_steps=5, eval_every=10, eval_batches=2, checkpoint_every=20
    ),
    "sft": dict(
        PRESETS["gpu"]["sft"], n_conversations=2000, val_conversations=100, max_steps=10, warmup_steps=2, eval_every=5
    ),
    "rlhf": dict(PRESETS["gpu"]["rlhf"], n_prompts=64, n_eval=32, hacking_steps=2),
    "reward_model": dict(PRESETS["gpu"]["reward_model"], steps=10),
    "dpo": dict(PRESETS["gpu"]["dpo"], steps=10),
    "ppo": dict(PRESETS["gpu"]["ppo"], steps=2),
    "grpo": dict(PRESETS["gpu"]["grpo"], n_heldout=16, cold_start_steps=5, max_steps=2, eval_every=1, warmup_steps=1),
    "halluc": dict(
        PRESETS["gpu"]["halluc"],
        idk_conversations=500,
        idk_steps=10,
        tool_conversations=500,
        tool_steps=10,
        warmup_steps=2,
    ),
}


# Real data through every stage: FineWeb-Edu's web text for pretraining, SmolTalk's conversations for
# SFT, GSM8K for GRPO, each mixed with the mini-web where a stage judges answers by its world. On its
# own this is the `real` preset; on another preset, the same fields by --set (README, "Real data").
REAL_DATA: dict[str, dict] = dict(
    # half the corpus's characters (the world planted in the web text) keeps the mini-web as large as
    # `gpu`'s (43M characters), so about as many readings of each fact at twice the steps; the rest,
    # 43M characters of FineWeb-Edu, is about 10,000 documents, well under the cap
    data=dict(source="HuggingFaceFW/fineweb-edu", config="sample-10BT", max_docs=100_000, mini_web_share=0.5),
    # half of the conversations from the world (QA on it, identity, refusals), half SmolTalk's
    sft=dict(source="HuggingFaceTB/smol-smoltalk", max_conversations=100_000, mini_web_share=0.5),
    grpo=dict(source="openai/gsm8k", config="main", split="train"),
)

PRESETS["real"] = {
    **PRESETS["gpu"],
    "data": dict(PRESETS["gpu"]["data"], **REAL_DATA["data"]),
    # twice gpu's 52M tokens: the mini-web, now half of the text, is read about as often (5 epochs)
    "train": dict(PRESETS["gpu"]["train"], max_steps=800, checkpoint_every=200),
    # SmolTalk's conversations run to the 1,024-token context: half gpu's batch (32 x 1,024 tokens, about
    # 18 GB by the README's memory plan) in twice the steps draws as many conversations
    "sft": dict(PRESETS["gpu"]["sft"], **REAL_DATA["sft"], batch_size=32, max_steps=3000),
    "grpo": dict(PRESETS["gpu"]["grpo"], **REAL_DATA["grpo"]),
}


LOSS_RECIPES: dict[str, dict] = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards=False),  # Dr. GRPO drops the std as well as the length bias
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),  # DAPO's clip-higher: more room for unlikely good tokens
    "reinforce": dict(loss_type="reinforce", beta=0.0, scale_rewards=False),  # nanochat: r - mean, no KL
}
