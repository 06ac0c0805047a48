"""Parallel layouts applied to an unchanged model, on torch.distributed.

    parallelize.py  `parallelize(model, plan)`: ExpertParallel(ep) and the paper's H2P layout,
                    by slicing parameters and swapping components in place (recording each slice)
    load.py         `load_parallel(directory, plan)`: a rank's share read straight from the files
    mesh.py         device meshes with named dimensions (dp x ep; attention dp x tp)
    dispatch.py     the MoE block's token dispatchers: all-to-all (EP), all-gather (H2P)
    comm.py         torch's functional collectives (with autograd) as the dispatchers use them
    expert.py       expert-sharded state: names, state dicts, gathering the whole model back
    training.py     gradient reduction for data x expert parallel training, global gradient norm
    lockstep.py     decoding in lockstep across ranks (generate's `all_done` hook)
    launch.py       process-group start-up under torchrun, timeouts that turn hangs into errors
    bench.py        `moge bench-ep`: MoGE against top-K on real expert-parallel processes
"""

from moge.parallel.load import load_parallel
from moge.parallel.parallelize import H2P, ExpertParallel, parallelize

__all__ = ["H2P", "ExpertParallel", "load_parallel", "parallelize"]
