"""Session set-up. Without CUDA, Triton kernels run in Triton's interpreter; triton reads TRITON_INTERPRET
when it is first imported (its own helpers are decorated then), so it must be set before any test module
imports triton. Ops still take their PyTorch path unless a test also sets TEMPO_DS_TRITON=1."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
