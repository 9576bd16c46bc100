"""adapterlab.quant: an int8 weight-only frozen base, and a bfloat16 base, under the adapter.

On a tiny random Llama (O(1) activations): int8 logits close to float32 ones, the two int8 product paths
(the CPU kernel for few rows, the dequantized product for many) agree, the int8 backward equals autograd
through the dequantized matrix, gradients reach the adapter, the base never changes, a bf16 base trains.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adapterlab import AdapterConfig, add_adapter
from adapterlab.adapter import trainable_parameters
from adapterlab.generate import generate_tokens
from adapterlab.losses import lm_loss
from adapterlab.quant import Int8Linear, int8_matmul, is_quantized, quantize_base, quantize_weight
from adapterlab.quant.int8 import KERNEL_MAX_ROWS

from conftest import make_tiny_model, open_gates_, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

# Tolerance of int8 logits against float32 on the tiny random model: per-channel int8 rounds each weight by
# at most scale/2 = max|W_row|/254 and bfloat16 activations by 2^-9 relative; through 3 blocks and the head
# that is ~1% of the logits' size. 0.05 of the largest logit leaves room, and a wrong scale or a transposed
# matrix gives O(1) errors.
INT8_LOGITS_TOL = 0.05


def test_per_channel_int8_round_trip_is_within_half_a_step_of_every_row():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3.0, 48)[:, None]
    w[5] = 0.0  # an all-zero row stays zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.abs().min()) >= 0
    assert (q[5] == 0).all()
    err = (w - q.float() * scale[:, None]).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # each row: its own step, so small rows stay precise
    assert torch.equal(q.abs().amax(1)[torch.arange(48) != 5], torch.full((47,), 127, dtype=torch.int8))


@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 64])
def test_both_int8_product_paths_agree_with_the_dequantized_matrix(rows):
    gen = torch.Generator().manual_seed(1)
    q, scale = quantize_weight(torch.randn(96, 64, generator=gen) / 8)
    x = torch.randn(rows, 64, generator=gen)
    reference = x @ (q.float() * scale[:, None]).t()  # float32, exact weights
    got = int8_matmul(x, q, scale, torch.bfloat16)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    # only bfloat16 rounding of the activations and of the accumulated output separates them
    assert (got - reference).abs().max() <= 0.02 * reference.abs().max()
    exact = int8_matmul(x, q, scale, torch.float32)
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-5)


def test_int8_base_logits_are_close_to_float32_and_not_identical():
    fp32 = make_tiny_model(seed=0, n_kv_heads=2)
    add_adapter(fp32, AdapterConfig(prompt_len=4, layers=2))
    open_gates_(fp32, scale=0.5)
    int8 = quantize_base(copy.deepcopy(fp32))
    assert is_quantized(int8) and not is_quantized(fp32)
    assert isinstance(int8.output, Int8Linear) and isinstance(int8.layers[0].feed_forward.w2, Int8Linear)
    tokens = random_tokens(2, 20)
    with torch.no_grad():
        a, b = fp32(tokens), int8(tokens)
    diff = (a - b).abs().max().item()
    assert 0 < diff <= INT8_LOGITS_TOL * a.abs().max().item(), diff
    # decoding one token at a time (the CPU kernel's path) gives the same logits as the full forward
    new = generate_tokens(int8, tokens.tolist(), max_new_tokens=4, greedy=True, stop_at_eos=False)
    assert all(len(row) == 4 for row in new)
    with torch.no_grad():
        full = int8(torch.cat([tokens, torch.tensor(new)], dim=1))
    assert torch.equal(full[:, tokens.shape[1] - 1: -1].argmax(-1), torch.tensor(new))


def test_int8_backward_is_the_gradient_of_the_dequantized_layer():
    gen = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 32, generator=gen))
    layer = Int8Linear.from_linear(linear, compute_dtype=torch.float32)  # exact products: compare tightly
    x = torch.randn(3, 5, 32, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 5, 24, generator=gen)
    (layer(x) * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, layer.weight) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert list(layer.parameters()) == []  # buffers only: nothing to train


def test_gradients_reach_the_adapter_through_an_int8_base_and_the_base_stays_frozen():
    fp32 = make_tiny_model(seed=0)
    add_adapter(fp32, AdapterConfig(prompt_len=4, layers=2))
    open_gates_(fp32, scale=0.5)
    int8 = quantize_base(copy.deepcopy(fp32)).train()
    base_before = {k: v.clone() for k, v in int8.state_dict().items() if ".adapter." not in k}
    tokens = random_tokens(2, 24)
    labels = tokens.clone()
    labels[:, :8] = -100

    grads = {}
    for name, model in (("fp32", fp32.train()), ("int8", int8)):
        model.zero_grad(set_to_none=True)
        lm_loss(model, tokens, labels).backward()
        grads[name] = torch.cat([p.grad.flatten() for _, p in trainable_parameters(model)])
    assert [n for n, _ in trainable_parameters(int8)] == [n for n, _ in trainable_parameters(fp32)]
    assert all(".adapter." in n for n, _ in trainable_parameters(int8))
    g32, g8 = grads["fp32"], grads["int8"]
    assert g8.abs().sum() > 0
    assert F.cosine_similarity(g32, g8, dim=0) > 0.99  # the same direction as through the float32 base

    opt = torch.optim.AdamW([p for _, p in trainable_parameters(int8)], lr=1e-2)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        lm_loss(int8, tokens, labels).backward()
        opt.step()
    after = {k: v for k, v in int8.state_dict().items() if ".adapter." not in k}
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in after), "the int8 base changed while training"
    assert any(not torch.equal(int8.state_dict()[k], fp32.state_dict()[k])
               for k in int8.state_dict() if ".adapter." in k), "the adapter did not train"


def test_a_bfloat16_base_trains_one_step_with_a_float32_adapter_and_generates():
    fp32 = make_tiny_model(seed=0)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    for model in (fp32, bf16):
        add_adapter(model, AdapterConfig(prompt_len=4, layers=2))
        model.train()
    adapter = [p for _, p in trainable_parameters(bf16)]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)  # the adapter's own tensors stay fp32
    base_before = {k: v.clone() for k, v in bf16.state_dict().items() if ".adapter." not in k}
    tokens = random_tokens(2, 24)

    losses = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        losses[name] = lm_loss(model, tokens)
    assert losses["bf16"].dtype == torch.float32
    assert abs(losses["bf16"].item() - losses["fp32"].item()) < 0.05  # zero gates: the base's loss, in bf16
    opt = torch.optim.AdamW(adapter, lr=1e-2)
    losses["bf16"].backward()
    gates = [p for n, p in trainable_parameters(bf16) if n.endswith("gate")]
    assert all(g.grad is not None and g.grad.dtype == torch.float32 and g.grad.abs().sum() > 0 for g in gates)
    opt.step()
    assert all(g.abs().sum() > 0 for g in gates)  # the gates left zero
    assert all(torch.equal(v, base_before[k]) for k, v in bf16.state_dict().items() if ".adapter." not in k)
    bf16.eval()
    new = generate_tokens(bf16, tokens[:, :8].tolist(), max_new_tokens=5, greedy=True, stop_at_eos=False)
    assert [len(row) for row in new] == [5, 5]


def test_quantize_base_names_a_wrong_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        quantize_base(make_tiny_model(), compute_dtype=torch.int8)


@pytest.mark.parametrize("base", ["int8", "bf16"])
def test_the_training_loop_tunes_an_adapter_on_a_smaller_base(base):
    from adapterlab.data import IGNORE_INDEX, TokenDataset
    from adapterlab.train import TrainConfig, train

    model = make_tiny_model(seed=0)
    model = quantize_base(model) if base == "int8" else model.to(torch.bfloat16)
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2))
    gen = torch.Generator().manual_seed(1)
    tokens, labels = [], []
    for _ in range(32):  # random prompts, one fixed response to learn
        prompt = [1] + torch.randint(3, 128, (int(torch.randint(4, 10, (1,), generator=gen)),), generator=gen).tolist()
        tokens.append(prompt + [5, 6, 7, 2])
        labels.append([IGNORE_INDEX] * len(prompt) + [5, 6, 7, 2])
    seen = []
    train(model, TokenDataset(tokens, labels), TrainConfig(steps=30, batch_size=8, lr=0.05, log_every=5, progress=False),
          callbacks=[lambda step, info: seen.append(info["loss"])])
    assert sum(seen[-5:]) / 5 < seen[0] - 0.3, seen
