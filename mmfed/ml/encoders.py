"""Bring your own encoder: ``model.image_encoder = "package.module:factory"`` (and
``record_encoder``, ``genomic_encoder``) swaps a built-in encoder for any torch module.

The factory is called as ``factory(out_dim, schema)`` (``schema`` a
:class:`mmfed.ml.features.FeatureSchema`: image size, record columns, genes) and returns
an ``nn.Module`` with the encoder interface of the modality it replaces:

* images: ``forward(x)`` with ``x`` of shape ``(n, 1, H, W)`` → ``(n, out_dim)``;
* records: ``forward(numeric, numeric_missing, categorical)`` with ``(n, n_numeric)``
  floats, their ``(n, n_numeric)`` missing indicators and ``(n, n_categorical)`` hashed
  category indices (``schema.hash_buckets`` per column) → ``(n, out_dim)``;
* genomics: ``forward(x)`` with ``(n, n_genes)`` standardized expression → ``(n, out_dim)``.

Three checks stand between an entry point and a round, because encoder code is code
that touches patients' data:

* **approval, at the site, before import.** Importing a module runs it, so a site first
  hashes the entry point's source without importing anything (:func:`encoder_digest`)
  and declines a run whose encoder digest its own policy does not list. A server can
  name any importable callable; only the site decides which one runs on its data.
* **shape**: a dummy batch through the encoder must give ``(n, out_dim)``, so a wrong
  encoder fails at setup with its name, not as a broadcasting error in round one.
* **DP-compatibility** (:func:`check_private`): under DP-SGD every layer must have
  per-patient gradients. BatchNorm is refused even without affine parameters (Opacus's
  validator only looks at trainable layers), since its batch statistics mix patients;
  the rest is Opacus's ``ModuleValidator``, layer by layer so the message names it.

The digest covers the entry point's top-level package (every ``.py`` file under it, or
the single module file) and the entry point itself; the libraries that code imports
(torch, MONAI) are part of what the site installed, as the mmfed release is.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmfed.config import ENCODER_KEYS, ModelSpec
from mmfed.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from mmfed.ml.features import FeatureSchema

# Which model attribute each key replaces (the state-dict prefix modality-aware
# aggregation and the explanations rely on).
MODULE_OF = {"image_encoder": "images", "record_encoder": "records",
             "genomic_encoder": "genomics"}
KEY_OF = {v: k for k, v in MODULE_OF.items()}
_DIGEST_TAG = b"mmfed encoder v1\0"


def custom_encoders(spec: ModelSpec) -> dict[str, str]:
    """The config keys that name an encoder of their own, with their entry points."""
    return {key: getattr(spec, key) for key in ENCODER_KEYS if getattr(spec, key)}


def _source_files(entry: str) -> tuple[Path, list[Path]]:
    """The root and the ``.py`` files of the entry point's top-level package, found
    through the import system's finders, which locate a module without running it."""
    top = entry.partition(":")[0].split(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"encoder {entry!r}: cannot locate {top!r} ({exc})") from None
    if found is None:
        raise ConfigError(f"encoder {entry!r}: no module {top!r} is installed here")
    if found.submodule_search_locations:
        roots = [Path(p) for p in found.submodule_search_locations]
        files = sorted({f for r in roots for f in r.rglob("*.py")
                        if "__pycache__" not in f.parts})
        return roots[0], files
    if found.origin and found.origin.endswith(".py"):
        origin = Path(found.origin)
        return origin.parent, [origin]
    raise ConfigError(f"encoder {entry!r}: {top!r} has no Python source here (a built-in or "
                      "compiled module), so a site cannot review and approve it")


def encoder_digest(entry: str) -> str:
    """SHA-256 over the entry point and its top-level package's source: what a site
    reviews and approves. Nothing is imported."""
    root, files = _source_files(entry)
    digest = hashlib.sha256(_DIGEST_TAG + entry.encode() + b"\0")
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"encoder {entry!r}: cannot read {path} ({exc})") from None
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(f"{rel}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def unapproved(spec: ModelSpec, approved: tuple[str, ...]) -> list[str]:
    """One line per custom encoder of ``spec`` whose code digest ``approved`` lacks."""
    out = []
    for key, entry in custom_encoders(spec).items():
        digest = encoder_digest(entry)
        if digest not in approved:
            out.append(f"model.{key} {entry!r} (code {digest[:12]}) is not approved at this "
                       "site: review it, then add `mmfed app hash --encoder ENTRY`'s digest to "
                       "approved_encoders in the site policy")
    return out


def _factory(key: str, entry: str) -> Callable[..., Any]:
    module_name, _, attr = entry.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # an import runs arbitrary code: any failure is the entry's
        raise ConfigError(f"model.{key} {entry!r}: cannot load it "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not callable(target):
        raise ConfigError(f"model.{key} {entry!r}: not callable")
    return target  # type: ignore[no-any-return]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dummy_inputs(key: str, schema: FeatureSchema) -> tuple[Any, ...]:
    import torch

    n = 2
    if key == "image_encoder":
        return (torch.zeros(n, 1, *schema.image_size),)
    if key == "genomic_encoder":
        return (torch.zeros(n, len(schema.genes)),)
    k = len(schema.numeric)
    return (torch.zeros(n, k), torch.zeros(n, k),
            torch.zeros(n, len(schema.categorical), dtype=torch.long))


def build_encoder(key: str, entry: str, out_dim: int, schema: FeatureSchema) -> nn.Module:
    """The module ``entry`` makes, checked to map a dummy batch to ``(n, out_dim)``."""
    import torch
    from torch import nn

    try:
        module = _factory(key, entry)(out_dim, schema)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"model.{key} {entry!r}: the factory failed "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.{key} {entry!r}: the factory returned "
                          f"{type(module).__name__}, not a torch.nn.Module")
    inputs = _dummy_inputs(key, schema)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*inputs)
    except Exception as exc:
        raise ConfigError(f"model.{key} {entry!r}: forward on a dummy batch of shape "
                          f"{tuple(inputs[0].shape)} failed ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from None
    finally:
        module.train(was_training)
    want = (inputs[0].shape[0], out_dim)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.{key} {entry!r}: gives {got} for a batch of {want[0]}; "
                          f"the fusion needs {want} (model.embed_dim = {out_dim})")
    return module


def check_private(model: nn.Module) -> None:
    """Refuse, naming the layer, a model DP-SGD cannot train with per-patient gradients."""
    import logging

    from torch import nn

    # Opacus calls logging.basicConfig at import, which would print every mmfed log line
    # a second time in the server process (the first there to import it): keep the
    # root logger's handlers as they were
    handlers = list(logging.root.handlers)
    from opacus.validators import ModuleValidator

    logging.root.handlers[:] = handlers

    for name, layer in model.named_modules():
        owner = KEY_OF.get(name.split(".")[0])
        where = f"model.{owner}: layer {name!r}" if owner else f"layer {name!r}"
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"{where} ({type(layer).__name__}) is refused with DP on: "
                              "batch statistics mix patients, so no per-patient gradient "
                              "exists; use GroupNorm, LayerNorm or InstanceNorm")
        validate = ModuleValidator.VALIDATORS.get(type(layer))
        if validate is None or not any(p.requires_grad
                                       for p in layer.parameters(recurse=False)):
            continue
        errors = validate(layer)
        if errors:
            raise ConfigError(f"{where} ({type(layer).__name__}) is refused with DP on: "
                              f"{_first_line(errors[0])}")
