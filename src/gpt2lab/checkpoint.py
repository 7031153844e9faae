"""Checkpoints: gpt2lab's own folders, Hugging Face GPT-2 folders, and conversion between them.

gpt2lab's format is a folder holding
    config.json        {"format": "gpt2lab", "version": 1, "model": {GPTConfig fields}}
    model.safetensors  the weights in our (nn.Linear) layout, the tied head stored once
    tokenizer/         the tokenizer's record (see Tokenizer.save)
plus whatever a trainer adds (train_state.pt). Folders are written under a temporary name and
renamed into place (files.atomic_dir), so a folder with this name is always complete; a folder
is written only where files.check_destination allows it.

Hugging Face folders (written by GPT2LMHeadModel.save_pretrained) hold config.json and one of
model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin. Their Conv1D
weights are the transposes of ours; everything else maps one to one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import files, hub, lora
from .config import GPTConfig
from .errors import CheckpointError, TokenizerMismatch
from .fetch import sha256_file
from .files import atomic_dir, write_json
from .model import GPT
from .tokenizer import GPT2_SHA256, Tokenizer, read_record

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
FINETUNE_RECORD = "finetune.json"  # what a fine-tuned checkpoint was trained from, and its prompt template
# HF's Conv1D stores these as (in, out); our nn.Linear as (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers that old HF checkpoints carry and that hold no learned state.
HF_IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


# -- writing ---------------------------------------------------------------------------------

# What gpt2lab writes into each kind of checkpoint folder (training runs add train_state.pt).
OUR_NAMES = ("config.json", WEIGHTS, "tokenizer", FINETUNE_RECORD, "train_state.pt")
HF_NAMES = ("config.json", WEIGHTS, "vocab.json", "merges.txt", "tokenizer_config.json", FINETUNE_RECORD)
EXPORT_MARK = "gpt2lab_export"  # a key of the HF config.json gpt2lab writes: HF keeps it as an attribute


def written_by_gpt2lab(folder: Path, kind: Literal["gpt2lab", "hf"]) -> bool:
    """Whether `folder` is a checkpoint of this kind that gpt2lab wrote, holding nothing else."""
    try:
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    if kind == "gpt2lab":
        return meta.get("format") == "gpt2lab" and files.only_names(folder, OUR_NAMES)
    return EXPORT_MARK in meta and files.only_names(folder, HF_NAMES)


def check_destination(dst: str | Path, *, to: Literal["gpt2lab", "hf"], force: bool,
                      sources: Iterable[str | Path] = ()) -> Path:
    """files.check_destination for a checkpoint folder: only a gpt2lab-written one of the same kind
    may be replaced (with force); never a run, a source or a folder holding one, or the user's files."""
    what = "Hugging Face folder written by gpt2lab" if to == "hf" else "gpt2lab checkpoint"
    return files.check_destination(dst, what=what, ours=lambda f: written_by_gpt2lab(f, to), force=force,
                                   sources=sources)


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with the tied head stored once, contiguous, on the CPU."""
    sd = _unwrap(model).state_dict()
    sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def write_model_files(model: torch.nn.Module, folder: Path, tokenizer: Any = None) -> None:
    """Write config.json, model.safetensors and the tokenizer record into an existing folder."""
    gpt = _unwrap(model)
    write_json(folder / "config.json",
               {"format": "gpt2lab", "version": FORMAT_VERSION, "model": gpt.config.to_dict()})
    save_file(state_dict_for_saving(gpt), str(folder / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer")


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take on disk (the tied head once)."""
    return sum(t.numel() * t.element_size() for t in state_dict_for_saving(model).values())


def save_checkpoint(model: torch.nn.Module, path: str | Path, *, tokenizer: Any = None,
                    extra_files: Mapping[str, str] | None = None) -> Path:
    """Save `model` as a gpt2lab checkpoint folder at `path`, atomically (check_destination first)."""
    with atomic_dir(path, needed=weights_bytes(model)) as tmp:
        write_model_files(model, tmp, tokenizer)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(path)


