"""Modality-aware aggregation: each encoder is the mean over the sites that had its modality.

The end-to-end tests run a real one-round federation in which site-2 holds no genomic
profiles, then retrain every site in this process from the same global model and
seeds (training is deterministic on one CPU thread) and check the server's result
against the weighted means computed here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.config import RunConfig
from mmfed.data.reader import list_sites
from mmfed.ml.model import build_model
from mmfed.ml.patterns import COMPLETE, metrics_by_pattern, pattern_names
from mmfed.ml.training import drop_modalities
from mmfed.ml.updates import (
    apply_delta,
    flat_delta,
    group_weights,
    grouped_average,
    segment_layout,
)
from mmfed.run.saved_model import load_saved_model
from mmfed.secagg import SecAggClient, SecAggParams, SecAggServer
from mmfed.secagg.quantize import pack_segments, unpack_segments
from mmfed.server.secure import aggregate_problem
from mmfed.site.runtime import train_round
from mmfed.site.secagg import segment_weights
from mmfed.wire import SecAggRequest
from tests.helpers import run_mmfed

SMALL = ["--sites", "3", "--rounds", "1", "--no-progress", "--no-dp", "--seed", "3",
         "--set", "data.patients_per_site=60", "--set", "data.genes=40",
         "--set", "data.holdout=60", "--set", "federation.local_eval=false",
         "--set", "train.batch_size=16", "--set", 'data.missing=["genomics@site-2"]',
         "--set", "aggregation.modality_aware=true"]


def _site_results(run: Path) -> tuple[RunConfig, dict[str, np.ndarray],
                                      list[tuple[str, dict[str, np.ndarray], dict[str, int]]]]:
    """Retrain every site locally exactly as the federation did in round 1."""
    saved = load_saved_model(run)
    cfg = saved.cfg
    init = build_model(saved.schema, cfg.model_spec(), seed=cfg["seed"])
    start = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
    results = []
    torch.set_num_threads(1)
    for folder in list_sites(cfg["data.dir"]):
        outcome = train_round(folder, cfg, saved.schema, start, 1)
        assert outcome.state is not None
        weights = group_weights(int(outcome.metrics["num_examples"]), outcome.counts, True)
        results.append((folder.name, outcome.state, weights))
    return cfg, start, results


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secagg"])
def test_genomic_encoder_is_mean_over_sites_with_genomics(tmp_path: Path, secure: bool
                                                          ) -> None:
    out = tmp_path / "run"
    proc = run_mmfed("simulate", "--out", out, "--secagg" if secure else "--no-secagg", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg, _, results = _site_results(out)
    by_site = {name: (state, w) for name, state, w in results}
    assert by_site["site-2"][1]["genomics"] == 0  # no genomic profiles at site-2
    assert all(by_site[s][1]["genomics"] > 0 for s in ("site-1", "site-3"))
    final = {k: v.detach().numpy() for k, v in load_saved_model(out).model.state_dict().items()}
    tol = 2e-5 if secure else 1e-6  # secure aggregation sums 32-bit fixed-point codes
    genomic = [k for k in final if k.startswith("genomics.")]
    assert genomic
    for key in genomic:
        total = sum(w["genomics"] for _, w in by_site.values())
        expected = sum(s[key].astype(np.float64) * w["genomics"] / total
                       for s, w in by_site.values())
        np.testing.assert_allclose(final[key], expected, atol=tol, rtol=0)
        # site-2's untouched (weight-decayed) copy would have pulled plain FedAvg away
        n_total = sum(w["examples"] for _, w in by_site.values())
        fedavg = sum(s[key].astype(np.float64) * w["examples"] / n_total
                     for s, w in by_site.values())
        if not np.allclose(fedavg, expected, atol=10 * tol):
            break
    else:
        pytest.fail("plain FedAvg equals the modality-aware mean: the test proves nothing")
    # fusion and head: example-weighted; images: weighted by patients with an image
    for key in (k for k in final if k.startswith(("head.", "fusion.", "images."))):
        group = "images" if key.startswith("images.") else "examples"
        total = sum(w[group] for _, w in by_site.values())
        expected = sum(s[key].astype(np.float64) * w[group] / total
                       for s, w in by_site.values())
        np.testing.assert_allclose(final[key], expected, atol=tol, rtol=0)
    assert cfg["aggregation.modality_aware"] is True


def test_grouped_average_matches_secure_segments() -> None:
    """The same weighted means from the plaintext rule and from the masked segment sum,
    each site weighing its segments as a real site does (``site.secagg.segment_weights``
    from the server's segment groups)."""
    rng = np.random.default_rng(0)
    ref = {"genomics.w": np.zeros((3, 4), np.float32), "head.b": np.zeros(2, np.float32),
           "images.k": np.zeros(5, np.float32), "fusion.v": np.zeros(3, np.float32),
           "records.m": np.zeros(2, np.float32)}
    counts = [{"examples": 50, "records": 50, "images": 40, "genomics": 0},
              {"examples": 30, "records": 30, "images": 0, "genomics": 25},
              {"examples": 70, "records": 70, "images": 60, "genomics": 10}]
    states = [{k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in ref.items()}
              for _ in counts]
    plain = grouped_average(list(zip(states, counts, strict=True)), ref)
    layout = segment_layout(ref)
    assert [g for g, _ in layout] == ["examples", "genomics", "examples", "images", "records"]
    d = sum(n for _, n in layout)
    params = SecAggParams(run_id="r", round=1, site_ids=[0, 1, 2], threshold=2,
                          neighbours=None, clip_range=1.0, max_sites=3, count_cap=100,
                          vector_length=d, segments=tuple(n for _, n in layout))
    clients = [SecAggClient(params, i) for i in range(3)]
    server = SecAggServer(params)
    server.collect_keys({i: c.advertise() for i, c in enumerate(clients)})
    routed = server.route({i: c.share_keys(server.keys_for(i)) for i, c in enumerate(clients)})
    groups = tuple(g for g, _ in layout)
    weights = [segment_weights(SecAggRequest(params, i, groups), counts[i]["examples"],
                               counts[i]) for i in range(3)]
    assert weights[1] == [30, 25, 30, 0, 30]  # examples, genomics, examples, images, records
    masked = {i: c.masked_input(routed.get(i, {}), flat_delta(states[i], ref), weights[i])
              for i, c in enumerate(clients)}
    survivors, dropped = server.unmask_request(list(masked))
    reveals = {i: clients[i].unmask(survivors, dropped) for i in survivors}
    mean, _, used = server.aggregate(masked, reveals)
    assert used == [0, 1, 2]
    assert server.segment_weights[1] == pytest.approx(0.35)  # (0 + 25 + 10) / count_cap
    secure = apply_delta(ref, mean)
    for key in ref:
        np.testing.assert_allclose(secure[key], plain[key], atol=2e-5)


def test_group_nobody_trained_keeps_its_previous_value() -> None:
    ref = {"genomics.w": np.full(3, 0.5, np.float32), "head.b": np.zeros(2, np.float32)}
    states = [{"genomics.w": np.full(3, 9.0, np.float32), "head.b": np.ones(2, np.float32)}]
    out = grouped_average([(states[0], {"examples": 10, "genomics": 0})], ref)
    np.testing.assert_array_equal(out["genomics.w"], ref["genomics.w"])
    np.testing.assert_array_equal(out["head.b"], np.ones(2))
    weights = [0.0, 0.4]
    means, totals = unpack_segments(pack_segments(np.array([0.3, -0.2, 0.5]), weights, [1, 2],
                                                  1.0, 4), 1, [1, 2], 1.0, 4)
    assert totals[0] == 0.0 and means[0] == 0.0
    np.testing.assert_allclose(means[1:], [-0.2, 0.5], atol=1e-6)


def test_modality_dropout_hides_present_modalities_but_never_all() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0]] * 2000 + [[1.0, 0.0, 0.0]] * 10)
    out = drop_modalities(mask, 0.5, torch.Generator().manual_seed(0))
    assert (out <= mask).all()
    assert (out.sum(dim=1) >= 1).all()
    assert (out[2000:] == mask[2000:]).all()  # a lone modality is never dropped
    hidden = 1 - out[:2000].mean(dim=0)
    assert ((hidden > 0.3) & (hidden < 0.6)).all()
    assert drop_modalities(mask, 0.0, torch.Generator()) is mask


