"""Batch generation on Ray Data: the local batch's output (same names, same pixels), over many workers.

The driver does everything that decides the output: it reads and checks every prompt and setting,
names each prompt's images as the local batch does (`plan_batch`), leaves out what an earlier run
finished, and draws the random seeds (so a batch Ray runs again after a worker died makes the same
images). Workers only generate: one Ray actor per worker keeps one warm model and answers each
prompt with PNG bytes that carry the image's settings. The driver writes those bytes atomically,
never over an existing file, so a cluster needs no shared file system, and an image that arrives
twice (Ray retries a failed batch whole) is written once.

LoRAs travel the same way, with no shared file system either: the driver resolves each LoRA the run
names once (a name in the LoRA folder, or a path) and hashes it; at the start of the run it reads the
files again, refuses if they changed since (their SHA-256 keys the file names), and puts their bytes
into Ray's object store once. Each worker fetches them (once per node), checks the SHA-256 of what it
got (refusing, naming the file, if it differs) and reads them from a folder of its own, under their own
names: the images record the same names, scales and hashes as the local batch's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ... import (CheckpointError, EditSettings, PixArtSigmaError, PixArtSigmaModel, SettingsError, check_edit,
                 check_output_dir, quiet_libraries, read_picture, resolve_lora, sha256_of)
from ...batch import BatchItem, plan_batch
from ...devices import dtype_name
from ...images import image_bytes, save_bytes
from ...lora_formats import PEFT_CONFIG
from ...settings import LOAD_SETTINGS, Settings, check_text, shown

log = logging.getLogger(__name__)
MAX_PROBLEMS = 20  # problems listed at once, as the prompt file's check does
TASK_RETRIES = 3  # times one prompt is tried again after its worker died; then the run stops
GPU_DEVICES = ("auto", "gpu", "cuda", "cuda:0")  # on Ray a worker sees only the one GPU it was given


PICTURE_COLUMNS = ("image", "mask")  # an edit's pictures: bytes, a path on the driver, or a PIL image


@dataclass
class Pictures:
    """A row's edit pictures, read and checked on the driver and sent to the worker as PNG bytes (no shared disk)."""

    image: bytes
    mask: Optional[bytes]
    key: dict[str, Any]  # the edit's settings and the pictures' SHA-256: part of the files' names


@dataclass
class Checked:
    """One row after the driver's checks."""

    prompt: str
    overrides: dict[str, Any]  # per-row settings (an edit's included)
    values: dict[str, Any]  # the run's settings with the row's, validated
    pictures: Optional[Pictures] = None


@dataclass
class Work:
    """One row of the input: its prompt and settings, and what is still to be made of it."""

    row: int
    label: str  # how messages name it: "row 3", or a prompt file's "line 7"
    prompt: str
    overrides: dict[str, Any]  # per-row settings, checked
    pictures: Optional[Pictures] = None
    item: Optional[BatchItem] = None  # the local batch's names, when writing to a folder
    missing: list[int] = field(default_factory=list)
    seed: Optional[int] = None  # first seed: given, drawn here, or the one an earlier run drew


@dataclass(frozen=True)
class ShippedLora:
    """A LoRA the run names, resolved and hashed once on the driver: what its workers are sent."""

    given: str  # as the settings name it: a name in the LoRA folder, or a path
    path: Path  # on the driver: a .safetensors file or a PEFT folder
    weights: Path  # the file hashed (a PEFT folder's adapter_model.safetensors)
    sha256: str

    def files(self) -> list[tuple[str, Path]]:
        """(where the worker puts it, relative to the LoRA's own folder there; the file here)."""
        if not self.path.is_dir():
            return [(self.path.name, self.path)]
        config = self.path / PEFT_CONFIG
        return [(f"{self.path.name}/{file.name}", file) for file in (config, self.weights) if file.is_file()]


@dataclass
class Plan:
    work: list[Work]
    settings: dict[str, Any]  # the run's settings, dtype=auto resolved here: every worker uses the same formats
    output_dir: Optional[Path]
    loras: dict[str, ShippedLora] = field(default_factory=dict)  # by the name the settings give


# -- checking and planning, before Ray starts ------------------------------------------------------

def _plain(value: Any) -> Any:
    """A Dataset's numpy scalar as the Python value the library's checks expect."""
    return value.item() if hasattr(value, "item") and getattr(value, "shape", None) == () else value


