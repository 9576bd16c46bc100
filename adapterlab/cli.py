"""The ``adapterlab`` command: pretrain, finetune, generate, gates, demo, ablate, families.

Layer: cli (the top). It only maps flags onto the typed functions of :mod:`adapterlab.recipes`
(and prints their results): what a run does, and its defaults, are written there once.

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
    adapterlab ablate --out runs/ablation --seeds 2 --steps 40     (zero-init vs random-init vs ungated)
    adapterlab demo --vit --out runs/vit                              (a ViT on VTAB-style tasks; --roberta: SQuAD-style)
    adapterlab families --family vit --seeds 3 --out runs/vit_study   (the multi-seed study of one family)

Errors: a mistake in what the user gave (a path, a file's content, a flag's value or a
combination of flags) prints one ``error: ...`` line naming the file or flag and what to do,
exits with status 2, and trains or writes nothing. Flag values are checked as they are parsed
(the ``type=`` functions below); the rest raises :class:`~adapterlab.recipes.UsageError` or
:class:`~adapterlab.data.DataError` in the recipes. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import recipes
from .recipes import UsageError

# The flag of each setting a UsageError can name (settings without a flag are printed as they are).
FLAGS = {"base": "--base", "data": "--data", "out": "--out", "adapter": "--adapter", "adapter.layers": "--adapter-layers",
         "lr": "--lr", "resume": "--resume", "compile": "--compile", "strategy": "--strategy", "method": "--method",
         "batch_size": "--batch-size", "png": "--png", "threads": "--threads"}


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


class Parser(argparse.ArgumentParser):
    """argparse, except that a mistake prints one line - ``error: ...`` and where the flags are
    explained - instead of the whole usage text (exit status 2, as argparse)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- flag values
def _checked(kind: type, expected: str, ok: Callable) -> Callable[[str], object]:
    """A ``type=`` function: parse the text as ``kind`` and check ``ok(value)``; argparse names the flag."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse's fallback message uses the name
    return parse


positive_int = _checked(int, "a whole number >= 1", lambda n: n >= 1)
count = _checked(int, "a whole number >= 0", lambda n: n >= 0)
positive_float = _checked(float, "a number > 0", lambda x: x > 0)
non_negative_float = _checked(float, "a number >= 0", lambda x: x >= 0)
probability = _checked(float, "a number in (0, 1]", lambda x: 0 < x <= 1)


def name_list(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: distinct comma-separated names, each one of ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        unknown = [t for t in names if t not in allowed]
        if not names or unknown or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"expected distinct comma-separated names from {','.join(allowed)}, "
                                             f"got {text!r}")
        return names
    return parse


# --------------------------------------------------------------------------- shared flags
def add_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="tinyworld",
                   help="the frozen LLaMA: 'tinyworld' (embedded, default) or a Meta / Hugging Face folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter (zero-init gated prompts, docs/method.md)")
    g.add_argument("--adapter-layers", type=positive_int, default=None, metavar="L",
                   help="adapt the top L layers (tiny world: 4 = all; LLaMA-7B paper: 30)")
    g.add_argument("--prompt-len", type=positive_int, default=None, metavar="K",
                   help="K prompt tokens per layer (default 10)")
    g.add_argument("--gate", choices=("head", "layer"), default="head", help="one gate per head (release) or per layer")
    g.add_argument("--gate-activation", choices=("tanh", "identity"), default="tanh")
    g.add_argument("--init", choices=("zero", "random"), default="zero",
                   help="zero-init gates (paper) or random gates (ablation, Table 5)")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=positive_float, default=None, help="passes over the data (release: 5)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="global batch (release: 64)")
    g.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="examples per forward pass; smaller -> gradient accumulation, same result")
    g.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: --blr * batch / 256)")
    g.add_argument("--blr", type=positive_float, default=None, help="base learning rate (default: the release's 9e-3)")
    warm = g.add_mutually_exclusive_group()
    warm.add_argument("--warmup-epochs", type=non_negative_float, default=None,
                      help="linear warm-up (release: 2 epochs)")
    warm.add_argument("--warmup-steps", type=count, default=None)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.02)
    g.add_argument("--clip", type=positive_float, default=None,
                   help="clip the gradient norm to this (default: no clipping)")
    g.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="truncate examples to this many tokens (default 512)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--length-group", type=positive_int, default=None,
                   help="batches' worth of examples sorted by length together (1: random batches; default 8)")
    g.add_argument("--log-every", type=positive_int, default=None, help="steps between gate/loss records (default 10)")
    g.add_argument("--eval-every", type=positive_int, default=None, help="steps between evaluations (tiny world)")
    g.add_argument("--ckpt-every", type=count, default=None,
                   help="steps between checkpoints (default 50; 0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def train_changes(args: argparse.Namespace) -> dict:
    """The training flags as TrainConfig fields (None: not given, the recipe's default applies)."""
    return dict(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                lr=args.lr, base_lr=args.blr, warmup_steps=args.warmup_steps, warmup_epochs=args.warmup_epochs,
                weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, length_group=args.length_group,
                log_every=args.log_every, eval_every=args.eval_every, ckpt_every=args.ckpt_every, resume=args.resume,
                progress=not args.no_progress)


def adapter_changes(args: argparse.Namespace) -> dict:
    """The adapter flags as AdapterConfig fields (None: not given, the recipe's default applies)."""
    return dict(prompt_len=args.prompt_len, layers=args.adapter_layers, gate=args.gate,
                gate_activation=args.gate_activation, init=args.init)


def _uses_tiny_world(args: argparse.Namespace) -> bool:
    # every demo (the multi-modal one too: its base is shipped, docs/bases.md) follows $ADAPTERLAB_THREADS
    if args.command in ("demo", "pretrain", "families"):
        return True
    return getattr(args, "base", None) == "tinyworld"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _usage_message(e: UsageError) -> str:
    """A UsageError in the command line's words: the flag instead of the recipe's setting name."""
    flag = FLAGS.get(e.setting or "")
    if flag is None:
        return str(e)
    shown = f" {e.value}" if e.value is not None and not isinstance(e.value, bool) else ""
    return f"{flag}{shown}: {e.message}"


# --------------------------------------------------------------------------- pretrain
def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="write the base to this folder (Meta format; default: the tiny-world cache)")
    p.add_argument("--steps", type=positive_int, default=None, help="pretraining steps (changes the recipe)")
    p.add_argument("--seed", type=int, default=None, help="world and training seed (changes the recipe)")
    p.add_argument("--force", action="store_true", help="rebuild the cached base even if it exists")
    p.add_argument("--no-progress", action="store_true")


