"""`torchrun -m moge serve`: the model split over 2 processes, rank 0 serving HTTP and both ranks
stepping each batch together. Concurrent requests equal offline greedy generation with the whole
model, and a polite kill stops every rank cleanly."""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from models import make_model, tiny_config
from serve.test_server import Server

from moge.checkpoint import save_pretrained
from moge.inference.generate import generate

PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [40, 41, 42, 43, 44, 45, 46, 47], [2]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_model(tiny_config(max_position_embeddings=128))
    return model, save_pretrained(model, tmp_path_factory.mktemp("serve-ranks") / "ckpt")


@pytest.mark.parametrize("plan", [("--parallel", "ep"), ("--parallel", "h2p", "--attn-tp", "2")], ids=["ep", "h2p"])
def test_rank_zero_serves_and_every_rank_steps_together(checkpoint, tmp_path, plan):
    model, path = checkpoint
    log = tmp_path / "torchrun.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moge",
             "serve", "--model", str(path), "--port", "0", "--threads", "1", "--log-level", "warning",
             "--dist-timeout", "60", *plan],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1", MOGE_API_KEY=""),
            start_new_session=True)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
            time.sleep(0.1)
        assert port is not None, log.read_text()
        server = Server(port)

        def complete(prompt):
            r = server.client.completions.create(model=path.name, prompt=prompt, max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
            return r.choices[0].token_ids

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(complete, PROMPTS))
        want = [generate(model, [p], max_new_tokens=6, stop_ids=[]).tokens[0] for p in PROMPTS]
        assert got == want
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to the ranks, then exits 1 itself
        proc.wait(60)
        text = log.read_text()
        assert "[rank0]" not in text and "[rank1]" not in text, text[-3000:]  # no rank failed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
