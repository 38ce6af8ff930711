"""save_attention / load_attention / attention_state_dict and the adapter-training helpers.

Laws: loading the saved attention onto the base model it came from gives the saved
model back bit for bit (state dict, dtypes, modes, outputs); a base model that does not
fit, or files that are missing or corrupt, raise an AttnBlocksError naming the problem
and leave the model exactly as it was; nothing is ever unpickled.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import TinyResNet, small_cnn, trained_like_
from _surgery_helpers import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import attnblocks
from attnblocks import (
    AttnBlocksError,
    ChannelMismatchError,
    InvalidArgumentError,
    SelectorError,
    SurgeryError,
    attention_parameters,
    attention_state_dict,
    available_blocks,
    freeze_except_attention,
    insert_attention,
    insert_se,
    load_attention,
    remove_attention,
    save_attention,
)
from attnblocks.blocks import SEBlock
from attnblocks.surgery import _persist
from attnblocks.surgery._persist import CONFIG_NAME, WEIGHTS_NAME

#: (block, sites, options) inserted one after the other into a TinyResNet.
RESNET_RECIPE: list[tuple[str, list[str], dict[str, Any]]] = [
    ("se", ["stem", "blocks.*.bn2"], {"reduction": 4, "activation": "silu"}),
    ("cbam", ["blocks.0.bn1"], {"reduction": 4, "spatial_kernel_size": 3}),
    ("coord", ["blocks.1.bn1"], {"reduction": 4}),  # BatchNorm buffers inside
    ("ge", ["blocks.0"], {"variant": "theta", "extent": 2}),
]


def _base(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return trained_like_(TinyResNet(width=16), seed=seed).to(dtype)


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(7)).to(dtype)


def _attended(dtype: torch.dtype = torch.float32, *, init: str = "default") -> nn.Module:
    """A base model with several blocks whose weights and statistics were 'trained'."""
    model = _base(dtype=dtype)
    example = _x(dtype)[:1]
    for block, sites, options in RESNET_RECIPE:
        use_init = init if block in ("se", "cbam") else "default"
        insert_attention(model, sites, block=block, init=use_init, example_input=example, **options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, tensor in attention_state_dict(model).items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
                tensor.add_(noise * 0.1 if "running_var" not in key else noise.abs() * 0.1)
    return model.eval()


def _assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].device == sb[key].device, key
        assert torch.equal(sa[key], sb[key]), key
    assert [(n, m.training) for n, m in a.named_modules()] == [
        (n, m.training) for n, m in b.named_modules()
    ]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# -- round trip ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    saved = _attended(dtype)
    folder = save_attention(saved, tmp_path / "adapter")
    assert folder == tmp_path / "adapter"
    loaded = load_attention(_base(dtype=dtype).eval(), folder, example_input=_x(dtype)[:1])
    _assert_same_model(saved, loaded, _x(dtype))
    # and removing it gives the base model back
    _assert_same_model(remove_attention(loaded), _base(dtype=dtype).eval(), _x(dtype))


def test_without_example_input_undeclared_sites_take_the_saved_channels(tmp_path: Path) -> None:
    # RESNET_RECIPE puts Gather-Excite after a whole residual block ('blocks.0'), whose
    # channels no module attribute declares: the config's count stands in for the probe
    saved = _attended()
    save_attention(saved, tmp_path)
    loaded = load_attention(_base().eval(), tmp_path)
    _assert_same_model(saved, loaded, _x())


def test_a_saved_count_taken_unchecked_fails_at_the_first_forward_not_silently(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    saved = insert_se(trained_like_(TinyResNet(width=16)), ["blocks.0"], example_input=_x()[:1])
    save_attention(saved, tmp_path)
    torch.manual_seed(0)
    wider = trained_like_(TinyResNet(width=24)).eval()
    load_attention(wider, tmp_path)  # nothing to compare the saved 16 channels with
    with pytest.raises(ChannelMismatchError, match=r"built for 16 channels.*24 channels"):
        wider(_x())
    # with an example input the same mismatch is refused while loading
    torch.manual_seed(0)
    _check_refused(
        trained_like_(TinyResNet(width=24)),
        tmp_path,
        "at site 'blocks.0'",
        "saved with 16 channels",
        "gives 24",
        example_input=_x()[:1],
    )


@pytest.mark.parametrize("init", ["default", "identity"])  # identity sets values on meta too
def test_an_edited_channel_count_is_refused_from_the_shapes_before_any_block_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str
) -> None:
    saved = insert_se(
        trained_like_(TinyResNet(width=16)), ["blocks.0"], init=init, example_input=_x()[:1]
    )
    save_attention(saved, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["sites"][0]["channels"] = 100_000  # an SEBlock of 1.25e9 weights, 5 GB
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    built: list[torch.device] = []
    real_init = SEBlock.__init__

    def spy(self: SEBlock, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        built.append(self.fc1.weight.device)

    monkeypatch.setattr(SEBlock, "__init__", spy)
    _check_refused(
        trained_like_(TinyResNet(width=16)),
        tmp_path,
        "at site 'blocks.0'",
        "saved tensors do not fit the block its config describes",
        "fc1.weight: saved [1, 16], the block needs [6250, 100000]",
    )
    assert built and all(device.type == "meta" for device in built)


def test_the_weights_file_holds_only_the_attention(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    saved = _attended()
    save_attention(saved, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    expected = attention_state_dict(saved)
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    full = sum(t.numel() * t.element_size() for t in saved.state_dict().values())
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < full


def test_saved_files_get_the_mode_open_would_give_them(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        save_attention(_attended(), tmp_path)
    finally:
        os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_the_config_names_every_site(tmp_path: Path) -> None:
    save_attention(_attended(init="identity"), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["attnblocks_version"] == attnblocks.__version__
    assert config["format_version"] == 1
    sites = [(s["site"], s["attribute"], s["block"]) for s in config["sites"]]
    assert sites == [
        ("stem", "se", "se"),
        ("blocks.0", "ge", "ge"),
        ("blocks.0.bn1", "cbam", "cbam"),
        ("blocks.0.bn2", "se", "se"),
        ("blocks.1.bn1", "coord", "coord"),
        ("blocks.1.bn2", "se", "se"),
    ]
    first = config["sites"][0]
    assert first["options"] == {"reduction": 4, "activation": "silu"}
    assert first["init"] == "identity" and first["channels"] == 16
    assert first["dtype"] == "float32"


@given(
    names=st.lists(st.sampled_from(available_blocks()), min_size=1, max_size=3),
    data=st.data(),
)
def test_round_trip_of_any_registered_blocks(names: list[str], data: st.DataObject) -> None:
    import tempfile

    sites = ["0", "1", "3", "4"]
    torch.manual_seed(0)
    saved = trained_like_(small_cnn(width=8))
    for index, name in enumerate(names):
        chosen = data.draw(st.lists(st.sampled_from(sites), min_size=1, max_size=2, unique=True))
        attr = data.draw(st.sampled_from([None, f"attention_{index}"]))
        try:
            insert_attention(saved, chosen, block=name, name=attr)
        except SurgeryError:  # that block is already there: fine, skip it
            continue
    with torch.no_grad():
        for tensor in attention_state_dict(saved).values():
            if tensor.is_floating_point():
                tensor.add_(0.01)
    with tempfile.TemporaryDirectory() as folder:
        save_attention(saved, folder)  # the first insertion always succeeds
        torch.manual_seed(0)
        loaded = load_attention(trained_like_(small_cnn(width=8)), folder)
    _assert_same_model(saved, loaded, torch.randn(2, 3, 8, 8))


def test_a_block_at_the_model_root_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = insert_attention(nn.Conv2d(3, 8, 3), [""], block="eca", kernel_size=3, bias=True)
    with torch.no_grad():
        saved.eca.conv.weight.add_(0.5)
    save_attention(saved, tmp_path)
    torch.manual_seed(0)
    loaded = load_attention(nn.Conv2d(3, 8, 3), tmp_path)
    _assert_same_model(saved, loaded, torch.randn(1, 3, 6, 6))


def test_loaded_blocks_take_the_base_model_mode_and_dtype(tmp_path: Path) -> None:
    save_attention(_attended(), tmp_path)
    base = _base(dtype=torch.float64).train()
    load_attention(base, tmp_path, example_input=_x(torch.float64)[:1])
    for key, tensor in attention_state_dict(base).items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64, key
    assert base.stem.se.training and base.blocks[1].bn1.coord.bn1.training


# -- the model does not fit -------------------------------------------------------------


def _check_refused(model: nn.Module, folder: Path, *needles: str, **kwargs: Any) -> None:
    before = snapshot(model)
    with pytest.raises(AttnBlocksError) as info:
        load_attention(model, folder, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert_unchanged(model, before)


def test_other_channels_are_refused_naming_the_first_site(tmp_path: Path) -> None:
    save_attention(_attended(), tmp_path)
    torch.manual_seed(0)
    wider = trained_like_(TinyResNet(width=24))
    _check_refused(
        wider,
        tmp_path,
        "at site 'stem'",
        "saved with 16 channels",
        "gives 24",
        "same architecture",
        "left unchanged",
        example_input=_x()[:1],
    )


def test_a_missing_site_is_refused_with_the_closest_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = insert_se(trained_like_(small_cnn(width=8)), ["1", "4"], reduction=2)
    save_attention(saved, tmp_path)
    shorter = nn.Sequential(*list(trained_like_(small_cnn(width=8)))[:3])
    _check_refused(shorter, tmp_path, "site '4'", "no module '4'", "module names are ['0'")


def test_a_failure_at_a_later_site_undoes_the_earlier_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = insert_se(trained_like_(small_cnn(width=8)), ["1", "4"], reduction=2)
    save_attention(saved, tmp_path)
    torch.manual_seed(0)
    other = trained_like_(small_cnn(width=8))
    other[4] = nn.BatchNorm2d(8)  # the second site now has 8 channels, not 16
    other[3] = nn.Conv2d(8, 8, 3, padding=1)
    _check_refused(other, tmp_path, "at site '4'", "saved with 16 channels")


def test_a_site_that_already_has_the_block_is_refused(tmp_path: Path) -> None:
    saved = _attended()
    save_attention(saved, tmp_path)
    _check_refused(saved, tmp_path, "at site 'stem'", "inserting it failed")


def test_tensors_that_do_not_fit_the_rebuilt_block_are_refused(tmp_path: Path) -> None:
    save_attention(_attended(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["sites"][-1]["options"]["reduction"] = 2  # blocks.1.bn2's SE: another width
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    _check_refused(
        _base().eval(),
        tmp_path,
        "at site 'blocks.1.bn2'",
        "saved tensors do not fit",
        example_input=_x()[:1],
    )


def test_tensors_of_no_site_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_attention(_attended(), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["fc.se.fc1.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    _check_refused(_base(), tmp_path, "belong to no site", "fc.se.fc1.weight")


# -- files missing or corrupt -----------------------------------------------------------


def test_a_directory_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    _check_refused(_base(), tmp_path / "nope", "is not a directory", CONFIG_NAME)


def test_a_file_instead_of_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    _check_refused(_base(), tmp_path / "file", "is not a directory")
    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        save_attention(_attended(), tmp_path / "file")


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_a_missing_file_is_refused(tmp_path: Path, missing: str) -> None:
    save_attention(_attended(), tmp_path)
    (tmp_path / missing).unlink()
    _check_refused(_base(), tmp_path, missing, "does not exist")


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "not a readable safetensors file"),
        (lambda p: p.write_bytes(b"\x00" * 3), "not a readable safetensors file"),
        (lambda p: p.write_bytes(b"\xff" * 8 + b"{}"), "not a readable safetensors file"),
    ],
)
def test_a_corrupt_weights_file_is_refused(tmp_path: Path, corrupt: Any, needle: str) -> None:
    save_attention(_attended(), tmp_path)
    corrupt(tmp_path / WEIGHTS_NAME)
    _check_refused(_base(), tmp_path, needle)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "cannot read"),
        ("[]", "'format'"),
        ('{"format": "attnblocks-attention", "format_version": 99, "sites": []}', "upgrade"),
        ('{"format": "attnblocks-attention", "format_version": 1, "sites": []}', "'sites'"),
        (
            '{"format": "attnblocks-attention", "format_version": 1, "sites": [{"site": 3}]}',
            "sites[0]['site'] is 3",
        ),
    ],
)
def test_a_corrupt_config_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    save_attention(_attended(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(text)
    _check_refused(_base(), tmp_path, needle)


def test_an_unknown_block_name_is_refused(tmp_path: Path) -> None:
    save_attention(_attended(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["sites"][0]["block"] = "no-such-block"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    _check_refused(_base(), tmp_path, "'no-such-block'", "not registered")


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _attended()
    save_attention(saved, tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_attention unpickled something")

    for target, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    loaded = load_attention(_base().eval(), tmp_path, example_input=_x()[:1])
    _assert_same_model(saved, loaded, _x())
    source = inspect.getsource(_persist)
    for call in ("torch.load(", "import pickle", "pickle.load", "weights_only"):
        assert call not in source


def test_a_meta_model_is_refused_both_ways(tmp_path: Path) -> None:
    saved = _attended()
    save_attention(saved, tmp_path / "a")
    with torch.device("meta"):
        meta = TinyResNet(width=16)
    keys = list(meta.state_dict())
    with pytest.raises(SurgeryError, match=r"'meta' device.*materialise"):
        load_attention(meta, tmp_path / "a")
    assert list(meta.state_dict()) == keys  # untouched
    with torch.device("meta"):
        meta_attended = insert_se(TinyResNet(width=16), ["stem"])
    with pytest.raises(SurgeryError, match="'meta' device"):
        save_attention(meta_attended, tmp_path / "b")


# -- saving refuses what it could not load ----------------------------------------------


def test_saving_a_model_without_blocks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="nothing to save"):
        save_attention(_base(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_saving_unregistered_blocks_or_module_options_is_refused(tmp_path: Path) -> None:
    class Unregistered(SEBlock):
        pass

    model = insert_attention(_base(), ["stem"], block=Unregistered)
    with pytest.raises(SurgeryError, match=r"not a registered block.*register_block"):
        save_attention(model, tmp_path)
    model = insert_se(_base(), ["stem"], activation=nn.SiLU())
    with pytest.raises(SurgeryError, match=r"options\['activation'\] = SiLU\(\).*by name"):
        save_attention(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: save_attention("model", "x"), "model must be an nn.Module"),  # type: ignore[arg-type]
        (lambda: save_attention(nn.Conv2d(1, 1, 1), 3), "directory must be a non-empty path"),  # type: ignore[arg-type]
        (lambda: load_attention(None, "x"), "model must be an nn.Module"),  # type: ignore[arg-type]
        (lambda: attention_state_dict([]), "model must be an nn.Module"),  # type: ignore[arg-type]
        (lambda: attention_parameters(1), "model must be an nn.Module"),  # type: ignore[arg-type]
        (lambda: save_attention(_attended(), ""), "directory must be a non-empty path"),
        (lambda: load_attention(_base(), ""), "directory must be a non-empty path"),
    ],
)
def test_wrong_argument_types_are_refused(call: Any, needle: str) -> None:
    with pytest.raises(InvalidArgumentError, match=needle):
        call()


# -- attention_state_dict, attention_parameters, freeze_except_attention -----------------


def test_attention_state_dict_is_the_blocks_part_of_the_state_dict() -> None:
    assert attention_state_dict(_base()) == {}
    model = _attended()
    part = attention_state_dict(model)
    full = model.state_dict()
    assert part and set(part) < set(full)
    assert all(".se." in k or ".cbam." in k or ".coord." in k or ".ge." in k for k in part)
    for key, value in part.items():
        assert value.data_ptr() == full[key].data_ptr()
    assert any(k.endswith("running_mean") for k in part)  # buffers too


def test_freeze_except_attention_keeps_exactly_what_was_asked() -> None:
    model = _attended()
    names = {id(p): n for n, p in model.named_parameters()}
    attention = {names[id(p)] for p in attention_parameters(model)}
    assert attention and all(n.split(".")[-2] != "fc" for n in attention)

    trainable = {names[id(p)] for p in freeze_except_attention(model)}
    assert trainable == attention
    assert {n for n, p in model.named_parameters() if p.requires_grad} == attention

    with_head = {names[id(p)] for p in freeze_except_attention(model, head="fc")}
    assert with_head == attention | {"fc.weight", "fc.bias"}

    with_norms = {names[id(p)] for p in freeze_except_attention(model, train_norms=True)}
    norms = {n for n in names.values() if ".bn" in n.split("se.")[0] or n.startswith("stem.1")}
    assert with_norms - attention == {n for n in norms if n not in attention}
    # a fresh call redefines the set: the norms are frozen again
    assert {names[id(p)] for p in freeze_except_attention(model)} == attention


def test_only_the_attention_moves_in_a_training_step() -> None:
    model = _attended().train()
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimiser = torch.optim.SGD(freeze_except_attention(model, head=["fc"]), lr=0.1)
    model(_x()).square().mean().backward()
    optimiser.step()
    kept = {n for n, _ in model.named_parameters()} & set(before)
    moved = {n for n in kept if not torch.equal(dict(model.named_parameters())[n], before[n])}
    assert moved and all(
        n.startswith("fc.") or ".se." in n or "cbam" in n or "coord" in n or ".ge." in n
        for n in moved
    )
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name


def test_freeze_refuses_bad_heads_and_models_without_blocks_changing_nothing() -> None:
    model = _attended()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(SelectorError, match=r"'fcc'.*Closest module names: \['fc'"):
        freeze_except_attention(model, head="fcc")
    with pytest.raises(InvalidArgumentError, match=r"head must select at least one module"):
        freeze_except_attention(model, head=[])
    with pytest.raises(SelectorError, match="got 3"):
        freeze_except_attention(model, head=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="train_norms must be True or False"):
        freeze_except_attention(model, train_norms="yes")  # type: ignore[arg-type]
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(SurgeryError, match=r"nothing\s+would train"):
        freeze_except_attention(_base())


def test_copies_and_unpickled_models_keep_what_save_attention_needs(tmp_path: Path) -> None:
    import copy

    saved = _attended()
    for index, clone in enumerate([copy.deepcopy(saved), pickle.loads(pickle.dumps(saved))]):
        folder = save_attention(clone, tmp_path / str(index))
        loaded = load_attention(_base().eval(), folder, example_input=_x()[:1])
        _assert_same_model(saved, loaded, _x())