def run_pretrain(args: argparse.Namespace) -> int:
    from .worlds.tinyworld import Recipe

    recipe = Recipe()
    if args.steps is not None:
        recipe.steps = args.steps
    if args.seed is not None:
        recipe.seed = args.seed
        recipe.world.seed = args.seed
    folder, info = recipes.pretrain(args.out, recipe, force=args.force, progress=not args.no_progress)
    if args.out is None:
        print(f"tiny-world base: {folder}\n  {info['params']:,} parameters, final pretraining loss "
              f"{info['final_loss']:.3f}, built in {info['pretrain_seconds']} s")
    else:
        print(f"wrote the base ({info['params']:,} parameters, final loss {info['final_loss']:.3f}) to {args.out}")
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


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    from .studies.baselines import LORA_TARGETS, METHODS

    g = p.add_argument_group("method (baselines of the paper's Table 3: adapterlab.studies.baselines)")
    g.add_argument("--method", choices=METHODS, default="adapter",
                   help="adapter: LLaMA-Adapter on the frozen base (default); lora: LoRA on the frozen base; "
                        "full: train every weight (writes a whole new base folder)")
    g.add_argument("--lora-rank", type=positive_int, default=None, metavar="R",
                   help="LoRA rank r (default 8, as Alpaca-LoRA)")
    g.add_argument("--lora-alpha", type=positive_float, default=None,
                   help="LoRA scale alpha; the update is alpha/r B A (default 16)")
    g.add_argument("--lora-targets", type=name_list(LORA_TARGETS), default=None, metavar="NAMES",
                   help=f"comma-separated linear layers of every block for LoRA, from {','.join(LORA_TARGETS)} "
                        "(default wq,wv)")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (torchrun --nproc_per_node N -m adapterlab finetune ...)")
    g.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="ddp: every rank holds the base; fsdp: shard the frozen base across ranks (bases that do "
                        "not fit one GPU). Ignored in a single process")
    g.add_argument("--dist-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="a rank waiting longer than this for the others stops with an error (default 600)")
    g.add_argument("--check-replicas", action="store_true",
                   help="debug: check after every step that every rank holds the same adapter")


def method_settings(args: argparse.Namespace) -> tuple[Optional[dict], Optional[dict]]:
    """(adapter changes, LoRA changes) for --method; a flag of another method is an error."""
    lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets}
    given = {"--adapter-layers": args.adapter_layers, "--prompt-len": args.prompt_len,
             "--lora-rank": args.lora_rank, "--lora-alpha": args.lora_alpha, "--lora-targets": args.lora_targets}
    own = {"adapter": ("--adapter-layers", "--prompt-len"), "lora": ("--lora-rank", "--lora-alpha", "--lora-targets"),
           "full": ()}
    stray = [f for f, v in given.items() if v is not None and f not in own[args.method]]
    if stray:
        raise UsageError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to --method "
                         f"{args.method}; drop {'it' if len(stray) == 1 else 'them'} or choose the method "
                         f"{'it belongs' if len(stray) == 1 else 'they belong'} to")
    if args.method == "adapter":
        return adapter_changes(args), None
    if args.method == "lora":
        return None, {k: v for k, v in lora.items() if v is not None}
    return None, None