def test_patterns_group_patients_by_what_they_have() -> None:
    mask = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
    assert pattern_names(mask) == [COMPLETE, "records+genomics", "records+images", "records",
                                   COMPLETE]
    assert pattern_names(mask, ("records", "images")) == [
        COMPLETE, "records", COMPLETE, "records", COMPLETE]
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.9, 0.1]])
    labels = np.array([1, 0, 1, 0, 0])
    figures = metrics_by_pattern(probs, labels, mask)
    assert next(iter(figures)) == COMPLETE
    assert figures[COMPLETE]["n"] == 2 and figures[COMPLETE]["auroc"] == 1.0
    assert figures["records"]["auroc"] is None  # one class only


def test_server_checks_the_secure_aggregate_segment_by_segment() -> None:
    params = SecAggParams(run_id="r", round=1, site_ids=[0, 1], threshold=2, neighbours=None,
                          clip_range=1.0, max_sites=2, count_cap=100, vector_length=8,
                          segments=(4, 4))
    ok = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # each segment norm 1.0
    assert aggregate_problem(ok, params, [0.3, 0.4], 2, max_norm=1.0) is None
    assert np.linalg.norm(ok) > 1.0  # the whole vector alone would have been refused
    big = ok.copy()
    big[:4] = 1.0  # segment norm 2.0 > bound 1.0
    assert "segment norm 2" in (aggregate_problem(big, params, [0.3, 0.4], 2, 1.0) or "")
    assert aggregate_problem(big, params, [0.0, 0.4], 2, 1.0) is None  # nobody trained it
    nan = ok.copy()
    nan[5] = np.nan
    assert aggregate_problem(nan, params, [0.3, 0.4], 2, 1.0) == "NaN or infinite values"
