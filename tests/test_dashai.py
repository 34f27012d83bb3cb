"""The DashAI plugin, against the real dashai 0.10.0 package: discovery, registry, validation, DashAI's flow."""

import json
import os
from typing import Literal, Optional

import numpy as np
import pytest
from PIL import Image
from pydantic import Field, ValidationError

pytest.importorskip("DashAI", reason="dashai is installed by `make test` (see requirements-dashai-test.txt)")

os.environ.setdefault("DASHAI_LOCAL_PATH", os.environ["HF_HOME"])  # DashAI's plugin folder: keep it private

from DashAI.back.config_object import ConfigObject  # noqa: E402
from DashAI.back.dependencies.database.models import ProcessData  # noqa: E402
from DashAI.back.dependencies.registry.component_registry import ComponentRegistry  # noqa: E402
from DashAI.back.plugins.utils import get_available_plugins  # noqa: E402
from DashAI.back.tasks.text_to_image_generation_task import TextToImageGenerationTask  # noqa: E402

from pixart_sigma import PixArtSigmaModel as CoreModel  # noqa: E402
from pixart_sigma import SettingsError, read_settings  # noqa: E402
from pixart_sigma.checkpoints import KNOWN_CHECKPOINTS  # noqa: E402
from pixart_sigma.settings import DEFAULT_MODEL, Settings  # noqa: E402

from conftest import BASE_REPO  # noqa: E402

GOOD = {"model_name": BASE_REPO, "negative_prompt": "", "num_inference_steps": 3, "guidance_scale": 4.5,
        "device": "CPU", "seed": 42, "width": 64, "height": 64, "num_images_per_prompt": 2, "dtype": "auto",
        "text_encoder_dtype": "auto",
        "memory": "auto", "vae_tiling": False, "compile": False, "scheduler": "dpm-solver++", "use_resolution_binning": True, "max_sequence_length": 300,
        "loras": "[]",  # a list of objects: DashAI's form sends it as JSON text
        "step_cache": "off", "step_cache_threshold": 0.1, "step_cache_interval": 2, "step_cache_warmup": 1,
        "step_cache_cooldown": 2}


@pytest.fixture(scope="module")
def plugin():
    found = [cls for cls in get_available_plugins() if cls.__module__ == "pixart_sigma.integrations.dashai"]
    assert len(found) == 1, "DashAI's plugin discovery did not find our entry point"
    return found[0]


@pytest.fixture(scope="module")
def registry(plugin):
    return ComponentRegistry(initial_components=[TextToImageGenerationTask, plugin])


def test_core_package_never_imports_dashai():
    import subprocess
    import sys

    code = "import sys, pixart_sigma, pixart_sigma.cli; assert not [m for m in sys.modules if m.startswith('DashAI')]"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_registry_accepts_it_as_a_text_to_image_model(registry, plugin, hub_cache):
    entry = registry["PixArtSigmaModel"]
    assert entry["class"] is plugin and entry["type"] == "GenerativeModel" and entry["configurable_object"]
    assert [c["name"] for c in registry.get_related_components("PixArtSigmaModel")] == ["TextToImageGenerationTask"]
    assert entry["color"] and "PixArt-Sigma" in str(entry["display_name"])
    assert entry["metadata"]["requires_download"] is True
    assert entry["metadata"]["download_size_bytes"] == 24_300_000_000
    assert entry["metadata"]["download_size_bytes_by_model"][BASE_REPO] == 21_900_000_000
    assert registry.refresh_download_status("PixArtSigmaModel") is True  # 1024 + 512 are in the HF cache


def test_the_front_end_schema_carries_our_fields_defaults_bounds_and_descriptions(registry):
    schema = registry["PixArtSigmaModel"]["schema"]
    properties = schema["properties"]
    assert set(GOOD) == set(properties)
    assert properties["num_inference_steps"]["placeholder"] == 20
    assert properties["guidance_scale"]["placeholder"] == 4.5
    assert properties["width"]["multipleOf"] == 8 and properties["width"]["maximum"] == 2048
    assert properties["seed"]["minimum"] == -1 and properties["seed"]["placeholder"] == -1
    assert properties["model_name"]["enum"][0] == BASE_REPO and "demo" in properties["model_name"]["enum"]
    assert properties["device"]["enum"][-1] == "CPU"
    assert properties["scheduler"]["enum"] == ["dpm-solver++", "sa-solver", "euler", "euler-ancestral", "ddim", "unipc"]
    # Optional fields carry their description inside anyOf, as DashAI's own components do.
    assert all(p.get("description") or p["anyOf"][0]["description"] for p in properties.values())
    assert "Images per prompt" in str(properties["num_images_per_prompt"]["title"])  # our alias


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _flat(prop: dict) -> dict:
    """A nullable property keeps its details in the non-null anyOf branch: merge them in."""
    merged = dict(prop)
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            merged.update(branch)
    return merged