def run_finetune(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .gates import format_summary, summarize

    adapter, lora = method_settings(args)
    _, m = recipes.finetune(
        args.base, args.data, args.out, method=args.method, adapter=adapter, lora=lora, train=train_changes(args),
        max_seq_len=args.max_seq_len, device=args.device, strategy=args.strategy, compile=args.compile,
        activation_checkpointing=args.activation_checkpointing, dist_timeout=args.dist_timeout,
        check_replicas=args.check_replicas, callbacks=args.callbacks)
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
                         "(load with adapterlab.studies.baselines.load_lora(base, folder))",
                 "full": "metrics.json params.json consolidated.00.pth tokenizer.model checkpoint.pt "
                         f"(a whole base: adapterlab generate --base {args.out})"}[method]
    print(f"wrote {args.out}/: {files}")
    return 0


# --------------------------------------------------------------------------- generate
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_base_arguments(p)
    p.add_argument("--adapter", default=None, help="adapter folder (from finetune), official .pth or PEFT folder; "
                                                   "or a LoRA folder from finetune --method lora")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--instruction", action="append", help="an instruction, wrapped in the Alpaca template (repeatable)")
    what.add_argument("--prompt", action="append", help="raw text to continue, no template (repeatable)")
    p.add_argument("--input", default="", help="the Alpaca input field for --instruction")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.1, help="release default 0.1 (0: greedy)")
    p.add_argument("--top-p", type=probability, default=0.75, help="release default 0.75")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=int, default=0)


def run_generate(args: argparse.Namespace) -> int:
    from .data import format_prompt
    from .generate import generate

    model = recipes.load_tuned_model(args.base, args.adapter, args.device)
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
    p.add_argument("--interval", type=positive_float, default=2.0,
                   help="seconds between checks with --follow (default 2)")


def run_gates(args: argparse.Namespace) -> int:
    from .gates import PLOT_NAME, format_summary, save_plot, summarize

    if args.png is not None and not args.no_plot and not Path(args.png).parent.is_dir():
        raise UsageError(f"the folder {Path(args.png).parent} does not exist; create it or choose another file", "png")
    if args.follow:
        from .gates.live import follow_gates

        folder = Path(args.path)
        if folder.suffix == ".jsonl":
            folder = folder.parent
        if not folder.is_dir():
            print(f"{folder} does not exist yet; waiting for the run to create it")
        follow_gates(folder, interval=args.interval, png=None if args.no_plot else (args.png or "auto"))
        return 0
    log, records = recipes.load_gate_log(args.path)
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
    p.add_argument("--samples", type=count, default=None,
                   help="held-out questions to show before/after (default 4; with --multimodal: pictures in samples.png, 8)")
    p.add_argument("--multimodal", action="store_true",
                   help="the multi-modal adapter (Sec. 3.3) on embedded pictures: ScienceQA-style questions with an image, "
                        "text or no context, and captions; with vs without the image (about 3 minutes on 2 cores, "
                        "under 2 once the scene base is cached)")
    p.add_argument("--vit", action="store_true",
                   help="zero-init gated prompts on a small ViT: VTAB-style tasks, against ungated prompts (VPT-deep), "
                        "full fine-tuning, BitFit, a linear probe and LoRA (about 3 minutes on 2 cores, base cached)")
    p.add_argument("--roberta", action="store_true",
                   help="the same on a small RoBERTa-style encoder: SQuAD-style questions (v1.1 and v2.0), against "
                        "P-tuning v2, full fine-tuning, BitFit, prompt tuning and LoRA (about 3 minutes on 2 cores)")
    add_adapter_arguments(p)
    add_training_arguments(p)
    p.set_defaults(base="tinyworld", data="tinyworld", device=None)


