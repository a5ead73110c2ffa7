"""The torch side of the method: create, export, load, sniff and the training/generation inputs (see the
package docstring)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch

from ...devices import to_host
from ..base import AdaptedStageC, AdapterMismatchError
from ..files import load_adapter_tensors, save_adapter_tensors
from .adapter import ARCHITECTURE, MULTI_IMAGE_MODES, IPAdapter, find_attention_blocks
from .config import METHOD, IPAdapterConfig
from .plan import plan_adapter  # noqa: F401

FORMATS = METHOD.format_names
FEATURE_NAME = "ip_image_embeds"

__all__ = ["IPAdapter", "FORMATS", "MULTI_IMAGE_MODES", "create_adapter", "export_adapter", "export_tensors", "load_adapter_file",
           "sniff", "training_inputs", "image_encoder_feature", "image_embed_dim", "IPImageFeature"]


@functools.lru_cache(maxsize=None)
def image_embed_dim(encoder_name: str) -> int:
    """Width of the chosen image encoder's embedding, read from a weightless (meta-device) build: no ViT-H in
    memory, and ``models.encoders`` stays the one place that knows the architectures."""
    from ...models.encoders import build_ip_image_encoder

    return int(build_ip_image_encoder(encoder_name, device="meta").embed_dim)


def _base_info(context: Any) -> dict[str, str]:
    if context is None:
        return {}
    return {"cascade_studio.base_model": str(context.preset),
            "cascade_studio.base_fingerprint": str(context.base_fingerprint)}


def create_adapter(cfg: Any, model: AdaptedStageC, context: Any, name: str = "ip_adapter") -> IPAdapter:
    """A fresh IP-Adapter from the recipe's ``adapter.ip_adapter`` section, attached to ``model``."""
    encoder = cfg.image_encoder
    adapter = IPAdapter.for_stage_c(
        model.stage_c, embed_dim=image_embed_dim(encoder), num_tokens=cfg.num_tokens,
        scale=cfg.scale, multi_image="average",
        image_encoder=encoder, name=name, info=_base_info(context))
    model.add_adapter(adapter)
    return adapter


def export_adapter(adapter: IPAdapter, out: str | Path, fmt: str = "ip_adapter",
                   extra_metadata: dict[str, str] | None = None) -> Path:
    """Write one safetensors file with ``image_proj.*`` and ``ip_adapter.*`` tensors and a metadata header."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown IP-Adapter export format {fmt!r}; choose one of {FORMATS}")
    meta = adapter.metadata()
    meta["cascade_studio.format"] = fmt
    meta.update(extra_metadata or {})
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    return save_adapter_tensors(adapter.adapter_state_dict(), out, meta)


def sniff(keys: list[str], metadata: dict[str, str]) -> bool:
    """An IP-Adapter file: our architecture tag, or both de-facto key prefixes."""
    if metadata.get("modelspec.architecture", "") == ARCHITECTURE:
        return True
    return any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)


def _file_dims(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Dimensions recorded by the tensors themselves (metadata can be missing or stale)."""
    try:
        proj = tensors["image_proj.proj.weight"]
        c_cond = int(tensors["image_proj.norm.weight"].shape[0])
        width = int(tensors["ip_adapter.0.to_k_ip.weight"].shape[0])
    except KeyError as exc:
        raise AdapterMismatchError(f"{path}: not a Cascade Studio IP-Adapter (no {exc.args[0]}); Stable "
                                   "Diffusion IP-Adapter files do not fit Stage C") from None
    blocks = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("ip_adapter."))
    return {"embed_dim": int(proj.shape[1]), "c_cond": c_cond, "width": width, "num_blocks": blocks,
            "num_tokens": int(proj.shape[0]) // c_cond}


def load_adapter_file(path: str | Path, model: AdaptedStageC, context: Any = None, name: str | None = None,
                      scale: float = 1.0, image_encoder: str | None = None, multi_image: str = "average",
                      **_: Any) -> IPAdapter:
    """Load an IP-Adapter file onto ``model``, refusing one made for another base or image encoder.

    ``image_encoder``: the encoder the caller will embed images with; a file trained on another one is refused
    (its token projection expects that encoder's embedding space).
    """
    path = Path(path)
    tensors, metadata = load_adapter_tensors(path)
    dims = _file_dims(tensors, path)
    file_encoder = metadata.get("cascade_studio.image_encoder", "unknown")
    if image_encoder is not None and file_encoder != image_encoder:
        raise AdapterMismatchError(f"{path}: trained with image encoder {file_encoder}, but {image_encoder} was "
                                   f"requested; encode the image prompts with {file_encoder}")
    blocks = find_attention_blocks(model.stage_c)
    if not blocks:
        raise AdapterMismatchError(f"{path}: this Stage C has no attention blocks to attach an IP-Adapter to")
    base_width = int(blocks[0].attention.attn.to_q.in_features)
    base_name = context.preset if context is not None else "this base"
    file_base = metadata.get("cascade_studio.base_model", "?")
    if dims["width"] != base_width:
        raise AdapterMismatchError(f"{path}: made for a Stage C of width {dims['width']} ({file_base}); this base "
                                   f"({base_name}) has width {base_width}")
    if dims["num_blocks"] != len(blocks):
        raise AdapterMismatchError(f"{path}: made for a Stage C with {dims['num_blocks']} attention blocks "
                                   f"({file_base}); this base ({base_name}) has {len(blocks)}")
    adapter = IPAdapter(**dims, scale=scale, multi_image=multi_image, image_encoder=file_encoder,
                        name=name or path.stem,
                        info={k: v for k, v in metadata.items() if k.startswith("cascade_studio.base_")
                              and k not in ("cascade_studio.base_width", "cascade_studio.base_c_cond")})
    try:
        adapter.load_adapter_state_dict({k: v.float() for k, v in tensors.items()})
        model.add_adapter(adapter)  # checks c_cond and every block's width
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"{path}: {exc}") from None
    return adapter


