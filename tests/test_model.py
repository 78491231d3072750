"""The GPT: same logits as Hugging Face's GPT-2 on the same weights, masked loss, init, optimizer groups."""

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from labkit.config import get_config
from labkit.engine import KVCache
from labkit.model import GPT, GPTConfig

SMALL = dict(block_size=32, vocab_size=97, n_layer=3, n_head=4, n_embd=48)


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_gpt2(block_size, vocab_size, n_layer, n_head, n_embd):
    """A randomly initialised transformers GPT-2 (no download), with weights large enough that
    the logits differ clearly from token to token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_positions=block_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        vocab_size=vocab_size,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # LayerNorm gains stay near 1
    return model.eval()


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


def test_same_logits_as_transformers_gpt2():
    hf = hf_gpt2(**SMALL)
    model = GPT.from_hf(hf).eval()
    idx = torch.randint(0, SMALL["vocab_size"], (3, SMALL["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx, output_hidden_states=True)
        logits, loss = model(idx)
        hidden = model.hidden_states(idx)
    assert loss is None
    assert logits.shape == (3, SMALL["block_size"], SMALL["vocab_size"])
    assert logits.std() > 1.0  # the weights make a real difference, so the match below means something
    torch.testing.assert_close(logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden, theirs.hidden_states[-1], atol=1e-5, rtol=0)  # after ln_f in both
    assert model.num_params(non_embedding=False) == hf.num_parameters()


def test_from_hf_reads_a_saved_folder(tmp_path):
    hf = hf_gpt2(**SMALL)
    hf.save_pretrained(tmp_path)
    model = GPT.from_hf(str(tmp_path)).eval()
    assert dataclasses.asdict(model.config) == dict(SMALL, dropout=0.0, bias=True)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_from_hf_refuses_another_activation():
    hf = hf_gpt2(**SMALL)
    hf.config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function='relu'.*gelu_new"):
        GPT.from_hf(hf)


def test_loss_ignores_masked_targets():
    model = small_gpt()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 97, (2, 10), generator=g)
    targets = torch.randint(0, 97, (2, 10), generator=g)
    targets[0, :4] = -1  # e.g. SFT masks the user's turn
    targets[1, 7:] = -1
    logits, loss = model(idx, targets)
    log_probs = logits.log_softmax(dim=-1)
    kept = [-log_probs[b, t, targets[b, t]] for b in range(2) for t in range(10) if targets[b, t] != -1]
    assert len(kept) == 13
    torch.testing.assert_close(loss, torch.stack(kept).mean())
    torch.testing.assert_close(loss, F.cross_entropy(logits[targets != -1], targets[targets != -1]))


def test_backward_reaches_every_parameter():
    model = small_gpt().train()
    idx = torch.randint(0, 97, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_too_long_input_is_refused():
    model = small_gpt()
    with pytest.raises(ValueError, match="length 33 .*block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_kv_cache_gives_the_same_logits_as_one_pass():
    model = small_gpt()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer, max_length=20)
        prefill, _ = model(idx[:, :8], kv_cache=cache)  # the prompt at once
        chunk, _ = model(idx[:, 8:12], kv_cache=cache)  # several tokens after a cached prefix
        steps = [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(12, 20)]  # one at a time
    torch.testing.assert_close(torch.cat([prefill, chunk, *steps], dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 20


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_embd=192, n_head=4))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    block = model.transformer.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / math.sqrt(2 * 4)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(
        m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
    )


def test_weight_decay_groups_only_decay_matrices():
    model = small_gpt()
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_layer = SMALL["n_layer"]
    assert len(decay["params"]) == 2 + 4 * n_layer  # wte (= lm_head), wpe, 4 matrices per block
    assert len(no_decay["params"]) == 2 + 8 * n_layer  # ln_f, 2 LayerNorms x 2 + 4 biases per block
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["betas"] == (0.9, 0.95)
    assert not optimizer.defaults["fused"]  # fused only on CUDA


def test_num_params_and_mfu():
    model = small_gpt()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 32 * 48  # the position embedding is left out
    flops = 6 * model.num_params() + 12 * 3 * 4 * 12 * 32
    assert model.estimate_mfu(tokens_per_second=1000.0, peak_flops=1e12) == pytest.approx(flops * 1000 / 1e12)


def test_bad_config_says_what_is_wrong():
    with pytest.raises(ValueError, match=r"n_embd=100 is not divisible by n_head=3.*multiple of n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match=r"n_layer=0 .*positive integer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match=r"dropout=1.5 .*\[0, 1\)"):
        GPTConfig(dropout=1.5)


def test_model_section_of_the_presets():
    for preset in ("tiny", "cpu", "gpu"):
        GPTConfig(vocab_size=300, **dataclasses.asdict(get_config(preset).model))  # every preset is a valid GPT
    cpu = get_config("cpu")
    model = GPT(GPTConfig(vocab_size=cpu.tokenizer.vocab_size, **dataclasses.asdict(cpu.model)))
    assert 1.9e6 < model.num_params() < 2.5e6  # "about 2M parameters with a 2048 vocabulary"
    assert dataclasses.asdict(get_config("gpu").model) == dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, bias=True
    )


def test_from_hf_refuses_another_mlp_width_before_reading_weights(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_inner=48)
    config.save_pretrained(tmp_path)  # a config and no weights: refused before any weight is looked for
    message = r"n_inner=48 \(the MLP's hidden width\) is not 4 \* n_embd = 64; labkit's GPT has GPT-2's MLP"
    with pytest.raises(ValueError, match=message):
        GPT.from_hf(str(tmp_path))
    hf = hf_gpt2(**SMALL)
    hf.config.n_inner = 3 * SMALL["n_embd"]
    with pytest.raises(ValueError, match=f"n_inner={3 * SMALL['n_embd']} .*n_inner=None or {4 * SMALL['n_embd']}"):
        GPT.from_hf(hf)
    hf.config.n_inner = 4 * SMALL["n_embd"]  # GPT-2's own width, written out, is fine
    idx = torch.randint(0, SMALL["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_hf(hf)(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
