"""Save and load only the inserted attention, the way adapters are shipped for a backbone.

:func:`save_attention` writes two files into a directory:

* ``attention_config.json``: the attnblocks version and, for each site in model
  order, its qualified name, the attribute the block is stored under, the block's
  registry name, its ``init`` and options, and its channel count;
* ``attention.safetensors``: the blocks' parameters and buffers in the safetensors
  format, under the same keys as in ``model.state_dict()``.

:func:`load_attention` inserts the same blocks at the same sites of a fresh copy of
the base model (with :func:`~attnblocks.surgery.insert_attention`) and loads their
weights. Neither file can run code when read: JSON and safetensors only, never
pickle.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnblocks._errors import AttnBlocksError, InvalidArgumentError, SurgeryError
from attnblocks._version import __version__
from attnblocks.blocks import available_blocks, create_block, get_block_class
from attnblocks.surgery._attach import detach_block
from attnblocks.surgery._insert import insert_request
from attnblocks.surgery._probe import ExampleInput
from attnblocks.surgery._record import BlockPath, InsertedSite, inserted_sites, insertion_record
from attnblocks.surgery._request import SurgeryRequest
from attnblocks.surgery._wrappers import unwrap_model

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "attention_state_dict",
    "load_attention",
    "save_attention",
]

#: The file names inside a saved attention directory.
CONFIG_NAME = "attention_config.json"
WEIGHTS_NAME = "attention.safetensors"
_FORMAT = "attnblocks-attention"
_FORMAT_VERSION = 1


def _check_model(model: object, owner: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be an nn.Module, got {type(model).__name__}."
        )
    return model


def _check_directory(directory: object, owner: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise InvalidArgumentError(
            f"{owner}: directory must be a non-empty path (str or os.PathLike), got "
            f"{directory!r} (type {type(directory).__name__})."
        )
    return Path(directory)


def attention_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the blocks inserted into ``model``, and nothing else.

    The keys are those of ``model.state_dict()`` (``<site>.<attr>.<name>``), so the
    result is a subset of the model's state dict, holding the same (detached) tensors.
    A model without inserted blocks gives an empty dict.

    Example:
        >>> from torch import nn
        >>> from attnblocks import attention_state_dict, insert_se
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> net = insert_se(net, ["1"], reduction=4)
        >>> list(attention_state_dict(net))
        ['1.se.fc1.weight', '1.se.fc1.bias', '1.se.fc2.weight', '1.se.fc2.bias']
    """
    model = _check_model(model, "attention_state_dict")
    state: dict[str, torch.Tensor] = {}
    for site in inserted_sites(model):
        state.update(site.block.state_dict(prefix=site.prefix, keep_vars=False))
    return state


def _json_problem(value: object, path: str) -> str | None:
    """Why ``value`` cannot be written to JSON and read back equal, or None."""
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} = {value!r} is not finite"
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a non-string key {key!r}"
            problem = _json_problem(item, f"{path}[{key!r}]")
            if problem is not None:
                return problem
        return None
    return f"{path} = {value!r} (type {type(value).__name__}) is not a JSON value"


def _site_config(site: InsertedSite, owner: str) -> dict[str, Any]:
    record = insertion_record(site.block)
    kind = type(site.block).__name__
    if record is None:
        raise SurgeryError(
            f"{owner}: the {kind} at {site.label!r} carries no record of how it was built "
            "(it was attached by hand or by an older attnblocks); re-insert it with "
            "insert_attention to save it."
        )
    registered = record.block in available_blocks() and (
        get_block_class(record.block) is type(site.block)
    )
    if not registered:
        raise SurgeryError(
            f"{owner}: the {kind} at {site.label!r} is not a registered block, so it "
            f"could not be rebuilt by name when loading. Register its class with "
            f"@register_block('<name>') before inserting it (registered: "
            f"{available_blocks()})."
        )
    problem = _json_problem(record.options, "options")
    if problem is not None:
        raise SurgeryError(
            f"{owner}: the options of the {kind} at {site.label!r} cannot be saved: "
            f"{problem}. Pass layers by name (activation='silu', gate='sigmoid') and plain "
            "numbers, strings and lists, so that the block can be rebuilt from JSON."
        )
    first = next(iter(site.block.parameters()), None)
    return {
        "site": site.host_name,
        "attribute": site.attr,
        "block": record.block,
        "init": record.init,
        "options": dict(record.options),
        "channels": int(getattr(site.block, "channels", record.channels)),
        "dtype": None if first is None else str(first.dtype).removeprefix("torch."),
    }


