"""`pixart-sigma`: generate, batch, schema, info. A front end: it calls only the public library."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

DEFAULT_OUTPUT_DIR = "outputs"


def _flag_type(annotation: Any):
    """(argparse type, choices) for a Settings field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not typing.Literal:
        return _flag_type(args[0])
    return annotation, None


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    from .settings import Settings

    group = parser.add_argument_group("settings (defaults as in `pixart-sigma schema`)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind, choices = _flag_type(field.annotation)
        help_text = f"{field.description} (default: {field.default})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS,
                               metavar=None if choices else name.upper(), help=help_text)


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    from .settings import Settings

    return {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}


class _Progress:
    """A tqdm bar over denoising steps, one per generation."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label, self.bar = enabled, label, None

    def __call__(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label, unit="step", leave=False, file=sys.stderr)
        self.bar.update(step - self.bar.n)
        if step == total:
            self.bar.close()


def _write(images, output_dir: Path, names: Optional[list[str]] = None) -> list[Path]:
    from . import read_settings, save_image
    from .images import output_name

    written = []
    for index, image in enumerate(images):
        record = read_settings(image)
        name = names[index] if names else output_name(record["prompt"], record["seed"])
        path = output_dir / name
        if names is None:
            stem, counter = path.stem, 1
            while path.exists():  # two images in the same second with the same seed and prompt
                path = output_dir / f"{stem}-{counter}.png"
                counter += 1
        written.append(save_image(image, path))
    return written


def _load(settings: dict[str, Any], quiet: bool):
    from . import PixArtSigmaModel

    _quiet_libraries()
    # Cheap (no weights read): resolves device and dtype for the line below; the model validates again.
    values = PixArtSigmaModel.validate_and_transform(settings)
    if not quiet:
        print(f"loading {values['model_name']} on {values['torch_device']} ({str(values['torch_dtype'])[6:]})",
              file=sys.stderr, flush=True)
    return PixArtSigmaModel(**settings)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import read_settings
    from .images import batch_settings
    from .settings import check_text

    settings: dict[str, Any] = {}
    prompt, keep = args.prompt, None
    given = _given_settings(args)
    if args.from_image:
        record = read_settings(args.from_image)
        settings, index = batch_settings(record)
        if not given.keys() & {"seed", "num_images_per_prompt"}:
            keep = index  # remake the image's whole batch and keep it alone: bit-identical pixels
        else:
            settings.update(seed=record["seed"], num_images_per_prompt=1)
        prompt = prompt or record.get("prompt")
    settings.update(given)
    if prompt is None:
        raise _UsageError("give a PROMPT, or --from IMAGE.png to make an image again")
    check_text("prompt", prompt, required=True)  # before the model loads, not after
    model = _load(settings, args.quiet)
    images = model.generate(prompt, on_progress=_Progress(not args.quiet, "generating"))
    if keep is not None:
        images = images[keep:keep + 1]
    for path in _write(images, Path(args.output_dir)):
        print(f"{path}  seed={read_settings(path)['seed']}")
    return 0


def _batch_key(prompt: str, settings: dict[str, Any]) -> str:
    text = json.dumps({"prompt": prompt, **settings}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .images import safe_stem
    from .settings import check_text

    source = Path(args.prompts_file)
    lines = source.read_text(encoding="utf-8").splitlines()
    prompts = [(number, line.strip()) for number, line in enumerate(lines, 1)
               if line.strip() and not line.lstrip().startswith("#")]
    for number, prompt in prompts:  # every line is checked before the first image
        try:
            check_text("prompt", prompt, required=True)
        except ValueError as exc:
            raise _UsageError(f"{source}:{number}: {exc}") from None
    settings = _given_settings(args)
    model = _load(settings, args.quiet)
    count = model.settings["num_images_per_prompt"]
    output_dir = Path(args.output_dir)
    done = skipped = 0
    for number, prompt in tqdm(prompts, desc="prompts", unit="prompt", disable=args.quiet, file=sys.stderr):
        stem = f"{number:05d}-{_batch_key(prompt, settings)}-{safe_stem(prompt, 32)}"
        names = [f"{stem}-{k}.png" for k in range(count)]
        if all((output_dir / name).is_file() for name in names):
            skipped += 1  # resumable: this prompt was finished by an earlier run
            continue
        for path in _write(model.generate(prompt), output_dir, names):
            print(path, flush=True)
        done += 1
    print(f"{done} prompt(s) generated, {skipped} already done, images in {output_dir}", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from . import PixArtSigmaModel

    print(json.dumps(PixArtSigmaModel.get_schema(), indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import read_settings

    print(json.dumps(read_settings(args.image), indent=2, ensure_ascii=False))
    return 0


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart-sigma", description="PixArt-Sigma text-to-image generation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from a prompt (or again from a PNG)",
                                   description="Generate images; prints each file written and its seed.")
    generate.add_argument("prompt", nargs="?", metavar="PROMPT", help="what to draw")
    generate.add_argument("--from", dest="from_image", metavar="IMAGE.png",
                          help="reuse the prompt and settings stored in a PNG we made (same settings, same pixels); "
                               "flags given here override them")
    generate.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder for the PNG files (default: outputs)")
    generate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_setting_flags(generate)
    generate.set_defaults(handler=cmd_generate)

    batch = commands.add_parser("batch", help="generate for every line of a text file (resumable)",
                                description="One prompt a line (blank lines and # comments skipped). "
                                            "Prompts whose images already exist in the output folder are skipped.")
    batch.add_argument("prompts_file", metavar="PROMPTS.txt")
    batch.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder for the PNG files (default: outputs)")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_setting_flags(batch)
    batch.set_defaults(handler=cmd_batch)

    schema = commands.add_parser("schema", help="print the JSON Schema of the settings")
    schema.set_defaults(handler=cmd_schema)

    info = commands.add_parser("info", help="print the settings stored in a PNG")
    info.add_argument("image", metavar="IMAGE.png")
    info.set_defaults(handler=cmd_info)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bar is enough: silence the per-file loading bars and chatter of diffusers/transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import Cancelled, CheckpointError, GenerationError, SettingsError

    try:
        return args.handler(args)
    except (SettingsError, CheckpointError, GenerationError, _UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable files, PNGs without settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
