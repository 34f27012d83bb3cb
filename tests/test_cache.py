"""The warm cache and the device: loads per key in parallel, shared parts, LRU eviction, one generation per device."""

import gc
import threading
import time
import weakref

import pytest

from pixart_sigma import Cancelled, GenerationError, PixArtSigmaModel, SettingsError, engine, unload_all
from pixart_sigma.testing import save_tiny_pipeline, save_tiny_transformer

from conftest import BASE_REPO, REPO_512

PROMPT = "a red circle"


@pytest.fixture
def second_dir(tmp_path):
    return save_tiny_pipeline(tmp_path / "second", seed=3)


def test_a_warm_checkpoint_does_not_wait_for_another_ones_load(tiny, second_dir, monkeypatch):
    from pixart_sigma import checkpoints

    PixArtSigmaModel(model_name=tiny, device="cpu")  # warm
    release, loading = threading.Event(), threading.Event()
    real_load_part = checkpoints.load_part

    def slow_load_part(folder, part, dtype):
        if str(second_dir) in str(folder):
            loading.set()
            assert release.wait(30)
        return real_load_part(folder, part, dtype)

    monkeypatch.setattr(checkpoints, "load_part", slow_load_part)
    slow = threading.Thread(target=lambda: PixArtSigmaModel(model_name=str(second_dir), device="cpu"))
    slow.start()
    try:
        assert loading.wait(30)
        start = time.perf_counter()
        PixArtSigmaModel(model_name=tiny, device="cpu", seed=2)
        assert time.perf_counter() - start < 2  # it used to wait behind the other load
    finally:
        release.set()
        slow.join(60)