def _row_values(row: Any, number: int) -> tuple[Any, dict[str, Any], dict[str, Any], list[str]]:
    """(prompt, per-row settings, pictures, problems) of one input row: a prompt, or a mapping with "prompt",
    settings and for an edit its pictures."""
    if isinstance(row, str):
        return row, {}, {}, []
    if not isinstance(row, dict):
        return None, {}, {}, [f"row {number}: {shown(row)} is not valid: give a prompt, or a mapping with \"prompt\" "
                              "and settings"]
    values = {key: _plain(value) for key, value in row.items() if _plain(value) is not None}  # None: not set
    pictures = {key: values.pop(key) for key in PICTURE_COLUMNS if key in values}
    problems = []
    if "prompt" not in values:
        problems.append(f"row {number}: prompt is missing: every row needs one")
    run_wide = sorted(set(values) & set(LOAD_SETTINGS))
    problems += [f"row {number}: {name} is the same for the whole run (each worker keeps one model): pass it "
                 f"once, e.g. {name}=..." for name in run_wide]
    per_row = Settings.per_call_names() + list(EditSettings.model_fields)
    unknown = sorted(set(values) - set(Settings.field_names()) - set(per_row) - {"prompt"})
    if unknown:
        problems.append(f"row {number}: {', '.join(map(str, unknown))} {'is' if len(unknown) == 1 else 'are'} not a "
                        f"setting: per-row settings are {', '.join(per_row)}, and an edit's {' and '.join(PICTURE_COLUMNS)}")
    overrides = {key: value for key, value in values.items() if key in per_row}
    return values.get("prompt"), overrides, pictures, problems


def _pictures(given: dict[str, Any], overrides: dict[str, Any], values: dict[str, Any]) -> Optional[Pictures]:
    """A row's edit, checked as the library checks it (SettingsError), and its pictures as PNG bytes; None for text."""
    settings = {key: value for key, value in overrides.items() if key not in EditSettings.model_fields}
    edit_values = {key: value for key, value in overrides.items() if key in EditSettings.model_fields}
    edit = check_edit(given.get("image"), given.get("mask"), edit_values, settings, values["checkpoint"].native_size)
    if edit is None:
        return None
    mask = given.get("mask")
    return Pictures(image_bytes(read_picture(given["image"], "image")),
                    image_bytes(read_picture(mask, "mask")) if mask is not None else None, edit.record())


def check_rows(rows: Iterable[Any], settings: dict[str, Any], numbers: Optional[Sequence[int]] = None
               ) -> list[Checked]:
    """Every row checked (an edit's pictures read too), or one SettingsError naming each bad row.

    The run's settings are checked once, each distinct per-row combination once, by the library's rules.
    `numbers` are how the rows are called in messages (a prompt file's line numbers); default 0, 1, ...
    """
    rows = list(rows)
    numbers = list(numbers) if numbers is not None else list(range(len(rows)))
    # The run's own settings first: a problem there is said once, not once a row.
    checked: dict[str, Any] = {"{}": PixArtSigmaModel.validate_and_transform(settings)}
    out, problems = [], []
    for number, row in zip(numbers, rows):
        prompt, overrides, given, row_problems = _row_values(row, number)
        if prompt is not None:
            try:
                prompt = check_text("prompt", prompt, required=True)
            except SettingsError as exc:
                row_problems += [f"row {number}: {problem}" for problem in exc.problems]
        plain = {key: value for key, value in overrides.items() if key not in EditSettings.model_fields}
        key = json.dumps(plain, sort_keys=True, default=repr)
        if key not in checked:
            try:
                checked[key] = PixArtSigmaModel.validate_and_transform({**settings, **plain})
            except SettingsError as exc:
                checked[key] = exc
        pictures = None
        if isinstance(checked[key], SettingsError):
            row_problems += [f"row {number}: {problem}" for problem in checked[key].problems]
        else:
            try:
                pictures = _pictures(given, overrides, checked[key])
            except SettingsError as exc:
                row_problems += [f"row {number}: {problem}" for problem in exc.problems]
        problems += row_problems
        if not row_problems:
            out.append(Checked(prompt, overrides, checked[key], pictures))
    if problems:
        more = [f"... and {len(problems) - MAX_PROBLEMS} more"] if len(problems) > MAX_PROBLEMS else []
        raise SettingsError(problems[:MAX_PROBLEMS] + more)
    return out


