"""`peer_failures_as_errors` relabels only failures known to come from a dead or silent peer."""

import pytest
import torch.distributed as dist

from moge.errors import DistributedError
from moge.parallel.launch import peer_failures_as_errors


@pytest.mark.parametrize("error", [RuntimeError("shape mismatch: invalid timeout value for the peer socket"),
                                   RuntimeError("CUDA out of memory"), ValueError("bad value")])
def test_other_errors_keep_their_type_and_message(error):
    with pytest.raises(type(error)) as e:
        with peer_failures_as_errors(3):
            raise error
    assert e.value is error and not isinstance(e.value, DistributedError)


@pytest.mark.parametrize("error", [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5"),
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for "
                 "recv operation to complete"),
    RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=3, OpType=ALLTOALL)"),
    dist.DistBackendError("backend failure"),
])
def test_collective_failures_become_distributed_errors(error):
    with pytest.raises(DistributedError, match=r"rank .*another rank died or did not answer within the 3 s") as e:
        with peer_failures_as_errors(3):
            raise error
    assert e.value.__cause__ is error
