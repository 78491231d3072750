"""Several processes, one run: the losses that DDP shares out, and the tiny pipeline under torchrun.

Why two processes match one: each process takes an equal share of every global batch, and DDP
averages the processes' gradients. The gradient of the mean over the global batch is the mean of
the shards' gradients (for SFT, whose shards hold unequal numbers of assistant tokens, once each
process's loss is weighted by its share of them), so both runs take the same optimizer steps on
the same data. What is left is float32 rounding: the sums are added in another order.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from labkit.cli import main
from labkit.config import STAGES, ConfigError, TrainConfig, get_config
from labkit.dpo import make_dpo_loss, reference_logps
from labkit.model import GPT, GPTConfig, ScalarModel
from labkit.pipeline import check_world_size
from labkit.preferences import PairBatches
from labkit.reward_model import make_reward_loss
from labkit.sft import IGNORE, assistant_tokens, sft_loss
from labkit.train import train

ROOT = Path(__file__).resolve().parent.parent


# --- the losses DDP shares out: two processes on gloo against one ----------------------------------


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=12, vocab_size=32, n_layer=1, n_head=2, n_embd=16, bias=False))


class Fixed:
    """The same list of global batches, in order."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def sft_batches():
    """Rows of 12 targets; the first half of each batch (process 0's share) has 10 assistant tokens
    a row, the second half (process 1's) 2: the mean of the two shards' means is not the mean."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x, y = torch.randint(0, 32, (4, 12), generator=g), torch.randint(0, 32, (4, 12), generator=g)
        y[:2, :2] = IGNORE
        y[2:, :10] = IGNORE
        batches.append((x, y))
    return batches


def pair_batches():
    g = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(0, 32, (n,), generator=g).tolist()

    examples = [(ids(3), ids(2 + i % 3), ids(4), ids(1 + i % 2)) for i in range(8)]
    return examples, PairBatches(examples, 4, seed=3, pad_id=0)


def train_each_loss(out_dir: Path | None = None) -> dict:
    """SFT (unequal assistant tokens per process), the reward model (`score`, not `forward`) and
    DPO (`hidden_states` and `lm_head`), 3 steps of 2 micro-batches each; their final weights."""
    cfg = TrainConfig(
        max_steps=3, batch_size=4, grad_accum=2, learning_rate=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=3
    )
    sft = tiny_gpt()
    train(sft, sft_loss, Fixed(sft_batches()), cfg, loss_terms=assistant_tokens)
    examples, pairs = pair_batches()
    reward_model = ScalarModel(tiny_gpt())
    # with the centring term the head's bias has a gradient (without it the bias cancels out of the
    # loss, and Adam turns the rounding left in its zero gradient into steps of any sign)
    train(reward_model, make_reward_loss(center_rewards_coefficient=0.01), pairs, cfg)
    dpo, ref = tiny_gpt(), tiny_gpt()
    _, pairs = pair_batches()
    pairs.extra = reference_logps(ref, examples, max_batch=8)
    train(dpo, make_dpo_loss(beta=0.1), pairs, cfg)
    return dict(sft=sft.state_dict(), reward_model=reward_model.state_dict(), dpo=dpo.state_dict())


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.save(train_each_loss(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_shared_loss_gives_the_same_weights_as_one_process(tmp_path, one_thread):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = train_each_loss()
    for loss in single:
        for name, value in single[loss].items():
            # DDP averaged the gradients: the same weights on both processes
            assert torch.equal(rank0[loss][name], rank1[loss][name]), (loss, name)
            torch.testing.assert_close(rank0[loss][name], value, rtol=1e-4, atol=1e-5, msg=f"{loss}: {name}")
    # the steps moved the weights: the comparison is not between two untrained models
    assert not torch.equal(single["sft"]["transformer.wte.weight"], tiny_gpt().state_dict()["transformer.wte.weight"])


def test_a_batch_that_does_not_split_over_the_processes_fails_before_any_work(tmp_path, capsys, monkeypatch):
    config = get_config("tiny")
    check_world_size(STAGES, config, 2)
    with pytest.raises(ConfigError, match=r"train.batch_size=8 does not split over 3 processes"):
        check_world_size(["base"], config, 3)
    with pytest.raises(ConfigError, match=r"dpo.batch_size=4 does not split over 8 processes"):
        check_world_size(["rlhf"], get_config("tiny", reward_model={"batch_size": 16}), 8)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 sets it
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path)]) == 2
    assert "train.batch_size=8 does not split over 3 processes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing was built"


# --- the tiny pipeline under torchrun ------------------------------------------------------------

# labkit's command line, recording every file this process writes or removes in the runs folder
# (audit hooks see each open for writing, rename and removal, whatever library makes it)
WATCHED_CLI = """
import json, os, sys
from labkit.cli import main