# the demo options the multi-modal demo understands, and the MultimodalConfig field each sets
MULTIMODAL_OPTIONS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "prompt_len": "prompt_len",
                      "adapter_layers": "adapter_layers", "seed": "seed"}


def run_multimodal_demo_command(args: argparse.Namespace) -> int:
    """``adapterlab demo --multimodal``: see :func:`adapterlab.worlds.multimodal.run_multimodal_demo`."""
    from dataclasses import replace

    from .worlds.multimodal import MultimodalConfig, run_multimodal_demo

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
    recipes.check_out_dir(args.out)
    print(f"Multi-modal LLaMA-Adapter demo -> {args.out}/ (config: "
          + (", ".join(f"{k}={v}" for k, v in changes.items()) or "defaults") + ")")
    m = run_multimodal_demo(args.out, config, progress=not args.no_progress, verbose=True,
                            n_samples=8 if args.samples is None else args.samples)
    img, txt = m["accuracy_by_context"], m["text_only_accuracy_by_context"]
    print(f"\nImage-context accuracy {img['image']:.3f} with the picture vs {txt['image']:.3f} for the text-only "
          f"adapter ({m['image_gain_points']:+.1f} points); {m['trainable_params']:,} trainable parameters "
          f"({m['projection_params']:,} in the projection). Open {args.out}/samples.png and {args.out}/gates.png.")
    return 0


FAMILY_DEMO_OPTIONS = ("out", "no_progress", "threads", "vit", "roberta", "run", "callbacks", "command")