def _assert_form_is(form: dict, settings: type[Settings]) -> None:
    """DashAI's form schema says what `settings` says: names in order, labels, descriptions, types, bounds, defaults."""
    from pixart_sigma.integrations.dashai import PLACEHOLDERS

    from pixart_sigma.integrations.dashai import _is_json_text

    declared = settings.model_json_schema()["properties"]
    assert list(form["properties"]) == list(declared)
    assert form["required"] == list(declared)  # the form sends every field
    for name, ours in declared.items():
        shown, ours = _flat(form["properties"][name]), _flat(ours)
        if _is_json_text(ours):  # a list of objects (loras): JSON text, as tests/test_structured_settings.py shows
            assert shown["type"] == "string" and shown["placeholder"] == json.dumps(ours["default"]), name
            assert shown["description"].en == f"{ours['description']} Write {settings.json_hint(name)}.", name
            continue
        assert shown["title"].en == ours["title"], name
        assert shown["description"].en == ours["description"], name
        assert shown["type"] == ours["type"], name
        assert {k: shown.get(k) for k in BOUNDS} == {k: ours.get(k) for k in BOUNDS}, name
        if "enum" in ours:
            assert shown["enum"] == ours["enum"], name
        # The few defaults a form cannot show (None, "auto") are replaced, and only those.
        assert shown["placeholder"] == PLACEHOLDERS.get(name, ours["default"]), name
        assert name not in PLACEHOLDERS or ours["default"] in (None, "auto"), name


def test_the_front_end_schema_is_built_from_settings(registry):
    _assert_form_is(registry["PixArtSigmaModel"]["schema"], Settings)
    properties = registry["PixArtSigmaModel"]["schema"]["properties"]
    native = KNOWN_CHECKPOINTS[DEFAULT_MODEL].native_size  # width/height: None in Settings, the native size here
    assert properties["width"]["placeholder"] == properties["height"]["placeholder"] == native


def test_a_new_setting_reaches_dashais_form_with_no_edit_to_the_plugin(plugin):
    from pixart_sigma.integrations.dashai import dashai_schema

    class Extended(Settings):
        eta: float = Field(0.5, title="Eta", ge=0.0, le=1.0, description="DDIM noise: 0 deterministic, 1 DDPM-like.")
        tile: Optional[int] = Field(None, title="Tile size", description="VAE tile side; null: no tiling.",
                                    json_schema_extra={"minimum": 64, "maximum": 1024, "multipleOf": 64})
        preview: Literal["none", "latent", "full"] = Field("none", title="Preview", description="Intermediate images.")

    extended = type("ExtendedPixArtSigmaModel", (plugin,), {"SCHEMA": dashai_schema(Extended)})
    form = extended.get_schema()  # DashAI's own path from SCHEMA to the front end
    assert list(form["properties"])[-3:] == ["eta", "tile", "preview"]
    _assert_form_is(form, Extended)
    values = extended.SCHEMA.model_validate({**GOOD, "eta": 0.2, "tile": None, "preview": "latent"})
    assert (values.eta, values.tile, values.preview) == (0.2, None, "latent")
    for bad in ({"eta": 1.5}, {"tile": 96}, {"preview": "gif"}):
        with pytest.raises(ValidationError):
            extended.SCHEMA.model_validate({**GOOD, "eta": 0.2, "tile": None, "preview": "latent", **bad})


def test_validate_and_transform_through_dashai(plugin, hub_cache):
    assert issubclass(plugin, ConfigObject)
    values = plugin.validate_and_transform(dict(GOOD))
    assert values["seed"] == 42 and values["torch_device"].type == "cpu" and values["negative_prompt"] is None
    for bad, fragment in [({"width": 1001}, "nearest valid: 1000 or 1008"), ({"guidance_scale": float("nan")}, "finite"),
                          ({"device": "GPU 0: NVIDIA H100 - Compute Capability 9.0"}, "not available here"),
                          ({"checkpoint": "512"}, "valid names are")]:
        with pytest.raises(SettingsError, match=fragment):
            plugin.validate_and_transform({**GOOD, **bad})


def test_a_generation_through_dashais_own_flow(plugin, registry, hub_cache, tmp_path):
    import time

    from pixart_sigma import engine

    task = registry["TextToImageGenerationTask"]["class"]()
    prompt = task.prepare_for_task([ProcessData(data="a red circle on a blue background", data_type="str")])
    start = time.perf_counter()
    model = plugin(**GOOD)  # what DashAI's generative job does for every job
    first = time.perf_counter() - start
    output = model.generate(prompt)
    first_engine, loads = model.model.engine, engine.load_count
    del model
    start = time.perf_counter()
    second_model = plugin(**GOOD)  # the next job: a new object, the weights stay warm
    second = time.perf_counter() - start
    print(f"\nDashAI job 1 construction {first:.3f} s, job 2 {second:.3f} s")
    assert engine.load_count == loads and second_model.model.engine is first_engine

    saved = task.process_output(output, images_path=tmp_path / "images")
    assert len(saved) == 2 and all(kind == "Image" for _, kind in saved)
    for (name, _), image in zip(saved, output):
        reread = Image.open(tmp_path / "images" / name)
        assert reread.size == (64, 64)
        assert np.array_equal(np.asarray(reread), np.asarray(image))


def test_same_settings_and_seed_give_the_same_pixels_as_our_api(plugin, hub_cache):
    through_dashai = plugin(**GOOD).generate("a green triangle")
    ours = CoreModel(**{k: v for k, v in GOOD.items() if k not in ("negative_prompt", "loras")}).generate("a green triangle")
    assert [read_settings(i)["seed"] for i in through_dashai] == [42, 43]
    for a, b in zip(through_dashai, ours):
        assert np.array_equal(np.asarray(a), np.asarray(b))