def export_hf(model: torch.nn.Module, path: str | Path, *, tokenizer: Any = None,
              extra_files: Mapping[str, str] | None = None) -> Path:
    """Write a folder that `transformers.GPT2LMHeadModel.from_pretrained` loads as is."""
    gpt = _unwrap(model)
    sd = {
        k: (v.t() if k.endswith(TRANSPOSED) else v).contiguous()
        for k, v in state_dict_for_saving(gpt).items()
    }
    with atomic_dir(path, needed=weights_bytes(gpt)) as tmp:
        write_json(tmp / "config.json", gpt.config.to_hf() | {EXPORT_MARK: FORMAT_VERSION})
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None and hasattr(tokenizer, "save_hf"):
            tokenizer.save_hf(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(path)


def _unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside DDP/FSDP/compile wrappers: checkpoints never carry wrapper prefixes."""
    while not isinstance(model, GPT):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a gpt2lab GPT model, got {type(model).__name__}")
        model = inner
    return model


# -- reading ---------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete `checkpoints/step-*` folder of a training run (a model or a LoRA adapter), or None."""
    steps = sorted(Path(run_dir).glob("checkpoints/step-*"))
    complete = [p for p in steps if ((p / "config.json").is_file() and (p / WEIGHTS).is_file())
                or ((p / lora.ADAPTER_CONFIG).is_file() and (p / lora.ADAPTER_WEIGHTS).is_file())]
    return complete[-1] if complete else None


def adapter_folder(path: str | Path) -> Path | None:
    """The LoRA adapter folder that `path` names (itself, or a run's newest checkpoint), or None."""
    path = Path(path)
    if lora.is_adapter(path):
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        latest = latest_checkpoint(path)
        if latest is not None and lora.is_adapter(latest):
            return latest
    return None


def resolve(path: str | Path) -> tuple[Path, Literal["gpt2lab", "hf"]]:
    """The checkpoint folder that `path` names, and its format. A run folder gives its newest;
    a Hub name (`gpt2`, `owner/name[@revision]`) that is not a local path, its downloaded snapshot."""
    if not Path(path).exists() and hub.is_hub_name(path):
        path = hub.download(str(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a checkpoint folder, a run folder or an HF folder")
    if path.is_file():
        raise CheckpointError(f"{path} is a file: give the folder that holds config.json and the weights")
    config = path / "config.json"
    if not config.is_file():
        if (adapter := adapter_folder(path)) is not None:
            raise CheckpointError(f"{adapter} is a LoRA adapter, not a full checkpoint: load it with load_model, "
                                  "or write a plain checkpoint with `gpt2lab lora merge`")
        if (latest := latest_checkpoint(path)) is not None:
            return resolve(latest)
        raise CheckpointError(f"{path} is not a GPT-2 checkpoint: it has no config.json (nor checkpoints/step-*)")
    meta = read_config_json(config)
    if meta.get("format") == "gpt2lab":
        return path, "gpt2lab"
    if meta.get("model_type") == "gpt2":
        return path, "hf"
    raise CheckpointError(
        f"{config} describes neither a gpt2lab checkpoint nor an HF GPT-2 model "
        f"(model_type={meta.get('model_type')!r}); gpt2lab loads GPT-2 only"
    )


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} holds a {type(meta).__name__}, expected a JSON object")
    return meta


def load_config(path: str | Path) -> GPTConfig:
    """The GPTConfig of a checkpoint, run or HF folder, without reading the weights."""
    folder, fmt = resolve(path)
    meta = read_config_json(folder / "config.json")
    try:
        if fmt == "gpt2lab":
            if meta.get("version", 0) > FORMAT_VERSION:
                raise CheckpointError(f"{folder} was written by a newer gpt2lab (format {meta['version']})")
            return GPTConfig.from_dict(meta["model"])
        return GPTConfig.from_hf(meta)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / 'config.json'}: invalid model config ({e})") from e


def load_model(path: str | Path, *, dtype: torch.dtype | Callable[[str], torch.dtype] | None = None,
               device: torch.device | str = "cpu", tokenizer: Tokenizer | None = None, copy: bool = False) -> GPT:
    """Load a gpt2lab checkpoint, a training run's newest checkpoint, an HF GPT-2 folder, or a model
    named on the Hugging Face Hub (`gpt2`, `owner/name[@revision]`; a local path of that name wins).

    The model is built on the meta device and the loaded tensors are assigned to it, so the
    weights are held in memory once. Returns the model in eval mode. Given a `tokenizer`, raises
    TokenizerMismatch unless it is the one the checkpoint records (or fits, if it records none).
    A LoRA adapter folder (or a LoRA run) loads the base it names, checks that base's weights are
    the ones it was trained on, and returns the base with the adapter merged in: a plain GPT.

    dtype: every tensor's dtype, or a function from a tensor's name to its dtype (None: as stored).
    copy: give each tensor contiguous memory of its own, read and converted one at a time (for
          training, which writes to them), instead of copy-on-write views of the file.
    """
    if (adapter := adapter_folder(path)) is not None:
        _, meta = lora.read_adapter_config(adapter)
        model = load_model(check_adapter_base(adapter, meta["base"]), dtype=dtype, device=device,
                           tokenizer=tokenizer, copy=copy)
        lora.load_adapter(model, adapter)
        return lora.merge_lora(model).eval()
    model, tensors = open_weights(path, tokenizer=tokenizer, copy=copy)
    sd = {}
    for name, t in tensors:
        t = t.to(device=device, dtype=(dtype(name) if callable(dtype) else dtype) or t.dtype)
        sd[name] = t.contiguous() if copy else t
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd, assign=True)
    model.tie_weights()
    return model.eval()


