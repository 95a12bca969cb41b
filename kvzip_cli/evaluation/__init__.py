"""Fidelity of a compressed cache against the full one, shared by the bench and the production path: `metrics`
(kld, top1 and the rest), `probes`, `evaluator` (answers from any cache), `self_check` (query-agnostic probes) and
`estimate` (a written file's self-check, for its header)."""
