"""Ray glue: one module per job (config dataclass, run(cfg) -> summary, main(argv)) and the one way to reach Ray (ray_env.init_ray)."""
