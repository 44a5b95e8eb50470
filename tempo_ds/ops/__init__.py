"""Functional ops, shaped like ``torch.nn.functional``. Each is a thin wrapper over an autograd Function
that keeps fewer bytes for backward than the PyTorch op, with a PyTorch path for any device and a Triton
kernel (``tempo_ds.kernels``) on CUDA. Triton itself is imported only when a kernel runs.
"""
from .attention import attention
from .dropout import seed_dropout
from .fewbit import fewbit
from .gated_mlp import gated_mlp
from .gelu import inplace_gelu
from .gelu_linear import gelu_linear
from .layer_norm import inplace_layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .moe_experts import moe_experts
from .qk_norm_rope import qk_norm_rope
from .rms_norm import inplace_rms_norm

__all__ = ["attention", "fewbit", "gated_mlp", "gelu_linear", "inplace_gelu", "inplace_layer_norm",
           "inplace_rms_norm", "linear_cross_entropy", "moe_experts", "qk_norm_rope", "seed_dropout"]
