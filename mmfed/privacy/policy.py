"""A site's privacy policy: its budget, set and enforced by the site itself.

The server may ask for stricter settings (smaller ε or δ, tighter clipping); it can
never loosen them, and a request to turn DP off is ignored by a site whose policy
requires it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmfed.errors import ConfigError
from mmfed.privacy.accounting import ACCOUNTANTS

FIELDS = ("enabled", "epsilon", "delta", "max_grad_norm", "accountant", "max_noise_multiplier")


@dataclass(frozen=True)
class PrivacyPolicy:
    enabled: bool = True
    epsilon: float = 8.0  # lifetime budget on this dataset, across every run
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    max_noise_multiplier: float = 10.0  # above this, updates are noise: decline instead

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.epsilon <= 1000:
            problems.append(f"epsilon must be in (0, 1000] (got {self.epsilon})")
        if not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1) (got {self.delta})")
        if not 0 < self.max_grad_norm <= 1000:
            problems.append(f"max_grad_norm must be in (0, 1000] (got {self.max_grad_norm})")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)} "
                            f"(got {self.accountant!r})")
        if not 0.1 <= self.max_noise_multiplier <= 1000:
            problems.append("max_noise_multiplier must be in [0.1, 1000] "
                            f"(got {self.max_noise_multiplier})")
        if problems:
            raise ConfigError("privacy policy: " + "; ".join(problems))

    def tightened(self, request: PrivacyPolicy) -> PrivacyPolicy:
        """Apply a server request, keeping only the parts that make the site stricter."""
        return replace(self, enabled=self.enabled or request.enabled,
                       epsilon=min(self.epsilon, request.epsilon),
                       delta=min(self.delta, request.delta),
                       max_grad_norm=min(self.max_grad_norm, request.max_grad_norm))

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}


def _typed(field: str, value: Any, where: str) -> Any:
    default = getattr(PrivacyPolicy(), field)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and isinstance(value, int) and abs(value) > 1e300:  # float() would overflow
            raise ConfigError(f"{where}: '{field}' is out of range (got a "
                              f"{value.bit_length()}-bit integer)")
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: '{field}' must be {type(default).__name__} (got {value!r})")
    return value


def policy_from_mapping(values: dict[str, Any], where: str) -> PrivacyPolicy:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: "
                          f"{', '.join(FIELDS)})")
    return PrivacyPolicy(**{k: _typed(k, v, where) for k, v in values.items()})


def load_policy(path: Path | str) -> PrivacyPolicy:
    """Read a site policy file (TOML, keys at top level or under [privacy])."""
    path = Path(path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: privacy policy file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read privacy policy ({exc})") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer too long for int()
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    values = tree.get("privacy", tree)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: [privacy] must be a table")
    extra = set(tree) - {"privacy"} if "privacy" in tree else set()
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(repr, sorted(extra)))}")
    return policy_from_mapping(values, str(path))
