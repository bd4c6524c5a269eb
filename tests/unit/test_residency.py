"""Where stage weights live, decided and moved on the CPU: the placement decisions (auto / sequential / gpu) against
a simulated GPU, the weights choice (auto -> bf16 or fp8), and a stage's host copy (one flat buffer, every dtype
kept, values back intact after a round trip). The GPU figures are in docs/PERFORMANCE.md."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from glm_core import pipeline
from glm_core.fp8 import Fp8Linear
from glm_core.memory import GB, NotEnoughGpuMemory
from glm_core.residency import StageWeights

SIZES = {"vision": 2.4 * GB, "ar": 17.8 * GB, "glyph": 0.4 * GB, "dit": 13.9 * GB, "vae": 0.8 * GB}


class SimulatedCard:
    """A GPU of `capacity` bytes holding the stages marked resident; `release` frees a stage's bytes."""

    def __init__(self, capacity, resident):
        self.capacity, self.resident, self.released = capacity, set(resident), []

    def free(self, device=None):
        return self.capacity - sum(SIZES[s] for s in self.resident)


@pytest.fixture
def simulated(monkeypatch, demo_folder):
    def make(capacity_gb, resident, placement):
        model = pipeline.GlmImage.from_folder(demo_folder, device="cpu", placement=placement)
        model.device = torch.device("cuda", 0)  # decisions only: nothing below touches the device
        card = SimulatedCard(capacity_gb * GB, resident)
        monkeypatch.setattr(pipeline, "free_bytes", card.free)
        monkeypatch.setattr(model, "stage_nbytes", lambda name: int(SIZES[name]))
        monkeypatch.setattr(model, "on_device", lambda name: name in card.resident)

        def release(name):
            card.released.append(name)
            card.resident.discard(name)
        monkeypatch.setattr(model, "release", release)
        return model, card
    return make


def test_auto_keeps_what_fits(simulated):
    model, card = simulated(80, {"ar"}, "auto")  # an 80 GB card: the DiT group fits beside the AR
    model._make_room(["glyph", "dit", "vae"], int(15.1 * GB), int(3 * GB))
    assert card.released == []


def test_auto_moves_only_what_the_next_stage_needs(simulated):
    model, card = simulated(24, {"ar", "vision"}, "auto")  # 24 GB: the AR must go, the vision tower may stay
    model._make_room(["glyph", "dit", "vae"], int(15.1 * GB), int(2 * GB))
    assert card.released == ["ar"]  # the largest other stage first, then enough room: the vision tower stays


def test_sequential_moves_every_other_stage(simulated):
    model, card = simulated(141, {"ar", "vision"}, "sequential")
    model._make_room(["glyph", "dit", "vae"], int(15.1 * GB), 0)
    assert sorted(card.released) == ["ar", "vision"]


def test_gpu_placement_never_moves_a_stage_and_an_impossible_load_is_refused_first(simulated):
    model, card = simulated(24, {"ar"}, "gpu")
    with pytest.raises(NotEnoughGpuMemory) as info:
        model._make_room(["glyph", "dit", "vae"], int(15.1 * GB), 0)
    assert card.released == []
    message = str(info.value)
    assert "15.1 GB" in message and "weights='fp8'" in message and "placement='sequential'" in message


def test_auto_refuses_weights_that_cannot_fit_even_alone(simulated):
    model, card = simulated(12, set(), "auto")
    with pytest.raises(NotEnoughGpuMemory, match="needs about 17.8 GB"):
        model._make_room(["ar"], int(17.8 * GB), 0)


@pytest.mark.parametrize("free_gb,expected", [(80, "bf16"), (24, "bf16"), (16, "fp8"), (12, "fp8")])
def test_weights_auto_picks_from_the_free_memory(simulated, free_gb, expected):
    model, card = simulated(free_gb, set(), "auto")
    model.stage_nbytes = lambda name: int(SIZES[name])
    assert model._choose_weights(None) == expected


def test_weights_auto_counts_the_memory_a_host_could_free(simulated):
    """16 GB free (another model of the host's on the card) would mean FP8, but a host that unloads its models on
    demand (ComfyUI) says 24 GB are within reach: bf16."""
    model, card = simulated(16, set(), "auto")
    model.stage_nbytes = lambda name: int(SIZES[name])
    assert model._choose_weights(None) == "fp8"
    assert model._choose_weights(int(24 * GB)) == "bf16"
    assert model._choose_weights(int(12 * GB)) == "fp8"


def test_weights_auto_takes_fp8_for_a_pre_quantised_folder(tmp_path, demo_folder):
    from glm_core.quantize import write_fp8_copy

    copy = write_fp8_copy(demo_folder, tmp_path / "fp8", device="cpu")
    assert pipeline.GlmImage.from_folder(copy, device="cpu").weights == "fp8"
    assert pipeline.GlmImage.from_folder(demo_folder, device="cpu").weights == "bf16"  # no GPU here


