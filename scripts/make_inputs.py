"""Random q, k, v, dout as .npy files: make_inputs.py DIR BATCH SEQLEN HEADS_Q HEADS_KV HEAD_DIM."""
import os
import sys

import numpy as np

out, b, s, hq, hkv, d = sys.argv[1], *map(int, sys.argv[2:7])
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
for name, heads in [("q", hq), ("k", hkv), ("v", hkv), ("do", hq)]:
    np.save(os.path.join(out, f"{name}.npy"), rng.standard_normal((b, s, heads, d)).astype(np.float32))
print(out)