# -- training ----------------------------------------------------------------------------------------------
def _drop_probs(cfg: Any) -> tuple[float, float, float]:
    probs = (cfg.drop_image, cfg.drop_text, cfg.drop_both)
    if min(probs) < 0 or sum(probs) > 1:
        raise ValueError(f"adapter.ip_adapter drop_image + drop_text + drop_both must be probabilities summing to "
                         f"at most 1, got {probs}")
    return probs  # type: ignore[return-value]


def _null_like(batch: dict[str, Any], key: str, like: torch.Tensor) -> torch.Tensor:
    null = batch.get(key)
    if null is None:
        return torch.zeros_like(like)
    null = null.to(like)
    if like.dim() == 3 and null.dim() == 2 and key.endswith("pooled"):
        null = null.unsqueeze(1)  # pooled [B, C] -> [B, 1, C]
    return null


def training_inputs(batch: dict[str, Any], inputs: dict[str, Any], cfg: Any,
                    generator: torch.Generator | None, train: bool = True) -> dict[str, Any]:
    """Add ``ip_image_embeds`` to the model inputs and apply the condition dropout of the original IP-Adapter.

    One uniform draw per sample decides, mutually exclusively: u < drop_image -> image embeddings zeroed ("no
    image"); next drop_text -> caption replaced by the empty-caption features (``batch["null_clip_text"]`` /
    ``["null_clip_text_pooled"]``, zeros when the cache has none); next drop_both -> both. Dropping teaches the
    adapter the unconditional branches classifier-free guidance uses. ``train=False`` (held-out loss) drops
    nothing.
    """
    if FEATURE_NAME not in batch:
        raise KeyError(f"the batch has no {FEATURE_NAME!r}; add ip_adapter.image_encoder_feature(cfg, context) to "
                       "the encoders the data cache runs (cascade_studio/adapters/ip_adapter/__init__.py)")
    out = dict(inputs)
    embeds = batch[FEATURE_NAME]
    if embeds.dim() == 2:
        embeds = embeds.unsqueeze(1)
    p_image, p_text, p_both = _drop_probs(cfg)
    if train and p_image + p_text + p_both > 0:
        u = torch.rand(embeds.shape[0], generator=generator)
        drop_image = u < p_image
        drop_text = (u >= p_image) & (u < p_image + p_text)
        drop_both = (u >= p_image + p_text) & (u < p_image + p_text + p_both)
        no_image = (drop_image | drop_both).to(embeds.device)
        embeds = torch.where(no_image.view(-1, 1, 1), torch.zeros_like(embeds), embeds)
        no_text = drop_text | drop_both
        if bool(no_text.any()):
            for key in ("clip_text", "clip_text_pooled"):
                value = out[key]
                mask = no_text.to(value.device).view(-1, *([1] * (value.dim() - 1)))
                out[key] = torch.where(mask, _null_like(batch, f"null_{key}", value), value)
    out[FEATURE_NAME] = embeds
    return out