def _resolve_loras(rows: list[Checked], labels: list[str], lora_dir: Optional[Path]) -> dict[str, ShippedLora]:
    """Every LoRA the rows use, resolved (in `lora_dir`, or by path) and hashed once; SettingsError naming each
    that cannot be (a row's own LoRAs with its label)."""
    shipped: dict[str, ShippedLora] = {}
    problems: list[str] = []
    tried: set[str] = set()
    for row, label in zip(rows, labels):
        for index, item in enumerate(row.values["loras"]):
            name = item["name"]
            if name in tried:  # once each, however many rows name it
                continue
            tried.add(name)
            own = "loras" in row.overrides  # the row's own setting: say which row
            where = f"loras.{index}.name"
            try:
                found = resolve_lora(name, lora_dir, where=where)
                shipped[name] = ShippedLora(name, found.path, found.weights, sha256_of(found.weights))
            except SettingsError as exc:
                problems += [f"{label}: {problem}" if own else problem for problem in exc.problems]
            except CheckpointError as exc:
                problems.append(f"{label + ': ' if own else ''}{where}={shown(name)} cannot be used: {exc}")
    if problems:
        raise SettingsError(problems[:MAX_PROBLEMS])
    return shipped


def plan(rows: list[Checked], settings: dict[str, Any], output_dir: Optional[Path],
         lines: Optional[Sequence[int]] = None, lora_dir: Optional[Union[str, os.PathLike]] = None) -> Plan:
    """Name every row's images as the local batch does, leave out what is done, and fix every seed now.
    The LoRAs are resolved (names in `lora_dir`, default the LoRA folder, or paths) and hashed here, once."""
    labels = [f"line {line}" for line in lines] if lines is not None else [f"row {row}" for row in range(len(rows))]
    lines = list(lines) if lines is not None else list(range(len(rows)))
    loras = _resolve_loras(rows, labels, Path(lora_dir).expanduser() if lora_dir is not None else None)
    work = [Work(index, labels[index], row.prompt, row.overrides, row.pictures) for index, row in enumerate(rows)]
    groups: dict[str, list[int]] = {}  # rows with the same settings are one local batch: names as plan_batch gives
    for index, row in enumerate(rows):
        edit = row.pictures.key if row.pictures is not None else None
        groups.setdefault(json.dumps([row.overrides, edit], sort_keys=True, default=repr), []).append(index)
    for members in groups.values():
        first = rows[members[0]]
        # An edit's settings and pictures decide its pixels: they are part of its files' names.
        values = first.values if first.pictures is None else {**first.values, "edit": first.pictures.key}
        records = [{"sha256": loras[item["name"]].sha256, "scale": item["scale"]} for item in values["loras"]]
        items = plan_batch([(lines[i], rows[i].prompt) for i in members], values, records)  # by SHA-256, not name
        for index, item in zip(members, items):
            unit = work[index]
            unit.item = item
            unit.missing = item.missing(output_dir) if output_dir is not None else list(range(len(item.names)))
            # Drawn once, here: a retried row makes the same images.
            unit.seed = item.first_seed(values["seed"], output_dir) if unit.missing else values["seed"]
    return Plan(work, resolved_formats(settings), output_dir, loras)


def resolved_formats(settings: dict[str, Any]) -> dict[str, Any]:
    """The run's settings with dtype and text_encoder_dtype as this machine resolves them, once for all workers:
    on nodes with and without native bfloat16, `auto` would pick different formats, so different pixels under
    the same file names."""
    values = PixArtSigmaModel.validate_and_transform(settings)
    return {**settings, "dtype": dtype_name(values["torch_dtype"]),
            "text_encoder_dtype": dtype_name(values["torch_text_encoder_dtype"])}


# -- the workers --------------------------------------------------------------------------------------