def test_concurrent_first_uses_of_one_checkpoint_load_it_once(second_dir):
    unload_all()
    loads = engine.load_count
    models = []
    threads = [threading.Thread(target=lambda: models.append(PixArtSigmaModel(model_name=str(second_dir))))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(models) == 3 and engine.load_count == loads + 1
    assert models[0].engine is models[1].engine is models[2].engine


class RecordingLock:
    """Stands in for engine._lock: notes the load counts each time the lock is taken and released."""

    def __init__(self):
        self.lock, self.taken, self.released = threading.Lock(), [], []

    def __enter__(self):
        self.lock.acquire()
        self.taken.append(load_counts())
        return self

    def __exit__(self, *exc):
        self.released.append(load_counts())
        self.lock.release()
        return False


def load_counts() -> tuple[int, int]:
    return engine.load_count, engine.part_load_count


def test_load_counts_change_only_under_the_cache_lock(second_dir, monkeypatch):
    # `count += 1` outside the lock can lose a count when two loads finish at once; here, one thread
    # shows where the counts move: never between a release of the lock and the next take.
    lock = RecordingLock()
    monkeypatch.setattr(engine, "_lock", lock)
    before = load_counts()
    PixArtSigmaModel(model_name=str(second_dir))
    after = load_counts()
    assert after[0] == before[0] + 1 and after[1] == before[1] + 5
    outside_the_lock = zip([before] + lock.released, lock.taken + [after])
    assert all(left == right for left, right in outside_the_lock), (before, lock.taken, lock.released, after)


def test_512_and_1024_share_text_encoder_tokenizer_vae_and_prompt_cache(hub_cache):
    unload_all()
    parts = engine.part_load_count
    big = PixArtSigmaModel(model_name=BASE_REPO, device="cpu", seed=1, num_inference_steps=2)
    small = PixArtSigmaModel(model_name=REPO_512, device="cpu", seed=1, num_inference_steps=2)
    a, b = big.engine.pipeline, small.engine.pipeline
    assert a.text_encoder is b.text_encoder and a.tokenizer is b.tokenizer and a.vae is b.vae
    assert a.transformer is not b.transformer
    assert engine.part_load_count == parts + 6  # five parts of the 1024 checkpoint, one transformer of the 512
    big.generate("a fox in the snow")
    calls = small.engine.text_encoder_calls
    small.generate("a fox in the snow")
    assert small.engine.text_encoder_calls == calls  # the prompt encoded for the 1024 serves the 512


def test_least_recently_used_engines_are_evicted_past_the_budget(tiny, second_dir, monkeypatch):
    unload_all()
    first = PixArtSigmaModel(model_name=tiny, device="cpu")
    transformer = weakref.ref(first.engine.pipeline.transformer)
    monkeypatch.setenv(engine.MEMORY_BUDGET_ENV, "0.000001")  # about 1 KB: room for one engine only
    PixArtSigmaModel(model_name=str(second_dir), device="cpu")
    gc.collect()
    assert transformer() is None  # the older checkpoint's weights are gone, though `first` still exists
    assert len(engine.cached_engines()) == 1
    loads = engine.load_count
    assert len(first.generate(PROMPT, num_inference_steps=2)) == 1  # and it reloads on its next use
    assert engine.load_count == loads + 1


def test_unload_all_frees_the_weights_even_while_models_exist(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu")
    transformer = weakref.ref(model.engine.pipeline.transformer)
    text_encoder = weakref.ref(model.engine.pipeline.text_encoder)
    unload_all()
    assert transformer() is None and text_encoder() is None
    assert len(model.generate(PROMPT, num_inference_steps=2)) == 1


def _hold_device(model, started, release):
    """A generation that sits in its progress callback until `release` is set."""
    def progress(step, total):
        started.set()
        assert release.wait(60)
    return threading.Thread(target=lambda: model.generate(PROMPT, num_inference_steps=2, on_progress=progress))


def test_one_generation_at_a_time_per_device_across_checkpoints(tiny, second_dir):
    first = PixArtSigmaModel(model_name=tiny, device="cpu")
    other = PixArtSigmaModel(model_name=str(second_dir), device="cpu")
    started, release, order = threading.Event(), threading.Event(), []
    holder = _hold_device(first, started, release)
    holder.start()
    assert started.wait(60)
    waiter = threading.Thread(target=lambda: order.append(other.generate(PROMPT, num_inference_steps=1)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not order  # the other checkpoint waits for the device
    release.set()
    holder.join(60)
    waiter.join(60)
    assert len(order) == 1


def test_a_cancel_applies_while_waiting_for_the_device(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu")
    started, release = threading.Event(), threading.Event()
    holder = _hold_device(model, started, release)
    holder.start()
    try:
        assert started.wait(60)
        flag, outcome = threading.Event(), []

        def waiting_call():
            try:
                model.generate(PROMPT, num_inference_steps=2, cancel=flag)
            except Cancelled as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=waiting_call)
        waiter.start()
        time.sleep(0.2)
        flag.set()
        waiter.join(5)
        assert not waiter.is_alive() and "waiting" in str(outcome[0])  # before the other generation ended
    finally:
        release.set()
        holder.join(60)


def test_generate_from_inside_on_progress_is_an_error_not_a_deadlock(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu")
    errors = []

    def progress(step, total):
        try:
            model.generate("nested", num_inference_steps=1)
        except GenerationError as exc:
            errors.append(exc)

    done = threading.Thread(target=lambda: model.generate(PROMPT, num_inference_steps=2, on_progress=progress))
    done.start()
    done.join(60)
    assert not done.is_alive() and len(errors) == 2
    assert "inside a callback" in str(errors[0])
    assert len(model.generate(PROMPT, num_inference_steps=1)) == 1  # the device was released


@pytest.mark.parametrize("kwargs, fragment", [
    ({"cancel": True}, "cancel=True"), ({"on_progress": 5}, "on_progress=5"), ({"cancel": "yes"}, "is_set()"),
])
def test_bad_callbacks_are_refused_before_any_model_work(tiny, kwargs, fragment):
    model = PixArtSigmaModel(model_name=tiny, device="cpu")
    calls = model.engine.text_encoder_calls
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        model.generate("a prompt never encoded before", **kwargs)
    assert model.engine.text_encoder_calls == calls


def test_a_fixed_negative_prompt_is_encoded_once_for_many_prompts(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", negative_prompt="a blurry dog", num_inference_steps=1)
    model.generate("first prompt")
    calls = model.engine.text_encoder_calls
    for prompt in ("second prompt", "third prompt", "fourth prompt"):
        model.generate(prompt)
    assert model.engine.text_encoder_calls == calls + 3


def test_a_transformer_only_checkpoint_borrows_from_the_shared_cache(tmp_path, hub_cache):
    directory = save_tiny_transformer(tmp_path / "finetune", seed=5)
    base = PixArtSigmaModel(model_name=BASE_REPO, device="cpu")
    mine = PixArtSigmaModel(model_name=str(directory), device="cpu")
    assert mine.engine.pipeline.text_encoder is base.engine.pipeline.text_encoder


@pytest.mark.parametrize("setting, expected", [("inf", "unlimited"), ("-3", "default"), ("lots", "default"),
                                               ("2", 2 * 2**30)])
def test_the_memory_budget_setting_is_read_safely(monkeypatch, setting, expected):
    import sys

    import torch

    monkeypatch.setenv(engine.MEMORY_BUDGET_ENV, setting)
    budget = engine.memory_budget(torch.device("cpu"))
    monkeypatch.delenv(engine.MEMORY_BUDGET_ENV)
    default = engine.memory_budget(torch.device("cpu"))
    assert budget == {"unlimited": sys.maxsize, "default": default}.get(expected, expected)


def test_from_pipeline_refuses_what_is_not_a_pipeline():
    with pytest.raises(SettingsError, match="needs a diffusers PixArtSigmaPipeline; object has no transformer"):
        PixArtSigmaModel.from_pipeline(object())


def test_a_model_says_whether_it_is_warm_and_what_the_budget_is(monkeypatch):
    from pixart_sigma import MEMORY_BUDGET_ENV, unload_all

    model = PixArtSigmaModel(model_name="demo", device="cpu")
    model.generate("a red circle", num_inference_steps=1)
    assert model.is_warm
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1.5")
    assert model.warm_budget_bytes == int(1.5 * 2**30)
    unload_all()
    assert not model.is_warm  # asking did not load it
    assert not model.is_warm