class IPImageFeature:
    """The data cache's feature encoder for IP-Adapter training: training image -> ``ip_image_embeds [1, D]``.

    The image encoder is built on first use (the cache may already hold every feature and never need it).
    """

    name = FEATURE_NAME
    inputs = "image"

    def __init__(self, encoder_name: str, factory: Callable[[str], Any]) -> None:
        self.encoder_name = encoder_name
        self._factory = factory
        self._encoder: Any = None

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = self._factory(self.encoder_name)
        return self._encoder

    @property
    def identity(self) -> str:
        return f"ip-image:{self.encoder.identity}"

    @torch.no_grad()
    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        """Images ``[3, H, W]`` in [0, 1], all one size (the cache's contract) -> ``{name: [B, 1, D]}``."""
        embeds = self.encoder.encode(torch.stack(list(batch)))
        return {self.name: to_host(embeds.float())}


def image_encoder_feature(cfg: IPAdapterConfig, context: Any = None) -> IPImageFeature:
    """The cache feature for the recipe's image encoder.

    Weights come from ``context.extra["ip_image_encoder_loader"]`` (a callable name -> encoder), else from the
    run's models (``context.extra["models"]``: ``adapter.ip_adapter.image_encoder_weights``, ``model.image_encoder``
    or ``model.repo_id``). Without either only ``tiny`` (random weights are its whole point) and ``toy`` (the toy
    cascade's shipped encoder) can be built; a random ViT-H would silently train an adapter on noise, so that is an
    error.
    """
    extra = getattr(context, "extra", None) or {}
    loader = extra.get("ip_image_encoder_loader")
    if loader is None and extra.get("models") is not None:
        loader = _run_encoder_loader(cfg, extra["models"])

    def factory(encoder_name: str) -> Any:
        if loader is not None:
            return loader(encoder_name)
        return _built_in_encoder(encoder_name)

    return IPImageFeature(cfg.image_encoder, factory)


def _built_in_encoder(name: str) -> Any:
    """The encoders built in code: tiny (seeded random, the same in every run, so cache identities repeat) and toy
    (the toy cascade's shipped weights)."""
    if name == "toy":
        from ...models.toy import load_toy_component

        return load_toy_component("ip_image_encoder")
    if name != "tiny":
        raise RuntimeError(
            f"no weights for the IP-Adapter image encoder {name!r}: pass a loader as "
            "AdapterContext.extra['ip_image_encoder_loader'] (cascade_studio/adapters/ip_adapter/method.py)")
    from ...models.encoders import build_ip_image_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_ip_image_encoder(name)


def _run_encoder_loader(cfg: IPAdapterConfig, models: Any) -> Callable[[str], Any]:
    """Name -> frozen image encoder for a training run, from the recipe's weights (never random for real use)."""
    model_cfg = models.model_cfg

    def load(name: str) -> Any:
        if name == "tiny" or (name == "toy" and not cfg.image_encoder_weights):
            return _built_in_encoder(name)  # the same encoders generate/compare build, so embeddings agree
        from ...models.loading import load_ip_image_encoder

        source = cfg.image_encoder_weights or model_cfg.image_encoder or model_cfg.repo_id
        if source is None:
            raise ValueError(f"adapter.ip_adapter.image_encoder {name!r} needs weights: set "
                             "adapter.ip_adapter.image_encoder_weights to its file or folder")
        dtype = torch.float32 if models.device.type == "cpu" else models.dtype
        return load_ip_image_encoder(name, source, dtype=dtype, device=models.device,
                                     allow_pickle=model_cfg.allow_pickle)
    return load


def preflight(cfg: IPAdapterConfig, recipe: Any, check_weights: Any, add: Any) -> None:
    """Before a run starts: the image encoder's weights are where ``_run_encoder_loader`` will look (the same
    order: adapter.ip_adapter.image_encoder_weights, model.image_encoder, model.repo_id) and of the right kind."""
    from ...models.encoders import IP_IMAGE_ENCODERS
    from ...models.loading import ip_encoder_weights_hint

    name = cfg.image_encoder
    if name == "tiny" or (name == "toy" and not cfg.image_encoder_weights) or name not in IP_IMAGE_ENCODERS:
        return
    model_cfg = recipe.model
    places = (("adapter.ip_adapter.image_encoder_weights", cfg.image_encoder_weights),
              ("model.image_encoder", model_cfg.image_encoder), ("model.repo_id", model_cfg.repo_id))
    dotted, source = next(((d, v) for d, v in places if v), (None, None))
    if source is None:
        add("adapter.ip_adapter.image_encoder_weights", None, f"the image encoder {name} needs weights: "
            f"{ip_encoder_weights_hint(name)}", "set adapter.ip_adapter.image_encoder_weights to its file, folder "
            "or repo id")
        return
    kind = "image_encoder" if IP_IMAGE_ENCODERS[name]["kind"] == "transformers" else "open_clip"
    check_weights(dotted, kind, source, hint=f"the image encoder {name} needs {ip_encoder_weights_hint(name)}; set "
                  "adapter.ip_adapter.image_encoder_weights to it")


