"""The GPT: same logits as Hugging Face's GPT-2 on the same weights, masked loss, init, optimizer groups;
the modern recipe's parts (rotary, RMSNorm, softcap, zero-initialised projections) and Muon's groups."""

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from labkit.config import get_config
from labkit.engine import KVCache
from labkit.model import GPT, GPTConfig, ScalarModel, apply_rotary, rotary_tables
from labkit.train import make_optimizer

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


def shaken(model: GPT) -> GPT:
    """The model with noise on every weight: the modern recipe's zero projections made non-zero,
    so that attention and the MLPs do something (an untrained modern model is a bigram model)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


ARCHS = pytest.mark.parametrize("arch", ["gpt2", "modern"])


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
    assert dataclasses.asdict(model.config) == dict(SMALL, dropout=0.0, bias=True, arch="gpt2", softcap=15.0)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_from_hf_refuses_another_activation():
    hf = hf_gpt2(**SMALL)
    hf.config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function='relu'.*gelu_new"):
        GPT.from_hf(hf)


@ARCHS
def test_loss_ignores_masked_targets(arch):
    model = small_gpt(arch=arch)
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


@ARCHS
def test_backward_reaches_every_parameter(arch):
    model = shaken(small_gpt(arch=arch)).train()
    idx = torch.randint(0, 97, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@ARCHS
def test_too_long_input_is_refused(arch):
    model = small_gpt(arch=arch)
    with pytest.raises(ValueError, match="length 33 .*block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@ARCHS
def test_kv_cache_gives_the_same_logits_as_one_pass(arch):
    model = shaken(small_gpt(arch=arch))
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
    cfg = get_config("tiny").train
    optimizer = make_optimizer(model, dataclasses.replace(cfg, weight_decay=0.1, learning_rate=3e-4), "cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_layer = SMALL["n_layer"]
    assert len(decay["params"]) == 2 + 4 * n_layer  # wte (= lm_head), wpe, 4 matrices per block
    assert len(no_decay["params"]) == 2 + 8 * n_layer  # ln_f, 2 LayerNorms x 2 + 4 biases per block
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["betas"] == (cfg.beta1, cfg.beta2)
    assert not optimizer.defaults["fused"]  # fused only on CUDA


@ARCHS
def test_muon_takes_the_block_matrices_and_adamw_the_rest(arch):
    model = ScalarModel(small_gpt(arch=arch))  # a reward model: its one-number head stays with AdamW
    cfg = dataclasses.replace(get_config("tiny").train, optimizer="muon", learning_rate=3e-3, muon_lr=0.02)
    optimizer = make_optimizer(model, cfg, "cpu")
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = [id(p) for g in muon.param_groups for p in g["params"]]
    in_adamw = [id(p) for g in adamw.param_groups for p in g["params"]]
    assert sorted(in_muon + in_adamw) == sorted(id(p) for p in model.parameters())  # each exactly once
    names = {id(p): name for name, p in model.named_parameters()}
    block_matrices = {name for name, p in model.named_parameters() if ".h." in name and p.dim() == 2}
    assert {names[i] for i in in_muon} == block_matrices
    matrices_per_block = 4 if arch == "gpt2" else 6  # c_attn or c_q, c_k, c_v; attn and mlp c_proj; c_fc
    assert len(block_matrices) == matrices_per_block * SMALL["n_layer"]
    assert {names[i] for i in in_adamw} >= {"body.transformer.wte.weight", "head.weight", "head.bias"}
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(0.02 / 3e-3)
    assert muon.param_groups[0]["momentum"] == cfg.muon_momentum
    assert muon.ns_dtype == torch.float32  # on a CPU; bfloat16 on CUDA


def test_muon_is_torchs_update_in_the_chosen_precision():
    from labkit.train import Muon

    torch.manual_seed(0)
    start = [torch.randn(48, 16), torch.randn(16, 40), torch.randn(24, 24)]  # tall, wide, square
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]

    def train(make):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return params

    settings = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    reference = train(lambda ps: torch.optim.Muon(ps, **settings))
    same = train(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **settings))
    in_float32 = train(lambda ps: Muon(ps, ns_dtype=torch.float32, **settings))
    for r, s, f, w in zip(reference, same, in_float32, start, strict=True):
        assert torch.equal(r, s)  # torch's own update, bit for bit
        moved = (r - w).abs().max()
        assert moved > 0.01 and (f - r).abs().max() < 0.05 * moved  # float32 differs by bfloat16's rounding only


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
        n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, bias=True, arch="gpt2", softcap=15.0
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


# --- the modern recipe ---------------------------------------------------------------------------


def test_rotary_scores_depend_only_on_the_offset():
    head_size = 16
    cos, sin = rotary_tables(64, head_size)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_size, generator=g), torch.randn(1, 1, 1, head_size, generator=g)

    def score(i, j):  # the query at position i, the key at position j
        return (apply_rotary(q, cos[[i]], sin[[i]]) * apply_rotary(k, cos[[j]], sin[[j]])).sum().item()

    for offset in (0, 3, 17):
        scores = [score(i + offset, i) for i in (0, 5, 40)]
        assert scores == pytest.approx([scores[0]] * 3, abs=1e-5)
    assert abs(score(3, 0) - score(17, 0)) > 1e-3  # other offsets give other scores: positions matter
    assert apply_rotary(q, cos[[9]], sin[[9]]).norm().item() == pytest.approx(q.norm().item())  # a rotation
    torch.testing.assert_close(apply_rotary(q, cos[[0]], sin[[0]]), q)  # position 0 is not turned


def test_rmsnorm_has_no_parameters_and_unit_rms():
    model = small_gpt(arch="modern")
    x = 5 * torch.randn(2, 7, SMALL["n_embd"]) + 3
    y = model.transformer.h[0].ln_1(x)
    assert y.pow(2).mean(-1).sqrt().numpy() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(y, x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt())
    assert not any("ln_" in name for name, _ in model.named_parameters())
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied
    assert "transformer.wpe.weight" not in model.state_dict()  # no position table


def test_softcap_bounds_the_logits():
    model = shaken(small_gpt(arch="modern", softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # raw logits far beyond the cap
        idx = torch.randint(0, SMALL["vocab_size"], (2, 12))
        capped = model(idx)[0]
        raw = model.lm_head(model.hidden_states(idx))
    assert capped.abs().max() <= 2.0 and raw.abs().max() > 20
    torch.testing.assert_close(capped, 2.0 * torch.tanh(raw / 2.0))
    off = GPT(GPTConfig(**SMALL, arch="modern", softcap=0.0))
    with torch.no_grad():
        off.lm_head.weight.normal_(std=10.0)
        assert off(idx)[0].abs().max() > 20  # softcap=0: no cap


def test_modern_at_init_is_a_bigram_model():
    """Zero output projections: every block adds nothing, so a position's logits depend on its own
    token only (not on the context), and the first gradient step moves only the projections,
    the embedding and the head."""
    model = small_gpt(arch="modern").train()
    a = torch.tensor([[5, 9, 2, 7, 11]])
    b = torch.tensor([[60, 1, 33, 80, 4, 19, 7, 11]])  # other contexts before the same last tokens
    logits_a, logits_b = model(a)[0], model(b)[0]
    torch.testing.assert_close(logits_a[0, -2:], logits_b[0, -2:])
    assert (logits_a[0, -1] - logits_a[0, 0]).abs().max() > 0  # other tokens: other logits
    _, loss = model(b, torch.roll(b, -1, 1))
    loss.backward()
    for name, p in model.named_parameters():
        moved = p.grad is not None and p.grad.abs().sum() > 0
        assert moved == (name.endswith("c_proj.weight") or name in ("transformer.wte.weight", "lm_head.weight")), name
    zero = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert len(zero) == 2 * SMALL["n_layer"] and all(p.abs().sum() == 0 for p in zero)


def test_modern_config_checks():
    with pytest.raises(ValueError, match=r"arch='llama' .*allowed: gpt2, modern"):
        GPTConfig(arch="llama")
    with pytest.raises(ValueError, match=r"head size n_embd // n_head = 5 must be even"):
        GPTConfig(arch="modern", n_embd=20, n_head=4)
    GPTConfig(arch="gpt2", n_embd=20, n_head=4)  # gpt2 has no rotary: any head size


def test_from_hf_refuses_a_labkit_model():
    with pytest.raises(ValueError, match="only arch 'gpt2' is GPT-2-compatible"):
        GPT.from_hf(small_gpt(arch="modern"))


@ARCHS
def test_scalar_model_reads_either_body(arch):
    body = shaken(small_gpt(arch=arch))
    model = ScalarModel(body)
    idx = torch.randint(0, SMALL["vocab_size"], (3, 10))
    values = model(idx)
    assert values.shape == (3, 10)
    torch.testing.assert_close(values, model.head(body.hidden_states(idx)).squeeze(-1))
    torch.testing.assert_close(model.score(idx, torch.tensor([2, 5, 9])), values[[0, 1, 2], [2, 5, 9]])


def test_checkpoints_keep_the_arch_and_old_ones_load_as_gpt2(tmp_path):
    from labkit.checkpoint import load_model, save_model

    idx = torch.randint(0, SMALL["vocab_size"], (2, 9))
    modern = shaken(small_gpt(arch="modern", softcap=7.0))
    save_model(tmp_path / "modern.pt", modern)
    loaded = load_model(tmp_path / "modern.pt")
    assert loaded.config == modern.config
    torch.testing.assert_close(loaded(idx)[0], modern(idx)[0])

    old = shaken(small_gpt())
    save_model(tmp_path / "old.pt", old)
    checkpoint = torch.load(tmp_path / "old.pt", weights_only=True)
    del checkpoint["config"]["arch"], checkpoint["config"]["softcap"]  # written before the fields existed
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.config.arch == "gpt2"
    torch.testing.assert_close(loaded(idx)[0], old(idx)[0])