def run_family_demo_command(args: argparse.Namespace) -> int:
    """``adapterlab demo --vit`` / ``--roberta``: see :func:`adapterlab.studies.families.run_demo`."""
    from .studies.families import run_demo as run_family_demo

    chosen = [f"--{name}" for name in ("multimodal", "vit", "roberta") if getattr(args, name)]
    if len(chosen) > 1:
        return _fail(f"demo: choose one of --multimodal, --vit, --roberta; got {' '.join(chosen)}")
    family = "vit" if args.vit else "roberta"
    parser_defaults = build_parser().parse_args(["demo"])
    ignored = sorted(k for k, v in vars(args).items()
                     if k not in FAMILY_DEMO_OPTIONS and getattr(parser_defaults, k, v) != v)
    if ignored:
        return _fail(f"demo --{family} does not use " + ", ".join("--" + k.replace("_", "-") for k in ignored)
                     + "; it understands --out, --no-progress and --threads (the study's settings are fixed: "
                       "adapterlab.studies.families.DEMO)")
    if args.out == "runs/demo":
        args.out = f"runs/demo_{family}"
    recipes.check_out_dir(args.out)
    print(f"Zero-init attention beyond LLaMA: the {family} demo -> {args.out}/")
    try:
        run_family_demo(args.out, family, progress=not args.no_progress, threads=0)  # main() set the threads
    except ValueError as e:  # a folder holding another demo's runs
        return _fail(f"--out {args.out}: {e}")
    print(f"wrote {Path(args.out) / 'metrics.json'}, results.json, table.png and gates.png")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The whole story on the embedded default: base -> answers before -> adapter tuning -> answers after."""
    if args.vit or args.roberta:
        return run_family_demo_command(args)
    if args.multimodal:
        return run_multimodal_demo_command(args)
    recipes.demo(args.out, adapter=adapter_changes(args), train=train_changes(args), max_seq_len=args.max_seq_len,
                 samples=4 if args.samples is None else args.samples, device=args.device, callbacks=args.callbacks)
    return 0


# --------------------------------------------------------------------------- ablate
def add_ablate_arguments(p: argparse.ArgumentParser) -> None:
    from .studies.ablate import VARIANTS, AblationConfig

    d = AblationConfig()
    p.add_argument("--out", required=True, help="folder for runs.jsonl, summary.json and ablation.png "
                                                "(rerun with the same flags to resume: finished runs are skipped)")
    p.add_argument("--seeds", type=positive_int, default=d.seeds, help=f"seeds per variant (default {d.seeds})")
    p.add_argument("--variants", type=name_list(VARIANTS), default=d.variants,
                   help="zero (zero-init gates), random (random-init gates), none (ungated: one softmax); "
                        "default zero,random,none")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"training steps per run (default {d.steps})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--warmup-steps", type=count, default=d.warmup_steps, help=f"default {d.warmup_steps}")
    p.add_argument("--layers", type=positive_int, default=d.layers, help=f"adapted top layers (default {d.layers})")
    p.add_argument("--prompt-len", type=positive_int, default=d.prompt_len, help=f"default {d.prompt_len}")
    p.add_argument("--gate-scale", type=positive_float, default=d.gate_scale,
                   help="multiply the random gates' N(0, 1) draws (variant random)")
    p.add_argument("--prompt-scale", type=positive_float, default=d.prompt_scale,
                   help="multiply the prompts' N(0, 1) draws (every variant)")
    p.add_argument("--train-records", type=positive_int, default=None,
                   help="train on the first N instruction records only (the small-data regime)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="held-out evaluation every N steps "
                                                                        "(default: at the end only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(base="tinyworld")


def run_ablate(args: argparse.Namespace) -> int:
    """``adapterlab ablate``: zero-init vs random-init gates vs ungated prompts over seeds (adapterlab.studies.ablate)."""
    import shlex

    from .studies.ablate import AblationConfig, format_table, run_ablation

    try:
        config = AblationConfig(variants=args.variants, seeds=args.seeds, lr=args.lr, steps=args.steps,
                                batch_size=args.batch_size, warmup_steps=min(args.warmup_steps, args.steps),
                                layers=args.layers, prompt_len=args.prompt_len, gate_scale=args.gate_scale,
                                prompt_scale=args.prompt_scale, train_records=args.train_records,
                                eval_every=args.eval_every, early_steps=min(10, args.steps))
    except ValueError as e:  # name the flag, not the setting
        import re

        return _fail(re.sub(r"\b(train_records|batch_size|warmup_steps|eval_every|gate_scale|prompt_scale|prompt_len|"
                            r"steps|seeds|layers|lr|variants)\b", lambda m: "--" + m.group(1).replace("_", "-"), str(e)))
    command = "adapterlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["ablate"] else None
    try:
        summary = run_ablation(args.out, config, progress=not args.no_progress, command=command, threads=0)
    except ValueError as e:
        return _fail(str(e))
    print(format_table(summary))
    print(f"wrote {Path(args.out) / 'runs.jsonl'}, summary.json and ablation.png")
    return 0


# --------------------------------------------------------------------------- families
def add_families_arguments(p: argparse.ArgumentParser) -> None:
    from .studies.families import ALL_METHODS, FAMILIES, StudyConfig, task_names

    d = StudyConfig()
    tasks = name_list([t for family in FAMILIES for t in task_names(family)])  # the family's own: checked later
    p.add_argument("--family", choices=FAMILIES, required=True, help="vit (VTAB-style tasks) or roberta (SQuAD-style)")
    p.add_argument("--out", required=True, help="folder for runs.jsonl, metrics.json, results.json, table.png, "
                                                "gates.png (rerun with the same flags to resume: finished runs are skipped)")
    p.add_argument("--seeds", type=positive_int, default=d.seeds, help=f"seeds per method and task (default {d.seeds})")
    p.add_argument("--methods", type=name_list(ALL_METHODS), default=None,
                   help="comma-separated subset of the family's methods (default: all)")
    p.add_argument("--tasks", type=tasks, default=None, help="comma-separated subset of the family's tasks (default: all)")
    p.add_argument("--search-tasks", type=tasks, default=None,
                   help="tasks of the learning-rate search (default: the study's, digits for vit and squad1 for roberta)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps per run (default: the family's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the family's")
    p.add_argument("--train-limit", type=positive_int, default=None,
                   help="use at most N training and N validation examples per task (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_families(args: argparse.Namespace) -> int:
    """``adapterlab families``: the multi-seed comparison of one family (adapterlab.studies.families.run_study)."""
    import re
    import shlex

    from .studies.families import format_table, run_study, study_config

    recipes.check_out_dir(args.out)
    try:
        config = study_config(args.family, methods=args.methods, tasks=args.tasks,
                              search_tasks=args.search_tasks, seeds=args.seeds, steps=args.steps,
                              batch_size=args.batch_size, train_limit=args.train_limit)
    except ValueError as e:  # name the flag, not the setting
        return _fail(re.sub(r"\b(search_tasks|batch_size|train_limit|warmup_steps|methods|tasks|seeds|steps)\b",
                            lambda m: "--" + m.group(1).replace("_", "-"), str(e)))
    command = "adapterlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["families"] else None
    try:
        results = run_study(args.out, config, progress=not args.no_progress, command=command, threads=0)
    except ValueError as e:
        return _fail(str(e))
    print(format_table(args.family, results["methods"]))
    print(f"wrote {Path(args.out) / 'results.json'}, metrics.json, runs.jsonl, table.png and gates.png")
    return 0


# --------------------------------------------------------------------------- entry point
register(Command("pretrain", "pretrain the tiny-world base (cached; first use of the embedded model does this)",
                 add_pretrain_arguments, run_pretrain))
register(Command("finetune", "train a LLaMA-Adapter on a frozen base (or a LoRA / full fine-tuning baseline)",
                 add_finetune_arguments, run_finetune))
register(Command("generate", "answer instructions / continue prompts with a base and an adapter",
                 add_generate_arguments, run_generate))
register(Command("gates", "summarise and plot a gates.jsonl", add_gates_arguments, run_gates))
register(Command("ablate", "zero-init vs random-init gates vs ungated prompts, over seeds, on the tiny world "
                           "(runs.jsonl, summary.json, plots)", add_ablate_arguments, run_ablate))
register(Command("families", "zero-init gated prompts on a ViT (VTAB-style) or a RoBERTa-style encoder (SQuAD-style) "
                              "against VPT / P-tuning v2, full fine-tuning, BitFit and more, over seeds",
                 add_families_arguments, run_families))
register(Command("demo", "the whole story on the embedded tiny world (--multimodal: on embedded pictures), "
                         "in a few minutes on a CPU", add_demo_arguments, run_demo))


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=count, default=None,
                   help="CPU threads for torch (0: torch's own choice). Default: $ADAPTERLAB_THREADS, else 1, for the "
                        "embedded models (their small matrices gain little from more, and a busy machine makes more "
                        "threads much slower; docs/bases.md), torch's own choice otherwise")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def _threads(args: argparse.Namespace) -> Optional[int]:
    """--threads, else $ADAPTERLAB_THREADS (default 1) for the tiny world, else torch's own choice."""
    from .io.files import default_threads

    if args.threads is not None or not _uses_tiny_world(args):
        return args.threads
    try:
        return default_threads()
    except ValueError as e:  # a bad $ADAPTERLAB_THREADS: the message names it
        raise UsageError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None, callbacks: Sequence = ()) -> int:
    """Run one command; return its exit status (0 done, 2 a mistake in the input, 130 interrupted).
    ``callbacks`` go to the training loop of finetune and demo (tests, notebooks)."""
    from .data import DataError
    from .distributed import DistributedError, cleanup, rank_and_world
    from .io.files import cpu_threads
    from .train import CheckpointMismatch, TrainingDiverged

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag mistake, already printed as one line (2)
        return e.code if isinstance(e.code, int) else 2
    args.callbacks = list(callbacks)
    try:
        with cpu_threads(_threads(args)):
            code = args.run(args)
        cleanup()  # leave the process group, if finetune joined one
        return code
    except (UsageError, DataError, TrainingDiverged, CheckpointMismatch, DistributedError) as e:
        message = _usage_message(e) if isinstance(e, UsageError) else str(e)
        rank, world = rank_and_world()
        return _fail(f"[rank {rank}] {message}" if world > 1 and not message.startswith("rank ") else message)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
