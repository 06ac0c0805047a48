"""Expert parallelism on torch.distributed.

    mesh.py      process groups (data x expert parallel; the H2P hybrid layout) and expert placement
    comm.py      collectives with autograd (all_to_all with uneven splits, all_gather, reduce_scatter)
    dispatch.py  token dispatch to the rank that owns each expert and the combine back
    expert.py    the expert-parallel MoGE block, sharding a model in place, gathering it back
    train.py     gradient reduction for data x expert parallel training, global gradient norm
    hybrid.py    the paper's H2P inference layout (attention DP x TP, experts TP x EP, shared TP)
    launch.py    process-group start-up under torchrun, timeouts that turn hangs into errors
"""
