"""Run 15's fit of a rank's kernel time on the mixed batch (every record of it in runs 14 and 15,
P = 2, 4, 8, placed and zigzag): least squares of the measured rank time (scaled to a 218.5 ms
one-GPU call, the runs' machines differ by a few percent) on features counted from the placement's
own blocks. Each record's placement is rebuilt with the code that made it (placement.py at 9e3ca2e
6be0c52 and ba2f6bf, taken from git) and checked against the recorded balance.
Usage (CPU, in a git clone, from the repository root): python benchmark/results/2026-12-06-run15/fit.py"""
import json, os, subprocess, sys, types
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # benchmark/
import benchmark_documents as bd


def placement_at(commit):
    """lightning_sp/core/placement.py as it was at ``commit``, its relative imports made absolute."""
    source = subprocess.run(["git", "show", f"{commit}:lightning_sp/core/placement.py"], capture_output=True,
                            text=True, check=True, cwd=HERE).stdout
    m = types.ModuleType(f"placement_{commit}")
    exec(source.replace("from .", "from lightning_sp.core."), m.__dict__)
    return m


old, seg, final = placement_at("9e3ca2e"), placement_at("6be0c52"), placement_at("ba2f6bf")
RECORDS = [("../2026-12-06-run14/documents_head.jsonl", old), ("../2026-12-06-run14/documents_final_tie1.jsonl", old),
           ("documents_6be0c52.jsonl", seg), ("documents_6be0c52_mixed_repeat.jsonl", seg),
           ("documents_final.jsonl", final), ("documents_final_mixed_repeat.jsonl", final)]
lengths, _ = bd.distribution("mixed")


def features(p, r):
    """attended pairs (M), query rows (K), key rows (K), blocks"""
    f = np.zeros(4)
    for blocks in p.step_blocks(r):
        for b in blocks:
            nq, nk = b.q_stop - b.q_start, b.k_stop - b.k_start
            pairs = (nq * nk - nq * (nq - 1) // 2 if nq <= nk else nk * (nk + 1) // 2) if b.causal else nq * nk
            f += (pairs / 1e6, nq / 1e3, nk / 1e3, 1)
    return f


X, y = [], []
for name, made_by in RECORDS:
    for line in open(os.path.join(HERE, name)):
        r = json.loads(line)
        if r.get("distribution") != "mixed" or "rank_ms" not in r:
            continue
        make = bd.spread_documents if r["layout"] == "zigzag" else made_by.place_documents
        p = make(bd.cu_seqlens(lengths), r["world"])
        assert abs(p.balance - r["balance"]) < 1e-9, (name, r["config"])
        scale = 218.5 / (r.get("single_ms") or 218.5)
        for rank, ms in enumerate(r["rank_ms"]):
            X.append(features(p, rank))
            y.append(ms * scale)
X, y = np.array(X), np.array(y)
rows = np.stack([X[:, 0], X[:, 1] + X[:, 2]], 1)
for label, A in (("pairs + blocks", X[:, [0, 3]]), ("pairs + rows (q + k)", rows), ("pairs + q rows + k rows", X[:, :3])):
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    rel = (A @ coef - y) / y
    print(f"{label:24s} ms per (M pairs, ...): {np.round(coef, 5)}  rms {np.sqrt((rel ** 2).mean()):.4f}  max {abs(rel).max():.4f}")
coef, *_ = np.linalg.lstsq(rows, y, rcond=None)
print(f"row cost in attended pairs: {coef[1] / coef[0] * 1000:.0f} (ba2f6bf's ROW_COST: {final.ROW_COST})")
