"""tempo_ds on models Liger-Kernel patched first (tempo_ds.liger): Liger's norms and gated MLPs are replaced
where the maths is verified, everything else is reported with an accurate reason, and no report line claims a
change that does nothing. Liger's Triton kernels do not run on the CPU, so the maths is checked after
injection, when none of Liger's modules is left, against the unpatched transformers model."""
import copy

import pytest
import torch
import transformers as T
from torch import nn

import tempo_ds

liger = pytest.importorskip("liger_kernel.transformers")

FAMILIES = {"llama": (T.LlamaConfig, T.LlamaForCausalLM, liger.apply_liger_kernel_to_llama, {}),
            "gemma": (T.GemmaConfig, T.GemmaForCausalLM, liger.apply_liger_kernel_to_gemma, {"head_dim": 8})}


@pytest.fixture
def patched():
    """``patched(family, **liger_options)`` applies Liger's class-level patch; undone after the test."""
    undo = []

    def patch(family, **options):
        module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["_"])
        names = dict(vars(module))
        forwards = {cls: cls.__dict__["forward"] for cls in names.values()
                    if isinstance(cls, type) and "forward" in cls.__dict__}
        undo.append((module, names, forwards))
        FAMILIES[family][2](**options)

    yield patch
    for module, names, forwards in undo:
        for key, value in names.items():
            setattr(module, key, value)
        for cls, forward in forwards.items():
            cls.forward = forward


def _model(family):
    config_cls, model_cls, _, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, use_cache=False, **extra)
    return model_cls(config)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_liger_norms_and_mlps_become_tempo_ds_modules_with_the_original_maths(family, patched):
    plain = _model(family)
    patched(family, rope=False, cross_entropy=False, fused_linear_cross_entropy=False)
    model = _model(family)
    assert {type(m).__module__.split(".")[0] for m in model.modules()} >= {"liger_kernel"}
    model.load_state_dict(plain.state_dict())
    params = dict(model.named_parameters())
    report = tempo_ds.inject(model)
    liger_names = {s.name: type(s.old).__name__ for s in report.replaced if type(s.old).__module__.startswith("liger")}
    mlp = "LigerSwiGLUMLP" if family == "llama" else "LigerGEGLUMLP"
    norm = "LigerRMSNorm" if family == "llama" else "LigerRMSNormForGemma"
    assert sorted(set(liger_names.values())) == sorted({mlp, norm}) and len(liger_names) == 2 + 2 * 2 + 1
    assert not any(type(m).__module__.startswith("liger_kernel") for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())
    batch = {"input_ids": torch.randint(3, 96, (2, 10)), "labels": torch.randint(3, 96, (2, 10))}
    loss, grads = _loss_and_grads(model, batch)
    want_loss, want = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_liger_patches_tempo_ds_cannot_take_are_reported_truthfully(patched):
    patched("llama")  # every Liger option: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
    from tempo_ds.nn.rms_norm import _llama_reference

    import transformers.models.llama.modeling_llama as modeling_llama

    assert modeling_llama.LlamaRMSNorm.__module__.startswith("liger_kernel")
    assert _llama_reference().__module__ == "transformers.models.mistral.modeling_mistral"  # not Liger's class
    model = _model("llama")
    model.model.layers[1].post_attention_layernorm = liger.LigerRMSNorm(32, casting_mode="none")
    report = tempo_ds.inject(model, silu="fewbit")
    skipped = {s.name: s.reason for s in report.skipped}
    assert "Liger-Kernel's liger_kernel.transformers.model.llama.lce_forward" in skipped["lm_head"]
    assert "fused_linear_cross_entropy=False" in skipped["lm_head"]
    assert "casting_mode='none' and offset=0 has no exact tempo_ds equivalent" in \
        skipped["model.layers.1.post_attention_layernorm"]
    # Liger's SwiGLU has no activation module: no few-bit SiLU is claimed, and the fused MLP is reported once
    claims = [s.name for s in report.replaced] + list(skipped)
    assert not any("act_fn" in name for name in claims), claims
    assert sum(s.technique == "mlp=recompute" for s in report.replaced) == 2
    tempo_ds.revert(model)
    assert type(model.model.layers[0].mlp).__name__ == "LigerSwiGLUMLP"


def test_a_liger_module_of_unknown_maths_is_left_alone():
    class LigerLikeMLP(nn.Module):  # Liger's module path, a maths tempo_ds has not verified
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    LigerLikeMLP.__module__ = "liger_kernel.transformers.swiglu"
    LigerLikeMLP.__name__ = "LigerReLUSquaredMLP"
    model = nn.Sequential(copy.deepcopy(LigerLikeMLP()))
    report = tempo_ds.inject(model)
    (skip,) = [s for s in report.skipped if s.name == "0"]
    assert "LigerReLUSquaredMLP is Liger-Kernel's and not one whose maths tempo_ds has verified" in skip.reason