def feature_encoders(cfg: Any, context: Any, models: Any) -> list:
    """The run's hook for the encode cache (same signature for every method)."""
    return [image_encoder_feature(cfg, context)]


def export_tensors(tensors: dict, metadata: dict[str, str], fmt: str, out: Path) -> Path:
    """A training checkpoint's tensors as ``fmt`` without a base model (checkpoints already hold this layout)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown IP-Adapter export format {fmt!r}; choose one of {FORMATS}")
    return save_adapter_tensors(tensors, Path(out), dict(metadata, **{"cascade_studio.format": fmt}))


# -- generation ------------------------------------------------------------------------------------------
def generation_load(resolved: Any, scratch: Path, state: dict) -> tuple[Path, dict[str, Any], None]:
    """(file, loader options, model input name) for the IP-Adapter of a generation."""
    return Path(resolved.path), {"scale": resolved.weight, "multi_image": resolved.spec.multi_image or "average"}, None


def _file_encoder(path: Path) -> str:
    from ..registry import read_adapter_header

    return read_adapter_header(path)[1].get("cascade_studio.image_encoder", "tiny")


def generation_prepare(resolved: Any, inputs: Any) -> None:
    """Before Stage C loads: the image prompts are given, and each is encoded alone by the adapter's image
    encoder (named in its file) to [D]; the adapter's M prompts are kept as [M, D]."""
    prompts = tuple(resolved.spec.image_prompts)
    if not prompts:
        raise ValueError(f"{resolved.path} is an IP-Adapter but no image prompt was given; add --image-prompt PATH "
                         "(repeatable)")
    name = _file_encoder(Path(resolved.path))
    key = ("ip_embeds", name, prompts)
    if key in inputs.cache:
        return
    encoder = inputs.shared(("ip_encoder", name), lambda: _generation_encoder(name, inputs))
    with torch.no_grad():
        rows = [encoder.encode(inputs.read_image(p, "image prompt")[None].to(inputs.device)).reshape(-1)
                for p in prompts]
    inputs.cache[key] = to_host(torch.stack(rows).float())


def _generation_encoder(name: str, inputs: Any) -> Any:
    """The image encoder of a generation: a loader, --ip-image-encoder, the built-in tiny/toy encoders, else the
    base's weights (model.image_encoder / model.repo_id), in the order training chooses them."""
    if inputs.encoder_loader is not None:
        return inputs.encoder_loader(name)
    from ...models.loading import load_ip_image_encoder

    if inputs.ip_image_encoder:
        return load_ip_image_encoder(name, inputs.ip_image_encoder, dtype=torch.float32, device=inputs.device)
    fallback = getattr(inputs, "model_image_encoder", None)
    if name not in ("tiny", "toy") and fallback:
        return load_ip_image_encoder(name, fallback, dtype=torch.float32, device=inputs.device)
    if name not in ("tiny", "toy"):
        raise ValueError(f"this IP-Adapter was trained with the image encoder {name!r}; give its weights with "
                         "--ip-image-encoder FILE|FOLDER|REPO (only the tiny and toy encoders are built in)")
    # The same build the training cache used (tiny: deterministic random; toy: the shipped weights), so the
    # embeddings match what the adapter learned.
    return _built_in_encoder(name).to(inputs.device)


def generation_inputs(entry: Any, inputs: Any, batch: int, cond: dict, uncond: dict) -> None:
    """The image embeddings [B, M, D] in the conditional half; zeros (the IP-Adapter's "no image") in the
    unconditional one. The adapter's ``multi_image`` mode averages the M prompts or concatenates their tokens."""
    key = ("ip_embeds", _file_encoder(Path(entry.resolved.path)), tuple(entry.resolved.spec.image_prompts))
    if key not in inputs.cache:
        generation_prepare(entry.resolved, inputs)
        inputs.release_shared()
    if FEATURE_NAME in cond:
        raise ValueError("two IP-Adapters in one generation would share the ip_image_embeds input; load one "
                         "IP-Adapter at a time")
    embeds = inputs.cache[key][None].expand(batch, -1, -1)
    cond[FEATURE_NAME] = embeds
    uncond[FEATURE_NAME] = torch.zeros_like(embeds)


def describe_spec(spec: Any) -> list[str]:
    """Extra words of an IP-Adapter spec's label: its image prompts (and how several are combined)."""
    if not spec.image_prompts:
        return []
    words = ["+".join(Path(p).name for p in spec.image_prompts)]
    return words + [f"({spec.multi_image or 'average'})"] if len(spec.image_prompts) > 1 else words
