"""The training loop: schedule, what trains, accumulation, divergence, and kill -9 + resume equivalence."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from adapterlab.adapter import AdapterConfig, add_adapter, adapter_state_dict, gate_values
from adapterlab.data import IGNORE_INDEX, TokenDataset
from adapterlab.model import Llama, LlamaConfig
from adapterlab.train import Schedule, TrainConfig, TrainingDiverged, load_checkpoint, lr_at, train

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> Llama:
    """A random base with O(1) activations and logits (matrices ~ N(0, 1/fan_in), output x3)."""
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=64)
    model = Llama(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        model.output.weight.mul_(3.0)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(n: int = 40, seed: int = 1) -> TokenDataset:
    """Random prompts, a fixed response (easy to learn even on a random base), prompt masked."""
    g = torch.Generator().manual_seed(seed)
    toks, labs = [], []
    for _ in range(n):
        k = int(torch.randint(4, 10, (1,), generator=g))
        prompt = [1] + torch.randint(3, 64, (k,), generator=g).tolist()
        response = [5, 6, 7, 2]
        toks.append(prompt + response)
        labs.append([IGNORE_INDEX] * len(prompt) + response)
    return TokenDataset(toks, labs)


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    return TrainConfig(**kw)


def test_schedule_warms_up_linearly_then_half_cosine_to_min():
    s = Schedule(total_steps=110, steps_per_epoch=10, warmup_steps=10)
    assert lr_at(0, s, 1.0) == 0.0 and lr_at(5, s, 1.0) == pytest.approx(0.5)
    assert lr_at(10, s, 1.0) == pytest.approx(1.0)  # peak right after warm-up
    assert lr_at(60, s, 1.0, min_lr=0.1) == pytest.approx(0.55)  # halfway down the half cycle
    assert lr_at(109, s, 1.0) < 1e-3
    lrs = [lr_at(i, s, 1.0) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_lr_scales_with_batch_and_epochs_resolve():
    assert TrainConfig(steps=1, batch_size=64, base_lr=9e-3).peak_lr == pytest.approx(9e-3 * 64 / 256)
    assert TrainConfig(steps=1, lr=0.1).peak_lr == 0.1
    s = Schedule.resolve(TrainConfig(epochs=5, batch_size=8, warmup_epochs=2), n_examples=41)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps) == (5, 25, 10)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        TrainConfig(steps=3, epochs=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Schedule.resolve(TrainConfig(steps=1, batch_size=64), n_examples=10)


def test_adapter_training_lowers_the_loss_and_touches_only_the_adapter():
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if ".adapter." not in k}
    seen = []
    m = train(model, toy_data(), quiet(steps=40, batch_size=8, lr=0.05, log_every=5),
              callbacks=[lambda step, info: seen.append((step, info["loss"]))])
    assert m["trainable_params"] == 2 * (4 * 32 + 4) and m["steps"] == 40
    first, last = seen[0][1], sum(l for _, l in seen[-5:]) / 5
    assert last < first - 0.3, (first, last)
    for k, v in model.state_dict().items():
        if ".adapter." not in k:
            assert torch.equal(v, base_before[k]), k  # the frozen base did not move
    assert gate_values(model).abs().min() > 0  # every gate left zero


def test_gradient_accumulation_matches_one_big_batch():
    finals = []
    for micro in (None, 2, 3):
        model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
        train(model, toy_data(), quiet(steps=5, batch_size=8, micro_batch_size=micro, lr=0.05))
        finals.append(adapter_state_dict(model))
    for other in finals[1:]:
        for k in finals[0]:
            torch.testing.assert_close(other[k], finals[0][k], rtol=0, atol=1e-6)


def test_per_example_forward_args_reach_the_model_with_their_examples():
    """A data set with image features per example: every micro-batch's forward gets its own examples' rows,
    and the multi-modal projection (applied inside the forward) trains."""
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2, visual_dim=3, visual_hidden=8))
    text = toy_data()
    first = torch.tensor([t[1] for t in text.tokens], dtype=torch.float)  # each example's first prompt token
    features = torch.stack([first, torch.zeros_like(first), torch.ones_like(first)], dim=1)  # (N, 3)
    data = TokenDataset(text.tokens, text.labels, forward_args={
        "image_features": features, "has_image": torch.arange(len(text)) % 2 == 0})
    projection_before = model.visual_proj.fc1.weight.clone()
    seen = []
    forward = model.forward

    def checking_forward(tokens, *args, image_features=None, has_image=None, **kwargs):
        assert torch.equal(image_features[:, 0].long(), tokens[:, 1])  # the rows of these very examples
        seen.append(len(tokens))
        return forward(tokens, *args, image_features=image_features, has_image=has_image, **kwargs)

    model.forward = checking_forward
    train(model, data, quiet(steps=3, batch_size=8, micro_batch_size=3, lr=0.05))
    assert seen == [3, 3, 2] * 3
    assert not torch.equal(model.visual_proj.fc1.weight, projection_before)


# --------------------------------------------------------------------------- other objectives
def test_a_batch_fn_and_loss_fn_give_the_updates_of_the_plain_loop_written_out():
    """The ViT, text-encoder, scene-encoder and family runs train through train(batch_fn, loss_fn):
    the same losses and weights, bit for bit, as the loop they replaced (AdamW with weight decay on
    matrices, warm-up + cosine, clipping), with batches drawn (with replacement) larger than the data."""
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    y = (x.sum(1) > 0).long()

    def net() -> torch.nn.Module:
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))

    def batches(seed: int):
        gen = torch.Generator().manual_seed(seed)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, len(x), (16,), generator=gen)
            return x[idx], y[idx]

        return batch

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    model, norms = net(), []
    cfg = quiet(steps=12, batch_size=16, lr=0.05, warmup_steps=3, weight_decay=0.1, clip=0.5, log_every=1)
    metrics = train(model, x, cfg, callbacks=[lambda step, info: norms.append(info["grad_norm"])],
                    batch_fn=batches(1), loss_fn=loss_fn)

    ref = net()
    matrices, others = [p for p in ref.parameters() if p.ndim >= 2], [p for p in ref.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=0.05, betas=(0.9, 0.95))
    schedule, batch, losses = Schedule(total_steps=12, steps_per_epoch=1, warmup_steps=3), batches(1), []
    for step in range(12):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule, 0.05)
        loss = loss_fn(ref, batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        losses.append(loss.item())

    assert [loss for _, loss in metrics["loss_history"]] == losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert max(norms) > 0.5  # the clipping took part
    assert metrics["examples"] == 12 and metrics["steps_per_epoch"] == 1 and losses[-1] < losses[0]


def test_a_batch_fn_comes_with_a_loss_fn_and_whole_batches():
    model, x = torch.nn.Linear(4, 2), torch.zeros(8, 4)

    def batch(step):
        return x, torch.zeros(8, dtype=torch.long)

    def loss_fn(model, b):
        return torch.nn.functional.cross_entropy(model(b[0]), b[1])

    with pytest.raises(ValueError, match="batch_fn and loss_fn together"):
        train(model, x, quiet(steps=1, batch_size=8), batch_fn=batch)
    with pytest.raises(ValueError, match="micro_batch_size=None"):
        train(model, x, quiet(steps=1, batch_size=8, micro_batch_size=4), batch_fn=batch, loss_fn=loss_fn)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))

    def poison(step, info):
        if step == 3:
            with torch.no_grad():
                model.layers[1].attention.adapter.prompt.fill_(float("nan"))
                model.layers[1].attention.adapter.gate.fill_(1.0)

    cfg = quiet(steps=10, batch_size=8, lr=0.05, ckpt_every=2, out_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4: loss=nan.*checkpoint\.pt"):
        train(model, toy_data(), cfg, callbacks=[poison])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["trainable"].values())


def test_resume_refuses_a_checkpoint_of_another_adapter(tmp_path):
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    train(model, toy_data(), quiet(steps=2, batch_size=8, lr=0.05, out_dir=str(tmp_path)))
    other = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=1))
    with pytest.raises(ValueError, match="different model or adapter"):
        train(other, toy_data(), quiet(steps=4, batch_size=8, lr=0.05, out_dir=str(tmp_path), resume=True))
    with pytest.raises(ValueError, match="batch_size=8"):
        train(add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2)), toy_data(),
              quiet(steps=4, batch_size=4, lr=0.05, out_dir=str(tmp_path), resume=True))


def test_metrics_json_and_eval(tmp_path):
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    calls = []
    m = train(model, toy_data(), quiet(steps=6, batch_size=8, lr=0.05, eval_every=3, out_dir=str(tmp_path)),
              eval_fn=lambda mod: calls.append(mod.training) or {"score": 1.0})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["step"] for e in saved["eval_history"]] == [3, 6] and calls == [False, False]
    assert saved["trainable_params"] == m["trainable_params"] and saved["steps"] == 6
    assert {"final_loss", "loss_history", "train_seconds", "total_params"} <= set(saved)


# --------------------------------------------------------------------------- kill -9 and resume
def job(out: str, resume: bool = False, kill_at: int = -1) -> None:
    """A short adapter run with checkpoints every 5 steps and gate records every 2; kill_at: SIGKILL itself there."""
    from adapterlab.gates import GateRecorder

    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))

    def killer(step, info):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(steps=30, batch_size=8, micro_batch_size=4, lr=0.05, warmup_steps=3, ckpt_every=5,
                      log_every=2, out_dir=str(out), resume=resume, progress=False)
    train(model, toy_data(), cfg, callbacks=[GateRecorder(out, every=2), killer])
    torch.save(adapter_state_dict(model), os.path.join(out, "final.pt"))


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_train import job
    job(sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]))
""")


