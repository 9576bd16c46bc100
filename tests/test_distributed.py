"""Data-parallel training on CPU with gloo: 2 processes train exactly what 1 process trains.

The multi-process tests start real processes (``python -m torch.distributed.run``, or the
ranks by hand with torchrun's environment variables when a test needs to kill one). They use a
small random base (dim 64, 3 layers) with a SentencePiece tokenizer, written to a temporary
folder once per session, and 64 Alpaca records of the tiny world.

The same tests run with 8 processes on a 2-core machine - slowly, which is how a classroom
simulates the paper's 8-GPU run: ``ADAPTERLAB_TEST_NPROC=8 pytest tests/test_distributed.py``
(measured on the 2-core CI machine: see docs/distributed.md).

This file is also the worker script of those tests: ``python tests/test_distributed.py MODE ...``.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapterlab import distributed as D
from adapterlab.data import BatchSizeError, StepSampler, check_batch_sizes

NPROC = int(os.environ.get("ADAPTERLAB_TEST_NPROC", "2"))
STEPS = 20
BATCH = 16  # global batch: divisible by NPROC = 1, 2, 4, 8
TIMEOUT = 5  # seconds a collective may wait in the fault tests
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- unit: batches
def test_batch_split_errors_name_both_numbers():
    assert check_batch_sizes(64, 8) == (8, 1)
    assert check_batch_sizes(64, 1, micro_batch=8) == (64, 8)  # 1 GPU: accumulate 8 micro-batches
    assert check_batch_sizes(64, 8, micro_batch=4) == (8, 2)
    assert check_batch_sizes(64, 8, micro_batch=3) == (8, 3)  # 3 + 3 + 2 on every rank
    with pytest.raises(BatchSizeError, match=r"global batch size 10 is not divisible by the world size 4 .*"
                                             r"--batch-size 8 or 12"):
        check_batch_sizes(10, 4)
    with pytest.raises(BatchSizeError, match="global batch size 50 is not divisible by the world size 8"):
        StepSampler([5] * 100, 50, rank=0, world_size=8, micro_batch=4)


@pytest.mark.parametrize("world", [1, 2, 8])
def test_shares_partition_the_same_global_batch_at_any_world_size(world):
    lengths = [int(x) for x in torch.randint(3, 200, (400,), generator=torch.Generator().manual_seed(0))]
    one = StepSampler(lengths, 32, seed=7, rank=0, world_size=1)
    samplers = [StepSampler(lengths, 32, seed=7, rank=r, world_size=world, micro_batch=2) for r in range(world)]
    for step in (0, 5, one.steps_per_epoch + 3):  # also in the second epoch (a new order)
        shares = [[i for micro in s.micro_batches(step) for i in micro] for s in samplers]
        assert all(s.global_batch(step) == one.global_batch(step) for s in samplers)
        assert sorted(i for sh in shares for i in sh) == sorted(one.global_batch(step))  # a partition
        assert all(len(sh) == 32 // world for sh in shares)
        assert all(sum(len(m) for m in s.micro_batches(step)) == 32 // world for s in samplers)
        # strided shares: every rank gets long and short examples (similar compute)
        spans = [max(lengths[i] for i in sh) for sh in shares]
        assert max(spans) - min(spans) <= max(lengths[i] for i in one.global_batch(step)) - min(
            lengths[i] for i in one.global_batch(step))
    other_seed = StepSampler(lengths, 32, seed=8, rank=0, world_size=1)
    assert other_seed.global_batch(0) != one.global_batch(0)


def test_position_is_counted_in_global_samples():
    s8 = StepSampler([4] * 200, 64, seed=1, rank=3, world_size=8)
    s1 = StepSampler([4] * 200, 64, seed=1, rank=0, world_size=1, micro_batch=8)
    pos = s8.position(5)
    assert pos == s1.position(5) and pos["samples_seen"] == 5 * 64 and pos["epoch"] == 1
    with pytest.raises(BatchSizeError, match="rank 8 is outside 0..7"):
        StepSampler([4] * 200, 64, rank=8, world_size=8)


def test_single_process_helpers_are_identities():
    assert D.rank_and_world() == (0, 1) and D.is_main()
    assert D.all_reduce_sum(2.5) == 2.5 and D.broadcast_object({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, "ddp") is model and D.unwrap(model) is model  # no process group: nothing to wrap
    with pytest.raises(ValueError, match="strategy must be one of"):
        D.wrap_model(model, "zero3")


# --------------------------------------------------------------------------- fixtures: base + data
@pytest.fixture(scope="session")
def world_files(tmp_path_factory) -> dict:
    """A small random base (Meta folder with tokenizer.model) and an Alpaca file of 64 records."""
    from adapterlab import Llama, LlamaConfig
    from adapterlab.data import save_alpaca
    from adapterlab.io.weights import save_llama
    from adapterlab.worlds.tinyworld import instruction_set, make_world
    from adapterlab.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("dist")
    records = instruction_set(make_world())[0][:64]
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in records]
    texts += ["Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request. ### Instruction: ### Input: ### Response:"] * 4
    tokenizer = Tokenizer.train(texts, vocab_size=200)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=3, n_heads=4, vocab_size=tokenizer.n_words, multiple_of=32,
                              max_seq_len=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) / math.sqrt(p.shape[-1]))
    base = save_llama(model, tokenizer, root / "base")
    data = root / "data.json"
    save_alpaca(records, data)
    return {"base": str(base), "data": str(data), "root": root}


def finetune_args(files: dict, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["finetune", "--base", files["base"], "--data", files["data"], "--out", str(out), "--device", "cpu",
            "--steps", str(steps), "--batch-size", str(BATCH), "--micro-batch-size", "2", "--lr", "0.05",
            "--warmup-steps", "2", "--adapter-layers", "2", "--prompt-len", "4", "--log-every", "1",
            "--ckpt-every", "2", "--seed", "0", "--no-progress", *extra]


def run(cmd: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    return proc


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gate_trajectory(out: Path) -> torch.Tensor:
    lines = (out / "gates.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert [r["step"] for r in records] == list(range(len(records))), "one record per step, written once (rank 0)"
    return torch.tensor([r["gates"] for r in records], dtype=torch.float64)  # (steps+1, L, H)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter.safetensors")


@pytest.fixture(scope="session")
def reference_run(world_files) -> Path:
    """The single-process run every multi-process run must reproduce."""
    out = world_files["root"] / "one"
    proc = run([sys.executable, "-m", "adapterlab", *finetune_args(world_files, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_run(out: Path, ref: Path) -> None:
    a, b = gate_trajectory(out), gate_trajectory(ref)
    assert a.shape == b.shape == (STEPS + 1, 2, 4)
    assert b[-1].abs().max() > 0.05, "the gates must have moved for the comparison to mean anything"
    assert (a - b).abs().max() <= 1e-4
    ta, tb = adapter_tensors(out), adapter_tensors(ref)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_n_processes_train_what_one_process_trains(world_files, reference_run, strategy):
    """Same global batch and seed: gate trajectory within 1e-4 for 20 steps, same final adapter.

    --check-replicas also asserts after every step that all ranks hold identical gates."""
    out = world_files["root"] / f"{strategy}{NPROC}"
    proc = run(torchrun(NPROC, "-m", "adapterlab", *finetune_args(world_files, out, "--strategy", strategy,
                                                                  "--check-replicas")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_same_run(out, reference_run)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == NPROC and metrics["strategy"] == strategy
    if strategy == "ddp":  # DDP's own record of its gradient buckets: the adapter only
        assert metrics["all_reduced_elements"] == metrics["trainable_params"] == 2 * (4 * 64 + 4)
    # rank 0 alone wrote files: no temporary leftovers, one gates.jsonl line per step (checked above)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- replicas, reduced elements
def worker_replicas() -> None:
    """2 ranks: DDP reduces only the adapter; identical replicas pass the check, a perturbed one fails."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny_model

    from adapterlab import AdapterConfig, add_adapter

    env = D.init_distributed(device="cpu", timeout_s=30)
    model = add_adapter(make_tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    ddp = D.wrap_model(model, "ddp")
    reduced = D.reduced_elements(ddp)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert reduced["elements"] == trainable == 2 * (4 * 64 + 4) and reduced["buckets"] == [4 * trainable], reduced
    assert frozen > 100 * trainable
    D.check_replicas(ddp, step=0)  # identical: passes
    if env.rank == 1:
        with torch.no_grad():
            model.layers[2].attention.adapter.gate[0, 3] += 1e-6  # one head of the top layer drifts
    try:
        D.check_replicas(ddp, step=1)
    except D.DistributedError as e:
        print(f"rank {env.rank} caught: {e}", flush=True)
    else:
        raise SystemExit(f"rank {env.rank}: a divergent replica was not detected")
    del ddp, model  # a DDP wrapper alive at interpreter exit, after the group is gone, can abort the process
    D.cleanup()


def test_replica_check_and_reduced_elements():
    proc = run(torchrun(2, __file__, "replicas"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert (f"rank {rank} caught: adapter replicas differ after step 1: rank 1 vs rank 0" in proc.stdout)
    assert "adapted layer #1, head 3" in proc.stdout


# --------------------------------------------------------------------------- bad input
def test_global_batch_not_divisible_by_world_size(world_files, tmp_path):
    args = finetune_args(world_files, tmp_path / "bad", steps=2)
    args[args.index("--batch-size") + 1] = "7"  # 7 examples over 2 ranks
    proc = run(torchrun(2, "-m", "adapterlab", *args), timeout=120)
    assert proc.returncode != 0
    assert "global batch size 7 is not divisible by the world size 2" in proc.stderr
    assert "adapterlab/distributed.py\", line" not in proc.stderr  # a message, not our traceback (torchrun adds its own)
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_resume_from_a_different_model_is_refused(world_files, reference_run, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    ckpt = (reference_run / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(ckpt)
    args = finetune_args(world_files, out, "--resume")
    args[args.index("--adapter-layers") + 1] = "3"  # a different adapter than the one saved
    proc = run([sys.executable, "-m", "adapterlab", *args], timeout=120)
    assert proc.returncode != 0
    assert "was written for a different model or adapter" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == ckpt  # untouched


# --------------------------------------------------------------------------- faults
def worker_fault(kind: str, base: str, data: str, out: str) -> None:
    """One rank of a run where rank 1 dies (or hangs) after step 3; rank 0 must stop by itself."""
    from adapterlab import cli

    class Fault:
        def on_step(self, step, info):
            if step == 3 and D.rank_and_world()[0] == 1:
                if kind == "die":
                    os._exit(3)
                time.sleep(10 * TIMEOUT)  # hang: never reach the next collective in time

    argv = finetune_args({"base": base, "data": data}, Path(out), "--dist-timeout", str(TIMEOUT))
    sys.exit(cli.main(argv, callbacks=[Fault()]))


@pytest.mark.parametrize("kind", ["die", "hang"])
def test_a_dead_or_hung_rank_stops_the_others(world_files, reference_run, tmp_path, kind):
    """No torchrun agent here (it would kill the survivors itself): rank 0 must notice on its own,
    within the timeout, with a clear message; the last checkpoint stays intact and (after a
    death) resumes, in one process, to the same result as the uninterrupted 1-process reference."""
    out = tmp_path / kind
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "fault", kind, world_files["base"],
                                       world_files["data"], str(out)], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        _, err = procs[0].communicate(timeout=240)  # generous: only a hang forever would hit it
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode not in (0, None)
    assert "rank 0 of 2" in err and "another rank has died or stopped responding" in err, err[-3000:]
    if kind == "hang":
        assert f"timeout {TIMEOUT} s" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # intact, written by rank 0 at step 2
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2
    if kind == "hang":
        return
    proc = run([sys.executable, "-m", "adapterlab", *finetune_args(world_files, out, "--resume")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, reference_run)  # resumed at world size 1 what 2 processes started


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "replicas":
        worker_replicas()
    elif mode == "fault":
        worker_fault(*sys.argv[2:6])
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
