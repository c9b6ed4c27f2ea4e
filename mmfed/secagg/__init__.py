"""mmfed's own secure aggregation: the server learns only the weighted sum of site updates.

Bonawitz et al. (CCS 2017) pairwise + self masks with Shamir-shared dropout recovery,
optionally over SecAgg+ sparse neighbourhoods (Bell et al., CCS 2020). The core is pure
Python + numpy + ``cryptography`` and imports nothing from Flower, so it can be tested and
reasoned about on its own; the Flower round loop only moves the dicts and arrays around.
See :mod:`mmfed.secagg.protocol` for the threat model.
"""

from mmfed.secagg.errors import SecAggAborted, SecAggError
from mmfed.secagg.prg import expand
from mmfed.secagg.protocol import (
    RoundKeys,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    client_from_state,
    client_to_state,
    default_threshold,
    effective_degree,
    neighbourhood,
    share_group_size,
)
from mmfed.secagg.quantize import (
    decode_sum,
    encode,
    levels,
    mean_error_bound,
    pack,
    site_weight,
    unpack_mean,
)
from mmfed.secagg.shamir import decode_share, encode_share, reconstruct, split

__all__ = [
    "RoundKeys",
    "SecAggAborted",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "client_from_state",
    "client_to_state",
    "decode_share",
    "decode_sum",
    "default_threshold",
    "effective_degree",
    "encode",
    "encode_share",
    "expand",
    "levels",
    "mean_error_bound",
    "neighbourhood",
    "pack",
    "reconstruct",
    "share_group_size",
    "site_weight",
    "split",
    "unpack_mean",
]
