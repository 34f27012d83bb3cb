"""`pixart-sigma`: generate, batch, schema, info, models. A front end: it calls only the public library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

DEFAULT_OUTPUT_DIR = "outputs"
SHOWN_REASON_CHARS = 300  # of why a LoRA cannot be read, in `pixart-sigma loras`


def _flag_type(annotation: Any):
    """(argparse type, choices) for a Settings field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not typing.Literal:
        return _flag_type(args[0])
    return annotation, None


def _json_flag(settings: type, name: str):
    """argparse type of a list or object setting: one JSON value, read by Settings' own rule (json_value)."""
    def parse(text: str) -> Any:
        try:
            return settings.json_value(name, text)
        except ValueError as exc:  # SettingsError: argparse prefixes the flag and exits 2, without a traceback
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _add_setting_flags(parser: argparse.ArgumentParser, settings: Optional[type] = None,
                       title: str = "settings (defaults as in `pixart-sigma schema`)") -> None:
    """A flag per setting of `settings` (default: Settings): a scalar by its type, a list or object as JSON."""
    from . import Settings

    settings = settings or Settings
    schemas = settings.field_schemas()
    group = parser.add_argument_group(title)
    for name, field in settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        schema = schemas[name]
        if schema.get("type") in ("array", "object"):  # e.g. --loras '[{"path": "a.safetensors", "scale": 0.8}]'
            default = json.dumps(schema["default"])
            help_text = f"{field.description} Give {settings.json_hint(name)} (default: {default})"
            group.add_argument(flag, dest=name, type=_json_flag(settings, name), default=argparse.SUPPRESS,
                               metavar="JSON", help=help_text.replace("%", "%%"))  # argparse %-formats help
            continue
        kind, choices = _flag_type(field.annotation)
        help_text = f"{field.description} (default: {field.default})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS,
                               metavar=None if choices else name.upper(), help=help_text)


def _given_settings(args: argparse.Namespace, settings: Optional[type] = None) -> dict[str, Any]:
    from . import Settings

    return {name: getattr(args, name) for name in (settings or Settings).model_fields if hasattr(args, name)}


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


def _write(images, output_dir: Path) -> list[Path]:
    """Save new images under names we choose; an existing file is never replaced."""
    from . import output_name, read_settings, save_image

    written = []
    for image in images:
        record = read_settings(image)
        path = output_dir / output_name(record["prompt"], record["seed"])
        stem, counter = path.stem, 1
        while True:
            try:
                written.append(save_image(image, path, overwrite=False))
                break
            except FileExistsError:  # two images in the same second with the same seed and prompt
                path = output_dir / f"{stem}-{counter}.png"
                counter += 1
    return written


def _lora_flag(text: str) -> dict[str, Any]:
    """`--lora NAME[:SCALE]`: a LoRA of the `loras` setting (scale 1 unless a number follows the last colon)."""
    name, colon, scale = text.rpartition(":")
    try:
        return {"name": name, "scale": float(scale)} if colon and name else {"name": text, "scale": 1.0}
    except ValueError:
        return {"name": text, "scale": 1.0}  # a colon that is part of the name (C:\loras\style.safetensors)


def _add_lora_flags(parser: argparse.ArgumentParser) -> None:
    from . import MAX_LORA_SCALE, MAX_LORAS

    group = parser.add_argument_group("LoRAs")
    group.add_argument("--lora", dest="lora_flags", action="append", type=_lora_flag, default=[],
                       metavar="NAME[:SCALE]",
                       help=f"apply a LoRA (repeat for several, at most {MAX_LORAS}): a name in the LoRA folder or a "
                            f"path (with a / in it), and its scale from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} "
                            "(default 1); added to --loras")
    _add_lora_dir(group)


def _add_lora_dir(parser) -> None:
    parser.add_argument("--lora-dir", type=Path, default=None, metavar="FOLDER",
                        help="the folder LoRA names are looked up in (default: $PIXART_SIGMA_HOME/loras)")


