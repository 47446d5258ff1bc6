"""Which stock transformers MoE family computes what a spec computes: pure spec logic, no torch.

``workers.engine.hf`` writes and reads the folders; this module only decides the family (or refuses naming the
field), so that the lint rules and the web side can ask without importing torch. ``workers.engine.hf``
re-exports every name here.
"""

from __future__ import annotations

from workers.engine.spec import ModelSpec

ARCHITECTURES = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
# HF's DeepSeek-V3 builds the q/kv latent RMSNorms with this epsilon, whatever rms_norm_eps says.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


class NotExpressible(ValueError):
    """No stock transformers family computes what this spec computes; ``field`` is the spec's dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check_latent_norm_eps(model: ModelSpec, family: str) -> None:
    """Refuse latent attention whose norm epsilon is not the one transformers' DeepSeek families hard-code."""
    if model.norm_eps != DEEPSEEK_LATENT_NORM_EPS:
        raise NotExpressible(
            "model.norm_eps",
            f"{model.norm_eps}: transformers' {family} normalises the attention latents with eps 1e-6 whatever "
            "rms_norm_eps is; use 1e-6",
        )


def hf_family(model: ModelSpec) -> str:
    """The transformers ``model_type`` that computes exactly what ``model`` computes; ``NotExpressible`` if none."""
    moe = model.moe
    if model.task != "causal_lm":
        raise NotExpressible("model.task", "transformers' MoE families here are causal language models only")
    if model.activation != "swiglu":
        raise NotExpressible(
            "model.activation", f"{model.activation}: the MoE families use SwiGLU (SiLU-gated) feed-forwards only"
        )
    if model.norm != "rmsnorm":
        raise NotExpressible("model.norm", "layernorm: the MoE families use RMSNorm only")
    grouped = moe.n_group > 1 and moe.topk_group < moe.n_group
    if moe.scoring == "sigmoid":
        # DeepSeek-V3's router (also GLM-4-MoE's) scores a group by its two best experts: topk(2) in every group.
        experts_per_group = moe.num_routed_experts // (moe.n_group if grouped else 1)
        if experts_per_group < 2:
            raise NotExpressible(
                "model.moe.n_group" if grouped else "model.moe.num_routed_experts",
                "DeepSeek-V3's sigmoid router needs at least 2 experts per group",
            )
        if model.attention == "mla":
            _check_latent_norm_eps(model, "DeepSeek-V3")
            return "deepseek_v3"
        return "glm4_moe"
    if moe.balancing == "aux_free":
        raise NotExpressible(
            "model.moe.balancing",
            "aux_free with softmax scoring selects experts by softmax + bias; no stock softmax router has a bias "
            "(use sigmoid scoring for DeepSeek-V3/GLM-4-MoE, or aux_loss balancing for Qwen2-MoE)",
        )
    if model.attention == "mla":
        # DeepSeek-V2: softmax, top-k kept as they are, groups scored by their best expert (as the engine does).
        _check_latent_norm_eps(model, "DeepSeek-V2")
        return "deepseek_v2"
    if grouped:
        raise NotExpressible(
            "model.moe.n_group", "group-limited routing with softmax scoring: Qwen2-MoE's router has no groups"
        )
    return "qwen2_moe"
