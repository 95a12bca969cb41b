"""Many documents → one `.kvc` each and a manifest: `inputs` (what a command line names), `local` (one process,
one model), `on_ray` (a Ray Data job), `progress` (what a run shows)."""
