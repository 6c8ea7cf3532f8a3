"""Jobs: train, eval, generate and the embedded demo. Each is ``run_<job>(cfg) -> result``."""
