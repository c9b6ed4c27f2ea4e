"""A site's privacy policy: its budget and its terms for secure aggregation, set and
enforced by the site itself.

The server may ask for stricter settings (smaller ε or δ, tighter clipping, secure
aggregation required, a higher threshold, a larger cohort); it can never loosen them,
and a request to turn DP off is ignored by a site whose policy requires it. The
fields, their bounds and defaults are the run configuration's ``privacy`` fields that a
site may set for itself (:class:`mmfed.config.SitePrivacyConfig`), so a policy file, a
``privacy.site.<name>.*`` entry and the server's request are checked by one schema.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from mmfed.config import SITE_POLICY_FIELDS, SitePrivacyConfig, check_value
from mmfed.errors import ConfigError

FIELDS = SITE_POLICY_FIELDS
TWO_SITE_WARNING = ("min_cohort = 2: with two sites each can subtract its own update from "
                    "the sum and read the other's")


class PrivacyPolicy(SitePrivacyConfig):
    """One site's effective policy."""

    def tightened(self, request: PrivacyPolicy) -> PrivacyPolicy:
        """Apply a server request, keeping only the parts that make the site stricter."""
        required = "required" in (self.secure_aggregation, request.secure_aggregation)
        return self.model_copy(update={
            "enabled": self.enabled or request.enabled,
            "epsilon": min(self.epsilon, request.epsilon),
            "delta": min(self.delta, request.delta),
            "max_grad_norm": min(self.max_grad_norm, request.max_grad_norm),
            "secure_aggregation": "required" if required else "optional",
            "min_threshold": max(self.min_threshold, request.min_threshold),
            "min_cohort": max(self.min_cohort, request.min_cohort),
            # local noise protects against anyone, distributed only within a sum
            "noise": "local" if "local" in (self.noise, request.noise) else "distributed",
            "colluders": max(self.colluders, request.colluders)})

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}


def policy_from_mapping(values: dict[str, Any], where: str) -> PrivacyPolicy:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: "
                          f"{', '.join(FIELDS)})")
    checked = {k: check_value(f"{where}: '{k}'", SitePrivacyConfig, k, v)
               for k, v in values.items()}
    return PrivacyPolicy.model_validate(checked)


def load_policy(path: Path | str) -> PrivacyPolicy:
    """Read a site policy file (TOML, keys at top level or under [privacy]).

    A file written before a key existed still loads: the key takes its default.
    """
    path = Path(path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: privacy policy file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read privacy policy ({exc})") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer too long for int()
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    tree.pop("apps", None)  # which apps the site serves: mmfed.deploy.release reads it
    values = tree.get("privacy", tree)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: [privacy] must be a table")
    extra = set(tree) - {"privacy"} if "privacy" in tree else set()
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(repr, sorted(extra)))}")
    return policy_from_mapping(values, str(path))
