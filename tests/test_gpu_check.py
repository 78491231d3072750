"""The `gpu-check` preset, the few-minute proof of every GPU path, runs here on the CPU with its
step counts, batch shapes and micro-batches and a model small enough for CI: its code never rots
between the rare sessions that have a GPU."""

from labkit.config import STAGES, get_config
from labkit.pipeline import ensure
from labkit.run import Run


def cpu_twin():
    return get_config(
        "gpu-check",
        data=dict(n_people=40, median_pages=2.0, max_pages_per_person=12, filler_ratio=0.5),
        tokenizer=dict(vocab_size=400),
        model=dict(n_layer=2, n_head=2, n_embd=32, block_size=256),
        train=dict(compile=False),
        grpo=dict(max_new_tokens=128),  # a reply gets at most half the context (gpu's 256 of 1024)
    )


def test_the_gpu_check_preset_keeps_the_gpu_shapes_and_cuts_the_steps():
    check, gpu = get_config("gpu-check"), get_config("gpu")
    assert check.model == gpu.model and check.train.batch_size == gpu.train.batch_size
    assert check.train.grad_accum == gpu.train.grad_accum and check.train.compile
    assert (check.ppo.batch_size, check.ppo.micro_batch_size) == (gpu.ppo.batch_size, gpu.ppo.micro_batch_size)
    assert (
        check.grpo.prompts_per_step * check.grpo.num_generations == gpu.grpo.prompts_per_step * gpu.grpo.num_generations
    )
    assert check.train.max_steps <= 20 and check.ppo.steps <= 2 and check.grpo.max_steps <= 2


def test_its_cpu_twin_runs_every_stage(tmp_path):
    config = cpu_twin()
    run = Run("gpu-check", tmp_path)
    for stage in STAGES:
        ensure(stage, config, run)
    base, grpo = run.metrics("base"), run.metrics("grpo")
    assert base["steps"] == 20 and base["tokens_seen"] == 20 * 32 * 4 * 256  # the gpu preset's batch shape
    assert grpo["samples"] == 2 * 32 * 16
    assert all(run.metrics(stage) is not None for stage in STAGES)