def open_weights(path: str | Path, *, tokenizer: Tokenizer | None = None,
                 copy: bool = False) -> tuple[GPT, Iterator[tuple[str, torch.Tensor]]]:
    """A checkpoint's model on the meta device (to be filled) and its weights, as read_tensors gives
    them; raises TokenizerMismatch first if `tokenizer` is not the checkpoint's."""
    folder, fmt = resolve(path)
    cfg = load_config(folder)
    if tokenizer is not None:
        check_tokenizer(folder, fmt, cfg, tokenizer)
    with torch.device("meta"):
        model = GPT(cfg)
    return model, read_tensors(folder, fmt, model, copy=copy)


def read_tensors(folder: Path, fmt: str, model: GPT, *, copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Each weight of a resolved checkpoint folder (our names and layout; the tied head once), largest
    first, checked against `model`'s (a meta model's) names and shapes; raises if any is missing.

    copy=False gives copy-on-write views of the file (safetensors and .bin are mmap'd), so weights used
    as they are take no memory twice. copy=True reads each tensor into memory of its own with plain
    reads: a loader that converts tensor by tensor (quantize.load) then holds only what it keeps,
    where the mmap'd pages it had read would count as resident until the file is closed.
    """
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    stored = _read_weights(folder, fmt, copy=copy)
    for name, (source, _) in stored.items():
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}; this is not a GPT-2 state dict")
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    for name in sorted(stored, key=lambda n: -math.prod(expected[n])):
        source, read = stored[name]
        t = read()
        if fmt == "hf" and name.endswith(TRANSPOSED):
            # No .contiguous(): a transposed view multiplies as fast as a copy, so weights stay held once.
            t = t.t()
        if t.shape != expected[name]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(expected[name])}; the weights and the config do not match"
            )
        yield name, t


def prompt_template(path: str | Path) -> str | None:
    """The prompt template a checkpoint was fine-tuned with ({prompt} marks the prompt), or None."""
    folder = adapter_folder(path) or resolve(path)[0]
    record = folder / FINETUNE_RECORD
    return read_config_json(record).get("prompt_template") if record.is_file() else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a model was trained with: a gpt2lab checkpoint's tokenizer/ record, an HF folder's
    vocab.json + merges.txt, a run folder's newest checkpoint's, a Hub model's, or a bare tokenizer folder.
    A checkpoint that records none was made with GPT-2's. A LoRA adapter gives its base's."""
    path = Path(path)
    if (adapter := adapter_folder(path)) is not None:
        if (adapter / "tokenizer").is_dir():
            return Tokenizer.from_dir(adapter / "tokenizer")
        return load_tokenizer(lora.read_adapter_config(adapter)[1]["base"]["path"])
    if path.is_dir() and not (path / "config.json").is_file() and latest_checkpoint(path) is None:
        return Tokenizer.from_dir(path)
    folder, fmt = resolve(path)
    return recorded_tokenizer(folder, fmt) or Tokenizer.gpt2()


def recorded_tokenizer(folder: Path, fmt: str) -> Tokenizer | None:
    """The tokenizer stored with a resolved checkpoint folder, or None if it stores none."""
    if fmt == "gpt2lab":
        return Tokenizer.from_dir(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return Tokenizer.from_dir(folder)
    return None


def check_tokenizer(folder: Path, fmt: str, cfg: GPTConfig, tokenizer: Tokenizer) -> None:
    """Raise TokenizerMismatch if `tokenizer` is not the one the checkpoint was trained with."""
    record = read_record(folder / "tokenizer") if fmt == "gpt2lab" else None
    if record is not None:
        name, sha = record.get("name"), record.get("sha256")
    elif (recorded := recorded_tokenizer(folder, fmt)) is not None:
        name, sha = recorded.name, recorded.sha256
    else:
        name, sha = None, None
    if sha is not None and sha != tokenizer.sha256:
        hint = "gpt2lab.Tokenizer.gpt2()" if sha == GPT2_SHA256 else f"gpt2lab.load_tokenizer({str(folder)!r})"
        raise TokenizerMismatch(
            f"{folder} was trained with tokenizer {name} (sha256 {sha[:12]}...), not {tokenizer.name} "
            f"(sha256 {tokenizer.sha256[:12]}...): the ids would mean other tokens; use {hint}"
        )
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TokenizerMismatch(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but {folder} embeds only {cfg.vocab_size}; "
            "use the tokenizer the model was trained with"
        )


def weights_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint's weight files (of their hashes, when there are several): its identity."""
    folder, fmt = resolve(path)
    hashes = [sha256_file(f) for f in _weight_files(folder, fmt)]
    return hashes[0] if len(hashes) == 1 else hashlib.sha256(" ".join(hashes).encode()).hexdigest()


def base_reference(path: str | Path) -> dict[str, Any]:
    """What a LoRA adapter records of its base: the resolved folder, its format, weights hash and config."""
    folder, fmt = resolve(path)
    return {"path": str(folder.resolve()), "format": fmt, "sha256": weights_sha256(folder),
            "config": load_config(folder).to_dict()}


def check_adapter_base(adapter: Path, base: dict[str, Any]) -> Path:
    """The base folder an adapter names, once its weights are checked to be those it was trained on."""
    folder = Path(base["path"])
    if not folder.exists():
        raise CheckpointError(f"{adapter} adapts the base model {folder}, which no longer exists; put it back, "
                              f"or set base.path in {adapter / lora.ADAPTER_CONFIG} to where it is now")
    if weights_sha256(folder) != base["sha256"]:
        raise CheckpointError(f"{adapter} was trained on a base {folder} whose weights had sha256 "
                              f"{base['sha256'][:12]}..., but that folder now holds other weights; "
                              "the adapter would not fit them")
    return folder


Reader = tuple[str, Any]


def _weight_files(folder: Path, fmt: str) -> list[Path]:
    """The files holding a resolved checkpoint folder's weights."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (index := folder / "model.safetensors.index.json").is_file():
        weight_map = read_config_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map; the sharded checkpoint is corrupt")
        names = sorted(set(weight_map.values()))
        for name in names:  # a shard index may only name files inside its own folder
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"{index} names the weights file {name!r}, which is not inside {folder}; "
                                      "gpt2lab loads only files from the checkpoint's own folder")
        return [folder / f for f in names]
    if fmt == "hf" and (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(
        f"{folder} has config.json but no weights: expected {WEIGHTS}, "
        "model.safetensors.index.json or (HF) pytorch_model.bin"
    )


def _read_weights(folder: Path, fmt: str, *, copy: bool = False) -> dict[str, Reader]:
    """Map each tensor name (our naming) to (source file, a function that reads it): see read_tensors."""
    files = _weight_files(folder, fmt)
    if files[0].name == "pytorch_model.bin":
        return _read_torch_bin(files[0], copy=copy)
    out: dict[str, Reader] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weights file {f} is missing (named by the shard index)")
        if copy:
            out |= {name: (str(f), read) for key, read in _plain_readers(f).items()
                    if (name := _our_name(key) if fmt == "hf" else key) is not None}
            continue
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
            keys = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it is truncated or corrupt") from e
        for key in keys:
            name = _our_name(key) if fmt == "hf" else key
            if name is not None:
                out[name] = (str(f), _safe_reader(handle, key, f))
    return out


def _safe_reader(handle: Any, key: str, f: Path):
    def read() -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {key!r} cannot be read ({e}); the file is truncated or corrupt") from e
    return read


# safetensors' dtype names for the floating-point tensors a GPT-2 checkpoint holds.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _plain_readers(f: Path) -> dict[str, Any]:
    """A reader per tensor of a safetensors file that copies it into fresh memory with plain reads.

    The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} and the data. safetensors' own reader mmaps the whole file, whose pages then
    stay in this process's resident set until it is closed, so a loader converting tensor by
    tensor would be charged for the whole file.
    """
    corrupt = f"{f} is not a readable safetensors file ({{}}); it is truncated or corrupt"
    try:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if size <= 100_000_000 else None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(corrupt.format(e)) from e
    if not isinstance(header, dict):
        raise CheckpointError(corrupt.format("no JSON header"))
    header.pop("__metadata__", None)
    start = 8 + size

    def reader(key: str, entry: Any):
        def read() -> torch.Tensor:
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = [int(n) for n in entry["shape"]]
                begin, end = (int(n) for n in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{f}: tensor {key!r} is not a floating-point tensor this loader reads "
                                      f"({e}); the checkpoint is corrupt or not GPT-2's") from e
            t = torch.empty(shape, dtype=dtype)
            if end - begin != t.numel() * t.element_size():
                raise CheckpointError(f"{f}: tensor {key!r} has {end - begin} bytes for shape {tuple(shape)}")
            with open(f, "rb") as fh:
                fh.seek(start + begin)
                got = fh.readinto(t.view(-1).view(torch.uint8).numpy())
            if got != end - begin:
                raise CheckpointError(corrupt.format(f"tensor {key!r} is cut short"))
            return t

        return read

    return {key: reader(key, entry) for key, entry in header.items()}


def _read_torch_bin(f: Path, *, copy: bool = False) -> dict[str, Reader]:
    try:
        # weights_only: never unpickle arbitrary objects; mmap: tensors stay on disk until used.
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"{f} cannot be read as a weights-only PyTorch file ({e}); it is corrupt or unsafe"
        ) from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f} holds a {type(sd).__name__}, not a state dict")
    return {name: (str(f), (lambda t=t: t.clone()) if copy else (lambda t=t: t))
            for key, t in sd.items() if (name := _our_name(key)) is not None}


def _our_name(hf_key: str) -> str | None:
    """Our name for an HF GPT2LMHeadModel/GPT2Model key, or None for keys that hold no state."""
    if hf_key.endswith(HF_IGNORED):
        return None
    return hf_key if hf_key.startswith("transformer.") else f"transformer.{hf_key}"


# -- conversion and inspection ---------------------------------------------------------------


def convert(src: str, dst: str, *, to: Literal["hf", "gpt2lab"] = "gpt2lab", force: bool = False) -> str:
    """Convert a checkpoint between gpt2lab's format and a Hugging Face GPT-2 folder.

    src: a gpt2lab checkpoint, run folder, HF folder, or Hub model name (gpt2, owner/name[@revision])
    dst: a new or empty folder to write
    to:  the format to write
    force: replace DST if it holds a checkpoint of this kind that gpt2lab wrote (never anything else)
    """
    folder, fmt = resolve(src)
    check_destination(dst, to=to, force=force, sources=[src, folder])
    model = load_model(folder)
    tokenizer = recorded_tokenizer(folder, fmt)  # carried across when the source has one
    if to == "hf":
        export_hf(model, dst, tokenizer=tokenizer)
    else:
        save_checkpoint(model, dst, tokenizer=tokenizer)
    return f"wrote {to} checkpoint to {dst}"


def info(path: str) -> dict[str, Any]:
    """Describe a checkpoint: format, config, parameter count and size on disk.

    path: a gpt2lab checkpoint, run folder, HF folder, LoRA adapter, or Hub model name (gpt2, owner/name)
    """
    if (adapter := adapter_folder(path)) is not None:
        config, meta = lora.read_adapter_config(adapter)
        folder, fmt = adapter, "gpt2lab-lora"
        extra = {"lora": config.to_dict(), "base": meta["base"]["path"],
                 "adapter_parameters": lora.safetensors_numel(adapter / lora.ADAPTER_WEIGHTS)}
        cfg = GPTConfig.from_dict(meta["base"]["config"])
    else:
        folder, fmt = resolve(path)
        cfg, extra = load_config(folder), {}
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"path": str(folder), "format": fmt, "config": cfg.to_dict(),
            "parameters": cfg.num_params(), **extra, "size_on_disk_bytes": size,
            "size_on_disk": f"{size / 2**20:.1f} MiB"}