def _with_lora_flags(settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The settings with --lora's LoRAs after those of --loras."""
    if args.lora_flags:
        given = settings.get("loras", [])
        settings["loras"] = (given if isinstance(given, list) else [given]) + args.lora_flags
    return settings


def _load(settings: dict[str, Any], quiet: bool, lora_dir: Optional[Path] = None):
    from . import PixArtSigmaModel

    _quiet_libraries()
    # Cheap (no weights read): resolves device and dtype for the line below; the model validates again.
    values = PixArtSigmaModel.validate_and_transform(settings)
    if not quiet:
        print(f"loading {values['model_name']} on {values['torch_device']} ({str(values['torch_dtype'])[6:]})",
              file=sys.stderr, flush=True)
    return PixArtSigmaModel(**settings, lora_dir=lora_dir)


def _settings_from_image(path: str, given: dict[str, Any]) -> tuple[dict[str, Any], Optional[int], dict[str, Any]]:
    """Settings, the index to keep (None: keep all), and the record stored in a PNG, for `--from`.

    The record's resolved number formats (dtype, text_encoder_dtype) are replayed as they are, whatever
    this machine's `auto` would pick: the same formats make the same pixels.

    A PNG is somebody else's file: it may name a known checkpoint or the demo, but a local folder
    only when the user names it too (--model-name), so a shared image cannot choose what code loads.
    """
    from . import DEMO_NAME, KNOWN_MODEL_NAMES, batch_settings, read_settings

    record = read_settings(path)
    settings, index = batch_settings(record)
    keep: Optional[int] = index  # remake the image's whole batch and keep it alone: bit-identical pixels
    if given.keys() & {"seed", "num_images_per_prompt"}:
        settings.update(seed=record.get("seed", -1), num_images_per_prompt=1)
        keep = None
    stored = settings.get("model_name")
    if "model_name" not in given and stored is not None and stored not in KNOWN_MODEL_NAMES:
        raise _UsageError(
            f"{path} was made with model_name={stored!r}, a local folder: an image may only choose a known "
            f"checkpoint or {DEMO_NAME!r}. If you trust that folder, say so: --model-name {stored!r}")
    return settings, keep, record


def cmd_generate(args: argparse.Namespace) -> int:
    from . import SettingsError, check_output_dir, check_text, read_settings, recorded_loras

    settings: dict[str, Any] = {}
    prompt, keep = args.prompt, None
    given = _given_settings(args)
    record: dict[str, Any] = {}
    if args.from_image:
        settings, keep, record = _settings_from_image(args.from_image, given)
        prompt = prompt or record["prompt"]
        # Said even with -q: the file, not the user, picked these.
        made = given.get("seed", record.get("seed"))  # the image's own seed, though its whole batch is remade
        print(f"from {args.from_image}: model_name={given.get('model_name', settings.get('model_name'))!r}, "
              f"seed={made}", file=sys.stderr, flush=True)
    settings.update(given)
    _with_lora_flags(settings, args)
    if record.get("loras") and "loras" not in settings:  # found by their SHA-256 in the folder, never by a path
        settings["loras"] = recorded_loras(record["loras"], args.lora_dir)
    if prompt is None:
        raise _UsageError("give a PROMPT, or --from IMAGE.png to make an image again")
    check_text("prompt", prompt, required=True)  # before the model loads, not after
    edit = _edit_inputs(args, record)
    output_dir = check_output_dir(args.output_dir)
    try:
        model = _load(settings, args.quiet, args.lora_dir)
    except SettingsError as exc:
        if not record or not any(problem.startswith(("dtype=", "text_encoder_dtype=")) and "memory=" not in problem
                                 for problem in exc.problems):
            raise
        raise _UsageError(f"{args.from_image} was made with dtype={record.get('dtype')!r}, text_encoder_dtype="
                          f"{record.get('text_encoder_dtype')!r} on {record.get('device', 'another machine')}, which "
                          f"this machine cannot run: {exc}. Give --dtype and --text-encoder-dtype to remake it in the "
                          "closest formats (its pixels will then differ slightly)") from None
    threads = record.get("cpu_threads")
    if threads and model.settings["torch_device"].type == "cpu":
        import torch

        torch.set_num_threads(threads)  # the thread count changes how a CPU rounds sums: replay it too
    images = model.generate(prompt, on_progress=_Progress(not args.quiet, "generating"), **edit)
    if keep is not None:
        images = images[keep:keep + 1]
    for path in _write(images, output_dir):
        print(f"{path}  seed={read_settings(path)['seed']}")
    return 0


def _edit_inputs(args: argparse.Namespace, record: dict[str, Any]) -> dict[str, Any]:
    """The picture, mask and edit settings for `generate`, read and checked before the model loads.

    With --from an edit's record: its settings replayed (flags override them), and --image (and --mask)
    must be the pictures it was made from, by the SHA-256 of their pixels (a record from A1111 text alone
    has no hashes: then the pictures cannot be checked, and a note says so).
    """
    from . import EditSettings, edit_settings, read_picture

    given = _given_settings(args, EditSettings)
    recorded = edit_settings(record) or {}
    # JSON records name the mask's hash when there was one; A1111's text has "Mask blur" only for inpainting.
    masked = bool(recorded.get("mask_sha256")) if "source_sha256" in recorded else "mask_blur" in recorded
    if recorded and (args.image is None or (masked and args.mask is None)):
        known = f" (SHA-256 {recorded['source_sha256']})" if recorded.get("source_sha256") else ""
        raise _UsageError(f"{args.from_image} is an edit of a picture{known}: give that picture with --image"
                          + (" and its mask with --mask" if masked else ""))
    if args.image is None:
        if args.mask is not None or given:
            names = ["--mask"] * (args.mask is not None) + ["--" + name.replace("_", "-") for name in given]
            raise _UsageError(f"{', '.join(names)}: for editing a picture, give it with --image")
        return {}
    values = {key: value for key, value in recorded.items() if key in EditSettings.model_fields}
    values.update(given)
    picture = read_picture(args.image, "--image")
    mask = read_picture(args.mask, "--mask") if args.mask is not None else None  # generate applies invert_mask
    if recorded:
        _check_pictures(args, recorded, picture, mask, values.get("invert_mask", False))
    return {"image": picture, **({"mask": mask} if mask is not None else {}), **values}


def _check_pictures(args: argparse.Namespace, recorded: dict[str, Any], picture, mask, invert: bool) -> None:
    """--image and --mask must be what the record was made from (by their pixels' SHA-256)."""
    from . import picture_sha256, read_mask

    if "source_sha256" not in recorded:
        print(f"note: {args.from_image} records no SHA-256 of its pictures (A1111 text only): --image and --mask "
              "cannot be checked against it", file=sys.stderr, flush=True)
        return
    found = [("--image", args.image, picture_sha256(picture.convert("RGB")), recorded["source_sha256"])]
    if mask is not None or recorded.get("mask_sha256"):
        if mask is None:
            raise _UsageError(f"{args.from_image} was inpainted: give its mask with --mask")
        found.append(("--mask", args.mask, picture_sha256(read_mask(mask, picture.size, invert)),
                      recorded.get("mask_sha256")))
    for flag, path, digest, wanted in found:
        if digest != wanted:
            raise _UsageError(f"{flag} {path} is not the picture {args.from_image} was made from: its pixels' "
                              f"SHA-256 is {digest}, the record's {wanted}")


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import (PixArtSigmaModel, check_images_per_call, check_output_dir, check_pixel_budget, plan_batch,
                   read_prompt_file, save_image)

    if not args.ray and (args.ray_address or args.workers):
        raise _UsageError("--ray-address and --workers are for runs on Ray: add --ray")
    if args.ray and args.prompts_per_call > 1:
        raise _UsageError("--prompts-per-call is for local runs: on Ray each worker takes one prompt at a time "
                          "(add --workers to use more devices)")
    given = _with_lora_flags(_given_settings(args), args)
    prompts = read_prompt_file(args.prompts_file)  # every line is checked before the first image
    output_dir = check_output_dir(args.output_dir)
    if args.ray:
        return _batch_on_ray(args, prompts, output_dir)
    if args.prompts_per_call > 1:  # the images of one call must fit, said before the model loads
        values = PixArtSigmaModel.validate_and_transform(given)
        calls = min(args.prompts_per_call, len(prompts))
        check_images_per_call(calls, values["num_images_per_prompt"])
        check_pixel_budget(values["width"], values["height"], values["num_images_per_prompt"], prompts=calls)
    model = _load(given, args.quiet, args.lora_dir)
    loras = model.lora_uses(model.settings["loras"])  # every LoRA found and read before the first image
    items = plan_batch(prompts, model.settings, [lora.record() for lora in loras])  # names keyed by their SHA-256
    pending = [item for item in items if item.missing(output_dir)]  # resumable: skip what an earlier run finished
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="prompts", unit="prompt",
               disable=args.quiet, file=sys.stderr)
    for start in range(0, len(pending), args.prompts_per_call):
        group = pending[start:start + args.prompts_per_call]
        seeds = [item.first_seed(model.settings["seed"], output_dir) for item in group]
        for item, images in zip(group, model.generate_many([item.prompt for item in group], seeds=seeds)):
            for index in item.missing(output_dir):
                try:
                    print(save_image(images[index], output_dir / item.names[index], overwrite=False), flush=True)
                except FileExistsError:  # another run wrote it meanwhile: keep theirs
                    pass
        bar.update(len(group))
    bar.close()
    print(f"{len(pending)} prompt(s) generated, {len(items) - len(pending)} already done, images in {output_dir}",
          file=sys.stderr)
    return 0


