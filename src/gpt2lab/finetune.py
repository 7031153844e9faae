"""Fine-tuning: adapt a GPT-2 checkpoint to your data, fully or with LoRA, in train.py's fit() loop.

    finetune(MODEL, data=..., out=RUN_DIR)   `gpt2lab finetune`: our checkpoint, a run or an HF folder
    merge(ADAPTER, out=DIR)                  `gpt2lab lora merge`: base + adapter -> a plain checkpoint

Data comes in two forms:
  * text (a file, a folder, a catalog corpus such as `kjv`, or a folder `gpt2lab prepare` wrote):
    domain adaptation, every token counts, batches are windows of the token stream (data.Loader);
  * JSONL rows {"prompt": ..., "completion": ...}: each example is the prompt formatted by a
    template, then the completion, then <|endoftext|>. Only the completion and that closing
    <|endoftext|> count in the loss. Examples are *padded*, not packed: each row of a batch is one
    example, right-padded to the batch's longest, and the padding is masked out of the loss.
    Causal attention never looks right, so a padded example computes exactly what it would alone.
    An example longer than the context (block_size + 1 tokens) is skipped and counted (default),
    truncated (its completion cut; the closing <|endoftext|> is lost), or an error naming its line.

Every checkpoint carries finetune.json: the method, the base, the data and the prompt template,
so that generation can format prompts as training did (checkpoint.prompt_template reads it back,
template.PromptTemplate formats both).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from . import data as datasets
from . import files, lora
from .checkpoint import (
    FINETUNE_RECORD,
    adapter_folder,
    base_reference,
    check_destination,
    export_hf,
    latest_checkpoint,
    load_config,
    load_model,
    load_tokenizer,
    resolve,
    save_checkpoint,
    write_model_files,
)
from .config import TrainConfig
from .device import resolve_device
from .errors import ConfigError, DataError, TrainingError
from .lora import LoRAConfig
from .metrics import raise_if_stopped, summary
from .model import GPT, CausalSelfAttention
from .rundir import METRICS, open_run
from .template import DEFAULT_TEMPLATE, PromptTemplate
from .tokenizer import Tokenizer
from .train import Batch, FitResult, Strategy, fit

DataFormat = Literal["auto", "text", "prompt-completion"]
TooLong = Literal["skip", "truncate", "error"]


# -- configuration ---------------------------------------------------------------------------


# Peak learning rates by method, for a run that does not set lr.
LEARNING_RATES: dict[str, float] = {"full": 1e-4, "lora": 1e-3}
# Where fine-tuning's defaults differ from pretraining's (TrainConfig's): short runs on little data,
# judged by the held-out loss, which picks the checkpoint to keep and stops a run that no longer gains.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    batch_size=8, max_steps=200, min_lr=0.0, warmup_steps=10, weight_decay=0.0, eval_interval=25, eval_batches=10,
    log_interval=5, ckpt_interval=100, keep_last=2, keep_best=True, patience=4,
)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainConfig):
    """TrainConfig plus the method and LoRA's shape. Every field is a `gpt2lab finetune` option.

    `FinetuneConfig.for_method("lora", max_steps=50)` starts from fine-tuning's defaults
    (FINETUNE_DEFAULTS and the method's learning rate), as `gpt2lab finetune` does; the
    constructor alone keeps TrainConfig's, which are pretraining's.
    """

    model: str = ""
    """The starting checkpoint (set from MODEL; a resumed run must start from the same one)."""
    lr: float | None = None  # None: the method's rate, decided when the run starts (peak_lr)
    """Peak learning rate (default: 1e-4 for full fine-tuning, 1e-3 for LoRA)."""
    method: Literal["full", "lora"] = "full"
    """full: train every weight; lora: freeze the model and train low-rank adapters (a small file)."""
    lora: LoRAConfig = LoRAConfig()
    """LoRA's shape, for --method lora."""

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise ConfigError(f"method must be full or lora, got {self.method!r}")
        if not isinstance(self.lora, LoRAConfig):
            raise ConfigError(f"lora must be a LoRAConfig, got {type(self.lora).__name__}")
        if self.method == "lora" and self.optimizer == "muon":
            raise ConfigError("--optimizer muon steps whole weight matrices and LoRA trains low-rank adapters "
                              "instead: use --method full with Muon, or LoRA with --optimizer adamw")
        if self.lr is None:
            dataclasses.replace(self, lr=self.peak_lr)  # TrainConfig's checks, with the rate the run will use
        else:
            super().__post_init__()

    @classmethod
    def for_method(cls, method: Literal["full", "lora"] = "full", **overrides: Any) -> FinetuneConfig:
        """Fine-tuning's defaults for `method`, its learning rate included, with `overrides` of any field."""
        config = cls(**(FINETUNE_DEFAULTS | {"method": method} | overrides))
        return config if "lr" in overrides else dataclasses.replace(config, lr=config.peak_lr)

    @property
    def peak_lr(self) -> float:
        """The learning rate warmup reaches: lr, or when that is None the method's (LEARNING_RATES)."""
        return LEARNING_RATES[self.method] if self.lr is None else self.lr


# What `gpt2lab finetune` starts from (its --option defaults): fine-tuning's, with lr left to --method.
COMMAND_DEFAULTS = FinetuneConfig.for_method(lr=None)


# -- prompt/completion examples --------------------------------------------------------------


def format_prompt(template: str, prompt: str) -> str:
    """`prompt` as the template shows it to the model: PromptTemplate(template).format(prompt)."""
    return PromptTemplate(template).format(prompt)


def read_examples(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """("PATH line N", prompt, completion) for each row of a JSONL file; blank lines are skipped.

    Raises DataError naming the line for undecodable or malformed JSON, a row that is not an
    object, a missing field or a field that is not a string, and for a file with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a file: give a JSONL file of {{\"prompt\": ..., \"completion\": ...}} rows")
    rows = 0
    for where, row in datasets.jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where} is a JSON {type(row).__name__}, not an object with prompt and completion")
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where} has no {key!r} field (its fields: {', '.join(sorted(row)) or 'none'}); "
                                "each row needs \"prompt\" and \"completion\"")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} is a JSON {type(row[key]).__name__}, not a string")
            if not row[key].isascii():
                try:  # JSON's "\ud800" escapes give lone surrogates, which no tokenizer can encode
                    row[key].encode("utf-8")
                except UnicodeEncodeError as e:
                    raise DataError(f"{where}: {key!r} holds a lone surrogate at character {e.start} "
                                    "(a broken \\u escape); fix it") from None
        rows += 1
        yield where, row["prompt"], row["completion"]
    if rows == 0:
        raise DataError(f"{path} holds no examples (it is empty or blank); give one JSON object per line")


@dataclass(frozen=True)
class Example:
    ids: list[int]  # the formatted prompt's tokens, the completion's, then <|endoftext|>
    n_prompt: int  # how many of ids are the prompt's (they do not count in the loss)


@dataclass(kw_only=True)
class Examples:
    """Tokenized examples and what happened to those that did not fit."""

    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # where each was ("PATH line N")
    truncated: list[str] = field(default_factory=list)


def tokenize_examples(rows: Iterator[tuple[str, str, str]], tokenizer: Tokenizer, *, template: PromptTemplate,
                      max_tokens: int, too_long: TooLong = "skip") -> Examples:
    """Tokenize (line, prompt, completion) rows into examples of at most `max_tokens` tokens.

    The prompt and the completion are encoded separately, as generation will see them: the
    formatted prompt first, then the model's own tokens.
    """
    out = Examples(examples=[])
    for where, prompt, completion in rows:
        p = tokenizer.encode(template.format(prompt))
        ids = p + tokenizer.encode(completion) + [tokenizer.eot_id]
        if len(ids) > max_tokens:
            if too_long == "error":
                raise DataError(f"{where}: the example has {len(ids)} tokens, more than the "
                                f"{max_tokens} that fit (block_size + 1); shorten it, or pass --too-long skip/truncate")
            if too_long == "skip" or len(p) >= max_tokens:  # truncating would leave no completion token
                out.skipped.append(where)
                continue
            ids = ids[:max_tokens]
            out.truncated.append(where)
        out.examples.append(Example(ids, len(p)))
    return out


def pad_batch(examples: Sequence[Example], pad_id: int) -> Batch:
    """(inputs, targets, loss mask), each (B, T): one example a row, right-padded to the longest.

    The mask is 1 where the target is a completion token (or the closing <|endoftext|>): the
    prompt's tokens and the padding contribute nothing to the loss.
    """
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        x[i, :n], y[i, :n] = ids[:-1], ids[1:]
        mask[i, max(e.n_prompt - 1, 0):n] = 1  # target t is ids[t + 1]: a completion token from t = n_prompt - 1
    return x, y, mask


class ExampleBatches:
    """Batches of padded examples for fit(): a function of (seed, step, index) alone, like data.Loader.

    Example k of the run's stream is example perm_e[k mod N] of epoch e = k // N, each epoch a
    fresh permutation seeded by (seed, e); micro-batch `index` of step `step` takes the stream's
    examples from (step * per_step + index) * batch_size on, so a resumed run reads what an
    uninterrupted one would have.
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, per_step: int, pad_id: int,
                 seed: int = 0) -> None:
        if not examples:
            raise DataError("no examples to train on")
        self.examples, self.batch_size, self.per_step = list(examples), batch_size, per_step
        self.pad_id, self.seed = pad_id, seed

    def _example(self, k: int) -> Example:
        epoch, i = divmod(k, len(self.examples))
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return self.examples[int(perm[i])]

    def get(self, step: int, index: int = 0) -> Batch:
        first = (step * self.per_step + index) * self.batch_size
        return pad_batch([self._example(k) for k in range(first, first + self.batch_size)], self.pad_id)

    def eval_batches(self, n: int) -> Iterator[Batch]:
        """The first n batches of the examples in order (fewer if there are fewer examples): the same every time."""
        for start in range(0, min(len(self.examples), n * self.batch_size), self.batch_size):
            yield pad_batch(self.examples[start:start + self.batch_size], self.pad_id)


def detect_format(path: str) -> Literal["text", "prompt-completion"]:
    """prompt-completion for a .jsonl file whose first row has a prompt or completion field, else text."""
    p = Path(path)
    if p.suffix != ".jsonl" or not p.is_file():
        return "text"
    with open(p, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return "prompt-completion"  # read_examples will name the bad line
                return "prompt-completion" if isinstance(row, dict) and {"prompt", "completion"} & set(row) \
                    else "text"
    return "prompt-completion"  # an empty .jsonl: read_examples says so


# -- the model -------------------------------------------------------------------------------


def set_dropout(model: GPT, p: float) -> None:
    """Use dropout `p` everywhere in a (not yet LoRA-adapted) GPT, and record it in its config."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, CausalSelfAttention):
            m.dropout = p
    model.config = dataclasses.replace(model.config, dropout=p)


def load_for_finetuning(path: str | Path, cfg: FinetuneConfig, tokenizer: Tokenizer) -> GPT:
    """The model at `path` ready for fit(): its own writable memory, the run's dropout, fully trainable
    or LoRA-adapted. Weights are fp32, but a bf16 LoRA run holds its frozen Linears in bf16 (lora.frozen_bf16)."""
    dtype = base_dtype(cfg, load_config(path).n_embd)
    model = load_model(path, dtype=dtype, tokenizer=tokenizer, copy=True)  # an adapter comes back merged
    set_dropout(model, cfg.dropout)
    if cfg.method == "lora":
        torch.manual_seed(cfg.seed)  # A's random init: the same run from the same seed
        lora.apply_lora(model, cfg.lora)
    return model


def base_dtype(cfg: FinetuneConfig, width: int | None = None) -> torch.dtype | Callable[[str], torch.dtype]:
    """The dtype of each tensor of the starting checkpoint (a model `width` wide), for load_model:
    bf16 for a LoRA run's frozen Linears wherever fit() will train it under bf16 autocast."""
    if cfg.method == "lora" and cfg.bf16(resolve_device(cfg.device).type, width):
        return lambda name: torch.bfloat16 if lora.frozen_bf16(name) else torch.float32
    return torch.float32


def _lora_strategy(config: lora.LoRAConfig, base: dict[str, Any], record: dict[str, Any]) -> Strategy:
    def save(model: nn.Module, folder: Path, tokenizer: Any) -> None:
        lora.save_adapter(model, folder, config=config, base=base)
        if tokenizer is not None:
            tokenizer.save(folder / "tokenizer")

    return Strategy(save=save, load=lora.load_adapter_weights, extra_files=_record_files(record))


def _record_files(record: dict[str, Any]) -> dict[str, str]:
    return {FINETUNE_RECORD: json.dumps(record, indent=2) + "\n"}


def _check_same_run(ckpt: Path | None, record: dict[str, Any]) -> None:
    """A resumed fine-tuning run must keep its method, LoRA shape, data and template."""
    if ckpt is None or not (ckpt / FINETUNE_RECORD).is_file():
        return  # fit() says what is wrong
    saved = files.read_json(ckpt / FINETUNE_RECORD, TrainingError, "fine-tuning record")
    for key in ("method", "lora", "data", "prompt_template"):
        if saved.get(key) != record.get(key):
            raise TrainingError(f"{ckpt} was fine-tuned with {key}={saved.get(key)!r}, but this run asks for "
                                f"{record.get(key)!r}; resume with the same settings or choose another --out")


# -- data ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Data:
    train: Any
    val: Any
    bytes_per_token: float | None
    notes: list[str]


def _text_data(source: str, val_source: str, out: Path, tokenizer: Tokenizer, *, cfg: FinetuneConfig,
               micro: int, block: int, field: str, val_fraction: float) -> _Data:
    def prepared(spec: str, name: str, fraction: float) -> datasets.DataFolder:
        if datasets.is_data_folder(spec):
            folder = datasets.DataFolder.open(spec)
            if folder.tokenizer.sha256 != tokenizer.sha256:
                raise DataError(f"{spec} was prepared with another tokenizer than the model's; prepare the text again "
                                "with the model's tokenizer (or give the text itself to finetune)")
            return folder
        datasets.prepare_own(spec, out / name, tokenizer=tokenizer, field=field, val_fraction=fraction)
        return datasets.DataFolder.open(out / name)

    data = prepared(source, "data", 0.0 if val_source else val_fraction)
    loader = data.loader("train", batch_size=micro, block_size=block, seed=cfg.seed)
    if val_source:
        val = prepared(val_source, "data-val", 0.0)
        return _Data(train=loader, val=val.loader("train", batch_size=micro, block_size=block),
                     bytes_per_token=val.bytes_per_token("train"), notes=[])
    if not data.has_split("val"):
        return _Data(train=loader, val=None, bytes_per_token=None, notes=["no validation split: no early stopping"])
    return _Data(train=loader, val=data.loader("val", batch_size=micro, block_size=block),
                 bytes_per_token=data.bytes_per_token("val"), notes=[])


def _example_data(source: str, val_source: str, tokenizer: Tokenizer, *, cfg: FinetuneConfig, micro: int,
                  block: int, template: PromptTemplate, too_long: TooLong, val_fraction: float) -> _Data:
    def load(path: str) -> tuple[Examples, list[str]]:
        got = tokenize_examples(read_examples(path), tokenizer, template=template, max_tokens=block + 1,
                                too_long=too_long)
        notes = []
        if got.skipped:
            notes.append(f"{path}: skipped {len(got.skipped)} example(s) longer than {block + 1} tokens "
                         f"(the first: {got.skipped[0]}); raise --block-size or pass --too-long truncate")
        if got.truncated:
            notes.append(f"{path}: truncated {len(got.truncated)} example(s) to {block + 1} tokens")
        if not got.examples:
            raise DataError(f"{path}: every example is longer than {block + 1} tokens; raise --block-size "
                            "(up to the model's context) or pass --too-long truncate")
        return got, notes

    train, notes = load(source)
    examples = train.examples
    if val_source:
        val, val_notes = load(val_source)
        notes += val_notes
        val_examples = val.examples
    else:
        held = [datasets.held_out(i, val_fraction) for i in range(len(examples))]
        val_examples = [e for e, h in zip(examples, held, strict=True) if h]
        examples = [e for e, h in zip(examples, held, strict=True) if not h]
        if not examples:
            raise DataError(f"{source}: no examples are left to train on after holding out --val-fraction "
                            f"{val_fraction}; give more examples or a separate --val-data")
    per_step = cfg.batch_size // micro
    batches = ExampleBatches(examples, batch_size=micro, per_step=per_step, pad_id=tokenizer.eot_id, seed=cfg.seed)
    val_batches = None
    if val_examples:
        val_batches = ExampleBatches(val_examples, batch_size=micro, per_step=per_step, pad_id=tokenizer.eot_id)
    else:
        notes.append("no validation examples: no early stopping")
    notes.insert(0, f"{len(examples)} training and {len(val_examples)} validation examples")
    return _Data(train=batches, val=val_batches, bytes_per_token=None, notes=notes)


# -- `gpt2lab finetune` ----------------------------------------------------------------------


def finetune(model: str, *, data: str, out: str, config: FinetuneConfig = COMMAND_DEFAULTS, resume: bool = False,
             data_format: DataFormat = "auto", template: str = DEFAULT_TEMPLATE, val_data: str = "",
             val_fraction: float = 0.05, too_long: TooLong = "skip", field: str = "text",
             merge: bool = False) -> str:
    """Fine-tune a GPT-2 checkpoint on your data, fully or with LoRA (the loop of `gpt2lab train`).

    Returns the run's report (the held-out loss before and after, where the checkpoints are); a run
    stopped by a signal raises Stopped with it. The arguments are `gpt2lab finetune`'s options, with
    `config` holding the training ones: see `gpt2lab finetune --help` for each.
    """
    cfg = config
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError("gpt2lab finetune runs in one process: run it without torchrun")
    if merge and cfg.method != "lora":
        raise TrainingError("--merge is for LoRA runs: full fine-tuning checkpoints are plain checkpoints already")
    run_dir = Path(out)
    if cfg.method == "lora" and adapter_folder(model) is not None:
        raise TrainingError(f"{model} is a LoRA adapter: merge it first (`gpt2lab lora merge {model} --out DIR`), "
                            "then fine-tune the merged checkpoint")
    resolve_device(cfg.device)  # a bad --device fails before any work
    # The run folder first: a busy or finished --out is refused before anything is written into it.
    run = open_run(run_dir, resume=resume)
    try:
        tokenizer = load_tokenizer(model)
        base = base_reference(model) if cfg.method == "lora" else {"path": str(_resolved(model))}
        cfg = dataclasses.replace(cfg, model=base["path"], lr=cfg.peak_lr)
        fmt = detect_format(data) if data_format == "auto" else data_format
        prompt = PromptTemplate(template) if fmt == "prompt-completion" else None  # a bad one fails before any work

        weights = load_for_finetuning(model, cfg, tokenizer)
        block = cfg.block_size or weights.config.n_ctx
        if block > weights.config.n_ctx:
            raise TrainingError(f"block_size {block} exceeds the model's context of {weights.config.n_ctx}")
        micro, _ = cfg.accumulation(1)
        if fmt == "prompt-completion":
            batches = _example_data(data, val_data, tokenizer, cfg=cfg, micro=micro, block=block, template=prompt,
                                    too_long=too_long, val_fraction=val_fraction)
        else:
            with files.writing_inside(run.path):  # OUT/data is the run's own, and only this command's
                batches = _text_data(data, val_data, run_dir, tokenizer, cfg=cfg, micro=micro, block=block,
                                     field=field, val_fraction=val_fraction)
        if cfg.patience and batches.val is None:
            cfg = dataclasses.replace(cfg, patience=0)

        record = {
            "format": "gpt2lab-finetune", "version": 1, "method": cfg.method, "base": base,
            "lora": cfg.lora.to_dict() if cfg.method == "lora" else None,
            "data": {"source": data, "format": fmt, "val_source": val_data or None},
            "prompt_template": prompt.text if prompt is not None else None,
        }
        if resume:
            _check_same_run(run.resume_from, record)
        if cfg.method == "lora":
            strategy = _lora_strategy(cfg.lora, base, record)
        else:
            strategy = Strategy(save=write_model_files, extra_files=_record_files(record))
        result = fit(weights, cfg, batches.train, val=batches.val, run_dir=run, tokenizer=tokenizer,
                     strategy=strategy, resume=resume, bytes_per_token=batches.bytes_per_token)
        report = _report(result, run_dir, weights, cfg.method, batches.notes, merge=merge)
        raise_if_stopped(result, report)
        return report
    finally:
        run.close()


def _report(result: FitResult, run_dir: Path, model: GPT, method: str, notes: list[str], *, merge: bool) -> str:
    """What the run trained and how it ended, its best checkpoint, and (with --merge) that merged."""
    lines = [f"{method} fine-tuning: {lora.trainable_parameters(model):,} of "
             f"{sum(p.numel() for p in model.parameters()):,} parameters trained", *notes, summary(result, run_dir)]
    if (change := held_out_change(run_dir)) is not None:
        lines.append(change)
    best = best_checkpoint(run_dir, result)
    if best is not None:
        lines.append(f"best checkpoint: {best}")
    if merge and best is not None:
        lines.append(_merge(best, run_dir / "merged", hf=False))
    return "\n".join(lines)


def _resolved(path: str) -> Path:
    return (adapter_folder(path) or resolve(path)[0]).resolve()


def held_out_change(run_dir: str | Path) -> str | None:
    """"held-out loss A -> B": the base model's validation loss (step 0) and the run's best."""
    path = Path(run_dir) / METRICS
    rows = files.read_jsonl(path, TrainingError) if path.is_file() else []
    rows = [r for r in rows if isinstance(r, dict) and "val_loss" in r]
    if len(rows) < 2 or rows[0]["step"] != 0:
        return None
    best = min(rows[1:], key=lambda r: r["val_loss"])
    key, unit = ("val_bpb", "bits/byte") if "val_bpb" in best and "val_bpb" in rows[0] else ("val_loss", "nats/token")
    return f"held-out loss: {rows[0][key]:.4f} {unit} before fine-tuning -> {best[key]:.4f} at step {best['step']}"


def best_checkpoint(run_dir: str | Path, result: FitResult | None = None) -> Path | None:
    """The run's best checkpoint (best.json), else its newest."""
    run_dir = Path(run_dir)
    if (run_dir / "best.json").is_file():
        record = files.read_json(run_dir / "best.json", TrainingError, "best-checkpoint record")
        name = record.get("checkpoint") if isinstance(record, dict) else None
        best = run_dir / str(name)
        if isinstance(name, str) and Path(name).parent == Path("checkpoints") and best.is_dir():
            return best
    return result.checkpoint if result is not None and result.checkpoint else latest_checkpoint(run_dir)


# -- `gpt2lab lora merge` --------------------------------------------------------------------


def merge(adapter: str, *, out: str, hf: bool = False, force: bool = False) -> str:
    """Merge a LoRA adapter into its base and write a plain checkpoint (or, with --hf, an HF folder).

    adapter: a LoRA adapter folder (a checkpoint of a LoRA fine-tuning run), or the run folder (its best checkpoint)
    out: a new or empty folder to write
    hf: write a Hugging Face GPT-2 folder instead of a gpt2lab checkpoint
    force: replace OUT if it holds a checkpoint of this kind that gpt2lab wrote (never anything else)
    """
    folder = Path(adapter)
    if not lora.is_adapter(folder) and (best := best_checkpoint(folder)) is not None:
        folder = best
    if adapter_folder(folder) is None:
        raise TrainingError(f"{adapter} is not a LoRA adapter (no {lora.ADAPTER_CONFIG}); full fine-tuning "
                            "checkpoints are plain already: use `gpt2lab convert` to export them")
    base = lora.read_adapter_config(adapter_folder(folder))[1]["base"]["path"]
    check_destination(out, to="hf" if hf else "gpt2lab", force=force, sources=[adapter, folder, base])
    return _merge(folder, Path(out), hf=hf)


def _merge(adapter: Path, out: Path, *, hf: bool) -> str:
    model = load_model(adapter)
    tokenizer = load_tokenizer(adapter)
    record = adapter / FINETUNE_RECORD  # the prompt template stays with the merged weights
    extra = {FINETUNE_RECORD: record.read_text(encoding="utf-8")} if record.is_file() else {}
    if hf:
        export_hf(model, out, tokenizer=tokenizer, extra_files=extra)
    else:
        save_checkpoint(model, out, tokenizer=tokenizer, extra_files=extra)
    return f"merged {adapter} into its base: {'HF folder' if hf else 'checkpoint'} {out}"

