"""Training throughput through labkit's training loop: labkit's GPT against transformers' GPT2LMHeadModel.

Both models have the same configuration, train on the same batches through the same loop
(`labkit.train.train`: AdamW, clipping, the schedule; bf16 autocast and torch.compile on CUDA
when the preset says so), and the loop's own clock gives tokens per second (evaluation and
checkpoints excluded). On a GPU it also prints labkit's model FLOPs utilisation against the
device's peak bf16 FLOP/s; on a CPU that line says why it is skipped.

    python benchmarks/train.py [--preset cpu|gpu] [--device auto|cpu|cuda] [--steps 20] [--repeats 3] [--threads N]
"""

import argparse
import dataclasses

import torch
from torch.nn import functional as F

from labkit.config import get_config, resolve_device
from labkit.model import GPT, GPTConfig
from labkit.train import train

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def labkit_loss(model, batch):
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


def hf_loss(model, batch):
    x, y = batch
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)), {}


def hf_model(c: GPTConfig):
    from transformers import GPT2LMHeadModel

    from labkit.export import hf_config

    return GPT2LMHeadModel(hf_config(c, attn_implementation="sdpa"))


def tokens_per_second(make_model, loss_fn, batches, train_cfg, device, repeats):
    """Best of `repeats` runs of `train_cfg.max_steps` steps, after a warm-up run (compilation)."""

    class Batches:
        def __init__(self):
            self.i = 0

        def next(self):
            self.i += 1
            return batches[(self.i - 1) % len(batches)]

    best = 0.0
    for attempt in range(repeats + 1):
        torch.manual_seed(0)
        result = train(make_model(), loss_fn, Batches(), train_cfg, device=device, desc="benchmark")
        if attempt > 0:  # the first run warms up (and compiles)
            best = max(best, result.tokens_per_second)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default=None, choices=["cpu", "gpu", "tiny"], help="model size (default: gpu on CUDA, else cpu)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    config = get_config(preset)
    vocab = config.tokenizer.vocab_size
    model_config = GPTConfig(**dataclasses.asdict(config.model), vocab_size=vocab)
    train_cfg = dataclasses.replace(
        config.train, max_steps=args.steps, warmup_steps=2, eval_every=10**9, checkpoint_every=0, grad_accum=1
    )
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        chunk = torch.randint(0, vocab, (train_cfg.batch_size, model_config.block_size + 1), generator=g)
        batches.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))

    print(f"## training throughput, preset {preset} on {device} ({torch.get_num_threads()} CPU threads)")
    print(
        f"model: {model_config.n_layer} layers, {model_config.n_head} heads, n_embd {model_config.n_embd}, "
        f"block_size {model_config.block_size}, vocab {vocab}; batch {train_cfg.batch_size} x {model_config.block_size} tokens; "
        f"compile={train_cfg.compile and device == 'cuda'}, dtype={'bf16 autocast' if device == 'cuda' else 'float32'}"
    )
    ours = tokens_per_second(lambda: GPT(model_config), labkit_loss, batches, train_cfg, device, args.repeats)
    theirs = tokens_per_second(lambda: hf_model(model_config), hf_loss, batches, train_cfg, device, args.repeats)
    print(f"labkit GPT          : {ours:12.0f} tokens/s")
    print(f"HF GPT2LMHeadModel  : {theirs:12.0f} tokens/s")
    print(f"labkit / HF         : {ours / theirs:12.2f}x")
    if device != "cuda":
        print("MFU: skipped (needs a CUDA GPU and its peak bf16 FLOP/s)")
        return
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        print(f"MFU: skipped (peak bf16 FLOP/s of {name!r} unknown; known: {', '.join(PEAK_BF16_FLOPS)})")
        return
    mfu = GPT(model_config).estimate_mfu(ours, peak)
    print(f"MFU on {name}: {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16")


if __name__ == "__main__":
    main()
