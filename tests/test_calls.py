"""One check of a call for every front end: what is accepted can run on the weights as they were loaded."""

import pytest

from pixart_sigma import PixArtSigmaModel, SettingsError, check_text, engine, unload_all
from pixart_sigma.settings import MAX_PROMPT_CHARS


def test_compile_is_refused_when_auto_placed_the_weights_block_by_block(tiny, monkeypatch):
    # memory=auto picks sequential-offload when the model does not fit (a small GPU); here the choice is forced.
    real = engine.resolve_mode
    monkeypatch.setattr(engine, "resolve_mode", lambda mode, device, sizes: "sequential-offload"
                        if mode == "auto" else real(mode, device, sizes))
    unload_all()
    try:
        model = PixArtSigmaModel(model_name=tiny, device="cpu", memory="auto")
        assert model.memory_mode == "sequential-offload" and model.settings["memory"] == "auto"
        with pytest.raises(SettingsError, match="compile=True cannot be used with memory='sequential-offload'"):
            model.validate_call("a red circle", compile=True)  # what a service checks before queueing
        assert model.validate_call("a red circle", compile=False)[1]["compile"] is False
    finally:
        unload_all()


def test_a_resident_model_accepts_compile(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", memory="auto")
    assert model.memory_mode == "resident"
    assert model.validate_call("a red circle", compile=True)[1]["compile"] is True


def test_a_text_over_the_cap_is_refused_for_its_length_before_it_is_read():
    with pytest.raises(SettingsError, match=f"characters long: at most {MAX_PROMPT_CHARS}"):
        check_text("prompt", "\x00" + "a" * MAX_PROMPT_CHARS, required=True)  # not "control character"