def run_script(tmp_path, out, resume=False, kill_at=-1, wait=True):
    script = tmp_path / "job.py"
    if not script.exists():
        script.write_text(SCRIPT.format(tests=str(REPO / "tests")))
    cmd = [sys.executable, str(script), str(out), "1" if resume else "0", str(kill_at)]
    if not wait:
        return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def assert_same_run(a: Path, b: Path):
    fa, fb = torch.load(a / "final.pt", weights_only=True), torch.load(b / "final.pt", weights_only=True)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), f"{k} differs after resume"  # bit-identical
    assert (a / "gates.jsonl").read_bytes() == (b / "gates.jsonl").read_bytes()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["loss_history"] == mb["loss_history"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    full = tmp_path / "full"
    job(full)  # uninterrupted, in this process (one thread, like the scripts)

    # Killed by itself at step 20, after gate lines 16-20 were written but before checkpoint 20.
    cut = tmp_path / "cut"
    r = run_script(tmp_path, cut, kill_at=20)
    assert r.returncode == -signal.SIGKILL
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 15
    assert json.loads((cut / "gates.jsonl").read_text().splitlines()[-1])["step"] == 20
    assert not (cut / "final.pt").exists()
    r = run_script(tmp_path, cut, resume=True)
    assert r.returncode == 0, r.stderr
    assert_same_run(full, cut)

    # Killed from outside at whatever moment it happens to be (maybe mid-checkpoint-write).
    ext = tmp_path / "ext"
    proc = run_script(tmp_path, ext, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        gates = ext / "gates.jsonl"
        if gates.exists() and gates.read_text().count("\n") >= 7:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_script(tmp_path, ext, resume=True)
    assert r.returncode == 0, r.stderr
    assert_same_run(full, ext)
    assert not [p for p in ext.iterdir() if p.name.endswith(".tmp")]  # no torn temporary files left behind
