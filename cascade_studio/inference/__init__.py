"""Generation: the Stable Cascade pipeline (text -> Stage C -> Stage B -> Stage A, or the previewer)."""

from cascade_studio.inference.pipeline import (
    DTYPES,
    STAGE_NAMES,
    CascadeComponents,
    GenerateSettings,
    ModelSpec,
    TextEmbeddings,
    decode_latents,
    encode_prompts,
    generate,
    initial_noise,
    sample_stage_c,
    stage_b_latent_size,
    stage_c_latent_size,
)

__all__ = [
    "DTYPES",
    "STAGE_NAMES",
    "CascadeComponents",
    "GenerateSettings",
    "ModelSpec",
    "TextEmbeddings",
    "decode_latents",
    "encode_prompts",
    "generate",
    "initial_noise",
    "sample_stage_c",
    "stage_b_latent_size",
    "stage_c_latent_size",
]
