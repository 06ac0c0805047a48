"""Training: the trainer, the MoGE vs top-K vs dense comparison, routing analyses."""
