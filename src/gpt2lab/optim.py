"""The optimizers a training run can step with (TrainConfig.optimizer).

    adamw   AdamW on every parameter that trains; weight decay on matrices and embeddings, none
            on biases and LayerNorm gains (GPT-2's recipe, and the default)
    muon    Muon on the transformer blocks' weight matrices, AdamW on the rest

Muon (torch.optim.Muon; Jordan et al., 2024) replaces each matrix's momentum by the nearest
semi-orthogonal matrix (five Newton-Schulz iterations), so every direction of the update moves
alike. It is made for hidden matrices: embeddings (GPT-2's head is the token embedding, tied),
biases and gains stay with AdamW, as in modded-nanogpt and Moonlight (Liu et al., 2025). Each
matrix's step is scaled to AdamW's update size (torch's adjust_lr_fn="match_rms_adamw", Moonlight's
rule), so one --lr and one schedule serve both halves. In the demo's 8 minutes it reached 0.035
bits per byte below AdamW on gpt2-nano, and more on wider models (docs/design/demo-model.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import TrainConfig
from .errors import TrainingError

MUON_MOMENTUM = 0.95  # torch's default and the papers'


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and embeddings, none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no parameters with requires_grad=True: nothing would train")
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def muon_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The trainable weight matrices inside the transformer blocks (transformer.h.N): Muon's share.
    LoRA's low-rank factors (lora_A, lora_B) are not among them."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.") and name.endswith(".weight")]


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on `matrices`, torch.optim.AdamW on the other groups, as one optimizer.

    One param_groups list and one state, so the learning-rate schedule, clipping, checkpoints and
    resume treat it as they treat AdamW; each step runs the two torch optimizers on their groups.
    """

    def __init__(self, matrices: list[torch.Tensor], adamw_groups: list[dict[str, Any]], *, lr: float,
                 weight_decay: float, betas: tuple[float, float], eps: float, fused: bool | None = None) -> None:
        self._muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM,
                                      adjust_lr_fn="match_rms_adamw")
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused)
        super().__init__(self._muon.param_groups + self._adamw.param_groups, {})
        self._link()
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", False):  # neither inner optimizer would step a group added now
            raise ValueError("MuonAdamW takes its parameters when it is built; build a new one to add some")
        super().add_param_group(param_group)

    def _link(self) -> None:
        """Point the two inner optimizers at this one's groups and state (again after a load)."""
        n = len(self._muon.param_groups)
        self._muon.param_groups, self._adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self._muon.state = self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self._muon.step()
        self._adamw.step()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer cfg.optimizer names, over `model`'s trainable parameters, at cfg's settings."""
    # Fused AdamW (one kernel for every tensor) on a GPU without FSDP; elsewhere torch's default
    # (on CPU, fused=True measured no faster on the benchmark's 6 x 384 model).
    fused = (device.type == "cuda" and not cfg.fsdp) or None
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)
    matrices = muon_matrices(model)
    if not matrices:
        raise TrainingError("--optimizer muon: the model has no trainable matrices in its transformer blocks "
                            "for Muon to step; use --optimizer adamw")
    taken = {id(p) for p in matrices}
    rest = [dict(g, params=[p for p in g["params"] if id(p) not in taken]) for g in groups]
    return MuonAdamW(matrices, rest, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     betas=betas, eps=cfg.eps, fused=fused)