class Mixed(nn.Module):
    """Every dtype a stage holds: bf16 and fp32 parameters, an FP8 layer (e4m3 + fp32 scales), an int buffer, a tie."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 16).to(torch.bfloat16)
        self.fp8 = Fp8Linear.from_linear(nn.Linear(16, 32))
        self.norm = nn.LayerNorm(16)
        self.register_buffer("ids", torch.arange(5))
        self.tied = nn.Linear(8, 16, bias=False).to(torch.bfloat16)
        self.tied.weight = self.linear.weight


def test_host_copy_round_trip_keeps_every_tensor():
    torch.manual_seed(0)
    module = Mixed()
    before = {name: t.clone() for name, t in module.state_dict().items()}
    weights = StageWeights(module, pin=False)
    weights.to_device("meta")  # stands for the GPU: the data is only in the host copy now
    assert {p.device.type for p in module.parameters()} == {"meta"}
    weights.to_host()  # back: the copy made on the way out, nothing lost
    after = module.state_dict()
    assert set(after) == set(before)
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor.view(-1).view(torch.uint8),
                                                                    before[name].view(-1).view(torch.uint8)), name
    # one flat buffer holds every tensor; the tie survives
    storages = {t.untyped_storage().data_ptr() for t in module.state_dict().values()}
    assert len(storages) == 1
    assert module.tied.weight is module.linear.weight
    # moving out again costs no copy: the same host buffer is reused
    weights.to_device("meta")
    weights.to_host()
    assert {t.untyped_storage().data_ptr() for t in module.state_dict().values()} == storages


@pytest.mark.parametrize("capacity_gb,resident,placement,expected", [
    (141, set(), "auto", False),         # an H200: everything fits, no host copies
    (48, {"ar"}, "auto", False),         # 48 GB: the AR held plus the rest still fits
    (24, set(), "auto", True),           # 24 GB: the AR and the DiT take turns
    (24, {"ar"}, "auto", True),          # the AR we hold counts as room, still not enough
    (141, set(), "sequential", True),
    (12, set(), "gpu", False),           # "gpu" never moves a stage (an impossible load is refused instead)
])
def test_takes_turns_follows_the_card(simulated, capacity_gb, resident, placement, expected):
    model, _ = simulated(capacity_gb, resident, placement)
    assert model.takes_turns() is expected


def test_host_copy_is_made_at_load_when_stages_take_turns(monkeypatch, demo_folder):
    """A stage that will have to leave gets its host copy right after it loads, so that the first swap of a later
    image costs only the copy back; a stage that can stay gets none."""
    for turns in (True, False):
        model = pipeline.GlmImage.from_folder(demo_folder, device="cpu")
        monkeypatch.setattr(model, "takes_turns", lambda turns=turns: turns)
        monkeypatch.setattr(pipeline, "host_copy_plan", lambda nbytes: "pageable")
        model.prepare(["dit", "vae"])
        assert ("dit" in model._weights and model._weights["dit"].has_host_copy) is turns
        assert "vae" not in model._weights  # small stages: copied when they first leave, if ever


def test_keep_host_copy_holds_the_values_and_is_made_once():
    torch.manual_seed(0)
    module = Mixed()
    before = {name: t.clone() for name, t in module.state_dict().items()}
    weights = StageWeights(module, pin=False)
    weights.keep_host_copy()
    first = weights._host
    weights.keep_host_copy()
    assert weights._host is first and not weights.pinned
    for parameter in module.parameters():  # the module itself is untouched by the copy
        parameter.data.zero_()
    weights.to_device("meta")
    weights.to_host()
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor.view(-1).view(torch.uint8), before[name].view(-1).view(torch.uint8)), name


def test_host_buffer_is_exactly_the_size_asked_for():
    from glm_core.residency import host_buffer

    buffer, keeper = host_buffer(12345, pin=False)
    assert buffer.numel() == 12345 and buffer.dtype == torch.uint8 and keeper is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA (run on the GPU machine)")
def test_pinned_host_copy_round_trip_on_the_gpu():
    torch.manual_seed(0)
    module = Mixed().cuda()
    before = {name: t.clone() for name, t in module.state_dict().items()}
    weights = StageWeights(module, pin=True)
    weights.keep_host_copy()
    assert weights.pinned and weights._host.is_pinned()
    weights.to_host()
    weights.to_device(torch.device("cuda", torch.cuda.current_device()))
    for name, tensor in module.state_dict().items():
        assert tensor.is_cuda and torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("turns", [True, False])
def test_vae_decodes_without_the_dit_when_stages_take_turns(monkeypatch, demo_folder, turns):
    """Where the AR and the DiT take turns, the DiT leaves before the VAE decode (free: its host copy exists), so
    an image's peak is one stage's; where everything fits, it stays for the next image."""
    model = pipeline.GlmImage.from_folder(demo_folder, device="cpu")
    monkeypatch.setattr(model, "takes_turns", lambda: turns)
    events = []
    monkeypatch.setattr(model, "release", lambda name: events.append(("release", name)))
    vae = model.stage("vae")
    original = vae.decode_latents
    monkeypatch.setattr(vae, "decode_latents", lambda latents: events.append(("vae", None)) or original(latents))
    images = pipeline.generate(model, "a red cube", 512, 512, steps=2)
    assert images.shape[0] == 1 and torch.isfinite(images).all()
    assert events == ([("release", "dit"), ("vae", None)] if turns else [("vae", None)])


def test_host_memory_is_read_through_psutil_where_there_is_no_proc_meminfo(monkeypatch):
    """Windows (ComfyUI's portable build) has no /proc/meminfo; without a reading there, no stage ever got a host copy."""
    import builtins
    import sys
    from types import SimpleNamespace

    from glm_core import residency

    real_open = builtins.open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    reading = SimpleNamespace(available=48 << 30, total=64 << 30)
    monkeypatch.setitem(sys.modules, "psutil", SimpleNamespace(virtual_memory=lambda: reading))
    assert residency.host_memory_available() == 48 << 30
    assert residency.host_memory_total() == 64 << 30
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: unknown
    assert residency.host_memory_available() == 0 and residency.host_memory_total() == 0
