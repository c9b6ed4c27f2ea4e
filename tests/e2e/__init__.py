"""End-to-end deployment tests: real processes, real sockets, real network namespaces."""
