"""The ``adapterlab`` command: pretrain, finetune, generate, gates, demo.

Each subcommand is one ``add_<name>_arguments(parser)`` and one ``run_<name>(args)`` function,
registered in :data:`COMMANDS`. To add a subcommand, register a :class:`Command`; to add flags
to an existing one, extend its ``add_*_arguments`` function (the shared training flags live in
:func:`add_training_arguments`, the adapter flags in :func:`add_adapter_arguments`).

    adapterlab demo --out runs/demo
    adapterlab finetune --base tinyworld --data tinyworld --out runs/ft --steps 200
    adapterlab finetune --base /models/llama-7b --data alpaca_data.json --out runs/alpaca --epochs 5
    adapterlab finetune --method lora --lora-rank 8 --out runs/lora      (baselines: lora, full)
    torchrun --nproc_per_node 8 -m adapterlab finetune --base /models/llama-7b --data alpaca_data.json --out runs/alpaca
    adapterlab gates runs/ft
    adapterlab gates --follow runs/alpaca
    adapterlab generate --base tinyworld --adapter runs/ft --instruction "Where does Mara live?"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .tinyworld import ADAPTER_SETTINGS, TUNING_SETTINGS

# Defaults for the embedded tiny world (adapterlab.tinyworld.TUNING_SETTINGS / ADAPTER_SETTINGS).
TINY_DEFAULTS = dict(**TUNING_SETTINGS, adapter_layers=ADAPTER_SETTINGS["layers"],
                     prompt_len=ADAPTER_SETTINGS["prompt_len"], max_seq_len=256, ckpt_every=50)
# Peak learning rates of finetune --method on the tiny world (notebook 7's efficiency table). On
# other bases lora and full need --lr: the release's 9e-3 base rate is the adapter's.
TINY_METHOD_LR = {"adapter": TUNING_SETTINGS["lr"], "lora": 1e-2, "full": 1e-3}
METHOD_NAMES = {"adapter": "adapter tuning", "lora": "LoRA tuning", "full": "full fine-tuning"}


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    COMMANDS[command.name] = command
    return command


# --------------------------------------------------------------------------- shared flags
def add_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="tinyworld",
                   help="the frozen LLaMA: 'tinyworld' (embedded, default) or a Meta / Hugging Face folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter (PAPER.md Sec. 3)")
    g.add_argument("--adapter-layers", type=int, default=None, metavar="L",
                   help="adapt the top L layers (tiny world: 4 = all; LLaMA-7B paper: 30)")
    g.add_argument("--prompt-len", type=int, default=None, metavar="K", help="K prompt tokens per layer (default 10)")
    g.add_argument("--gate", choices=("head", "layer"), default="head", help="one gate per head (release) or per layer")
    g.add_argument("--gate-activation", choices=("tanh", "identity"), default="tanh")
    g.add_argument("--init", choices=("zero", "random"), default="zero",
                   help="zero-init gates (paper) or random gates (ablation, Table 5)")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data (release: 5)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (release: 64)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="examples per forward pass; smaller -> gradient accumulation, same result")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: --blr * batch / 256)")
    g.add_argument("--blr", type=float, default=None, help="base learning rate (default: the release's 9e-3)")
    warm = g.add_mutually_exclusive_group()
    warm.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up (release: 2 epochs)")
    warm.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.02)
    g.add_argument("--clip", type=float, default=None, help="clip the gradient norm to this (default: no clipping)")
    g.add_argument("--max-seq-len", type=int, default=None, help="truncate examples to this many tokens (default 512)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--length-group", type=int, default=None,
                   help="batches' worth of examples sorted by length together (1: random batches; default 8)")
    g.add_argument("--log-every", type=int, default=None, help="steps between gate/loss records (default 10)")
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (tiny world)")
    g.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default 50)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------- helpers
def load_base_model(spec: str, device: Optional[str] = None):
    """'tinyworld' -> the embedded base; a folder -> adapterlab.checkpoints.load_llama. Frozen, with .tokenizer."""
    import torch

    if spec == "tinyworld":
        from .tinyworld import load_base

        model = load_base(device=device)
    else:
        from .checkpoints import load_llama

        model = load_llama(spec, device=device)
        if getattr(model, "tokenizer", None) is None:
            raise SystemExit(f"error: {spec} has no tokenizer.model; put LLaMA's tokenizer.model in the folder")
    model.requires_grad_(False)
    if device is None and torch.cuda.is_available():
        model = model.cuda()
    return model


def adapter_config_from(args: argparse.Namespace, n_layers: int):
    from .adapter import AdapterConfig

    layers = args.adapter_layers if args.adapter_layers is not None else min(30, n_layers)
    if not 1 <= layers <= n_layers:
        raise SystemExit(f"error: --adapter-layers {layers}: the base has {n_layers} layers; choose 1..{n_layers}")
    return AdapterConfig(prompt_len=args.prompt_len or ADAPTER_SETTINGS["prompt_len"], layers=layers, gate=args.gate,
                         gate_activation=args.gate_activation, init=args.init)


def train_config_from(args: argparse.Namespace, out_dir: Optional[str], tiny: bool):
    """A TrainConfig from the flags; unset flags take the tiny world's defaults or the release's."""
    from .train import TrainConfig

    method = getattr(args, "method", "adapter")
    d = {**TINY_DEFAULTS, "lr": TINY_METHOD_LR[method]} if tiny else {}
    steps, epochs = args.steps, args.epochs
    if steps is None and epochs is None:
        steps, epochs = (d["steps"], None) if tiny else (None, 5.0)
    warmup_steps, warmup_epochs = args.warmup_steps, args.warmup_epochs
    if warmup_steps is None and warmup_epochs is None:
        if tiny:
            warmup_steps = d["warmup_steps"]
        else:
            warmup_epochs = 2.0 if epochs is not None else 0.0
    lr = args.lr
    if lr is None and args.blr is None and tiny:
        lr = d["lr"]
    return TrainConfig(
        steps=steps, epochs=epochs, batch_size=args.batch_size or d.get("batch_size", 64),
        micro_batch_size=args.micro_batch_size, base_lr=args.blr if args.blr is not None else 9e-3, lr=lr,
        warmup_steps=warmup_steps, warmup_epochs=warmup_epochs or 0.0, weight_decay=args.weight_decay,
        clip=args.clip, seed=args.seed, length_group=args.length_group or d.get("length_group", 8), log_every=args.log_every or d.get("log_every", 10),
        eval_every=args.eval_every, ckpt_every=args.ckpt_every or d.get("ckpt_every", 50), out_dir=out_dir,
        resume=args.resume, progress=not args.no_progress, desc=METHOD_NAMES[method],
    )


def _uses_tiny_world(args: argparse.Namespace) -> bool:
    if args.command == "demo" and getattr(args, "multimodal", False):
        return False  # its base pretrains on longer batches: the machine's threads help (3.7 vs 5 min cold)
    if args.command in ("demo", "pretrain"):
        return True
    return getattr(args, "base", None) == "tinyworld"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- pretrain
def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="write the base to this folder (Meta format; default: the tiny-world cache)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (changes the recipe)")
    p.add_argument("--seed", type=int, default=None, help="world and training seed (changes the recipe)")
    p.add_argument("--force", action="store_true", help="rebuild the cached base even if it exists")
    p.add_argument("--no-progress", action="store_true")


def _recipe_from(args: argparse.Namespace):
    from .tinyworld import Recipe

    recipe = Recipe()
    if args.steps is not None:
        recipe.steps = args.steps
    if args.seed is not None:
        recipe.seed = args.seed
        recipe.world.seed = args.seed
    return recipe


def run_pretrain(args: argparse.Namespace) -> int:
    from . import tinyworld
    from .train import write_metrics

    recipe = _recipe_from(args)
    if args.out is None:
        folder = tinyworld.build_base(recipe, progress=not args.no_progress, force=args.force)
        info = json.loads((folder / "tinyworld.json").read_text())
        print(f"tiny-world base: {folder}\n  {info['params']:,} parameters, final pretraining loss "
              f"{info['final_loss']:.3f}, built in {info['pretrain_seconds']} s")
        return 0
    t0 = time.perf_counter()
    model, tokenizer, metrics = tinyworld.pretrain(recipe, progress=not args.no_progress)
    tinyworld.save_base(model, tokenizer, args.out, extra={"recipe": recipe, "final_loss": metrics["final_loss"]})
    metrics.update(pretrain_seconds=round(time.perf_counter() - t0, 1), params=model.num_params())
    write_metrics(args.out, metrics, update=False)
    print(f"wrote the base ({model.num_params():,} parameters, final loss {metrics['final_loss']:.3f}) to {args.out}")
    return 0


# --------------------------------------------------------------------------- finetune
def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    add_base_arguments(p)
    p.add_argument("--data", default="tinyworld", help="'tinyworld' (embedded instruction set) or an Alpaca .json file")
    p.add_argument("--out", required=True, help="output folder: metrics.json, gates.jsonl, gates.png, adapter, checkpoint")
    add_method_arguments(p)
    add_adapter_arguments(p)
    add_training_arguments(p)
    add_speed_arguments(p)
    add_distributed_arguments(p)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed and memory (measured in benchmarks/README.md)")
    g.add_argument("--compile", action="store_true",
                   help="compile every block with torch.compile (adapterlab.losses.compile_model); falls back to "
                        "eager with a warning where compiling fails. Pays off on long runs: each new batch length "
                        "costs a compilation (the tiny world's 300 steps: 80 s compiled vs 50 s eager on 2 cores; at "
                        "a fixed shape the compiled step is 19%% faster)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the adapted blocks in backward instead of keeping their activations: about half "
                        "the activation memory, 30-40%% slower")


def apply_speed_options(model, args: argparse.Namespace, strategy: str) -> None:
    """--compile / --activation-checkpointing on the model, before it is wrapped for several processes."""
    if getattr(args, "compile", False):
        if strategy == "fsdp":
            raise SystemExit("error: --compile with --strategy fsdp is not supported; use --strategy ddp or drop --compile")
        from .losses import compile_model

        compile_model(model)
    model.activation_checkpointing = bool(getattr(args, "activation_checkpointing", False))


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    from .baselines import LORA_TARGETS, METHODS

    g = p.add_argument_group("method (baselines of the paper's Table 3: adapterlab.baselines)")
    g.add_argument("--method", choices=METHODS, default="adapter",
                   help="adapter: LLaMA-Adapter on the frozen base (default); lora: LoRA on the frozen base; "
                        "full: train every weight (writes a whole new base folder)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R", help="LoRA rank r (default 8, as Alpaca-LoRA)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha; the update is alpha/r B A (default 16)")
    g.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help=f"comma-separated linear layers of every block for LoRA, from {','.join(LORA_TARGETS)} "
                        "(default wq,wv)")


def prepare_method(model, args: argparse.Namespace, tiny: bool, strategy: str = "none") -> None:
    """Attach the adapter or LoRA, or unfreeze the base, as --method says (checks the flags belong to it)."""
    from .baselines import prepare

    method = getattr(args, "method", "adapter")
    lora_flags = {"--lora-rank": getattr(args, "lora_rank", None), "--lora-alpha": getattr(args, "lora_alpha", None),
                  "--lora-targets": getattr(args, "lora_targets", None)}
    given = [f for f, v in {"--adapter-layers": args.adapter_layers, "--prompt-len": args.prompt_len,
                            **lora_flags}.items() if v is not None]
    own = {"adapter": ("--adapter-layers", "--prompt-len"), "lora": tuple(lora_flags), "full": ()}[method]
    stray = [f for f in given if f not in own]
    if stray:
        raise SystemExit(f"error: {', '.join(stray)} do(es) not apply to --method {method}")
    if method != "adapter" and not tiny and args.lr is None and args.blr is None:
        raise SystemExit(f"error: --method {method} on this base needs --lr: the default base rate 9e-3 is the "
                         "adapter's (Alpaca's full fine-tuning used 2e-5, Alpaca-LoRA 3e-4)")
    if method == "adapter":
        if tiny and args.adapter_layers is None:
            args.adapter_layers = TINY_DEFAULTS["adapter_layers"]
        prepare(model, "adapter", seed=args.seed, config=adapter_config_from(args, model.config.n_layers))
    elif method == "lora":
        kw = {"rank": args.lora_rank or 8, "alpha": args.lora_alpha or 16.0}
        if args.lora_targets:
            kw["targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        try:
            prepare(model, "lora", seed=args.seed, **kw)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        if strategy == "fsdp":
            raise SystemExit("error: --strategy fsdp shards the frozen weights; full fine-tuning has none: use ddp")
        prepare(model, "full")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (torchrun --nproc_per_node N -m adapterlab finetune ...)")
    g.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="ddp: every rank holds the base; fsdp: shard the frozen base across ranks (bases that do "
                        "not fit one GPU). Ignored in a single process")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="a rank waiting longer than this for the others stops with an error (default 600)")
    g.add_argument("--check-replicas", action="store_true",
                   help="debug: check after every step that every rank holds the same adapter")


def finetune(args: argparse.Namespace, quiet: bool = False):
    """The body of ``adapterlab finetune`` -> (model with its trained adapter, metrics written to --out).

    ``--method lora`` / ``full`` train the baselines instead (LoRA on the frozen base; every weight)
    through the same loop. Under torchrun every rank runs this: the same base, adapter and data;
    rank 0 alone prints and writes files.
    """
    from . import distributed
    from .baselines import save_lora
    from .checkpoints import save_adapter
    from .data import instruction_dataset, load_instruction_data
    from .train import write_metrics, train

    env = distributed.init_distributed(args.device, getattr(args, "dist_timeout", None))
    strategy = getattr(args, "strategy", "ddp") if env.distributed else "none"
    quiet = quiet or not env.is_main
    if env.distributed and not quiet:
        print(f"{env.world_size} processes ({env.backend}, {strategy}), global batch split over them")
    tiny = args.data == "tinyworld" and args.base == "tinyworld"
    records = load_instruction_data(args.data)  # validated before anything is trained
    # FSDP: read the base into (shared, memory-mapped) CPU memory; sharding moves each block to its GPU.
    load_device = "cpu" if strategy == "fsdp" else (str(env.device) if env.distributed else args.device)
    model = load_base_model(args.base, load_device)
    tokenizer = model.tokenizer
    max_len = args.max_seq_len or (TINY_DEFAULTS["max_seq_len"] if tiny else min(512, model.config.max_seq_len))
    data = instruction_dataset(records, tokenizer, max_len, source=args.data)
    if not quiet:
        print(data.summary())
    method = getattr(args, "method", "adapter")
    n_base = model.num_params()  # before the adapter / LoRA adds its own tensors
    prepare_method(model, args, tiny, strategy)
    apply_speed_options(model, args, strategy)
    config = train_config_from(args, args.out, tiny)
    config.check_replicas = getattr(args, "check_replicas", False)
    config.progress = config.progress and env.is_main
    wrapped = distributed.wrap_model(model, strategy, env.device)

    eval_fn = None
    heldout = None
    if tiny:
        from .tinyworld import heldout_accuracy, load_world

        _, _, heldout = load_world()
        eval_fn = lambda m: {"heldout_accuracy": heldout_accuracy(m, tokenizer, heldout)}  # noqa: E731
    metrics = train(wrapped, data, config, eval_fn=eval_fn, callbacks=getattr(args, "callbacks", ()))
    extra = {"base": args.base, "data": args.data, "method": method, "base_params": n_base,
             "trainable_fraction": metrics["trainable_params"] / n_base}
    if heldout is not None:
        extra["heldout_accuracy"] = metrics["eval"]["heldout_accuracy"]
    if env.is_main:
        if method == "adapter":
            save_adapter(model, args.out)
        elif method == "lora":
            save_lora(model, args.out)
        else:  # a whole new base in Meta's layout: adapterlab generate --base OUT reads it
            from .tinyworld import save_base

            save_base(model, tokenizer, args.out)
        write_metrics(args.out, extra)
    distributed.barrier("the end of training (rank 0 wrote the files)", env)
    metrics.update(extra)
    return model, metrics


def run_finetune(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .gates import format_summary, summarize

    _, m = finetune(args)
    if not is_main():
        return 0
    method = m["method"]
    what = {"adapter": "adapter", "lora": "LoRA", "full": "base"}[method]
    print(f"trained {m['trainable_params']:,} {what} parameters ({100 * m['trainable_fraction']:.3f}% of the base) "
          f"for {m['steps']} steps in {m['train_seconds']:.0f} s; final loss {m['final_loss']:.4f}")
    if "heldout_accuracy" in m:
        print(f"held-out accuracy: {m['heldout_accuracy']:.3f}")
    if method == "adapter":
        print(format_summary(summarize(Path(args.out))))
        files = "metrics.json gates.jsonl gates.png adapter.safetensors adapter_config.json checkpoint.pt"
    else:
        print(f"no gate summary: --method {method} has no zero-init gates (only the adapter records gates.jsonl)")
        files = {"lora": "metrics.json lora.safetensors lora_config.json checkpoint.pt "
                         "(load with adapterlab.baselines.load_lora(base, folder))",
                 "full": "metrics.json params.json consolidated.00.pth tokenizer.model checkpoint.pt "
                         f"(a whole base: adapterlab generate --base {args.out})"}[method]
    print(f"wrote {args.out}/: {files}")
    return 0


# --------------------------------------------------------------------------- generate
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_base_arguments(p)
    p.add_argument("--adapter", default=None, help="adapter folder (from finetune), official .pth or PEFT folder; or a LoRA folder from finetune --method lora")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--instruction", action="append", help="an instruction, wrapped in the Alpaca template (repeatable)")
    what.add_argument("--prompt", action="append", help="raw text to continue, no template (repeatable)")
    p.add_argument("--input", default="", help="the Alpaca input field for --instruction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.1, help="release default 0.1")
    p.add_argument("--top-p", type=float, default=0.75, help="release default 0.75")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=int, default=0)


def run_generate(args: argparse.Namespace) -> int:
    from .data import format_prompt
    from .generate import generate

    model = load_base_model(args.base, args.device)
    if args.adapter:
        from .baselines import LORA_CONFIG, load_lora
        from .checkpoints import load_adapter

        folder = Path(args.adapter)
        if (folder / LORA_CONFIG).is_file():  # written by finetune --method lora
            load_lora(model, folder)
        else:
            load_adapter(model, args.adapter)
    prompts = [format_prompt(i, args.input) for i in args.instruction] if args.instruction else args.prompt
    outs = generate(model, model.tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    for prompt, out in zip(args.instruction or args.prompt, outs):
        print(f">>> {prompt}\n{out.strip()}\n")
    return 0


# --------------------------------------------------------------------------- gates
def add_gates_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder (with gates.jsonl) or a gates.jsonl file")
    p.add_argument("--png", default=None, help="where to draw the plots (default: gates.png beside the log; "
                                                "with --follow: gates_live.png)")
    p.add_argument("--no-plot", action="store_true", help="print the summary only")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--follow", action="store_true",
                   help="watch a running job: print each new record and redraw the PNG until the run ends")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between checks with --follow (default 2)")


def run_gates(args: argparse.Namespace) -> int:
    from .gates import GATES_NAME, PLOT_NAME, format_summary, read_gates, save_plot, summarize

    if args.follow:
        from .live import follow_gates

        folder = Path(args.path)
        if folder.suffix == ".jsonl":
            folder = folder.parent
        if not folder.is_dir():
            print(f"{folder} does not exist yet; waiting for the run to create it")
        follow_gates(folder, interval=args.interval, png=None if args.no_plot else (args.png or "auto"))
        return 0
    path = Path(args.path)
    log = path / GATES_NAME if path.is_dir() else path
    if not log.is_file():
        return _fail(f"{log}: no gate log; pass a run folder written by 'adapterlab finetune' or its gates.jsonl")
    records = read_gates(log)
    if not records:
        return _fail(f"{log} holds no records yet")
    summary = summarize(records)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if not args.no_plot:
        png = Path(args.png) if args.png else log.with_name(PLOT_NAME)
        save_plot(records, png)
        print(f"wrote {png}")
    return 0


# --------------------------------------------------------------------------- demo
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--samples", type=int, default=None,
                   help="held-out questions to show before/after (default 4; with --multimodal: pictures in samples.png, 8)")
    p.add_argument("--multimodal", action="store_true",
                   help="the multi-modal adapter (Sec. 3.3) on embedded pictures: ScienceQA-style questions with an image, "
                        "text or no context, and captions; with vs without the image (about 3 minutes on 2 cores, "
                        "under 2 once the scene base is cached)")
    add_adapter_arguments(p)
    add_training_arguments(p)
    p.set_defaults(base="tinyworld", data="tinyworld", device=None)


# the demo options the multi-modal demo understands, and the MultimodalConfig field each sets
MULTIMODAL_OPTIONS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "prompt_len": "prompt_len",
                      "adapter_layers": "adapter_layers", "seed": "seed"}


def run_multimodal_demo_command(args: argparse.Namespace) -> int:
    """``adapterlab demo --multimodal``: see :func:`adapterlab.multimodal.run_multimodal_demo`."""
    from dataclasses import replace

    from .multimodal import MultimodalConfig, run_multimodal_demo

    parser_defaults = build_parser().parse_args(["demo"])
    ignored = sorted(k for k, v in vars(args).items()
                     if k not in MULTIMODAL_OPTIONS and k not in ("out", "samples", "multimodal", "no_progress", "threads",
                                                                  "run", "callbacks", "command", "device")
                     and getattr(parser_defaults, k, v) != v)
    if ignored:
        return _fail("demo --multimodal does not use " + ", ".join("--" + k.replace("_", "-") for k in ignored)
                     + "; it understands " + ", ".join("--" + k.replace("_", "-") for k in MULTIMODAL_OPTIONS))
    if args.device not in (None, "cpu"):
        return _fail("demo --multimodal runs on the CPU (its models are tiny); drop --device")
    default = MultimodalConfig()
    changes = {field: getattr(args, opt) for opt, field in MULTIMODAL_OPTIONS.items()
               if getattr(args, opt) is not None and getattr(args, opt) != getattr(default, field)}
    config = replace(default, **changes)
    if args.out == "runs/demo":
        args.out = "runs/multimodal"
    print(f"Multi-modal LLaMA-Adapter demo -> {args.out}/ (config: "
          + (", ".join(f"{k}={v}" for k, v in changes.items()) or "defaults") + ")")
    m = run_multimodal_demo(args.out, config, progress=not args.no_progress, verbose=True,
                            n_samples=8 if args.samples is None else args.samples)
    img, txt = m["accuracy_by_context"], m["text_only_accuracy_by_context"]
    print(f"\nImage-context accuracy {img['image']:.3f} with the picture vs {txt['image']:.3f} for the text-only "
          f"adapter ({m['image_gain_points']:+.1f} points); {m['trainable_params']:,} trainable parameters "
          f"({m['projection_params']:,} in the projection). Open {args.out}/samples.png and {args.out}/gates.png.")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The whole story on the embedded default: base -> answers before -> adapter tuning -> answers after."""
    if args.multimodal:
        return run_multimodal_demo_command(args)
    from . import tinyworld
    from .train import write_metrics

    if args.samples is None:
        args.samples = 4
    t_start = time.perf_counter()
    print("== 1. The frozen base: a tiny LLaMA pretrained on text about a synthetic world")
    base = tinyworld.load_base(device=args.device)
    tokenizer = base.tokenizer
    world, train_records, heldout = tinyworld.load_world()
    print(f"   {base.num_params():,} parameters; {len(world.people)} people, {len(heldout)} held-out questions "
          f"about {len(world.heldout)} people the instruction set never mentions")
    before = tinyworld.evaluate(base, tokenizer, heldout)
    acc_before = sum(r["correct"] for r in before) / len(before)
    print(f"\n== 2. Before tuning, the base does not follow the Alpaca template: held-out accuracy {acc_before:.2f}")
    _show(before[: args.samples])
    del base

    print(f"\n== 3. LLaMA-Adapter: zero-init gated prompts on the frozen base, {len(train_records)} instruction records")
    t_ft = time.perf_counter()
    model, m = finetune(args, quiet=True)
    after = tinyworld.evaluate(model, tokenizer, heldout)
    acc_after = sum(r["correct"] for r in after) / len(after)
    print(f"   {m['trainable_params']:,} trainable parameters = {100 * m['trainable_fraction']:.2f}% of the base; "
          f"{m['steps']} steps in {m['train_seconds']:.0f} s; loss {m['loss_history'][0][1]:.3f} -> {m['final_loss']:.3f}")

    from .gates import read_gates

    gates = read_gates(Path(args.out))
    first, last = gates[0]["gates"], gates[-1]["gates"]
    mean_abs = lambda g: sum(abs(x) for row in g for x in row) / sum(len(row) for row in g)  # noqa: E731
    print(f"   gates: mean |tanh(g)| {mean_abs(first):.3f} at step 0 -> {mean_abs(last):.3f} at step {gates[-1]['step']}")
    print(f"\n== 4. After tuning: held-out accuracy {acc_after:.2f} (was {acc_before:.2f})")
    _show(after[: args.samples])

    total = time.perf_counter() - t_start
    write_metrics(args.out, {
        "base_params": m["base_params"], "trainable_params": m["trainable_params"],
        "trainable_fraction": m["trainable_fraction"], "heldout_accuracy_before": acc_before,
        "heldout_accuracy_after": acc_after, "train_seconds": m["train_seconds"],
        "finetune_seconds": round(time.perf_counter() - t_ft, 2), "demo_seconds": round(total, 2),
        "samples_before": before[: args.samples], "samples_after": after[: args.samples],
        "gate_mean_abs_start": mean_abs(first), "gate_mean_abs_end": mean_abs(last),
    })
    print(f"\nWrote {args.out}/: metrics.json, gates.jsonl, gates.png (the gates opening), adapter.safetensors + "
          f"adapter_config.json, checkpoint.pt. Total {total:.0f} s.")
    return 0


