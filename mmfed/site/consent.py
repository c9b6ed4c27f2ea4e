"""What a site agrees to release: its policy's terms, checked against each request.

The coordinator lays out every round: whether it is secure at all, the threshold,
the neighbourhoods and, at the end, which sites it says survived. Each of those is a
lever a curious coordinator could pull to get one site's update in the clear, so the
site checks them itself, before it trains (nothing spent, nothing released) and
again before it reveals the shares that unmask a sum. A refusal is a ``Declined``
with a one-line reason; the server records it as ``declined: <reason>``.

These checks hold against a server that deviates from the protocol only as far as
the site can see it: a server can still lie about how many sites it asked in a
plaintext round, which is why secure aggregation is required by default.
"""

from __future__ import annotations

from mmfed.errors import Declined
from mmfed.privacy.policy import PrivacyPolicy
from mmfed.secagg import SecAggParams, neighbourhood, share_group_size


def check_plaintext(policy: PrivacyPolicy, cohort: int | None) -> None:
    """A plaintext train request shows the server this site's update itself."""
    if policy.secure_aggregation == "required":
        raise Declined("declined: this site's policy requires secure aggregation and the "
                       "request is plaintext")
    if cohort is None or cohort < policy.min_cohort:
        raise Declined(f"declined: the round announces {cohort or 'no'} site(s); this "
                       f"site's policy needs at least {policy.min_cohort}")


def check_secure(policy: PrivacyPolicy, params: SecAggParams, my_id: int) -> None:
    """The round's layout must hide this site's update among enough others."""
    sites = len(params.site_ids)
    if sites < policy.min_cohort:
        raise Declined(f"declined: the round has {sites} site(s); this site's policy needs "
                       f"at least {policy.min_cohort}")
    floor = share_group_size(sites, params.neighbours) // 2 + 1
    needed = max(policy.min_threshold, floor)
    if params.threshold < needed:
        raise Declined(f"declined: threshold {params.threshold} is below this site's "
                       f"minimum of {needed}")
    peers = len(neighbourhood(my_id, params))
    if peers + 1 < policy.min_cohort:
        raise Declined(f"declined: this site would mask with {peers} neighbour(s); its "
                       f"policy needs at least {policy.min_cohort - 1}")


def check_unmask(min_cohort: int, survivors: list[int], my_id: int) -> None:
    """Revealing shares for too small a set of survivors would unmask a "sum" that is
    in effect a few sites' updates, or this site's alone."""
    if my_id not in survivors:
        raise Declined("declined: the server lists this site among the dropped although it "
                       "sent its masked update")
    if len(set(survivors)) < min_cohort:
        raise Declined(f"declined: only {len(set(survivors))} site(s) survived; this "
                       f"site's policy needs at least {min_cohort} in the sum")
