"""`gpt2lab estimate`: the memory and time of a training run, before running it; the model of
both is gpt2lab.estimate's."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from ..config import PRESETS, GPTConfig, TrainConfig, preset
from ..errors import ConfigError
from ..estimate import Estimate, Setup, gpu_peak, machine_memory, parse_bytes
from ..estimate import estimate as estimate_run
from ..lora import LoRAConfig
from . import Annotated, Model, flag

GPT2_VOCAB = 50257
LORA = LoRAConfig()


def estimate(model: Model, /, *, batch_size: int = 8, block_size: int = 0, micro_batch: int = 0,
             method: Literal["full", "lora"] = "full", lora: LoRAConfig = LORA,
             precision: Literal["auto", "fp32", "bf16"] = "auto", gradient_checkpointing: bool = False,
             devices: int = 1, fsdp: bool = False, device: str = "cpu", device_memory: str = "",
             mfu: float = 0.4, peak_tflops: float = 0.0,
             as_json: Annotated[bool, flag("json")] = False) -> str | dict[str, Any]:
    """Estimate a training run's memory per device, FLOPs and time per step, without running it.

    Args:
        model: a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-nano, gpt2-micro, gpt2-mini; GPT-2's 50257
            ids), a checkpoint, run or HF folder, or a Hub name (only its config.json is read)
        batch_size: sequences per optimizer step, over all devices
        block_size: tokens per sequence (0: the model's context length)
        micro_batch: sequences per forward pass on each device (0: batch_size / devices); the rest is accumulation
        method: full: train every weight; lora: a frozen base and low-rank adapters (gpt2lab finetune --method lora)
        lora: the adapters' rank and target layers, for --method lora
        precision: auto: as training decides (bf16 on a GPU, and on this CPU if it has native bf16); bf16: bf16
            autocast (fp32 master weights)
        gradient_checkpointing: plan for recomputing activations in backward (both are shown anyway)
        devices: processes (one per device) sharing the batch under torchrun
        fsdp: shard weights, gradients and optimizer state over the devices (FSDP2) instead of DDP
        device: cpu, cuda (this machine's GPU), or a GPU name for its data-sheet peak (H100, H200, A100, ...)
        device_memory: memory of one device, such as 24GiB or 80GB (default: this machine's RAM on cpu, the GPU's
            own with cuda)
        mfu: model FLOPs utilisation to assume for the time per step
        peak_tflops: peak TFLOP/s of one device (0: the data sheet of a named GPU; give it for cpu)
        as_json: print a JSON object instead of the table
    """
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    if not (peak_tflops >= 0 and math.isfinite(peak_tflops)):
        raise ConfigError(f"--peak-tflops must be a finite number, 0 or more, got {peak_tflops}")
    cfg = _model_config(model)
    kind, gpu_name, memory = _device(device)
    if device_memory:
        memory = parse_bytes(device_memory)
    if precision == "auto":
        precision = "bf16" if TrainConfig().bf16(kind, cfg.n_embd) else "fp32"
    setup = Setup(batch_size=batch_size, block_size=block_size or cfg.n_ctx, micro_batch=micro_batch, method=method,
                  lora=lora, precision=precision, gradient_checkpointing=gradient_checkpointing, devices=devices,
                  fsdp=fsdp, device=kind)
    est = estimate_run(cfg, setup)
    peak = peak_tflops * 1e12 if peak_tflops else (gpu_peak(gpu_name, precision) if gpu_name else None)
    seconds = est.step_seconds(peak, mfu, devices) if peak else None
    report = {
        "model": model, "config": cfg.to_dict(), "setup": dataclasses.asdict(setup) | {"lora": lora.to_dict()},
        **{k: v for k, v in dataclasses.asdict(est).items() if k != "activations"},
        "activations": dataclasses.asdict(est.activations),
        "device_memory": memory, "fits": None if memory is None else est.peak <= memory,
        "peak_flops": peak, "mfu": mfu, "step_seconds": seconds,
        "tokens_per_second": est.tokens_per_step / seconds if seconds else None,
    }
    return report if as_json else _table(model, setup, est, report, gpu_name)


def _model_config(model: str) -> GPTConfig:
    if model in PRESETS:
        return preset(model, vocab_size=GPT2_VOCAB)
    from ..checkpoint import load_config  # torch and the Hub client: only for a model that is not a preset
    from ..hub import is_hub_name

    if not Path(model).exists() and not is_hub_name(model):
        raise ConfigError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder "
                          "or Hub name (owner/name)")
    return load_config(model)


def _device(name: str) -> tuple[Literal["cpu", "cuda"], str | None, int | None]:
    """(cpu or cuda, the GPU's name for its data-sheet peak, the device's memory if known here)."""
    if name == "cpu":
        return "cpu", None, machine_memory()
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no GPU; name one instead (--device H100)")
        return "cuda", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory
    if gpu_peak(name, "bf16") is None:
        from ..metrics import GPU_PEAKS

        raise ConfigError(f"unknown --device {name!r}: cpu, cuda, or a GPU name ({', '.join(GPU_PEAKS)})")
    return "cuda", name, None


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def _table(model: str, setup: Setup, est: Estimate, r: dict[str, Any], gpu_name: str | None) -> str:
    acts = est.activations
    where = gpu_name or ("this machine's GPU" if setup.device == "cuda" else "CPU")
    shared = f"FSDP over {setup.devices}" if setup.fsdp else f"DDP over {setup.devices}" if setup.devices > 1 else "1"
    lines = [
        f"{model}: {setup.method} training, {setup.precision}, batch {setup.batch_size} x {setup.block_size} tokens "
        f"(micro-batch {est.micro_batch}, accumulation {est.accumulation}), devices {shared}, {where}",
        f"  parameters            {est.parameters:,} ({est.trainable:,} trained)",
        "memory per device",
        f"  weights               {_size(est.weights)}",
        f"  gradients             {_size(est.gradients)}",
        f"  optimizer state       {_size(est.optimizer)}",
        f"  activations           {_size(acts.saved)} "
        + (f"with gradient checkpointing ({_size(acts.without_checkpointing)} without)" if setup.gradient_checkpointing
           else f"({_size(acts.with_checkpointing)} with gradient checkpointing)"),
        f"  around the peak       {_size(acts.transient)} (the head's chunks and gradients"
        f"{', a recomputed block' if setup.gradient_checkpointing else ''}), "
        f"{_size(est.optimizer_step)} in the optimizer step",
        f"  runtime overhead      {_size(est.overhead)}",
        f"  peak                  {_size(est.peak)} in the {est.peak_at}"
        f"{' (with gradient checkpointing)' if setup.gradient_checkpointing else ''}",
    ]
    if r["device_memory"] is not None:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {_size(r['device_memory'])}")
    lines += ["compute", f"  FLOPs per token       {est.flops_per_token / 1e6:,.1f} M"]
    if r["step_seconds"] is not None:
        lines.append(f"  time per step         {r['step_seconds']:,.3g} s at {r['mfu']:.0%} MFU of "
                     f"{r['peak_flops'] / 1e12:,.4g} TFLOP/s per device ({r['tokens_per_second']:,.0f} tokens/s)")
    else:
        lines.append("  time per step         give --peak-tflops (or --device H100, ...) for a time")
    return "\n".join(lines)