class Worker:
    """One Ray actor of the pool: a warm model, and PNG bytes (settings inside) for each prompt it is given.

    What the library refuses (a checkpoint missing on this node, a NaN image) comes back to the driver
    as a row naming the error, not as a crash: Ray would only try it again, and hide the message.
    """

    def __init__(self, settings: dict[str, Any], threads: Optional[int], loras: Sequence[dict[str, Any]] = ()):
        import torch

        if threads:  # on the CPU the thread count changes float rounding: the driver says how many, for its pixels
            torch.set_num_threads(threads)
        quiet_libraries()
        self.model: Optional[PixArtSigmaModel] = None
        self.refused: Optional[PixArtSigmaError] = None
        self.local: dict[str, str] = {}  # a LoRA's name as the settings give it -> its copy on this worker
        try:
            self._receive(loras)
            if "loras" in settings:
                settings = {**settings, "loras": self._local(settings["loras"])}
            self.model = PixArtSigmaModel(**settings)
        except PixArtSigmaError as exc:  # said at the first prompt
            self.refused = exc

    def _receive(self, loras: Sequence[dict[str, Any]]) -> None:
        """The run's LoRAs, from the object store into a folder of this worker's, each checked by its SHA-256."""
        if not loras:
            return
        import ray

        self.folder = tempfile.TemporaryDirectory(prefix="pixart-sigma-loras-")  # removed with the worker
        for lora in loras:
            root = Path(self.folder.name) / lora["sha256"]
            for relative, ref in lora["files"]:
                data = ray.get(ref)
                if relative == lora["weights"] and hashlib.sha256(data).hexdigest() != lora["sha256"]:
                    raise CheckpointError(
                        f"loras: {lora['given']} ({relative}) reached this worker with SHA-256 "
                        f"{hashlib.sha256(data).hexdigest()}, not the {lora['sha256']} the driver hashed: refusing "
                        "to use it (run the batch again)")
                target = root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.local[lora["given"]] = str(root / lora["top"])

    def _local(self, loras: Any) -> Any:
        """A `loras` setting with each name the driver resolved replaced by this worker's copy."""
        if not loras:
            return loras
        items = [item if isinstance(item, dict) else item.model_dump() for item in loras]
        return [{**item, "name": self.local.get(item["name"], item["name"])} for item in items]

    def _shown(self, problem: str) -> str:
        """A message naming a LoRA as the run named it, not by this worker's copy."""
        for given, local in self.local.items():
            problem = problem.replace(repr(local), repr(given)).replace(local, given)
        return problem

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"row": [], "image": [], "png": [], "error": []}
        for row, prompt, overrides, seed, missing, picture, mask in zip(
                batch["row"], batch["prompt"], batch["overrides"], batch["seed"], batch["missing"],
                batch["picture"], batch["mask"]):
            edit = {"image": bytes(picture)} if len(picture) else {}
            if len(mask):
                edit["mask"] = bytes(mask)
            try:
                if self.refused is not None:
                    raise self.refused
                given = json.loads(overrides)
                if "loras" in given:
                    given["loras"] = self._local(given["loras"])
                images = self.model.generate(str(prompt), **edit, **{**given, "seed": int(seed)})
            except PixArtSigmaError as exc:
                problems = [self._shown(problem) for problem in getattr(exc, "problems", None) or [str(exc)]]
                error = json.dumps({"kind": type(exc).__name__, "problems": problems})
                _add(out, int(row), -1, error=error)
                continue
            for index in json.loads(missing):
                _add(out, int(row), index, png=image_bytes(images[index]))
        return out


def _add(out: dict[str, list], row: int, image: int, png: bytes = b"", error: str = "") -> None:
    for key, value in (("row", row), ("image", image), ("png", png), ("error", error)):
        out[key].append(value)


def _raised(error: str, unit: Work) -> PixArtSigmaError:
    """A worker's refusal, again as the library's error, naming the prompt."""
    from ... import errors

    data = json.loads(error)
    where = f"{unit.label} ({shown(unit.prompt, 60)}), on a Ray worker"
    if data["kind"] == "SettingsError":
        return SettingsError([f"{where}: {problem}" for problem in data["problems"]])
    kind = getattr(errors, data["kind"], None)
    if not (isinstance(kind, type) and issubclass(kind, PixArtSigmaError)):
        kind = PixArtSigmaError
    return kind(f"{where}: " + "\n".join(data["problems"]))


# -- the driver ---------------------------------------------------------------------------------------

QUIET = {"logging_level": logging.WARNING, "log_to_driver": False, "include_dashboard": False}


def start_local_ray(cpus: int, **options: Any) -> None:
    """A Ray on this machine's loopback alone, without its dashboard; `options` go to `ray.init`."""
    import ray

    ray.init(_node_ip_address="127.0.0.1", num_cpus=cpus, **{**QUIET, **options})


