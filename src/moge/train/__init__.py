"""Training: a run's parts (config, data, model, optim, step, checkpointing, processes and, under
torchrun, distributed), the loop that joins them (trainer), the MoGE vs top-K vs dense comparison
(compare) and the routing analyses (analysis). Post-training on the same loop: packed chat data
(packing, chat) for SFT (sft), GRPO with its rewards (rl, rewards), and the verifiable task family
the demo trains on (tasks)."""
