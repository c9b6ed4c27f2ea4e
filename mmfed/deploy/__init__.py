"""Deployment as real processes: ``mmfed certs init``, ``keys new``, ``server``, ``client``.

Topology of one federation (Flower 1.41 serves its Fleet, Control and Runtime APIs on
a single HTTP port, so the SuperLink itself is never exposed)::

    coordinating server                                  hospital i (one per site)
    ───────────────────                                  ─────────────────────────
    mmfed server  (child subreaper; stops all below)     mmfed client (same role)
     ├─ flower-superlink   127.0.0.1:<free port>, TLS,    └─ flower-supernode
     │   --enable-supernode-auth, in-memory state             --superlink HOST:9092 (TLS,
     │   └─ flower-superexec → flwr-serverapp                   CA = ca.pem, key = SITE.key)
     │        (mmfed.server.deployed: holdout only,           Runtime API 127.0.0.1:<free
     │         writes RUN/)                                       port or --runtime-port>
     ├─ flwr supernode register SITE.pub   (per site)          └─ flower-superexec →
     ├─ flwr run <generated app> --stream  (the run)               flwr-clientapp per message
     └─ Fleet gateway thread  HOST:9092, same TLS cert ◄── TLS ──  (mmfed.site.app)
          forwards POST /v1/fleet/* only → SuperLink

* ``mmfed certs init`` makes ``ca.pem``/``ca.key`` (keep the CA key offline) and the
  SuperLink's ``server.pem``/``server.key``, valid for every ``--host`` plus loopback
  (Flower's own helpers reach the SuperLink on 127.0.0.1). Sites only need ``ca.pem``.
* ``mmfed keys new --site NAME`` makes ``NAME.key`` (stays at the site, mode 0600) and
  ``NAME.pub`` (goes to the server operator, who passes it to ``--admit``).
* The server registers every admitted key through the SuperLink's Control API on
  loopback *before* opening the public port, so a site never races its registration,
  and nobody outside can reach the Control API (open-source Flower has no
  authentication on it) or the Runtime API.
* Sites keep their data, privacy policy and privacy ledger; the server keeps only the
  holdout. Private keys are mode 0600 and are never printed: only SHA256 fingerprints.
* One ``mmfed server`` is one run; its SuperLink state is in memory. A client outlives
  it: when a new server (new node ids) takes the port, the client's SuperNode is told
  its node is unknown, and ``mmfed client`` starts a fresh one that re-authenticates.
"""
