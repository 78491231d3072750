"""Resume anywhere: a checkpoint written on another device loads here, and PPO, GRPO and GRPO's
cold start, killed mid-way, resume to the weights of a run never killed (pretraining's loop is
tested the same way in test_train.py)."""

import copy
import io
import zipfile

import pytest
import torch

from labkit import grpo, tasks
from labkit.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from labkit.config import get_config
from labkit.model import ScalarModel
from labkit.pipeline import ensure
from labkit.rewards import parse_weights


def written_on_cuda(path):
    """Rewrite a checkpoint as a CUDA machine would have saved it: every storage tagged 'cuda:0'."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(info, data)
    path.write_bytes(out.getvalue())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_checkpoint_written_on_a_gpu_restores_cpu_random_generators(tmp_path):
    path = tmp_path / "train_state.pt"
    save_checkpoint(path, dict(rng=rng_state(), step=3))
    written_on_cuda(path)
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really is a GPU's: a plain load fails here
        torch.load(path, weights_only=False)
    state = load_checkpoint(path)
    assert state["rng"]["torch"].device.type == "cpu" and state["rng"]["torch"].dtype == torch.uint8
    expected = torch.rand(3)
    set_rng_state(state["rng"])  # torch.set_rng_state takes only a CPU byte tensor
    assert state["step"] == 3 and torch.equal(torch.rand(3), expected)


@pytest.fixture(scope="module")
def assistant(tiny_run, tiny_config):
    from labkit.sft import load_assistant

    ensure("sft", tiny_config, tiny_run)
    return load_assistant(tiny_run)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ppo_killed_midway_resumes_to_the_weights_of_a_run_never_killed(assistant, tiny_run, tmp_path, optimizer):
    from labkit.data import read_world
    from labkit.ppo import ppo_train
    from labkit.preferences import ranking_prompts

    sft, tokenizer = assistant
    prompts = ranking_prompts(read_world(tiny_run), 8, seed=1, heldout_people=0.3)
    torch.manual_seed(0)
    reward_model = ScalarModel(copy.deepcopy(sft)).eval()
    config = get_config("tiny", ppo=dict(steps=4), train=dict(optimizer=optimizer))  # muon: two optimizers' states

    def ppo(checkpoint, kill_at_step=None):
        policy, value = copy.deepcopy(sft), copy.deepcopy(reward_model)

        def kill(event):
            if event["step"] == kill_at_step:
                raise KeyboardInterrupt

        torch.manual_seed(999)  # a resumed run must not depend on the generators' states it starts with
        history = ppo_train(
            policy, copy.deepcopy(sft), value, reward_model, tokenizer, prompts, config, "cpu",
            checkpoint=checkpoint, resume_key="k", on_step=kill,
        )  # fmt: skip
        return policy, value, history

    once = ppo(tmp_path / "once.pt")
    with pytest.raises(KeyboardInterrupt):
        ppo(tmp_path / "killed.pt", kill_at_step=3)
    assert load_checkpoint(tmp_path / "killed.pt")["step"] == 2
    resumed = ppo(tmp_path / "killed.pt")
    assert [r["step"] for r in resumed[2]] == [1, 2, 3, 4]
    assert [r["score"] for r in resumed[2]] == [r["score"] for r in once[2]]
    assert same_weights(resumed[0], once[0]) and same_weights(resumed[1], once[1])


def test_grpo_killed_midway_resumes_to_the_weights_of_a_run_never_killed(assistant, tmp_path):
    model, tokenizer = assistant
    cfg = get_config("tiny", grpo=dict(max_steps=4, eval_every=2)).grpo
    heldout = tasks.heldout_problems(["addition"], 2, seed=0)

    def train(checkpoint, stop_at_step=None):
        policy = copy.deepcopy(model)
        torch.manual_seed(999)
        result = grpo.train_grpo(
            policy, tokenizer, tasks.TaskStream(["addition"], seed=0), heldout, cfg, parse_weights(cfg.rewards),
            seed=0, checkpoint=checkpoint, resume_key="k", stop_at_step=stop_at_step,
        )  # fmt: skip
        return policy, result

    once = train(tmp_path / "once.pt")
    train(tmp_path / "killed.pt", stop_at_step=2)
    assert load_checkpoint(tmp_path / "killed.pt")["step"] == 2
    resumed = train(tmp_path / "killed.pt")
    same = ("step", "reward", "loss", "kl", "pass_at_1")
    assert [{k: r.get(k) for k in same} for r in resumed[1]["history"]] == [
        {k: r.get(k) for k in same} for r in once[1]["history"]
    ]
    assert resumed[1]["step"] == 4 and same_weights(resumed[0], once[0])


class KilledAt:
    """Stands in for a run: training logs every step to it, and it kills the process at one step."""

    def __init__(self, step=None):
        self.step = step

    def log(self, metrics, step=None):
        if step == self.step:
            raise KeyboardInterrupt


def test_the_cold_start_killed_midway_resumes_to_the_weights_of_a_run_never_killed(assistant, tmp_path):
    model, tokenizer = assistant
    config = get_config("tiny", grpo=dict(cold_start_steps=5))

    def cold_start(checkpoint, run):
        policy = copy.deepcopy(model)
        torch.manual_seed(999)
        stream = tasks.TaskStream(["addition"], seed=0)
        result = grpo.cold_start(policy, tokenizer, stream, config, "cpu", run, checkpoint, "k")
        return policy, result

    once = cold_start(tmp_path / "once.pt", KilledAt())
    with pytest.raises(KeyboardInterrupt):
        cold_start(tmp_path / "killed.pt", KilledAt(step=4))
    assert load_checkpoint(tmp_path / "killed.pt")["step"] == 3  # checkpointed along the way, not only at the end
    resumed = cold_start(tmp_path / "killed.pt", KilledAt())
    assert resumed[1]["steps"] == once[1]["steps"] == 5
    assert same_weights(resumed[0], once[0]) and not same_weights(once[0], model)
