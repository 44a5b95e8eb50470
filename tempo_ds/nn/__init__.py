"""Modules over ``tempo_ds.ops``: drop-in replacements for their ``torch.nn`` counterparts."""
from .attention import LeanAttention
from .dropout import SeedDropout
from .fewbit import (FewBitActivation, FewBitCELU, FewBitELU, FewBitGELU, FewBitHardswish, FewBitHardtanh,
                     FewBitLeakyReLU, FewBitLogSigmoid, FewBitMish, FewBitReLU, FewBitReLU6, FewBitSELU,
                     FewBitSigmoid, FewBitSiLU, FewBitSoftplus, FewBitSoftsign, FewBitTanh, FewBitTanhshrink)
from .gated_mlp import GatedDownProjection, GatedMLP
from .gelu import InplaceGELU
from .gelu_linear import GeluLinear
from .layer_norm import InplaceCohereLayerNorm, InplaceLayerNorm
from .moe_experts import MoEExperts
from .norm_families import inplace_norm
from .qk_norm_rope import QKNormRopeAttention
from .rms_norm import InplaceGemmaRMSNorm, InplaceRMSNorm

__all__ = ["LeanAttention", "SeedDropout", "GatedMLP", "GatedDownProjection", "MoEExperts", "InplaceGELU", "GeluLinear",
           "InplaceLayerNorm", "InplaceRMSNorm", "InplaceGemmaRMSNorm", "InplaceCohereLayerNorm", "inplace_norm",
           "QKNormRopeAttention", "FewBitActivation", "FewBitGELU", "FewBitSiLU", "FewBitTanh", "FewBitSigmoid", "FewBitSoftplus",
           "FewBitELU", "FewBitCELU", "FewBitSELU", "FewBitMish", "FewBitLogSigmoid", "FewBitSoftsign",
           "FewBitTanhshrink", "FewBitHardswish", "FewBitReLU", "FewBitLeakyReLU", "FewBitReLU6", "FewBitHardtanh"]