def _show(rows: Sequence[dict]) -> None:
    for r in rows:
        mark = "right" if r["correct"] else "wrong"
        print(f"   Q: {r['question']}\n   A: {r['answer'] or '(nothing)'}   [{mark}; expected {r['expected']}]")


# --------------------------------------------------------------------------- entry point
register(Command("pretrain", "pretrain the tiny-world base (cached; first use of the embedded model does this)",
                 add_pretrain_arguments, run_pretrain))
register(Command("finetune", "train a LLaMA-Adapter on a frozen base (or a LoRA / full fine-tuning baseline)",
                 add_finetune_arguments, run_finetune))
register(Command("generate", "answer instructions / continue prompts with a base and an adapter",
                 add_generate_arguments, run_generate))
register(Command("gates", "summarise and plot a gates.jsonl", add_gates_arguments, run_gates))
register(Command("demo", "the whole story on the embedded tiny world (--multimodal: on embedded pictures), "
                         "in a few minutes on a CPU", add_demo_arguments, run_demo))


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch. Default: 1 for the tiny world ($ADAPTERLAB_THREADS overrides; its "
                        "small matrices gain little from more, and a busy machine makes more threads much slower), "
                        "torch's own choice otherwise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterlab",
        description="LLaMA-Adapter (zero-init gated attention, arXiv 2303.16199): train, inspect and use adapters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        if not any(a.dest == "threads" for a in p._actions):
            add_threads_argument(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Optional[Sequence[str]] = None, callbacks: Sequence = ()) -> int:
    """Run one command. ``callbacks`` go to the training loop of finetune (tests, notebooks)."""
    from .data import DataError
    from .distributed import BatchSizeError, DistributedError, cleanup, rank_and_world
    from .train import CheckpointMismatch, TrainingDiverged

    args = build_parser().parse_args(argv)
    args.callbacks = list(callbacks)
    from .tinyworld import cpu_threads, default_threads

    threads = getattr(args, "threads", None)
    if threads is None and _uses_tiny_world(args):
        threads = default_threads()
    try:
        with cpu_threads(threads):
            code = args.run(args)
        cleanup()  # leave the process group, if finetune joined one
        return code
    except (DataError, TrainingDiverged, BatchSizeError, CheckpointMismatch, DistributedError) as e:
        rank, world = rank_and_world()
        return _fail(f"[rank {rank}] {e}" if world > 1 and not str(e).startswith("rank ") else str(e))
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
