"""The loader hands back the model it opened last when ComfyUI's cache let go of its output and it runs again
(ComfyUI 0.33's default cache does so whenever another workflow ran), for a limited time and while the host has
memory to spare; one model at most."""
from __future__ import annotations

import gc
import sys
import time
import weakref

import pytest

from tests.nodes.pack_facts import DEFAULT_MODEL_FOLDER


@pytest.fixture
def recent(pack):
    return sys.modules[f"{pack.module_name}.nodes.recent_model"]


@pytest.fixture
def load(pack, installed_checkpoint):
    loader = pack.node_class_mappings["GLMImageLoader"]()
    return lambda dtype="fp32": loader.load(DEFAULT_MODEL_FOLDER, dtype)[0]


def dropped_by_comfyui(model) -> weakref.ref:
    """What ComfyUI's cache does to our output: forget it. A weak reference tells whether anything else holds it."""
    ref = weakref.ref(model)
    del model
    gc.collect()
    return ref


def test_a_loader_run_again_gets_the_same_model_back(load, recent):
    load().stage("vae")  # a loaded stage comes back loaded, not read from the files again
    ref = dropped_by_comfyui(recent.held())
    second = load()
    assert ref() is second
    assert "vae" in second.stage_modules()


def test_the_model_is_let_go_after_the_keep_time(load, recent):
    ref = dropped_by_comfyui(load())
    assert ref() is not None and recent.held() is ref()
    assert not recent.let_go_if_due(now=time.monotonic() + recent.KEEP_S / 2)
    assert recent.let_go_if_due(now=time.monotonic() + recent.KEEP_S + 1)
    gc.collect()
    assert ref() is None and recent.held() is None
    assert load() is not None  # opened again


def test_the_model_is_let_go_when_the_host_runs_short_of_memory(load, recent, monkeypatch):
    ref = dropped_by_comfyui(load())
    monkeypatch.setattr(recent, "host_memory_short", lambda: True)
    assert recent.let_go_if_due()
    gc.collect()
    assert ref() is None


def test_a_loader_run_with_other_inputs_replaces_the_held_model(load, recent):
    fp32 = dropped_by_comfyui(load("fp32"))
    bf16 = load("bf16")
    gc.collect()
    assert fp32() is None and recent.held() is bf16


def test_a_node_using_the_model_holds_it_again(load, recent):
    model = load()
    recent.let_go()  # e.g. its time was up while ComfyUI's cache still held it
    assert recent.held() is None
    recent.touch(model)
    assert recent.held() is model


def test_the_watcher_lets_go_without_any_node_running(load, recent, monkeypatch):
    monkeypatch.setattr(recent, "POLL_S", 0.01)
    monkeypatch.setattr(recent, "KEEP_S", 0.0)
    ref = dropped_by_comfyui(load())
    deadline = time.monotonic() + 5
    while recent.held() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    gc.collect()
    assert recent.held() is None and ref() is None


def test_host_memory_short_follows_comfyuis_cache_headroom(pack, recent, monkeypatch):
    gb = recent.GB
    residency = sys.modules[f"{pack.module_name}.glm_core.residency"]
    for available, total, short in [(20 * gb, 64 * gb, False), (5 * gb, 64 * gb, True), (7 * gb, 64 * gb, False),
                                    (11 * gb, 256 * gb, False), (9 * gb, 256 * gb, True), (1.5 * gb, 8 * gb, True),
                                    (2.5 * gb, 8 * gb, False), (0, 64 * gb, True), (20 * gb, 0, True)]:
        readings = {"MemAvailable": available, "MemTotal": total}  # what the host reports (0: unknown)
        monkeypatch.setattr(residency, "_host_memory", lambda field, _, readings=readings: int(readings[field]))
        assert recent.host_memory_short() is short, (available / gb, total / gb)
