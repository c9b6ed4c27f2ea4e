"""Site-owned differential privacy: policy, accounting, the durable ledger, DP-SGD."""