def _batch_on_ray(args: argparse.Namespace, prompts: list[tuple[int, str]], output_dir: Path) -> int:
    """The same batch on Ray: every input checked and every name and seed fixed here, before Ray starts."""
    try:
        import ray

        from . import DEFAULT_MODEL
        from .integrations.ray import batch as on_ray
    except ImportError as exc:
        raise _UsageError(f"--ray needs the ray extra: pip install \"pixart-sigma[ray]\" ({exc})") from None
    _quiet_libraries()
    settings = _with_lora_flags(_given_settings(args), args)
    lines = [line for line, _ in prompts]
    checked = on_ray.check_rows([prompt for _, prompt in prompts], settings, numbers=lines)
    plan = on_ray.plan(checked, settings, output_dir, lines=lines, lora_dir=args.lora_dir)
    skipped = sum(1 for unit in plan.work if not unit.missing)
    if not args.quiet and skipped < len(plan.work):
        print(f"on Ray ({args.ray_address or 'a local Ray for this run'}): {len(plan.work) - skipped} prompt(s) "
              f"of {settings.get('model_name', DEFAULT_MODEL)}", file=sys.stderr, flush=True)
    try:
        on_ray.run(plan, workers=args.workers, address=args.ray_address, progress=not args.quiet,
                   on_image=lambda row, index, path: print(path, flush=True))
    except ray.exceptions.RayError as exc:  # the library's own refusals come back as themselves, not as these
        print(f"error: the run on Ray failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); what was "
              "written stays, and the same command makes the rest", file=sys.stderr)
        return 1
    print(f"{len(plan.work) - skipped} prompt(s) generated, {skipped} already done, images in {output_dir}",
          file=sys.stderr)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    """A comparison grid: every axis value checked before the model loads; the cells, then the sheet, written."""
    from tqdm import tqdm

    from . import check_output_dir, make_grid, plan_grid

    settings = _with_lora_flags(_given_settings(args), args)
    plan = plan_grid(args.prompt, settings, args.x, args.y)
    output_dir = check_output_dir(args.output_dir)
    model = _load(settings, args.quiet, args.lora_dir)
    with tqdm(total=plan.count, desc="cells", unit="cell", disable=args.quiet, file=sys.stderr) as bar:
        grid = make_grid(model, plan, on_cell=lambda done, total: bar.update(done - bar.n))
    files = grid.save(output_dir)
    for row in files.cells:
        for path in row:
            print(path)
    print(f"{files.sheet}  {plan.count} cells")
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    """Train a LoRA: the data checked first, then a progress bar with loss and ETA; Ctrl-C saves and stops."""
    from . import LoraTrainingSettings, check_training_settings, train_lora

    _quiet_libraries()
    raw = {name: getattr(args, name) for name in LoraTrainingSettings.model_fields if getattr(args, name) is not None}
    settings = check_training_settings(raw)
    result = train_lora(args.data, args.output, settings, resume=args.resume, progress=not args.quiet,
                        stop_after=args.stop_after)
    if result.stopped:
        print(f"stopped at step {result.steps} after {result.seconds / 60:.1f} min: the LoRA so far is "
              f"{result.output.stem}-step{result.steps:06d}.safetensors; add --resume to go on", file=sys.stderr)
        return 0 if args.stop_after is not None and result.steps >= args.stop_after else 130
    print(result.output)
    print(f"{result.steps} steps in {result.seconds / 60:.1f} min, loss {result.final_loss:.4f}", file=sys.stderr)
    return 0


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per LoraTrainingSettings field (its description as help, its default as the model's)."""
    from . import LoraTrainingSettings

    for name, field in LoraTrainingSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown_default = "" if default in (None, []) else f" (default: {default})"
        kind, choices = _flag_type(field.annotation)
        if typing.get_origin(field.annotation) is list:
            kind = list
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.description}{shown_default}")
        elif kind is list:
            parser.add_argument(flag, dest=name, action="append", default=None, metavar="TEXT",
                                help=f"{field.description} (repeatable)")
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, choices=choices,
                                metavar="{" + ",".join(choices) + "}" if choices else name.split("_")[-1].upper(),
                                help=f"{field.description}{shown_default}")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not valid: it must be a whole number from 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid: it must be a whole number from 1")
    return value