runs, log, written = os.path.realpath(sys.argv[1]), sys.argv[2], []

def watch(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)) and args[2] & (os.O_WRONLY | os.O_RDWR):
        written.append(("open", os.path.realpath(args[0])))
    elif event in ("os.rename", "os.remove"):  # os.replace is audited as os.rename
        written.append((event, os.path.realpath(args[1] if event == "os.rename" else args[0])))

sys.addaudithook(watch)
code = main(sys.argv[3:])
with open(f"{log}-rank{os.environ['RANK']}.json", "w") as f:
    json.dump([(e, p) for e, p in written if p.startswith(runs + os.sep)], f)
sys.exit(code)
"""


def torchrun(tmp_path: Path, runs: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "watched_cli.py"
    script.write_text(WATCHED_CLI)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("LABKIT_PRESET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # --standalone: a rendezvous on localhost:0, a free port, so that parallel runs never collide
    command += [str(script), str(runs), str(tmp_path / "writes"), "run", "--preset", "tiny", "--runs-dir", str(runs)]
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env, cwd=tmp_path)


def test_the_tiny_pipeline_under_torchrun_is_one_run(tmp_path, one_thread):
    runs = tmp_path / "runs"
    done = torchrun(tmp_path, runs)
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "default"
    assert all((run / s / "metrics.json").exists() for s in STAGES)

    rank0, rank1 = (json.loads((tmp_path / f"writes-rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == [], f"rank 1 wrote {rank1[:5]}"  # it read what rank 0 wrote, and wrote nothing
    for stage in STAGES:  # written once: an atomic write renames its temporary file onto metrics.json
        assert rank0.count(["os.rename", str((run / stage / "metrics.json").resolve())]) == 1, stage
    assert len(list((run / "wandb").glob("offline-run-*"))) == len(STAGES)  # one wandb run per stage, not two
    # rank 0 alone prints: one first line, one report card, one progress bar per loop
    assert done.stderr.count("labkit: preset tiny") == 1 and done.stdout.count("# labkit report card") == 1
    assert done.stderr.count("pretraining:   0%") == 1 and done.stderr.count("sft:   0%") == 1

    # the same pretraining in one process: the same global batches, the same steps
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path / "one"), "--stages", "base"]) == 0
    one = json.loads((tmp_path / "one" / "default" / "base" / "history.json").read_text())
    two = json.loads((run / "base" / "history.json").read_text())
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(31))
    for a, b in zip(two, one):
        # float32 rounding only: measured at most 7e-7 over the 30 steps; with the gradients not
        # averaged (each process stepping on its own half) the loss is 7.6e-3 off at step 2
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-4), a["step"]
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-4), a["step"]
    base_two, base_one = (
        json.loads((r / "default" / "base" / "metrics.json").read_text()) for r in (runs, tmp_path / "one")
    )
    assert base_two["val_loss"] == pytest.approx(base_one["val_loss"], abs=1e-4)
    assert base_two["tokens_seen"] == base_one["tokens_seen"]  # the global batch, not a process's share
