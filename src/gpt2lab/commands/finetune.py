"""`gpt2lab finetune` and `gpt2lab lora merge`; the work is gpt2lab.finetune's."""

from __future__ import annotations

import dataclasses

import tyro

from .. import finetune as library
from ..finetune import COMMAND_DEFAULTS, DataFormat, FinetuneConfig, TooLong
from ..template import DEFAULT_TEMPLATE
from . import FLAT, Annotated, Model, positional


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(FinetuneConfig):
    """FinetuneConfig as options: the starting checkpoint is the MODEL argument, not an option."""

    model: Annotated[str, tyro.conf.Suppress] = ""


DEFAULTS = Options(**{f.name: getattr(COMMAND_DEFAULTS, f.name) for f in dataclasses.fields(FinetuneConfig)})


def finetune(model: Model, /, *, data: str, out: str, config: Annotated[Options, FLAT] = DEFAULTS, resume: bool = False,
             data_format: DataFormat = "auto", template: str = DEFAULT_TEMPLATE,
             val_data: str = "", val_fraction: float = 0.05, too_long: TooLong = "skip", field: str = "text",
             merge: bool = False) -> str:
    """Fine-tune a GPT-2 checkpoint on your data, fully or with LoRA (the loop of `gpt2lab train`).

    Args:
        model: the starting point: a gpt2lab checkpoint, a run folder (its newest), an HF folder or a Hub name (gpt2)
        data: text (a file, folder, catalog corpus like kjv, or prepared folder), or JSONL of prompt/completion rows
        out: the run folder: checkpoints/ (full models, or LoRA adapters), best.json, metrics.jsonl, loss.png
        resume: continue the run in --out from its newest checkpoint
        data_format: auto: prompt-completion for .jsonl files whose rows have those fields, else text
        template: how a prompt is shown to the model ({prompt} is replaced); saved in every checkpoint
        val_data: validation data in the same form as --data (default: hold out --val-fraction of it)
        val_fraction: share of --data held out for validation (whole documents, or examples)
        too_long: examples longer than block_size + 1 tokens: skip them (counted), truncate them, or error
        field: the text field of JSONL rows, for text data
        merge: with --method lora, also merge the best (else last) adapter into a checkpoint at OUT/merged
    """
    return library.finetune(model, data=data, out=out, config=config, resume=resume, data_format=data_format,
                            template=template, val_data=val_data, val_fraction=val_fraction, too_long=too_long,
                            field=field, merge=merge)


def merge(adapter: Annotated[str, positional("ADAPTER")], /, *, out: str, hf: bool = False, force: bool = False) -> str:
    """Merge a LoRA adapter into its base and write a plain checkpoint (or, with --hf, an HF folder).

    Args:
        adapter: a LoRA adapter (a checkpoint of a LoRA fine-tuning run), or the run folder (its best one)
        out: a new or empty folder to write
        hf: write a Hugging Face GPT-2 folder instead of a gpt2lab checkpoint
        force: replace OUT if it holds a checkpoint of this kind that gpt2lab wrote (never anything else)
    """
    return library.merge(adapter, out=out, hf=hf, force=force)
