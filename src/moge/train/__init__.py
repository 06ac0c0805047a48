"""Training: a run's parts (config, data, model, optim, step, checkpointing, processes and, under
torchrun, distributed), the loop that joins them (trainer), the MoGE vs top-K vs dense comparison
(compare) and the routing analyses (analysis)."""
