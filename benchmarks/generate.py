"""How fast labkit's GPT generates and trains, against references measured in the same run.

1. Generation: 256 new tokens with the KV cache against recomputing the whole sequence every
   step, on the cpu preset's model size (its block_size raised so that 256 tokens fit).
2. Forward + backward throughput (tokens/s) of labkit's GPT against transformers'
   GPT2LMHeadModel of the same config, on the same batches, in float32.
3. GPU only: the same comparison in bf16 autocast on the gpu preset's model (GPT-2 small), and
   labkit's model FLOPs utilisation against the GPU's peak.

    python benchmarks/generate.py [--device cpu|cuda] [--repeats 3] [--threads N]
"""

import argparse
import dataclasses
import time

import torch
from torch.nn import functional as F

from labkit.config import get_config, resolve_device
from labkit.engine import generate
from labkit.model import GPT, GPTConfig
from labkit.train import peak_flops


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def best_times(fns, device, repeats):
    """Fastest of `repeats` timed runs of each function, after one warm-up run each. The
    functions take turns, so a machine that slows down mid-run slows them all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            fn_times.append(time.perf_counter() - start)
    return [min(fn_times) for fn_times in times]


def bench_generation(device, repeats, new_tokens=256, prompt_tokens=16, num_samples=1):
    model_config = get_config("cpu").model
    config = GPTConfig(**{**dataclasses.asdict(model_config), "block_size": 512}, vocab_size=2048)
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,)).tolist()
    print(f"\n## generation: {new_tokens} new tokens after a {prompt_tokens}-token prompt, {num_samples} sample(s)")
    print(
        f"model: cpu preset size ({config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, "
        f"block_size raised to {config.block_size}), {model.num_params() / 1e6:.2f}M parameters, {device}"
    )
    cached, recomputed = best_times(
        [
            lambda: generate(model, prompt, new_tokens, temperature=0, num_samples=num_samples, use_cache=True),
            lambda: generate(model, prompt, new_tokens, temperature=0, num_samples=num_samples, use_cache=False),
        ],
        device,
        repeats,
    )
    print(f"with KV cache   : {new_tokens * num_samples / cached:9.0f} tokens/s")
    print(f"without KV cache: {new_tokens * num_samples / recomputed:9.0f} tokens/s")
    same = generate(model, prompt, new_tokens, temperature=0) == generate(
        model, prompt, new_tokens, temperature=0, use_cache=False
    )
    print(f"speed-up from the cache: {recomputed / cached:.1f}x (target >= 5x); greedy outputs identical: {same}")


def bench_many_prompts(device, repeats, n_prompts=64, new_tokens=32):
    """What the stages do: greedy replies to many prompts of different lengths, in one batched call
    (left-padded, stopped rows dropped) against one call per prompt."""
    config = GPTConfig(**dataclasses.asdict(get_config("cpu").model), vocab_size=2048)
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, config.vocab_size, (int(n),), generator=g).tolist()
        for n in torch.randint(10, 60, (n_prompts,), generator=g)
    ]
    print(f"\n## {n_prompts} prompts of 10-59 tokens, {new_tokens} greedy tokens each (cpu preset model)")
    batched, one_by_one = best_times(
        [
            lambda: generate(model, prompts, new_tokens, temperature=0),
            lambda: [generate(model, p, new_tokens, temperature=0) for p in prompts],
        ],
        device,
        repeats,
    )
    same = generate(model, prompts, new_tokens, temperature=0) == [
        generate(model, p, new_tokens, temperature=0)[0] for p in prompts
    ]
    print(f"one batched call : {n_prompts * new_tokens / batched:9.0f} tokens/s")
    print(f"one call a prompt: {n_prompts * new_tokens / one_by_one:9.0f} tokens/s")
    print(f"speed-up from batching: {one_by_one / batched:.1f}x; greedy outputs identical: {same}")


def bench_training(config, device, batch_size, repeats, steps=3, bf16=False):
    """Tokens/s of forward + backward (no optimizer step), labkit against transformers."""
    from transformers import GPT2LMHeadModel

    from labkit.export import hf_config

    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(hf_config(config)).to(device).train()
    ours = GPT.from_hf(theirs).to(device).train()  # same weights
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), generator=g).to(device)
        for _ in range(steps)
    ]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)

    def labkit_steps():
        for batch in batches:
            with autocast:
                _, loss = ours(batch[:, :-1], batch[:, 1:])
            loss.backward()
        ours.zero_grad(set_to_none=True)

    def transformers_steps():
        for batch in batches:
            with autocast:  # the same loss, computed the same way from the logits
                logits = theirs(batch[:, :-1]).logits
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            loss.backward()
        theirs.zero_grad(set_to_none=True)

    tokens = steps * batch_size * config.block_size
    ours_seconds, theirs_seconds = best_times([labkit_steps, transformers_steps], device, repeats)
    ours_tps, theirs_tps = tokens / ours_seconds, tokens / theirs_seconds
    print(f"labkit GPT:               {ours_tps:10.0f} tokens/s")
    print(f"transformers GPT2LMHead:  {theirs_tps:10.0f} tokens/s  (attention: {theirs.config._attn_implementation})")
    print(f"labkit / transformers: {ours_tps / theirs_tps:.2f}x (target >= 1x)")
    return ours, ours_tps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads")

    bench_generation(device, args.repeats)
    bench_many_prompts(device, args.repeats)

    cpu_config = GPTConfig(**dataclasses.asdict(get_config("cpu").model), vocab_size=2048)
    print(f"\n## forward + backward, float32, cpu preset model (vocab 2048, batch 8 x {cpu_config.block_size} tokens)")
    bench_training(cpu_config, device, batch_size=8, repeats=args.repeats)

    print("\n## forward + backward, bf16 autocast, gpu preset model (GPT-2 small, vocab 50304, batch 8 x 1024 tokens)")
    if device != "cuda":
        print("skipped (no GPU)")
        print("\n## model FLOPs utilisation (bf16)")
        print("skipped (no GPU)")
        return
    gpu_config = GPTConfig(**dataclasses.asdict(get_config("gpu").model), vocab_size=50304)
    ours, tokens_per_second = bench_training(gpu_config, device, batch_size=8, repeats=args.repeats, bf16=True)
    print("\n## model FLOPs utilisation (bf16)")
    name = torch.cuda.get_device_name()
    peak = peak_flops(device)
    if peak is None:
        print(f"skipped (peak bf16 FLOP/s of {name!r} unknown)")
    else:
        mfu = ours.estimate_mfu(tokens_per_second, peak)
        print(f"{name}: {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s (forward + backward only, eager, no torch.compile)")


if __name__ == "__main__":
    main()
