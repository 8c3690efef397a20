"""Client-side cost of the judge's openai backend: 50 pairs x 4 metrics (448x597 px images) through
the openai backend's generate against the fault server on 127.0.0.1 (no model: what is left is the
client, JSON, base64 and loopback HTTP). Prints pairs/s and requests/s. Run: python benchmarks/bench_judge_http.py
"""

import sys
import time

sys.path.insert(0, ".")
import numpy as np
from PIL import Image

from mlmfilter.backends.openai import INFO as OPENAI
from mlmfilter.judge.backend import JudgeRequest
from mlmfilter.judge.prompts import resolve_template
from mlmfilter.scorers.mlm import MLMOptions
from tests.support.fault_server import FaultServer

t = resolve_template("v2")
rng = np.random.RandomState(0)
img = Image.fromarray((rng.rand(448, 597, 3) * 255).astype("uint8"))
metrics = ["image_text_matching", "object_detail_fulfillment", "caption_text_quality", "semantic_understanding"]
reqs = [JudgeRequest(img, [t.render(m, f"caption {i} of a dog on grass .") for m in metrics]) for i in range(50)]
with FaultServer() as server:
    o = MLMOptions(
        model="served",
        readout="generate",
        backend="openai",
        backend_options={"base_url": server.base_url, "max_concurrency": 8},
    )
    b = OPENAI.build(o)
    t0 = time.perf_counter()
    out = b.generate(reqs)
    dt = time.perf_counter() - t0
    print(
        f"{len(reqs)} pairs x 4 prompts in {dt:.2f}s: {len(reqs) / dt:.1f} pairs/s, {4 * len(reqs) / dt:.1f} requests/s, ok={sum(not hasattr(x, 'reason') for x in out)}"
    )
    b.close()