def _write_atomically(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        # mkstemp creates the file private (0600); give it the mode open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_attention(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Save only the inserted attention blocks of ``model``: their config and weights.

    Writes ``attention_config.json`` (the attnblocks version and, per site, its
    qualified name, attribute, block name, ``init``, options, channels and dtype) and
    ``attention.safetensors`` (the tensors of :func:`attention_state_dict`) into
    ``directory``, created if needed; existing files of those names are replaced,
    each in one step (a crash never leaves half a file). The backbone's weights are
    not written: ship them separately (or point to the public checkpoint), and
    :func:`load_attention` puts the attention back onto them.

    Args:
        model: a model with blocks inserted by :func:`insert_attention` or
            :func:`insert_se`. Every block must be a registered block built from
            options JSON can hold (names for activations and gates, not modules).
            A model wrapped by ``torch.compile``, ``DistributedDataParallel`` or
            ``DataParallel`` is saved under the wrapped model's names (without
            ``_orig_mod.`` or ``module.``), so the attention loads onto the model
            however it is wrapped then.
        directory: where to write the two files.

    Returns:
        The directory, as a :class:`pathlib.Path`.

    Raises:
        SurgeryError: the model has no inserted block, or a block could not be
            rebuilt from the saved config (not registered, options not JSON).
        InvalidArgumentError: ``model`` or ``directory`` has the wrong type, or the
            directory cannot be written.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from attnblocks import insert_se, load_attention, save_attention
        >>> def backbone():
        ...     torch.manual_seed(0)
        ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = insert_se(backbone(), ["1"], reduction=4)
        >>> folder = tempfile.mkdtemp()
        >>> sorted(p.name for p in save_attention(net, folder).iterdir())
        ['attention.safetensors', 'attention_config.json']
        >>> fresh = load_attention(backbone(), folder)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(fresh(x), net(x))
        True
    """
    owner = "save_attention"
    model = _check_model(model, owner)
    path = _check_directory(directory, owner)
    from safetensors.torch import save as safetensors_save

    sites = list(inserted_sites(unwrap_model(model)[0]))  # names without _orig_mod.
    if not sites:
        raise SurgeryError(
            f"{owner}: the model has no attention blocks inserted by attnblocks, so there "
            "is nothing to save. Insert some with insert_attention or insert_se first."
        )
    configs = [_site_config(site, owner) for site in sites]
    tensors: dict[str, torch.Tensor] = {}
    for site in sites:
        for key, value in site.block.state_dict(prefix=site.prefix).items():
            if value.device.type == "meta":
                raise SurgeryError(
                    f"{owner}: {key!r} is on the 'meta' device and holds no data; "
                    "materialise the model (model.to_empty(...) and load weights) first."
                )
            # one contiguous CPU copy per tensor: safetensors refuses shared storage
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    config = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "attnblocks_version": __version__,
        "torch_version": torch.__version__,
        "sites": configs,
    }
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(f"{owner}: {str(path)!r} exists and is not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        weights = safetensors_save(tensors, metadata={"format": "pt"})
        _write_atomically(path / WEIGHTS_NAME, weights)
        text = json.dumps(config, indent=2, allow_nan=False) + "\n"
        _write_atomically(path / CONFIG_NAME, text.encode("utf-8"))
    except OSError as err:
        raise InvalidArgumentError(f"{owner}: cannot write to {str(path)!r}: {err}") from None
    return path


# -- loading ---------------------------------------------------------------------


@dataclass(frozen=True)
class _SavedSite(BlockPath):
    host_name: str
    attr: str
    block: str
    init: str
    options: dict[str, Any]
    channels: int


_SITE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "site": str,
    "attribute": str,
    "block": str,
    "init": str,
    "options": dict,
    "channels": int,
}


def _read_config(path: Path, owner: str) -> list[_SavedSite]:
    file = path / CONFIG_NAME
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttnBlocksError(
            f"{owner}: {str(file)!r} does not exist; a saved attention directory holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by save_attention)."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AttnBlocksError(f"{owner}: cannot read {str(file)!r}: {err}") from None

    def bad(what: str) -> AttnBlocksError:
        return AttnBlocksError(
            f"{owner}: {str(file)!r} is not an attention config written by save_attention: {what}."
        )

    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise bad(f"its 'format' is not {_FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > _FORMAT_VERSION:
        raise bad(
            f"format_version {version!r} is not one this attnblocks ({__version__}) reads "
            f"(up to {_FORMAT_VERSION}); upgrade attnblocks"
        )
    entries = config.get("sites")
    if not isinstance(entries, list) or not entries:
        raise bad("'sites' is not a non-empty list")
    sites: list[_SavedSite] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(f"sites[{index}] is not an object")
        for key, kind in _SITE_FIELDS.items():
            value = entry.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise bad(f"sites[{index}][{key!r}] is {value!r}, not a {kind.__name__}")  # type: ignore[union-attr]
        if entry["block"] not in available_blocks():
            raise AttnBlocksError(
                f"{owner}: the block {entry['block']!r} at site {entry['site']!r} is not "
                f"registered here (registered: {available_blocks()}); import the module "
                "that registers it before loading."
            )
        sites.append(
            _SavedSite(
                entry["site"],
                entry["attribute"],
                entry["block"],
                entry["init"],
                dict(entry["options"]),
                entry["channels"],
            )
        )
    return sites


def _read_weights(path: Path, sites: Sequence[_SavedSite], owner: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    file = path / WEIGHTS_NAME
    try:
        tensors = safetensors_load(file.read_bytes())
    except FileNotFoundError:
        raise AttnBlocksError(
            f"{owner}: {str(file)!r} does not exist; save_attention writes it beside {CONFIG_NAME}."
        ) from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise AttnBlocksError(
            f"{owner}: {str(file)!r} is not a readable safetensors file ({err}); it may be "
            "truncated or corrupt. Save it again with save_attention."
        ) from None
    prefixes = tuple(site.prefix for site in sites)
    stray = sorted(key for key in tensors if not key.startswith(prefixes))
    if stray:
        raise AttnBlocksError(
            f"{owner}: {str(file)!r} holds tensors that belong to no site of "
            f"{CONFIG_NAME}: {stray[:5]}; the two files do not belong together."
        )
    return tensors


def _exact_selector(name: str) -> str:
    """A selector that matches exactly the module called ``name``."""
    if name == "" or not (set("*?[") & set(name) or name.startswith("re:")):
        return name
    return "re:" + re.escape(name)


def _mismatch(owner: str, site: _SavedSite, what: str) -> AttnBlocksError:
    return SurgeryError(
        f"{owner}: the saved attention does not fit this model at site {site.host_name!r} "
        f"({site.block}, stored as {site.label!r}): {what} Load it onto the same "
        "architecture (and the same base weights) it was saved from; the model was left "
        "unchanged."
    )


def _check_saved_shapes(site: _SavedSite, tensors: dict[str, torch.Tensor], owner: str) -> None:
    """Refuse a site whose saved tensors do not fit its saved block, before building it.

    The block is built on the meta device (no memory), so a config whose channels or
    options were edited to something huge is refused without allocating the block. A
    block that cannot be built on the meta device is left to the real insertion, which
    reports its own error.
    """
    try:  # init="identity" sets values (it reads gate(0)), never shapes: build the default
        with torch.device("meta"):
            expected = create_block(site.block, site.channels, **site.options).state_dict()
    except Exception:
        return
    want = {key: tuple(value.shape) for key, value in expected.items()}
    have = {
        key[len(site.prefix) :]: tuple(value.shape)
        for key, value in tensors.items()
        if key.startswith(site.prefix)
    }
    if want != have:
        wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        parts = [f"{k}: saved {list(have[k])}, the block needs {list(want[k])}" for k in wrong]
        parts += [f"missing {missing}"] if missing else []
        parts += [f"unexpected {extra}"] if extra else []
        raise _mismatch(
            owner,
            site,
            f"its saved tensors do not fit the block its config describes "
            f"({site.block} with {site.channels} channels and options {site.options}): "
            + "; ".join(parts)
            + ".",
        )


def load_attention(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    example_input: ExampleInput | None = None,
) -> nn.Module:
    """Insert the attention saved by :func:`save_attention` into ``model`` and load its weights.

    Every saved block is inserted at its saved site, under its saved attribute, with
    its saved block name, ``init`` and options (through :func:`insert_attention`, so
    each is placed on its site's device and dtype and takes its site's train/eval
    mode), then its saved tensors are copied in. Loaded onto the base model the
    attention was saved from, the result has the same state dict, bit for bit, and
    the same outputs. Only JSON and safetensors are read: nothing is unpickled.

    Everything is checked before the model is kept changed: if a saved site is
    missing from ``model``, has other channels, cannot take the block or the tensors
    do not fit, every block inserted so far is removed again and the error names the
    first site that did not fit.

    Args:
        model: the base model, without the saved blocks (e.g. a freshly built
            backbone with its pretrained weights); it may be wrapped by
            ``torch.compile``, ``DistributedDataParallel`` or ``DataParallel``, and
            the blocks go into the model it wraps.
        directory: a directory written by :func:`save_attention`.
        example_input: optional input for one forward pass, as for
            :func:`insert_attention`: each saved block is then checked against the
            real output of its site. Without it, a site whose module does not declare
            its channels (a residual block, an activation) takes the channel count the
            config saved, unchecked until the model's first forward pass; a declared
            count (a convolution's, a norm's) is always compared with the saved one.

    Returns:
        ``model`` itself, with the attention inserted.

    Raises:
        AttnBlocksError: the directory or a file is missing, unreadable, corrupt or
            not written by save_attention.
        SurgeryError: the model does not fit the saved attention (missing site,
            other channels, the site already has such a block, ...).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from attnblocks import AttnBlocksError, insert_attention, load_attention, save_attention
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> folder = save_attention(insert_attention(net, ["1"], block="eca"), tempfile.mkdtemp())
        >>> load_attention(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), folder)[1].eca
        ECABlock(...)
        >>> try:
        ...     load_attention(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)), folder)
        ... except AttnBlocksError as err:
        ...     print(str(err)[:80])
        load_attention: the saved attention does not fit this model at site '1' (eca, st
    """
    owner = "load_attention"
    model = _check_model(model, owner)
    path = _check_directory(directory, owner)
    if not path.is_dir():
        raise AttnBlocksError(
            f"{owner}: {str(path)!r} is not a directory; pass the directory save_attention "
            f"wrote ({CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    saved = _read_config(path, owner)
    tensors = _read_weights(path, saved, owner)
    target = unwrap_model(model)[0]  # saved names are the unwrapped model's
    modules = dict(target.named_modules())
    inserted: list[tuple[nn.Module, str]] = []
    try:  # site by site, in saved order; any failure removes what was inserted
        for site in saved:
            host = modules.get(site.host_name)
            if host is None:
                names = [n for n in modules if n]
                close = difflib.get_close_matches(site.host_name, names, n=3, cutoff=0.4)
                hint = (
                    f" Closest module names: {close}."
                    if close
                    else f" Its first module names are {names[:5]}."
                )
                raise _mismatch(owner, site, f"the model has no module {site.host_name!r}.{hint}")
            _check_saved_shapes(site, tensors, owner)
            request = SurgeryRequest(
                target,
                [_exact_selector(site.host_name)],
                site.block,
                site.init,
                example_input,
                True,
                site.attr,
                site.options,
                "insert_attention",
                saved_channels=site.channels,
            )
            try:
                insert_request(request)
            except AttnBlocksError as err:
                raise _mismatch(owner, site, f"inserting it failed: {err}") from None
            inserted.append((host, site.attr))
            block = host._modules[site.attr]
            if block is None:  # pragma: no cover - insert_attention always stores a block
                raise _mismatch(owner, site, "no block was stored.")
            channels = getattr(block, "channels", None)
            if channels != site.channels:
                raise _mismatch(
                    owner,
                    site,
                    f"it was saved with {site.channels} channels, and the model's module "
                    f"gives {channels}.",
                )
            if any(t.device.type == "meta" for t in block.state_dict().values()):
                raise _mismatch(
                    owner,
                    site,
                    "the model is on the 'meta' device, where weights cannot be loaded; "
                    "materialise it first (model.to_empty(device=...) and its weights).",
                )
            state = {
                key[len(site.prefix) :]: value
                for key, value in tensors.items()
                if key.startswith(site.prefix)
            }
            try:
                block.load_state_dict(state, strict=True)
            except RuntimeError as err:
                text = " ".join(str(err).split())
                raise _mismatch(owner, site, f"its saved tensors do not fit: {text}") from None
    except BaseException:
        for host, attr in reversed(inserted):
            detach_block(host, attr)
        raise
    return model
