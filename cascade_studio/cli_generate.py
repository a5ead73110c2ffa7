"""``cascade-studio generate``: prompt -> Stage C -> Stage B -> Stage A -> PNG (or the previewer only)."""
from __future__ import annotations

import sys
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="text -> image through the whole cascade (or --preview: Stage C + "
                                         "previewer)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", default="generated.png", help="PNG path (batch > 1 adds -0, -1, ...)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "lite", "big", "toy"])
    p.add_argument("--repo-id", help="Hugging Face repo id with the published weights (from the local hub cache)")
    for stage in ("stage_c", "stage_b", "stage_a", "previewer", "text_encoder", "effnet"):
        p.add_argument(f"--{stage.replace('_', '-')}", dest=stage, help=f"weights of {stage} (file or folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="Stage C steps (published: 20)")
    p.add_argument("--cfg", type=float, default=4.0, help="Stage C guidance (published: 4)")
    p.add_argument("--shift", type=float, default=2.0, help="Stage C schedule shift (published: 2)")
    p.add_argument("--steps-b", type=int, default=10)
    p.add_argument("--cfg-b", type=float, default=1.1)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--preview", action="store_true", help="decode with the previewer only (fast)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="bf16 (GPU default) or fp32 (CPU default)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt weights (loaded weights_only)")
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args) -> int:
    from .inference.pipeline import CascadeComponents, GenerateSettings, ModelSpec, generate
    from .models import get_preset

    spec = ModelSpec(preset=args.preset, stage_c=args.stage_c, stage_b=args.stage_b, stage_a=args.stage_a,
                     previewer=args.previewer, text_encoder=args.text_encoder, effnet=args.effnet,
                     repo_id=args.repo_id, allow_pickle=args.allow_pickle)
    size = get_preset("tiny" if args.preset == "toy" else args.preset).generate_resolution
    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps_c=args.steps,
                  cfg_c=args.cfg, shift_c=args.shift, steps_b=args.steps_b, cfg_b=args.cfg_b,
                  width=args.width or size, height=args.height or size, batch=args.batch, preview=args.preview)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    settings = GenerateSettings(**kwargs)
    components = CascadeComponents(spec)
    components.warn_if_slow()
    images = generate(components, settings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})", file=sys.stderr if False else sys.stdout)
    return 0
