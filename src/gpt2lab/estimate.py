"""Plan before you run: the memory, FLOPs and time of one of gpt2lab's training steps, on paper.

    estimate(model_config, setup)  -> Estimate: parameters, memory per device by kind, the peak,
                                      FLOPs per token and (given a peak and an MFU) seconds per step

The model is of gpt2lab's own loop (train.fit) and model (model.GPT), from first principles: bytes
per parameter for each state, and the activations autograd saves in GPT.forward, per token and
layer, as counted with torch.autograd.graph.saved_tensors_hooks (tests/test_estimate.py holds the
counts and checks the whole against the peak RSS of real CPU training steps). Nothing here runs
a model or allocates a tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .config import GPTConfig, TrainConfig
from .errors import ConfigError
from .lora import LoRAConfig
from .loss import CHUNK, COMPILE_FROM
from .metrics import GPU_PEAKS, flops_per_token

MiB = 1 << 20

# A gpt2lab training process before its model holds private memory (Python, torch and gpt2lab's
# objects, torch's CPU runtime and thread pool, the matmul that measures the CPU's peak, the loop's
# own objects: 220 MiB, measured as fit() on a 1-layer, 8-wide model; tests/test_estimate.py measures
# it again) and the pages of torch's libraries it has run. Those are shared and clean, and how many
# count in RSS depends on the page cache: 95 MiB here, 175 MiB just after torch was installed (the
# kernel then maps the freshly written library in larger folios).
CPU_PRIVATE = 220 * MiB
CPU_CODE = 110 * MiB
CPU_OVERHEAD = CPU_PRIVATE + CPU_CODE
# torch.compile's Inductor, which the fused head loads for large chunks of logits (loss.py).
COMPILER = 85 * MiB
# On a GPU: the CUDA context and cuBLAS's workspace, which torch.cuda.memory_allocated() does not
# count but the device's memory holds (typically 0.5 GiB with recent drivers; not measured here).
GPU_OVERHEAD = 512 * MiB

# The four linear layers of a block: (name, in_features / C, out_features / C).
LINEARS = (("attn.c_attn", 1, 3), ("attn.c_proj", 1, 1), ("mlp.c_fc", 1, 4), ("mlp.c_proj", 4, 1))


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What a run does with its model: the training options that decide memory and time."""

    batch_size: int
    """Sequences per optimizer step, over all devices."""
    block_size: int
    """Tokens per sequence."""
    micro_batch: int = 0
    """Sequences per forward pass on each device (0: batch_size / devices)."""
    method: Literal["full", "lora"] = "full"
    """full: every weight trains; lora: a frozen base and low-rank adapters."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA's rank and target layers, for method lora."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast (fp32 master weights; LoRA holds its frozen base in bf16)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    devices: int = 1
    """Processes (one per device) that share the batch: DDP, or FSDP with fsdp."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state over the devices (FSDP2) instead of replicating them."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the run trains: decides the fixed overhead and how AdamW steps."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_size", "devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.micro_batch < 0:
            raise ConfigError(f"micro_batch must be 0 or positive, got {self.micro_batch}")
        if self.method not in ("full", "lora"):
            raise ConfigError(f"method must be full or lora, got {self.method!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        if self.method == "lora" and self.devices > 1:
            raise ConfigError("LoRA fine-tuning (gpt2lab finetune) runs in one process: use --devices 1")
        if self.fsdp and self.devices == 1:
            raise ConfigError("--fsdp shards over several devices: give --devices N with N > 1")
        self.accumulation()  # batch_size must split evenly over the devices and micro-batches

    def accumulation(self) -> tuple[int, int]:
        """(micro-batch, gradient accumulation steps) on each device, by train.py's own rule."""
        return TrainConfig(batch_size=self.batch_size, micro_batch=self.micro_batch).accumulation(self.devices)


@dataclass(frozen=True, kw_only=True)
class Activations:
    """What autograd keeps between the forward and the backward pass, in bytes per device."""

    saved: int
    """Saved for backward at the end of the forward pass (as this run checkpoints, or not)."""
    without_checkpointing: int
    """`saved` when every block keeps its activations."""
    with_checkpointing: int
    """`saved` when each block keeps only its input and recomputes the rest in backward."""
    transient: int
    """Live only around the peak, on top of `saved`: the logits' gradients, a recomputed block."""


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """One training step of one device, on paper. Memory in bytes, per device."""

    parameters: int
    """All of the model's parameters (the tied head counted once), adapters included."""
    trainable: int
    """The parameters the optimizer updates."""
    micro_batch: int
    accumulation: int
    weights: int
    """The weights this device holds: fp32 (a LoRA base in bf16 with bf16), sharded under FSDP."""
    gradients: int
    """fp32 gradients of the trainable weights (sharded under FSDP; DDP's buckets double them)."""
    optimizer: int
    """AdamW's two fp32 moments per trainable weight (sharded under FSDP)."""
    activations: Activations
    optimizer_step: int
    """AdamW's temporaries while it steps."""
    overhead: int
    """The process or CUDA context before any model (CPU_OVERHEAD, GPU_OVERHEAD)."""
    peak: int
    """The most this device holds at once: in the backward pass, or in the optimizer step."""
    peak_at: str
    """When the peak happens."""
    flops_per_token: float
    """Model FLOPs per trained token, as MFU counts them (recomputation not included)."""
    tokens_per_step: int
    """Tokens of one optimizer step, over all devices."""

    def step_seconds(self, peak_flops: float, mfu: float, devices: int) -> float:
        """Seconds per optimizer step when each of `devices` runs at `mfu` of `peak_flops` FLOP/s."""
        return self.flops_per_token * self.tokens_per_step / (peak_flops * mfu * devices)


def estimate(cfg: GPTConfig, setup: Setup) -> Estimate:
    """The memory and FLOPs of one training step of a `cfg`-shaped GPT as gpt2lab's fit() runs it."""
    micro, accum = setup.accumulation()
    if setup.block_size > cfg.n_ctx:
        raise ConfigError(f"block_size {setup.block_size} exceeds the model's context of {cfg.n_ctx}")
    L, C, V, nh = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_head
    BT = micro * setup.block_size  # tokens of one forward pass
    n = cfg.num_params()
    lora, bf16, gpu = setup.method == "lora", setup.precision == "bf16", setup.device == "cuda"
    shards = setup.devices if setup.fsdp else 1

    adapted = _adapted(setup.lora.targets) if lora else []
    adapter = L * sum(setup.lora.rank * (i + o) * C for i, o in adapted)  # A (r, in) and B (out, r)
    trainable = adapter if lora else n
    # A bf16 LoRA run holds the frozen Linear weights and biases of its blocks in bf16 (finetune:
    # load_model with lora.frozen_bf16); embeddings, LayerNorms and every trained weight are fp32.
    block_linears = L * (12 * C * C + 9 * C)
    weights = (4 * n - (2 * block_linears if bf16 else 0) + 4 * adapter) if lora else 4 * n
    gradients = 4 * trainable
    optimizer = 8 * trainable  # exp_avg and exp_avg_sq
    if setup.devices > 1 and not setup.fsdp:
        gradients *= 2  # DDP's buckets are a copy of the gradients (gradient_as_bucket_view is off)

    # Bytes per token and layer that autograd saves (counted with saved_tensors_hooks):
    # fp32: the block's input x, ln_1's output, q|k|v (3C, one tensor), attention's output (which is
    #       also c_proj's input), the residual after attention, ln_2's output, c_fc's output (4C),
    #       the GELU's output (4C): 16 C floats; + LayerNorm's mean and rstd, SDPA's logsumexp.
    # bf16 autocast (LoRA's too): the two residuals stay fp32 (8 C bytes), the other 14 C values are
    # bf16 casts. LoRA adds each adapter's rank-r input to B.
    half = 2 if bf16 else 4
    per_layer = (36 if bf16 else 64) * C + 16 + 4 * nh
    per_layer += len(adapted) * setup.lora.rank * half
    residual = 4  # bytes of a residual-stream value: fp32 always
    block_input = residual * C  # what a checkpointed block keeps
    # After the blocks: ln_f's input (and its mean and rstd). The fused head (loss.py) keeps no
    # logits: it computes the gradients of its input (fp32, C a token) and, unless LoRA froze it, of
    # its weight (fp32, V x C) in the forward pass, and saves those. LoRA keeps nothing for the
    # first block's input (wte + wpe), which needs no gradient.
    head = residual * C + 8 + 4 * C
    head_weight = 0 if lora else 4 * V * C
    first = residual * C + 8 if lora else 0
    # Autocast casts each weight a Linear uses to bf16 once per forward; the Linear saves the copy
    # for backward. A LoRA run's block Linears are bf16 already: only its adapters are cast.
    casts_block = (2 * adapter // L if lora else 2 * 12 * C * C) if bf16 else 0
    plain = BT * (L * per_layer + head - first) + L * casts_block + head_weight
    checkpointed = BT * (L * block_input + head) + head_weight
    saved = checkpointed if setup.gradient_checkpointing else plain
    # Transients: the head's forward holds a chunk of logits and of probabilities in the matmul's
    # dtype, its input and weight cast to it, and under bf16 each chunk's weight gradient before it
    # is added in fp32; backward starts by scaling the two saved gradients into new tensors. A
    # checkpointed run then holds one recomputed block (and its weights' casts) at a time, beside
    # the head's weight gradient.
    rows = min(CHUNK, BT)
    head_forward = 2 * half * rows * V + ((BT * C + V * C + (0 if lora else V * C)) * 2 if bf16 else 0)
    head_backward = 4 * BT * C + head_weight
    recompute = BT * per_layer + casts_block if setup.gradient_checkpointing else 0
    transient = max(head_forward, head_backward, recompute + head_weight)
    acts = Activations(saved=saved, without_checkpointing=plain, with_checkpointing=checkpointed,
                       transient=transient)

    # AdamW steps tensor by tensor on CPU (sqrt(exp_avg_sq) / bias correction: two temporaries the
    # size of the largest trained tensor, the embedding) and with foreach kernels on GPU (one
    # temporary for every moment at once).
    largest = max(V * C, 4 * C * C) if not lora else max(setup.lora.rank * 4 * C, 1)
    step_temp = 4 * trainable // shards if gpu else 2 * 4 * largest

    # FSDP2 gathers whole weights while they compute: the root's (embeddings, ln_f) for the whole
    # step, and a block's (with the next one prefetched).
    if setup.fsdp:
        root = 4 * (V * C + cfg.n_ctx * C + 2 * C)
        gathered = root + 2 * 4 * (12 * C * C + 13 * C)
        weights, gradients, optimizer = weights // shards + gathered, gradients // shards, optimizer // shards

    overhead = GPU_OVERHEAD if gpu else CPU_OVERHEAD + (COMPILER if rows * V >= COMPILE_FROM else 0)
    # Gradients exist during backward only when an earlier micro-batch left them (accumulation).
    held_in_backward = weights + optimizer + (gradients if accum > 1 else 0)
    backward = held_in_backward + saved + transient
    step = weights + gradients + optimizer + step_temp
    peak, peak_at = (backward, "backward pass") if backward >= step else (step, "optimizer step")

    flops = flops_per_token(cfg, setup.block_size)
    if lora:  # a frozen weight needs no gradient of its own: 4 FLOPs per weight, not 6, plus the adapters'
        flops += -2.0 * (n - cfg.n_ctx * C) + 6.0 * adapter
    return Estimate(
        parameters=n + adapter, trainable=trainable, micro_batch=micro, accumulation=accum,
        weights=weights, gradients=gradients, optimizer=optimizer, activations=acts, optimizer_step=step_temp,
        overhead=overhead, peak=peak + overhead, peak_at=peak_at, flops_per_token=flops,
        tokens_per_step=setup.batch_size * setup.block_size,
    )


def _adapted(targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """(in / C, out / C) of each linear of a block that LoRA adapts: a name ending in "." + a target."""
    return [(i, o) for name, i, o in LINEARS if any(f"h.0.{name}".endswith("." + t) for t in targets)]


def gpu_peak(name: str, precision: str) -> float | None:
    """A GPU's dense data-sheet peak FLOP/s for the precision (metrics.GPU_PEAKS), or None if unknown."""
    for key, (bf16, fp32) in GPU_PEAKS.items():
        if key.lower() in name.lower():
            return bf16 if precision == "bf16" else fp32
    return None


def machine_memory() -> int:
    """This machine's RAM in bytes (what a CPU run has to fit in)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '512 MiB', '1e9' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and m[2].lower()
    if m is None or unit not in _UNITS or float(m[1]) <= 0:
        raise ConfigError(f"a memory size like 24GiB, 80GB or 512MiB, got {text!r}")
    return int(float(m[1]) * _UNITS[unit])
