"""Commands beside the daemon: the planner and model sizes (`stated plan`), the demo, `stated status`,
and the proto generator."""