@dataclass
class Session:
    """The Ray this run uses: one already started in this process, a local one, or a cluster's."""

    started: bool  # ours to shut down at the end

    @classmethod
    def open(cls, address: Optional[str], cpus: int) -> "Session":
        import ray

        if ray.is_initialized():
            return cls(started=False)
        if address:
            ray.init(address=address, **QUIET)
        else:
            start_local_ray(cpus)
        return cls(started=True)

    def close(self) -> None:
        import ray

        if self.started:
            ray.shutdown()


def _placement(settings: dict[str, Any], workers: Optional[int], threads: int) -> tuple[int, dict[str, Any], Optional[int]]:
    """(workers, the actors' resources, CPU threads per worker) for the cluster Ray is connected to."""
    import ray

    resources = ray.cluster_resources()
    device = str(settings.get("device", "auto")).strip().lower()
    if resources.get("GPU", 0) >= 1 and device != "cpu":
        if device not in GPU_DEVICES:
            raise SettingsError([f"device={settings['device']!r} cannot be used on Ray: each worker is given one GPU of "
                                 f"its own; use device auto, gpu or cuda (or cpu)"])
        count = workers or int(resources["GPU"])
        return count, {"num_gpus": 1, "num_cpus": 1}, None
    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    threads = max(1, min(threads, int(max(nodes, default=threads))))  # a worker must fit on one node
    count = workers or max(1, int(resources.get("CPU", threads) // threads))
    return count, {"num_cpus": threads}, threads


def run(plan_: Plan, *, workers: Optional[int] = None, address: Optional[str] = None, progress: bool = True,
        on_image: Optional[Callable[[int, int, Union[Path, Any]], None]] = None) -> dict[tuple[int, int], Any]:
    """Generate what `plan_` still needs on Ray; {(row, image index): Path written, or PIL image}.

    `workers`: actors, each with a warm model (default: one per GPU, else as many as the CPUs hold);
    `address`: a cluster's (default: a local Ray started for the run, unless this process has one).
    """
    import torch

    todo = [unit for unit in plan_.work if unit.missing]
    results: dict[tuple[int, int], Any] = {}
    if not todo:
        return results
    threads = torch.get_num_threads()  # what a local run in this process uses
    session = Session.open(address, cpus=max(os.cpu_count() or 1, (workers or 1) * threads))
    try:
        import ray

        count, resources, worker_threads = _placement(plan_.settings, workers, threads)
        loras = _put_loras(plan_.loras)
        rows = [{"row": unit.row, "prompt": unit.prompt, "overrides": json.dumps(unit.overrides), "seed": unit.seed,
                 "missing": json.dumps(unit.missing), **_picture_columns(unit.pictures)} for unit in todo]
        with warnings.catch_warnings():
            # max_task_retries has no named parameter in Ray 2.60 (the extra pins it): without it a prompt that
            # kills its worker each time would be retried for ever.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                Worker, fn_constructor_kwargs={"settings": plan_.settings, "threads": worker_threads, "loras": loras},
                compute=ray.data.ActorPoolStrategy(size=min(count, len(rows))), batch_size=1, batch_format="numpy",
                max_task_retries=TASK_RETRIES, **resources)
        with _quiet_data():
            _collect(dataset, todo, plan_.output_dir, results, progress, on_image)
    finally:
        session.close()
    return results


def _put_loras(loras: dict[str, ShippedLora]) -> list[dict[str, Any]]:
    """Each LoRA's files read again and put into Ray's object store once, for every worker; CheckpointError
    naming the file if it changed since the plan hashed it (its SHA-256 names the images)."""
    import ray

    sent = []
    for lora in loras.values():
        files = []
        for relative, path in lora.files():
            data = path.read_bytes()
            if path == lora.weights and hashlib.sha256(data).hexdigest() != lora.sha256:
                raise CheckpointError(f"loras: {path} changed since the batch was planned (SHA-256 {lora.sha256} "
                                      f"then, {hashlib.sha256(data).hexdigest()} now): run the batch again")
            files.append((relative, ray.put(data)))
        weights = next(relative for relative, path in lora.files() if path == lora.weights)
        sent.append({"given": lora.given, "sha256": lora.sha256, "files": files, "weights": weights,
                     "top": lora.path.name})
    return sent


def _picture_columns(pictures: Optional[Pictures]) -> dict[str, bytes]:
    """An edit's pictures as binary columns (empty for text to image: a column holds one type)."""
    if pictures is None:
        return {"picture": b"", "mask": b""}
    return {"picture": pictures.image, "mask": pictures.mask or b""}


@contextlib.contextmanager
def _quiet_data():
    """Our progress bar instead of Ray Data's bars and execution logs; the caller's own settings come back after."""
    import ray

    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = context.enable_progress_bars, context.print_on_execution_start, logger.level
    context.enable_progress_bars = context.print_on_execution_start = False
    logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start, level = saved
        logger.setLevel(level)


def _collect(dataset, todo: list[Work], output_dir: Optional[Path], results: dict, progress: bool,
             on_image: Optional[Callable]) -> None:
    """Write (or keep) each image as it arrives, once; a bar over the prompts on the driver."""
    from PIL import Image
    from tqdm import tqdm

    by_row = {unit.row: unit for unit in todo}
    left = {unit.row: len(unit.missing) for unit in todo}
    with tqdm(total=len(todo), desc="prompts", unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for record in dataset.iter_rows():
            row, index = int(record["row"]), int(record["image"])
            if record["error"]:
                raise _raised(record["error"], by_row[row])
            if (row, index) in results or index not in by_row[row].missing:
                continue  # sent again by a retried batch: the same image, already taken
            data = bytes(record["png"])
            if output_dir is None:
                image = Image.open(io.BytesIO(data))
                image.load()
                results[row, index] = image
            else:
                path = output_dir / by_row[row].item.names[index]
                try:
                    results[row, index] = save_bytes(data, path, overwrite=False)
                except FileExistsError:  # another run wrote it meanwhile: keep theirs
                    results[row, index] = path
            if on_image is not None:
                on_image(row, index, results[row, index])
            left[row] -= 1
            if left[row] == 0:
                bar.update(1)


# -- the Python entry -------------------------------------------------------------------------------

def generate(prompts: Any, output_dir: Union[str, os.PathLike, None] = None, *, workers: Optional[int] = None,
             address: Optional[str] = None, progress: bool = True, lora_dir: Union[str, os.PathLike, None] = None,
             **settings: Any) -> list[list[Any]]:
    """Generate for many prompts on Ray; for each prompt (in order), its images, or their files in `output_dir`.

    `prompts`: a list of prompts, of mappings (`{"prompt": ..., "seed": 7, ...}`: per-row settings), or
    a Ray Dataset with a "prompt" column and optional columns named as settings (null: not set). A row
    with an "image" (bytes, a path on this machine, or a PIL image), and optionally a "mask" and edit
    settings ("strength", "expand", ...), edits that picture as `PixArtSigmaModel.generate(image=...)`
    does. Every row is checked by the library's rules (its pictures read) before any worker starts;
    errors name the row.
    `settings`: for the whole run (model_name, device, dtype and the defaults of the rest).
    `output_dir`: write the files as `pixart-sigma batch` names them, skip what is there already
    (resumable), return their paths; without it the images come back as PIL images.
    `workers`, `address`: as for `run`. `lora_dir`: the folder LoRA names are looked up in (default: the LoRA
    folder); a LoRA (`loras=[...]`, for the run or a row) is resolved and hashed here and sent to the workers.
    """
    rows = _input_rows(prompts)
    checked = check_rows(rows, settings)
    folder = check_output_dir(output_dir) if output_dir is not None else None
    plan_ = plan(checked, settings, folder, lora_dir=lora_dir)
    made = run(plan_, workers=workers, address=address, progress=progress)
    return [[made.get((unit.row, index), folder / name if folder is not None else None)
             for index, name in enumerate(unit.item.names)] for unit in plan_.work]


def _input_rows(prompts: Any) -> list[Any]:
    if isinstance(prompts, (str, bytes)):
        raise SettingsError([f"prompts={shown(prompts)} is not valid: pass a list of prompts (or a Ray Dataset)"])
    if hasattr(prompts, "take_all") and hasattr(prompts, "map_batches"):  # a Ray Dataset: its rows, in its order
        return prompts.take_all()
    try:
        rows = list(prompts)
    except TypeError:
        raise SettingsError([f"prompts={shown(prompts)} is not valid: pass a list of prompts (or a Ray Dataset)"]) from None
    if not rows:
        raise SettingsError(["prompts is empty: pass at least one prompt"])
    return rows