def cmd_schema(args: argparse.Namespace) -> int:
    from . import PixArtSigmaModel

    print(json.dumps(PixArtSigmaModel.get_schema(), indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import read_settings

    print(json.dumps(read_settings(args.image), indent=2, ensure_ascii=False, allow_nan=False))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from . import checkpoint_statuses

    statuses = checkpoint_statuses()
    if args.json:
        print(json.dumps([{**asdict(s), "folders": [str(f) for f in s.folders]} for s in statuses], indent=2))
        return 0
    for status in statuses:
        if status.complete:
            where = ", ".join(sorted({str(f.parent) for f in status.folders}))
            print(f"{status.model_name}  {status.native_size}px  ready  {status.size_bytes / 1e9:.2f} GB  {where}")
        else:
            cost = f"about {status.download_gb:g} GB"
            if status.shared_gb:  # the first checkpoint also brings the T5, VAE and tokenizer all three share
                cost += f", {status.shared_gb:g} GB of it the T5, VAE and tokenizer all three share, downloaded once"
            print(f"{status.model_name}  {status.native_size}px  not downloaded ({cost})")
            if args.verbose:
                print("  " + status.problem.replace("\n", "\n  "))
    if not args.verbose and not all(status.complete for status in statuses):
        print("(-v shows what is missing and the download commands)")
    return 0


def cmd_loras(args: argparse.Namespace) -> int:
    """The LoRA folder: each LoRA's name, layout, ranks, targets, size and hash; a line for each that does not read."""
    from . import default_lora_dir, list_loras
    from .settings import SHORT_HASH_DIGITS

    folder = args.lora_dir or default_lora_dir()
    if not folder.is_dir():
        raise _UsageError(f"the LoRA folder {folder} does not exist: put LoRAs there, or name one with --lora-dir")
    listed = list_loras(folder, model_name=args.model_name)
    for lora in listed:
        if lora.problem:
            reason = " ".join(lora.problem.split())
            print(f"{lora.name}  cannot be read: {reason[:SHOWN_REASON_CHARS]}  ({lora.path})")
            continue
        ranks = "/".join(str(rank) for rank in lora.ranks)
        print(f"{lora.name}  {lora.layout}  rank {ranks}  {lora.targets} targets  {lora.bytes / 1e6:.1f} MB  "
              f"{lora.sha256[:SHORT_HASH_DIGITS]}  ({lora.path})")
    print(f"{len(listed)} LoRA(s) in {folder}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        raise _UsageError(f"the service needs its extra: pip install \"pixart-sigma[server]\" ({exc})") from None
    _quiet_libraries()
    return serve(args.model_names or [], device=args.device, dtype=args.dtype,
                 text_encoder_dtype=args.text_encoder_dtype, memory=args.memory, host=args.host,
                 port=args.port, data_dir=args.data_dir, queue_size=args.queue_size, api_key=args.api_key,
                 keep_jobs=args.keep_jobs, keep_grace_seconds=args.keep_grace, allow_compile=args.allow_compile,
                 lora_dir=args.lora_dir)


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from . import MEMORY_MODES

    parser = argparse.ArgumentParser(prog="pixart-sigma", description="PixArt-Sigma text-to-image generation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from a prompt (or again from a PNG)",
                                   description="Generate images; prints each file written and its seed.")
    generate.add_argument("prompt", nargs="?", metavar="PROMPT", help="what to draw")
    generate.add_argument("--from", dest="from_image", metavar="IMAGE.png",
                          help="reuse the prompt and settings stored in a PNG we made (same settings, same pixels); "
                               "flags given here override them. A PNG may name a known checkpoint or demo; a local "
                               "folder is used only when --model-name names it too")
    generate.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder for the PNG files (default: outputs)")
    generate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    generate.add_argument("--image", metavar="PICTURE", help="edit this picture (PNG, JPEG, WebP...) instead of "
                          "starting from noise: image-to-image by --strength; with --mask, inpainting; with --expand, "
                          "outpainting. The images keep its size unless --width and --height are given")
    generate.add_argument("--mask", metavar="MASK", help="with --image: what to repaint, white (or fully "
                          "transparent) on a picture of the same size")
    _add_setting_flags(generate)
    from . import EditSettings

    _add_setting_flags(generate, EditSettings, "edit settings (with --image)")
    _add_lora_flags(generate)
    generate.set_defaults(handler=cmd_generate)

    batch = commands.add_parser("batch", help="generate for every line of a text file (resumable)",
                                description="One prompt a line of a UTF-8 file (blank lines and # comments skipped); "
                                            "every line is checked before the first image. Files are named from the "
                                            "prompt and settings, so a rerun makes only what is missing and never "
                                            "replaces a file, however the lines were moved.")
    batch.add_argument("prompts_file", metavar="PROMPTS.txt")
    batch.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder for the PNG files (default: outputs)")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    batch.add_argument("--prompts-per-call", type=_count, default=1, metavar="N",
                       help="denoise N prompts together: fills a GPU; each image equals one prompt per call's within "
                            "one 8-bit level (default: 1)")
    ray_flags = batch.add_argument_group("on Ray (the ray extra: pip install \"pixart-sigma[ray]\")")
    ray_flags.add_argument("--ray", action="store_true",
                           help="run the batch on Ray: the same files (names, and for a fixed seed, pixels), made by "
                                "workers that each keep a warm model; images come back to this machine to be written")
    ray_flags.add_argument("--ray-address", metavar="ADDR",
                           help="the cluster to use (e.g. ray://head:10001, or auto); default: a local Ray for the run")
    ray_flags.add_argument("--workers", type=_count, metavar="N",
                           help="workers, each with its own model (default: one per GPU of the cluster, else as many "
                                "as its CPUs hold at this machine's thread count)")
    _add_setting_flags(batch)
    _add_lora_flags(batch)
    batch.set_defaults(handler=cmd_batch)

    from . import MAX_GRID_CELLS, axis_names

    grid = commands.add_parser(
        "grid", help="a comparison grid of one prompt: a setting (or a LoRA's scale) per axis, one labelled sheet",
        description="An X/Y plot: one prompt, one image per pair of axis values, each the image `generate` makes "
                    "with those settings (saved with its record, so --from remakes it), and a contact sheet "
                    "(the prompt as its title, x's values over the columns, y's beside the rows; the grid as PNG "
                    "text). The model loads once; every value is checked before the first image.",
        epilog="example: pixart-sigma grid \"a red fox\" --lora my-style --x lora_scale=0,0.5,1 --y seed=1,2,3")
    grid.add_argument("prompt", metavar="PROMPT", help="what to draw")
    axis_help = (f"NAME=V1,V2,...: a setting and its values, each checked by the setting's rules (quote a value "
                 f"with a comma: 'negative_prompt=\"blurry, dark\",'; a list setting as a JSON list of values: "
                 f"'loras=[[], [{{\"name\": \"my-style\"}}]]'). NAME is one of {', '.join(axis_names())}: "
                 "lora_scale is the scale of every LoRA given, lora_scale:NAME of that one")
    grid.add_argument("--x", required=True, metavar="AXIS", help=f"the columns: {axis_help}")
    grid.add_argument("--y", metavar="AXIS",
                      help=f"the rows (default: one row), as --x; at most {MAX_GRID_CELLS} cells in all")
    grid.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR,
                      help="folder for the sheet and a folder of its cells beside it (default: outputs)")
    grid.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_setting_flags(grid, title="settings of every cell (defaults as in `pixart-sigma schema`)")
    _add_lora_flags(grid)
    grid.set_defaults(handler=cmd_grid)

    train = commands.add_parser(
        "train-lora", help="train a LoRA on a folder of captioned pictures",
        description="Train a LoRA for a checkpoint's transformer on DATA: pictures with captions in same-name .txt "
                    "files, or a metadata.jsonl of {\"file_name\", \"text\"} lines. The data is checked first "
                    "(each problem named with its file); captions and pictures are encoded once (then T5 is freed); "
                    "the state is saved every --save-every steps and at Ctrl-C, and --resume goes on from it. "
                    "Writes the diffusers/PEFT layout, which `--lora` and diffusers-based tools read.",
        epilog="example: pixart-sigma train-lora my-pictures -o my-style.safetensors --model-name "
               "PixArt-alpha/PixArt-Sigma-XL-2-512-MS --rank 16 --steps 2000")
    train.add_argument("data", metavar="DATA", type=Path, help="the folder of pictures and captions")
    train.add_argument("-o", "--output", required=True, type=Path, metavar="FILE.safetensors",
                       help="the LoRA to write (never overwritten); its state goes in FILE.safetensors.training/")
    train.add_argument("--resume", action="store_true", help="go on from the state a stopped run saved")
    train.add_argument("--stop-after", type=_count, default=None, metavar="STEPS",
                       help="save and stop once this many steps are done in all (a session's worth; --resume goes on)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_training_flags(train)
    train.set_defaults(handler=cmd_train_lora)

    from . import DEFAULT_MODEL

    loras = commands.add_parser("loras", help="list the LoRA folder: name, layout, rank, targets, size, hash",
                                description="List the LoRAs of the LoRA folder, each read against a checkpoint's "
                                            "transformer; a file that does not read is listed with the reason.")
    _add_lora_dir(loras)
    loras.add_argument("--model-name", default=DEFAULT_MODEL, metavar="ID",
                       help=f"the checkpoint the LoRAs are read against (default: {DEFAULT_MODEL})")
    loras.set_defaults(handler=cmd_loras)

    schema = commands.add_parser("schema", help="print the JSON Schema of the settings")
    schema.set_defaults(handler=cmd_schema)

    info = commands.add_parser("info", help="print the settings stored in a PNG")
    info.add_argument("image", metavar="IMAGE.png")
    info.set_defaults(handler=cmd_info)

    from . import COMPILE_COST
    from .server import API_KEY_ENV, KEEP_GRACE_SECONDS, MAX_QUEUE_SIZE  # light: the web stack loads only when serving

    serve = commands.add_parser(
        "serve", help="run the HTTP service and its web page",
        description="Serve generation over HTTP (a job queue, OpenAI- and A1111-compatible routes) and a web page at /. "
                    "Models load and warm at start; jobs run one at a time; state lives in --data-dir.")
    serve.add_argument("--model-name", dest="model_names", action="append", metavar="ID",
                       help="a model to serve (repeat for several; requests may choose among these only); "
                            "default: the 1024 checkpoint")
    serve.add_argument("--device", default="auto", help="where the models run (default: auto)")
    serve.add_argument("--dtype", default="auto", help="number format (default: auto)")
    serve.add_argument("--text-encoder-dtype", default="auto", help="the T5 encoder's number format (default: auto)")
    serve.add_argument("--memory", default="auto", choices=list(MEMORY_MODES),
                       help="memory mode, as in `pixart-sigma generate --help` (default: auto)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1); any other needs an API key")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one, printed at start)")
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="jobs database and images (default: $PIXART_SIGMA_HOME, else the user data folder)")
    serve.add_argument("--queue-size", type=int, default=8,
                       help=f"jobs that may wait behind the running one, 1 to {MAX_QUEUE_SIZE} (default: 8)")
    serve.add_argument("--keep-jobs", type=int, default=0, metavar="N",
                       help="keep the newest N finished jobs and their images, deleting older ones (default: 0, "
                            "keep all); a job is never deleted while a request waits for it, nor within "
                            "--keep-grace seconds of its end or of its image URLs going out to a client")
    serve.add_argument("--keep-grace", type=float, default=KEEP_GRACE_SECONDS, metavar="SECONDS",
                       help=f"with --keep-jobs: how long a job just finished or just shown is kept whatever N (default: "
                            f"{KEEP_GRACE_SECONDS:g})")
    serve.add_argument("--allow-compile", action="store_true",
                       help=f"let requests ask for compile=true ({COMPILE_COST}); without it such requests are "
                            "refused with 422")
    serve.add_argument("--lora-dir", type=Path, default=None, metavar="FOLDER",
                       help="the LoRA folder: requests name LoRAs of it (never a path), and GET /v1/loras and "
                            "/sdapi/v1/loras list it (default: $PIXART_SIGMA_HOME/loras)")
    serve.add_argument("--api-key", default=None,
                       help="bearer token every route requires but /healthz and the page's own files "
                            f"(default: ${API_KEY_ENV})")
    serve.set_defaults(handler=cmd_serve)

    models = commands.add_parser("models", help="list the known checkpoints: downloaded or not, size, folder")
    models.add_argument("--json", action="store_true", help="print JSON instead of lines")
    models.add_argument("-v", "--verbose", action="store_true", help="say what is missing and how to download it")
    models.set_defaults(handler=cmd_models)
    return parser


def _quiet_libraries() -> None:
    from . import quiet_libraries

    quiet_libraries()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import Cancelled, PixArtSigmaError

    try:
        return args.handler(args)
    except BrokenPipeError:  # the reader left (`pixart-sigma schema | head`): end quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
        return 141  # what a shell reports for a tool ended by SIGPIPE
    except (KeyboardInterrupt, Cancelled):
        print("cancelled", file=sys.stderr)
        return 130
    except (PixArtSigmaError, _UsageError, OSError) as exc:  # everything we refuse, and unreadable files
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
